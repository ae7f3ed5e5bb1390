"""AIR, Attend-Infer-Repeat (Eslami et al. 2016): count, locate and describe objects one by one.

An LSTM looks at the part of the image not yet explained (the residual canvas, as in the paper's
DAIR variant) and, for up to K steps, proposes an object: presence z_pres (Bernoulli), where
z_where = (log scale, x, y) (reparameterised Gaussian) and what z_what (Gaussian code of the
glimpse cut out at z_where). The decoder writes each object back through the inverse transform
onto an additive canvas; the likelihood is Gaussian with a fixed std (as in pyro's AIR tutorial).

Presence as a count. Under "once a step is off, later steps are off", the K presence bits are
exactly one categorical variable, the count n in 0..K, with ``log q(n) = sum_{t<=n} log p_t +
log(1 - p_{n+1})``. A single forward pass with every step on gives every prefix (step t only sees
steps before it), so the loss of every count, ``F[n]`` (likelihood of the canvas of the first n
objects plus their KLs), costs K+1 cheap likelihood evaluations. The count is handed to the
estimator as a categorical with loss ``F[n]``, so all six estimators run unchanged: score-function
ones (reinforce, nvil) see the realised cost, relaxed ones (concrete, rebar, relax) a convex
combination of the F's, and ``exact`` sums over the K+1 counts. KL(q(n) || p(n)) is analytic.

Finding the next object. Besides an MLP code of the residual, the LSTM reads spatial-softmax
keypoints of it (where the unexplained mass is, in coordinates a linear where-head can use):
without them, with some seeds, a middle step learned a fixed "mean" location and wrote a faint
ghost there while the next step found the real digit, and "once off, stays off" kept the ghost
on. The where/what networks also fit every count (``explore``), so each prefix of the steps must
explain the image on its own: strongly early on, and with a floor for good. Without the floor a
second failure grew once exploration had ended (seed 0: 1-digit scenes read as 2 went from 2 to
42 of 143 between steps 1,000 and 7,000): step 0 became a dud that writes a faint blob near the
digit while step 1 draws the digit; with q(n=2) ~ 1 nothing in the ELBO asks step 0 to explain
the digit alone (F[1] has no weight), so the dud never recovers. The correct decomposition makes
every prefix a best explanation anyway, so the floor does not pull against it.

Importance-weighted NLL: each sample draws the steps' where and what from q and sums the count
out exactly (the F[n] above with sampled log ratios instead of KLs).

Coordinates: z_where's (x, y) is the glimpse centre in the contract's [-1, 1] units (x right, y
down) and the scale is the glimpse's width as a fraction of the canvas, so ``position`` is (x, y)
directly (the conventions of :mod:`perception.nn.spatial_transformer`; the sampling itself is
:mod:`perception.nn.glimpse`'s faster axis-aligned version).

K can be raised at test time: ``encode(images, max_steps=k)`` or ``with_max_objects(k)``, which
returns a copy whose ``num_slots`` is k (the benchmark's hook for models that support it). The
copy is for inference: its estimator keeps the training K.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perception.config import CheckedConfig
from perception.contract import Encoder, EncoderOutput, ModelLoss
from perception.errors import PerceptionError
from perception.nn.blocks import gaussian_kl
from perception.nn.glimpse import cut, paste

WHERE_NAMES = ["where_scale", "where_x", "where_y"]


@dataclass
class AIRConfig(CheckedConfig):
    max_steps: int = 3  # K: objects per image (the contract's num_slots)
    glimpse_size: int = 20
    what_dim: int = 20
    hidden: int = 128  # LSTM width
    embed: int = 128  # residual-image embedding fed to the LSTM
    input_pool: int = 2  # the LSTM sees the residual average-pooled by this factor (CPU cost)
    mlp: int = 128  # glimpse encoder / decoder width
    keypoints: int = 8  # spatial-softmax keypoints of the residual fed to the LSTM (0: none)
    estimator: str = "exact"  # for the presence count (K+1 states: enumeration is cheap and exact)
    likelihood_std: float = 0.3  # Gaussian pixel likelihood on [0, 1] images
    object_size: float = 20 / 64  # prior mean of the glimpse width, fraction of the canvas
    scale_prior_std: float = 0.2  # on log scale
    shift_prior_std: float = 1.0
    pres_prior_start: float = 0.5  # geometric count prior p(step on | previous on), annealed
    pres_prior_end: float = 1e-5
    pres_anneal_steps: int = 5000  # log-linear annealing
    what_kl_weight: float = 1.0
    explore: float = 0.5  # where/what also fit every count n (mean of F[n]) with this weight...
    explore_steps: int = 3000  # ...decaying linearly over these steps...
    explore_floor: float = 0.4  # ...to this fraction of it, kept for the rest of training (explore_steps=0:
    # the floor from step 0; explore=0 or explore_floor=0 switches exploration off for good)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_steps < 1 or self.glimpse_size < 2 or self.what_dim < 1 or self.input_pool < 1:
            raise PerceptionError("air needs max_steps >= 1, glimpse_size >= 2, what_dim >= 1 and input_pool >= 1")
        if not (0 < self.pres_prior_end < 1 and 0 < self.pres_prior_start < 1):
            raise PerceptionError("air: the presence prior probabilities must lie in (0, 1)")
        if not 0.0 <= self.explore_floor <= 1.0:
            raise PerceptionError(f"air: explore_floor is a fraction of explore in [0, 1], got {self.explore_floor}")


class ObjectCode(NamedTuple):
    """What an object model returns for one step's glimpses ``[B, C, g, g]``."""

    features: Tensor  # [B, F] slot columns after the where part
    kl: Tensor  # [B] KL of the object's latents (nats)
    appearance: Tensor  # [B, C, g, g] in [0, 1], what the decoder writes
    feedback: Tensor  # [B, E] fed to the LSTM at the next step
    class_probs: Tensor | None = None  # [B, classes]
    aux_loss: Tensor | None = None  # [B] extra per-object training loss (not in the ELBO)
    log_ratio: Tensor | None = None  # [B] log p(latents) - log q(latents) at the values used
    centre: Tensor | None = None  # [B, 2] where the object sits in its glimpse (glimpse units); None: the glimpse centre


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class GaussianWhat(nn.Module):
    """AIR's object model: a small VAE of the glimpse."""

    def __init__(self, channels: int, glimpse: int, what_dim: int, width: int):
        super().__init__()
        pixels = channels * glimpse * glimpse
        self.shape = (channels, glimpse, glimpse)
        self.encoder = mlp([pixels, width, 2 * what_dim])
        self.decoder = mlp([what_dim, width, pixels])
        nn.init.constant_(self.decoder[-1].bias, -2.0)  # start dark: an empty canvas, not a grey one
        self.feature_names = [f"what_{i}" for i in range(what_dim)]
        self.feedback_dim = what_dim

    def forward(self, glimpse: Tensor, sample: bool) -> ObjectCode:
        mu, logvar = self.encoder(glimpse.flatten(1)).chunk(2, -1)
        logvar = logvar.clamp(-10.0, 10.0)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        appearance = torch.sigmoid(self.decoder(z)).view(-1, *self.shape)
        log_ratio = (-0.5 * z.pow(2) + 0.5 * (z - mu).pow(2) / logvar.exp() + 0.5 * logvar).sum(-1)
        return ObjectCode(z, gaussian_kl(mu, logvar), appearance, z, log_ratio=log_ratio)


