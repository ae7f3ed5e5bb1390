"""D-VAE: a categorical latent whose decoder is one learned prototype image per class.

q(c|x) is a small conv classifier, p(c) is uniform over L classes and p(x|c) is a Bernoulli
image whose pixel probabilities *are* prototype c, so the prototypes are directly viewable
(:meth:`DVAE.prototypes`). Minimising -ELBO = E_q[-log p(x|c)] + KL(q(c|x) || uniform) is a
soft k-means under the Bernoulli likelihood; the expectation over c goes through the
configured discrete estimator.

Plain training falls into the local minima of k-means (thesis: duplicate prototypes, noise
prototypes that no image picks). Three remedies, all on by default and all switchable so the
benchmark can show their effect (docs/results/clustering.md):

* ``init="kmeans++"``: the first training batch seeds the prototypes by k-means++ (distant
  digits, not random noise), so every class starts as a plausible, distinct image;
* ``balance``: a penalty ``log L - H(mean_batch q(c|x))`` that keeps every class in use, decayed
  linearly to 0 over ``warmup_steps`` so the final objective is the plain ELBO;
* split-and-merge moves (``split_every``/``split_until``): the most redundant prototype is
  re-seeded on one half of a 2-means split of another cluster when that lowers the cost of
  recent training images; no moves after ``split_until``, so training ends on the plain ELBO.

``encode`` reads the class from the amortised classifier (``class_inference="classifier"``, the
default: it exports to ONNX within tolerance and is what training optimises) or by enumerating
the L classes with their inferred transforms (``"posterior"``: ~1 point more accurate on MNIST,
but its near-tied probabilities move ~3e-4 between torch and onnxruntime, so export refuses it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perception.contract import Encoder, EncoderOutput, ModelLoss
from perception.errors import PerceptionError
from perception.nn.blocks import conv_encoder
from perception.nn.prototype_split import removal_costs, two_means

PROB_EPS = 1e-4  # keeps log p(x|c) finite where a prototype pixel reaches exactly 0 or 1
SPLIT_EPS = 1e-3  # candidate prototypes from pixel means are clamped to [eps, 1 - eps]
INITS = ("kmeans++", "random")
CLASS_INFERENCE = ("posterior", "classifier")


@dataclass
class DVAEConfig:
    num_classes: int = 10
    estimator: str = "exact"
    channels: int = 32
    hidden: int = 128
    init: str = "kmeans++"  # prototypes from the first batch by k-means++, or "random" logits
    prototype_lr: float = 10.0  # prototype learning-rate multiplier: pixels move in a few steps
    balance: float = 30.0  # weight (nats) of the class-usage penalty at step 0: comparable to the
    # NLL gaps between prototypes, else the best prototype for the average digit takes every image
    warmup_steps: int = 600  # steps over which the balance weight decays to 0
    # Split-and-merge moves (perception/nn/prototype_split.py): every split_every training steps
    # up to split_until, try replacing the most redundant prototype by one half of a 2-means
    # split of another cluster; kept only if the probe batch's cost falls by split_min_gain nats
    # per image. The probe is the last probe_batches training batches.
    split_every: int = 100  # 0: never
    split_until: int = 1600  # the benchmark trains 2400 steps: the last third is plain ELBO
    split_min_gain: float = 0.5
    probe_batches: int = 8
    # How encode() reads the class: "classifier" is the amortised q(c|x) trained by the ELBO;
    # "posterior" enumerates the L classes, p(c|x) proportional to p(x|c, z_c) exp(-KL_z_c) with
    # each class's inferred transform, which removes the classifier's amortisation gap but
    # compares ~100-nat likelihoods, so float32 noise between runtimes exceeds the export tolerance.
    class_inference: str = "classifier"


class PrototypeBank(nn.Module):
    """L learnable images stored as logits; the optimiser gives them their own learning rate."""

    def __init__(self, num: int, shape: tuple[int, int, int], lr_scale: float):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(num, *shape) * 0.5 - 2.0)
        self.lr_scale = lr_scale
        self.register_buffer("seeded", torch.zeros((), dtype=torch.bool))

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [self.logits], "lr": lr * self.lr_scale}]

    def probs(self) -> Tensor:
        return torch.sigmoid(self.logits)

    @torch.no_grad()
    def seed_kmeanspp(self, images: Tensor) -> None:
        """k-means++ seeding (D^2 sampling) on a batch; images are softened towards the batch
        mean so no pixel starts saturated."""
        n, num = images.shape[0], self.logits.shape[0]
        flat = images.flatten(1)
        chosen = [int(torch.randint(n, ()).item())]
        dist = (flat - flat[chosen[0]]).pow(2).sum(1)
        for _ in range(1, num):
            if n <= len(chosen) or float(dist.sum()) <= 0:
                chosen.append(int(torch.randint(n, ()).item()))
            else:
                chosen.append(int(torch.multinomial(dist, 1).item()))
            dist = torch.minimum(dist, (flat - flat[chosen[-1]]).pow(2).sum(1))
        self.logits.copy_(soft_logits(images[chosen], images))
        self.seeded.fill_(True)


def soft_logits(picked: Tensor, batch: Tensor) -> Tensor:
    """Prototype logits from data images, softened towards the batch mean so that no pixel
    starts saturated (a saturated pixel has no gradient)."""
    return torch.logit((0.7 * picked + 0.3 * batch.mean(0, keepdim=True)).clamp(0.02, 0.98))


def bernoulli_nll_probs(probs: Tensor, target: Tensor) -> Tensor:
    """Per-image -log p(target | probs) in nats, summed over pixels."""
    p = probs.clamp(PROB_EPS, 1.0 - PROB_EPS)
    return -(target * p.log() + (1.0 - target) * (1.0 - p).log()).flatten(1).sum(1)


def mix(weights: Tensor, placed: Tensor) -> Tensor:
    """``sum_l weights[n, l] * placed[n, l]``: [N, L] x [N or 1, L, C, H, W] -> [N, C, H, W]."""
    return (weights[:, :, None, None, None] * placed).sum(1)


def categorical_kl_uniform(logits: Tensor) -> Tensor:
    """KL(softmax(logits) || uniform) per row."""
    logq = F.log_softmax(logits, dim=-1)
    return (logq.exp() * logq).sum(-1) + math.log(logits.shape[-1])


class DVAE(Encoder):
    Config = DVAEConfig
    name = "dvae"
    default_dataset = "mnist"

    def __init__(self, config: DVAEConfig, image_shape: tuple[int, int, int]):
        super().__init__(config, image_shape)
        if config.num_classes < 2:
            raise PerceptionError(f"num_classes must be at least 2, got {config.num_classes}")
        if config.init not in INITS:
            raise PerceptionError(f"unknown prototype init '{config.init}'; valid: {', '.join(INITS)}")
        if config.class_inference not in CLASS_INFERENCE:
            raise PerceptionError(
                f"unknown class_inference '{config.class_inference}'; valid: {', '.join(CLASS_INFERENCE)}"
            )
        from perception.estimators import build_estimator

        c, h, _ = self.image_shape
        self.features, n_features = conv_encoder(c, h, config.channels)
        self.to_hidden = nn.Sequential(nn.Linear(n_features, config.hidden), nn.ReLU())
        self.to_logits = nn.Linear(config.hidden, config.num_classes)
        self.bank = PrototypeBank(config.num_classes, self.image_shape, config.prototype_lr)
        self.estimator = build_estimator(
            config.estimator, "categorical", num_classes=config.num_classes, context_dim=config.hidden
        )
        self._probe: list[Tensor] = []  # recent training batches for split-and-merge (not saved)
        self.moves = 0  # accepted split-and-merge moves in this process

    # --- contract -------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return 1

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def transform_names(self) -> list[str]:
        return []

    @property
    def slot_layout(self) -> list[str]:
        return self.transform_names + [f"class_{i}" for i in range(self.num_classes)]

    def prototypes(self) -> Tensor:
        """The L prototype images ``[L, C, H, W]`` in [0, 1]."""
        return self.bank.probs()

    def hidden(self, images: Tensor) -> Tensor:
        return self.to_hidden(self.features(images))

    def transform(
        self, images: Tensor, hidden: Tensor, deterministic: bool, step: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per class: (transform params [N, L, T], their KL [N, L]); ``step`` is the training
        step (None outside training)."""
        n, num = images.shape[0], self.num_classes
        return images.new_zeros(n, num, 0), images.new_zeros(n, num)

    def placed(self, params: Tensor) -> Tensor:
        """Every prototype as it would appear in each image: ``[N or 1, L, C, H, W]``."""
        return self.prototypes().unsqueeze(0)

    def render(self, weights: Tensor, params: Tensor) -> Tensor:
        """Pixel probabilities of the prototype mixture ``weights`` [N, L] (one-hot or relaxed)."""
        return mix(weights, self.placed(params))

    def position(self, params: Tensor) -> Tensor:
        return params.new_zeros(params.shape[0], 1, 2)

    def aligned(self, images: Tensor, params: Tensor) -> Tensor:
        """Images brought into a prototype's own frame (``params`` ``[N, T]`` of that class)."""
        return images

    def place_one(self, proto: Tensor, params: Tensor) -> Tensor:
        """One prototype ``[C, H, W]`` as it would appear in the images of ``params`` ``[N, T]``."""
        return proto.expand(params.shape[0], *proto.shape)

    def class_rows(self) -> list[Tensor]:
        """Parameters whose first dimension (after a reshape) indexes the classes."""
        return [self.to_logits.weight, self.to_logits.bias]

    @torch.no_grad()
    def copy_class(self, src: int, dst: int) -> None:
        for p in self.class_rows():
            rows = p.view(self.num_classes, -1)
            rows[dst] = rows[src]

    def costs(self, images: Tensor, params: Tensor, kl_z: Tensor, placed: Tensor | None = None) -> Tensor:
        """``[N, L]``: -log p(x|c, z_c) + KL(q(z_c|x) || p(z)) for every class c (``placed``:
        :meth:`placed` of ``params`` when already computed)."""
        placed = self.placed(params) if placed is None else placed
        placed = placed.expand(images.shape[0], *placed.shape[1:])
        target = images.unsqueeze(1).expand_as(placed)
        return bernoulli_nll_probs(placed.flatten(0, 1), target.flatten(0, 1)).view(images.shape[0], -1) + kl_z

    def class_logits(self, images: Tensor, deterministic: bool = True) -> tuple[Tensor, Tensor]:
        """(class logits [N, L] as ``class_inference`` reads them, transform params [N, L, T])."""
        hidden = self.hidden(images)
        params, kl_z = self.transform(images, hidden, deterministic)
        if self.config.class_inference == "classifier":
            return self.to_logits(hidden), params
        return -self.costs(images, params, kl_z), params

    def encode(self, images: Tensor, deterministic: bool = True) -> EncoderOutput:
        logits, params = self.class_logits(images, deterministic)
        if deterministic:
            cls = logits.argmax(-1)
        else:
            cls = torch.distributions.Categorical(logits=logits).sample()
        one_hot = F.one_hot(cls, self.num_classes).to(images.dtype)
        n = images.shape[0]
        params = params[torch.arange(n, device=images.device), cls]  # the chosen class's transform
        return EncoderOutput(
            slots=torch.cat([params, one_hot], dim=-1).unsqueeze(1),
            presence=images.new_ones(n, 1),
            position=self.position(params),
            class_probs=logits.softmax(-1).unsqueeze(1),
        )

    # --- training -------------------------------------------------------------------------
    def balance_weight(self, step: int) -> float:
        cfg = self.config
        if cfg.balance <= 0 or step >= cfg.warmup_steps:
            return 0.0
        return cfg.balance * (1.0 - step / cfg.warmup_steps)

    @torch.no_grad()
    def split_and_merge(self, x: Tensor) -> float:
        """Try one move on the probe images ``x``; returns the accepted gain in nats per image
        (0 if rejected). Removal of prototype ``drop`` frees a class; cluster ``s`` is split by
        2-means of its members in ``s``'s frame into ``s`` and ``drop``, which inherits ``s``'s
        classifier and transform rows, so both start with half of ``s``'s images."""
        n, num = x.shape[0], self.num_classes
        params, kl_z = self.transform(x, self.hidden(x), deterministic=True)
        cost = self.costs(x, params, kl_z)
        assign = cost.argmin(1)
        drop = int(removal_costs(cost).argmin())

        def column(proto: Tensor, s: int) -> Tensor:
            return bernoulli_nll_probs(self.place_one(proto.clamp(SPLIT_EPS, 1 - SPLIT_EPS), params[:, s]), x) + kl_z[:, s]

        best_gain, best = 0.0, None
        for s in range(num):
            members = assign == s
            if s == drop or int(members.sum()) < 4:
                continue
            frame = self.aligned(x[members], params[members, s])
            one = column(frame.mean(0), s)
            halves = two_means(frame.flatten(1)).view(2, *frame.shape[1:])
            refreshed, split = cost.clone(), cost.clone()
            refreshed[:, s] = one  # the fair baseline: s re-fitted to its members, unsplit
            split[:, s], split[:, drop] = column(halves[0], s), column(halves[1], s)
            before = min(float(cost.min(1).values.sum()), float(refreshed.min(1).values.sum()))
            gain = (before - float(split.min(1).values.sum())) / n
            if gain > best_gain:
                best_gain, best = gain, (s, halves)
        if best is None or best_gain < self.config.split_min_gain:
            return 0.0
        s, halves = best
        logits = torch.logit(halves.clamp(SPLIT_EPS, 1 - SPLIT_EPS))
        self.bank.logits[s], self.bank.logits[drop] = logits[0], logits[1]
        self.copy_class(s, drop)
        self.moves += 1
        return best_gain

    def loss(self, batch: Mapping[str, Tensor], step: int) -> ModelLoss:
        x = batch["image"]
        if self.training and self.config.init == "kmeans++" and not bool(self.bank.seeded):
            self.bank.seed_kmeanspp(x)
        cfg = self.config
        if self.training and cfg.split_every > 0 and step < cfg.split_until:
            self._probe = (self._probe + [x.detach()])[-cfg.probe_batches :]
            if step > 0 and step % cfg.split_every == 0:
                self.split_and_merge(torch.cat(self._probe))
        hidden = self.hidden(x)
        logits = self.to_logits(hidden)
        params, kl_z = self.transform(x, hidden, deterministic=False, step=step if self.training else None)
        placed = self.placed(params)  # warped once; every class sample is a mixture of these

        def nll_of(sample: Tensor) -> Tensor:  # -log p(x|c, z_c) + KL(q(z_c|x) || p(z))
            return bernoulli_nll_probs(mix(sample, placed), x) + (sample * kl_z).sum(-1)

        est = self.estimator(logits, nll_of, context=hidden.detach())
        kl_c = categorical_kl_uniform(logits)
        loss = est.surrogate.mean() + kl_c.mean()
        usage = logits.softmax(-1).mean(0)
        usage_gap = math.log(self.num_classes) + (usage * usage.clamp_min(1e-12).log()).sum()
        weight = self.balance_weight(step)
        if weight:
            loss = loss + weight * usage_gap

        with torch.no_grad():  # exact expectation over classes for the reported ELBO
            q = logits.softmax(-1)
            expected_nll = (q * (self.costs(x, params, kl_z, placed.detach()) - kl_z)).sum(-1)
            kl = kl_c + (q * kl_z).sum(-1)
        metrics = {
            "neg_elbo": (expected_nll + kl).mean().item(),
            "nll": expected_nll.mean().item(),
            "kl": kl.mean().item(),
            "kl_class": kl_c.mean().item(),
            "usage_gap": usage_gap.item(),
        }
        if self.training and cfg.split_every > 0:
            metrics["split_moves"] = float(self.moves)  # accepted so far in this process
        return ModelLoss(loss, metrics)

    def reconstruct(self, images: Tensor) -> Tensor:
        logits, params = self.class_logits(images)
        return self.render(F.one_hot(logits.argmax(-1), self.num_classes).to(images.dtype), params)

    def visualize(self, images: Tensor) -> dict[str, Tensor]:
        rows = {"input": images, "reconstruction": self.reconstruct(images)}
        protos = self.prototypes()
        n = images.shape[0]
        for start in range(0, self.num_classes, n):  # prototypes, n per row
            chunk = protos[start : start + n]
            pad = chunk.new_zeros(n - chunk.shape[0], *chunk.shape[1:])
            rows[f"prototypes_{start}"] = torch.cat([chunk, pad])
        return rows