class Steps(NamedTuple):
    """Per-step quantities stacked over K."""

    pres_logits: Tensor  # [B, K]
    where: Tensor  # [B, K, 3] (log scale, x, y), sampled or mean
    where_kl: Tensor  # [B, K]
    where_log_ratio: Tensor  # [B, K] log p(z_where) - log q(z_where) at the values used
    objects: list[ObjectCode]
    contributions: Tensor  # [B, K, C, H, W] what each step writes
    on: Tensor  # [B, K] 1 where the step is on (all ones in the training pass)
    embedding: Tensor  # [B, E] embedding of the input image (context for the estimator)


class AIR(Encoder):
    Config = AIRConfig
    name = "air"

    def __init__(self, config: AIRConfig, image_shape: tuple[int, int, int]):
        super().__init__(config, image_shape)
        c, h, w = self.image_shape
        self.objects = self.build_object_model()
        pool = config.input_pool
        self.embed = nn.Sequential(
            nn.AvgPool2d(pool), nn.Flatten(), nn.Linear(c * (h // pool) * (w // pool), config.embed), nn.ReLU()
        )
        m = config.keypoints
        self.keypoint_maps = (
            nn.Sequential(nn.AvgPool2d(pool), nn.Conv2d(c, 16, 5, padding=2), nn.ReLU(), nn.Conv2d(16, m, 5, padding=2))
            if m
            else None
        )
        self.rnn = nn.LSTMCell(config.embed + 2 * m + 3 + self.objects.feedback_dim + 1, config.hidden)
        self.pres_head = nn.Linear(config.hidden, 1)
        self.where_head = nn.Linear(config.hidden, 6)
        with torch.no_grad():  # glimpses start centred at digit size, with a small spread
            self.where_head.weight.mul_(0.1)
            self.where_head.bias.copy_(torch.tensor([math.log(config.object_size), 0, 0, -3.0, -3.0, -3.0]))
            nn.init.constant_(self.pres_head.bias, 2.0)  # start by proposing objects
        prior = torch.tensor([math.log(config.object_size), 0.0, 0.0])
        prior_std = torch.tensor([config.scale_prior_std, config.shift_prior_std, config.shift_prior_std])
        self.register_buffer("where_prior_mean", prior)
        self.register_buffer("where_prior_std", prior_std)
        from perception.estimators import build_estimator

        self.estimator = build_estimator(
            config.estimator, "categorical", num_classes=config.max_steps + 1, context_dim=config.embed
        )

    def build_object_model(self) -> nn.Module:
        cfg = self.config
        return GaussianWhat(self.image_shape[0], cfg.glimpse_size, cfg.what_dim, cfg.mlp)

    # --- contract -------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.config.max_steps

    @property
    def slot_layout(self) -> list[str]:
        return WHERE_NAMES + self.objects.feature_names

    def with_max_objects(self, k: int) -> "AIR":
        """A copy that runs ``k`` steps (inference only: the estimator keeps the training K)."""
        if k < 1:
            raise PerceptionError(f"max objects must be >= 1, got {k}")
        other = copy.deepcopy(self)
        other.config = dataclasses.replace(self.config, max_steps=int(k))
        return other

    def encode(self, images: Tensor, deterministic: bool = True, max_steps: int | None = None) -> EncoderOutput:
        steps = self.run_steps(images, max_steps or self.config.max_steps, sample=not deterministic, threshold=True)
        p = torch.sigmoid(steps.pres_logits)
        previous = torch.cat([torch.ones_like(steps.on[:, :1]), steps.on[:, :-1]], dim=1)
        where = steps.where
        scale = where[..., :1].exp()
        slots = torch.cat([scale, where[..., 1:], torch.stack([o.features for o in steps.objects], 1)], -1)
        probs = [o.class_probs for o in steps.objects]
        offsets = [o.centre for o in steps.objects]
        # the position of the object the object model read (DAIR: its digit's frame), else the box centre
        position = where[..., 1:] if offsets[0] is None else where[..., 1:] + scale * torch.stack(offsets, 1)
        return EncoderOutput(
            slots=slots,
            presence=p * previous,
            position=position,
            class_probs=None if probs[0] is None else torch.stack(probs, 1),
        )

    # --- the recurrent pass -----------------------------------------------------------------
    def run_steps(self, images: Tensor, k: int, sample: bool, threshold: bool) -> Steps:
        """K inference steps. ``threshold``: presence decides (0.5 or a sample) and once a step is
        off the rest are; else every step is on (the training pass, where the count is
        marginalised outside)."""
        n, c, h, w = images.shape
        g = self.config.glimpse_size
        canvas = torch.zeros_like(images)
        state = None
        prev_where = images.new_zeros(n, 3)
        prev_what = images.new_zeros(n, self.objects.feedback_dim)
        prev_on = images.new_ones(n, 1)
        embedding = self.embed(images)
        logits, wheres, kls, ratios, objects, contributions, ons = [], [], [], [], [], [], []
        for t in range(k):
            residual = embedding if t == 0 else self.embed(images - canvas.detach())
            if self.keypoint_maps is not None:
                residual = torch.cat([residual, self.keypoints(images - canvas.detach())], -1)
            state = self.rnn(torch.cat([residual, prev_where, prev_what, prev_on], -1), state)
            hidden = state[0]
            pres_logit = self.pres_head(hidden).squeeze(-1)
            mean, raw_std = self.where_head(hidden).chunk(2, -1)
            std = F.softplus(raw_std) + 1e-4
            where = mean + torch.randn_like(mean) * std if sample else mean
            where_kl = (
                torch.log(self.where_prior_std / std)
                + (std.pow(2) + (mean - self.where_prior_mean).pow(2)) / (2 * self.where_prior_std.pow(2))
                - 0.5
            ).sum(-1)
            ratios.append(
                (
                    torch.log(std / self.where_prior_std)
                    - 0.5 * ((where - self.where_prior_mean) / self.where_prior_std).pow(2)
                    + 0.5 * ((where - mean) / std).pow(2)
                ).sum(-1)
            )
            scale, centre = where[:, 0].exp(), where[:, 1:]
            obj = self.objects(cut(images, scale, centre, (g, g)), sample)
            contribution = paste(obj.appearance, scale, centre, (h, w))
            if threshold:
                p = torch.sigmoid(pres_logit)
                decide = torch.bernoulli(p) if sample else (p > 0.5).to(p.dtype)
                on = prev_on.squeeze(-1) * decide
            else:
                on = torch.ones_like(pres_logit)
            canvas = canvas + on.view(n, 1, 1, 1) * contribution
            logits.append(pres_logit)
            wheres.append(where)
            kls.append(where_kl)
            objects.append(obj)
            contributions.append(contribution)
            ons.append(on)
            prev_where, prev_what, prev_on = where, obj.feedback, on.unsqueeze(-1)
        return Steps(
            torch.stack(logits, 1), torch.stack(wheres, 1), torch.stack(kls, 1), torch.stack(ratios, 1), objects,
            torch.stack(contributions, 1), torch.stack(ons, 1), embedding,
        )

    def keypoints(self, residual: Tensor) -> Tensor:
        """``[N, 2M]`` expected (x, y) of each map's spatial softmax: where the unexplained
        mass is, in a form a linear where-head can read (an MLP embedding localises poorly)."""
        maps = self.keypoint_maps(residual)
        n, m, h, w = maps.shape
        weights = F.softmax(maps.flatten(2), -1).view(n, m, h, w)
        xs = (2 * torch.arange(w, dtype=maps.dtype, device=maps.device) + 1) / w - 1
        ys = (2 * torch.arange(h, dtype=maps.dtype, device=maps.device) + 1) / h - 1
        return torch.cat([(weights.sum(2) * xs).sum(-1), (weights.sum(3) * ys).sum(-1)], -1)

    # --- training ---------------------------------------------------------------------------
    def pres_prior(self, step: int) -> float:
        cfg = self.config
        frac = min(1.0, step / cfg.pres_anneal_steps) if cfg.pres_anneal_steps > 0 else 1.0
        return math.exp((1 - frac) * math.log(cfg.pres_prior_start) + frac * math.log(cfg.pres_prior_end))

    def explore_weight(self, step: int) -> float:
        cfg = self.config
        decay = max(0.0, 1.0 - step / cfg.explore_steps) if cfg.explore_steps > 0 else 0.0
        return cfg.explore * max(decay, cfg.explore_floor)

    @staticmethod
    def count_log_probs(pres_logits: Tensor) -> Tensor:
        """``[B, K+1]`` log q(n) of the count under "once off, stays off"."""
        on, off = F.logsigmoid(pres_logits), F.logsigmoid(-pres_logits)
        prefix = torch.cat([torch.zeros_like(on[:, :1]), on.cumsum(1)], 1)  # sum_{t<=n} log p_t
        stop = torch.cat([off, torch.zeros_like(off[:, :1])], 1)  # log(1 - p_{n+1}); n = K: none
        return prefix + stop

    def count_prior(self, k: int, step: int, like: Tensor) -> Tensor:
        rho = self.pres_prior(step)
        n = torch.arange(k + 1, dtype=like.dtype, device=like.device)
        return n * math.log(rho) + (n < k).to(like.dtype) * math.log1p(-rho)

    def gaussian_nll(self, mean: Tensor, images: Tensor) -> Tensor:
        """Per-image NLL (nats) of ``images`` ``[B, ..., C, H, W]`` under N(mean, std^2)."""
        s = self.config.likelihood_std
        nll = 0.5 * ((images - mean) / s).pow(2) + math.log(s) + 0.5 * math.log(2 * math.pi)
        return nll.flatten(-3).sum(-1)

    def count_costs(self, images: Tensor, contributions: Tensor, kl: Tensor) -> Tensor:
        """``[B, K+1]``: F[n] = -log p(x | first n objects) + their costs ``kl`` ``[B, K]``."""
        zero = torch.zeros_like(contributions[:, :1])
        canvases = torch.cat([zero, contributions], 1).cumsum(1)  # [B, K+1, C, H, W]
        nll = self.gaussian_nll(canvases, images.unsqueeze(1))
        return nll + torch.cat([torch.zeros_like(kl[:, :1]), kl.cumsum(1)], 1)

    def object_kls(self, steps: Steps) -> Tensor:
        object_kl = torch.stack([o.kl for o in steps.objects], 1)
        return steps.where_kl + self.config.what_kl_weight * object_kl

    def loss(self, batch: Mapping[str, Tensor], step: int) -> ModelLoss:
        loss, metrics, _, _ = self.loss_terms(batch["image"], step)
        return ModelLoss(loss.mean(), metrics)

    def loss_terms(self, x: Tensor, step: int) -> tuple[Tensor, dict[str, float], Steps, Tensor]:
        """Per-image loss ``[B]``, metrics, the steps and P(step t on) ``[B, K]``."""
        k = self.config.max_steps
        steps = self.run_steps(x, k, sample=True, threshold=False)
        costs = self.count_costs(x, steps.contributions, self.object_kls(steps))
        log_q = self.count_log_probs(steps.pres_logits)
        q = log_q.exp()
        count_kl = (q * (log_q - self.count_prior(k, step, x))).sum(-1)
        neg_elbo = (q * costs).sum(-1) + count_kl
        if self.training:
            est = self.estimator(log_q, lambda s: (s * costs).sum(-1), context=steps.embedding, broadcasts=True)
            loss = est.surrogate + count_kl
            loss = loss + self.explore_weight(step) * costs.mean(-1)
        else:  # evaluation: the exact expectation over counts, no estimator needed
            loss = neg_elbo
        on_prob = log_q.new_ones(()) - log_q[:, :-1].exp().cumsum(1)  # P(step t on) = P(n >= t+1)
        aux = [o.aux_loss for o in steps.objects]
        if aux[0] is not None:
            loss = loss + (torch.stack(aux, 1) * on_prob.detach()).sum(1)
        metrics = {
            "neg_elbo": neg_elbo.mean().item(),
            "count_kl": count_kl.mean().item(),
            "expected_count": (q * torch.arange(k + 1, dtype=x.dtype, device=x.device)).sum(-1).mean().item(),
            "pres_prior": self.pres_prior(step),
        }
        return loss, metrics, steps, on_prob

    def importance_weighted_nll(self, images: Tensor, num_samples: int, batch: int = 100) -> Tensor:
        """IWAE bound ``-log (1/S sum_s p(x, z_s) / q(z_s | x))`` in nats per image, ``[N]``, at the
        final count prior. Each sample draws every step's where / what from q; the presence
        configuration is summed out exactly (sum over s of p(config) p(x | objects on) times the
        on objects' prior / posterior ratios), which is the importance weight of the steps'
        latents with the configuration marginalised, so it needs no presence sample."""
        k = self.config.max_steps
        out = []
        for start in range(0, len(images), batch):
            x = images[start : start + batch]
            prior = self.count_prior(k, 10**12, x)
            log_w = []
            for _ in range(num_samples):
                steps = self.run_steps(x, k, sample=True, threshold=False)
                ratio = steps.where_log_ratio + torch.stack([o.log_ratio for o in steps.objects], 1)
                log_w.append(torch.logsumexp(prior - self.count_costs(x, steps.contributions, -ratio), -1))
            out.append(-(torch.logsumexp(torch.stack(log_w), 0) - math.log(num_samples)))
        return torch.cat(out)

    # --- pictures -----------------------------------------------------------------------------
    def visualize(self, images: Tensor) -> dict[str, Tensor]:
        from perception.train.images import draw_boxes

        k = self.config.max_steps
        steps = self.run_steps(images, k, sample=False, threshold=True)
        on = steps.on
        recon = (steps.contributions * on[..., None, None, None]).sum(1).clamp(0, 1)
        _, _, h, w = images.shape
        scale = steps.where[..., 0].exp()
        cx, cy = (steps.where[..., 1] + 1) * w / 2, (steps.where[..., 2] + 1) * h / 2
        half_w, half_h = scale * w / 2, scale * h / 2
        boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1)
        rows = {"input": images, "reconstruction": draw_boxes(recon, boxes, on > 0.5)}
        for t in range(k):
            rows[f"step_{t}"] = steps.contributions[:, t].clamp(0, 1) * on[:, t, None, None, None]
        return rows
