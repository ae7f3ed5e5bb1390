"""LAVAE: a location-appearance VAE (Dittadi & Winther 2019, "LAVAE: Disentangling Location
and Appearance").

Generative model: ``n ~ Cat(pi)`` over ``0..max_objects`` (pi learned); ``n`` locations drawn
uniformly *without replacement* from the ``D = H * W`` pixels; an appearance ``z_i ~ N(0, I)``
per object; one shared MLP decodes every ``z_i`` into a small sprite of non-negative intensities,
each sprite is convolved with its one-hot location map (so its centre lands on the location
pixel), the placed sprites are summed with a learned background level ``T`` and squashed to a
pixel probability ``1 - exp(-T)`` (a noisy-OR: one sprite alone is exactly ``sigmoid`` of its
logits). Bernoulli likelihood (binarised data) or, optionally, Gaussian with a fixed std.

Inference is fully convolutional: a small U-Net gives one location logit and appearance
posterior parameters per pixel. The location logits are the network's output times ``log D``,
so that a unit of network output can separate a peak from the ``D`` background pixels whatever
the canvas size. Locations are drawn one after another from the categorical over pixels, each
time masking out a ``peak_window`` square around the earlier draws (``peak_window=1`` masks the
pixel itself, as in the paper; the default 9 stops a second draw from landing on the same
object, and a secondary mode a few pixels from an object's peak from counting as a second object:
with a 5x5 window one seed in two over-counted 0.9% of the scenes that way). The appearance
posterior is read from the feature map at the drawn location (a relaxed location reads a
weighted average), and reparameterised.

Counting (documented rule): the number of objects is the number of local maxima of the location
logit map (maxima of a ``peak_window`` x ``peak_window`` neighbourhood) whose logit exceeds
``threshold`` (default 0), capped at ``max_objects``. To make that rule trainable, the posterior
over ``n`` is built from the sorted peak logits ``l_(1) >= l_(2) >= ...``:
``q(n >= k) = sigmoid((l_(k) - threshold) / log D)``; its median is exactly the rule above. The
expectation over ``n`` (``max_objects + 1`` values) is computed exactly, which is cheap because
every prefix of the drawn objects is one more partial sum of the canvas. Deterministic encoding
returns the peaks themselves (argmax locations, appearance means).

Estimators: the ``max_objects`` location draws are handed to the estimator as one
``[B, max_objects, D]`` categorical whose row ``i`` is masked by the earlier rows' draws. The
masks are fixed by a first pass that draws exactly the noise the estimator will draw next (the
RNG is forked), so the estimator's hard rows coincide with the sequential without-replacement
draws. Concrete (default, the paper's Gumbel-softmax), REBAR, RELAX, REINFORCE and NVIL run;
``exact`` would enumerate ``D ** max_objects`` joint locations and refuses unless that is at
most 4096 (tiny images).

Warm-up (``warmup_steps``): for the first steps an auxiliary ``KL(t || q(first location))``
pulls the location softmax towards a map ``t`` peaked where a sprite-sized window holds the most
foreground, fading out between ``warmup_steps`` and twice that (see :meth:`LAVAE._kl_map`).
``warmup_single_object`` also forces ``n = 1`` on the same schedule, as the paper does.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perception.config import CheckedConfig
from perception.contract import Encoder, EncoderOutput, ModelLoss
from perception.errors import PerceptionError
from perception.estimators import build_estimator
from perception.estimators import distributions as dist
from perception.nn.blocks import LOG_2PI, gaussian_kl
from perception.nn.sprites import place_by_convolution, place_by_index

MASKED = -1e4  # logit of a masked-out pixel: probability exactly 0 in float32, finite gradients
EXACT_MAX_STATES = 4096  # the exact estimator's default enumeration limit


@dataclass
class LAVAEConfig(CheckedConfig):
    max_objects: int = 3
    appearance_dim: int = 10
    sprite_size: int = 15  # odd, so the sprite centre is a pixel; 15 for the lavae preset
    channels: int = 48
    hidden: int = 256
    estimator: str = "concrete"
    threshold: float = 0.0  # on the location logits; see the counting rule above
    peak_window: int = 9  # odd; local-maximum neighbourhood and suppression square
    likelihood: str = "bernoulli"  # or "gaussian" (grayscale), with std gaussian_std
    gaussian_std: float = 0.1
    warmup_steps: int = 200  # KL-map warm-up: full weight until here, fading out by twice this
    warmup_single_object: bool = False  # also force n = 1 during the warm-up (the paper's second warm-up)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_objects < 1:
            raise PerceptionError(f"lavae: max_objects must be >= 1, got {self.max_objects}")
        if self.sprite_size < 1 or self.sprite_size % 2 == 0:
            raise PerceptionError(f"lavae: sprite_size must be a positive odd number, got {self.sprite_size}")
        if self.peak_window < 1 or self.peak_window % 2 == 0:
            raise PerceptionError(f"lavae: peak_window must be a positive odd number, got {self.peak_window}")
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise PerceptionError(f"lavae: unknown likelihood '{self.likelihood}'; valid: bernoulli, gaussian")


class LocationAppearanceNet(nn.Module):
    """Fully convolutional: a location logit and appearance (mean, log-variance) per pixel.

    The trunk works on 4x4 pixel cells (space-to-depth), 3x cheaper on a CPU than a
    full-resolution U-Net, and gives every cell 16 sub-pixel outputs (depth-to-space), so a
    peak can still sit on any pixel. Receptive field 44 pixels: a whole 20x20 digit.

    Training reads whole maps (:meth:`forward`); deterministic inference needs only the location
    map and the appearance at K peaks (:meth:`location_logits`, :meth:`appearance_at`), which
    skips 95% of the head and the depth-to-space of the appearance maps (the costliest op of the
    exported graph).
    """

    CELL = 4

    def __init__(self, in_channels: int, channels: int, appearance_dim: int):
        super().__init__()
        c, cells = channels, self.CELL**2
        self.appearance_dim = appearance_dim
        self.net = nn.Sequential(
            nn.Conv2d(in_channels * cells, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, cells * (1 + 2 * appearance_dim), 1),
        )
        nn.init.zeros_(self.net[-1].bias)

    def features(self, x: Tensor) -> Tensor:
        """Trunk features per cell ``[B, c, H/4, W/4]``."""
        # space-to-depth by reshapes (nn.PixelUnshuffle is several times slower on a CPU)
        _, c, h, w = x.shape
        k = self.CELL
        cells = x.reshape(-1, c, h // k, k, w // k, k).permute(0, 1, 3, 5, 2, 4).reshape(-1, c * k * k, h // k, w // k)
        return self.net[:-1](cells)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _, _, h, w = x.shape
        k = self.CELL
        out = self.net[-1](self.features(x))  # channel = output * 16 + sub-pixel (row * 4 + column)
        out = out.reshape(-1, out.shape[1] // (k * k), k, k, h // k, w // k).permute(0, 1, 4, 2, 5, 3)
        out = out.reshape(-1, out.shape[1], h, w)
        return out[:, 0], out[:, 1:]  # [B, H, W], [B, 2Z, H, W]

    def location_logits(self, features: Tensor) -> Tensor:
        """The location map ``[B, H, W]`` of :meth:`forward`, from the head's 16 location rows
        only (depth-to-space of 1 channel instead of 21)."""
        head, k = self.net[-1], self.CELL
        out = F.conv2d(features, head.weight[: k * k], head.bias[: k * k])  # [B, 16 sub-pixels, H/4, W/4]
        _, _, h, w = out.shape
        return out.reshape(-1, k, k, h, w).permute(0, 3, 1, 4, 2).reshape(-1, h * k, w * k)

    def appearance_at(self, features: Tensor, cell: Tensor, sub: Tensor) -> Tensor:
        """Appearance means ``[B, K, Z]`` at the pixels in flat cell ``cell`` ``[B, K]``,
        sub-pixel ``sub`` ``[B, K]``: the head applied at those K cells only."""
        head, k, z = self.net[-1], self.CELL**2, self.appearance_dim
        f = features.flatten(2).gather(2, cell.unsqueeze(1).expand(-1, features.shape[1], -1)).transpose(1, 2)
        params = F.linear(f, head.weight[k : k * (1 + z), :, 0, 0], head.bias[k : k * (1 + z)])
        params = params.reshape(*cell.shape, z, k)  # [B, K, Z, 16 sub-pixels]
        return params.gather(3, sub[:, :, None, None].expand(-1, -1, z, 1)).squeeze(3)


class SpriteDecoder(nn.Module):
    """One MLP shared by every object: appearance -> non-negative sprite intensities."""

    def __init__(self, appearance_dim: int, hidden: int, channels: int, size: int):
        super().__init__()
        self.shape = (channels, size, size)
        self.net = nn.Sequential(
            nn.Linear(appearance_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, channels * size * size),
        )

    def forward(self, z: Tensor) -> Tensor:
        return F.softplus(self.net(z)).reshape(*z.shape[:-1], *self.shape)


def local_maxima(logits: Tensor, window: int, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest local maxima of ``[B, H, W]`` maps: (values ``[B, k]`` sorted
    descending, flat indices ``[B, k]``). A pixel is a local maximum when it is the largest
    of its ``window`` x ``window`` neighbourhood (ties count). With fewer than ``k`` maxima
    (tiny images) the rest are arbitrary non-maxima, whose values are still their own logits."""
    r = window // 2
    pooled = F.max_pool2d(logits.unsqueeze(1), (1, window), stride=1, padding=(0, r))  # separable: cheaper
    pooled = F.max_pool2d(pooled, (window, 1), stride=1, padding=(r, 0)).squeeze(1)
    peaks = torch.where(logits >= pooled, logits, torch.full_like(logits, -math.inf)).flatten(1)
    index = peaks.topk(k, dim=1).indices
    return logits.flatten(1).gather(1, index), index


def count_objects(logits: Tensor, threshold: float, window: int, max_objects: int) -> Tensor:
    """The counting rule: local maxima of the location logits above ``threshold`` (``[B]``)."""
    values, _ = local_maxima(logits, window, max_objects)
    return (values > threshold).sum(1)


def suppress(mask: Tensor, index: Tensor, shape: tuple[int, int], window: int) -> Tensor:
    """``mask`` ``[B, D]`` bool with the ``window`` square around each ``index`` ``[B]`` set."""
    h, w = shape
    r = window // 2
    y, x = torch.div(index, w, rounding_mode="floor"), index % w
    rows = (torch.arange(h, device=index.device) - y[:, None]).abs() <= r  # [B, H]
    cols = (torch.arange(w, device=index.device) - x[:, None]).abs() <= r  # [B, W]
    return mask | (rows[:, :, None] & cols[:, None, :]).reshape(-1, h * w)


def sequential_masks(logits: Tensor, noise: Tensor, shape: tuple[int, int], window: int) -> tuple[Tensor, Tensor]:
    """Draw ``K`` locations one after another without replacement (Gumbel-max with uniform
    ``noise`` ``[B, K, D]``), masking a ``window`` square around each earlier draw.

    Returns (masked logits ``[B, K, D]``, row ``i`` masked by draws ``< i``; indices ``[B, K]``).
    The hard sample of row ``i`` under the same noise is index ``i``.
    """
    mask = torch.zeros_like(logits, dtype=torch.bool)
    rows, picks = [], []
    for i in range(noise.shape[1]):
        row = logits.masked_fill(mask, MASKED)
        pick = dist.perturb("categorical", row.detach(), noise[:, i]).argmax(-1)
        rows.append(row)
        picks.append(pick)
        mask = suppress(mask, pick, shape, window)
    return torch.stack(rows, 1), torch.stack(picks, 1)


class LAVAE(Encoder):
    Config = LAVAEConfig
    name = "lavae"
    default_dataset = "multi-mnist-lavae"

    def __init__(self, config: LAVAEConfig, image_shape: tuple[int, int, int]):
        super().__init__(config, image_shape)
        c, h, w = self.image_shape
        cell = LocationAppearanceNet.CELL
        if h % cell or w % cell:
            raise PerceptionError(f"lavae: image height and width must be multiples of {cell}, got {h}x{w}")
        self.num_pixels = h * w
        if config.estimator == "exact" and self.num_pixels**config.max_objects > EXACT_MAX_STATES:
            raise PerceptionError(
                f"lavae: the exact estimator would enumerate {self.num_pixels}^{config.max_objects} joint "
                f"locations (limit {EXACT_MAX_STATES}); use concrete (default), rebar, relax, nvil or reinforce"
            )
        self.log_d = math.log(self.num_pixels)
        self.net = LocationAppearanceNet(c, config.channels, config.appearance_dim)
        self.decoder = SpriteDecoder(config.appearance_dim, config.hidden, c, config.sprite_size)
        self.background = nn.Parameter(torch.tensor(-4.0))  # background logit: p = sigmoid(-4)
        self.count_prior_logits = nn.Parameter(torch.zeros(config.max_objects + 1))
        self.estimator = build_estimator(config.estimator, "categorical", num_classes=self.num_pixels)
        # per-pixel lookups, one gather each in the exported graph instead of index arithmetic
        y, x = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
        position = torch.stack([(x.float() + 0.5) * (2.0 / w) - 1.0, (y.float() + 0.5) * (2.0 / h) - 1.0], -1)
        self.register_buffer("pixel_position", position, persistent=False)  # [D, 2]
        self.register_buffer("pixel_cell", (y // cell) * (w // cell) + x // cell, persistent=False)
        self.register_buffer("pixel_sub", (y % cell) * cell + x % cell, persistent=False)

    # --- contract -------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.config.max_objects

    @property
    def slot_layout(self) -> list[str]:
        return ["where_x", "where_y"] + [f"what_{i}" for i in range(self.config.appearance_dim)]

    def with_max_objects(self, k: int) -> "LAVAE":
        """A copy that may find up to ``k`` objects (test-time generalisation): the detector is
        convolutional, so only the count prior needs new entries; counts never seen in training
        get the smallest learned prior logit."""
        if k < 1:
            raise PerceptionError(f"lavae: max_objects must be >= 1, got {k}")
        new = copy.deepcopy(self)
        new.config = dataclasses.replace(self.config, max_objects=int(k))
        old = self.count_prior_logits.detach()
        pad = old.min().expand(max(0, k + 1 - old.numel()))
        new.count_prior_logits = nn.Parameter(torch.cat([old[: k + 1], pad]).clone())
        return new

    # --- inference pieces -----------------------------------------------------------------
    def _posterior(self, x: Tensor) -> dict[str, Tensor]:
        raw, appearance = self.net(x)
        logits = raw * self.log_d  # [B, H, W]
        cfg = self.config
        peaks, _ = local_maxima(logits, cfg.peak_window, cfg.max_objects)
        at_least = torch.sigmoid((peaks - cfg.threshold) / self.log_d)  # q(n >= k), k = 1..M
        ones, zeros = torch.ones_like(at_least[:, :1]), torch.zeros_like(at_least[:, :1])
        count_probs = torch.cat([ones, at_least], 1) - torch.cat([at_least, zeros], 1)  # q(n = k)
        return {
            "logits": logits.flatten(1),
            "appearance": appearance.flatten(2),  # [B, 2Z, D]
            "at_least": at_least,
            "count_probs": count_probs.clamp_min(0.0),
        }

    def _appearance(self, post: dict[str, Tensor], where: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar) ``[B, K, Z]`` at one-hot or relaxed locations ``[B, K, D]``."""
        params = torch.einsum("bkd,bzd->bkz", where, post["appearance"])
        mu, logvar = params.chunk(2, -1)
        return mu, logvar.clamp(-8.0, 6.0)

    def _appearance_at(self, post: dict[str, Tensor], index: Tensor) -> tuple[Tensor, Tensor]:
        """Same as :meth:`_appearance` for flat indices ``[B, K]`` (a gather, no D-sized product)."""
        a = post["appearance"]
        params = a.gather(2, index.unsqueeze(1).expand(-1, a.shape[1], -1)).transpose(1, 2)
        mu, logvar = params.chunk(2, -1)
        return mu, logvar.clamp(-8.0, 6.0)

    def _position(self, index: Tensor) -> Tensor:
        """Pixel centres of flat indices ``[...]`` in +-1 units ``[..., 2]``."""
        return self.pixel_position[index]

    def _detect(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Deterministic inference, without the full appearance maps: (trunk features, peak
        logits ``[B, K]``, peak indices ``[B, K]``)."""
        features, logits = self._location_logits(images)
        peaks, index = local_maxima(logits, self.config.peak_window, self.config.max_objects)
        return features, peaks, index

    def _location_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(trunk features, location logits ``[B, H, W]``) without the appearance maps."""
        features = self.net.features(images)
        return features, self.net.location_logits(features) * self.log_d

    def _mean_appearance(self, features: Tensor, index: Tensor) -> Tensor:
        return self.net.appearance_at(features, self.pixel_cell[index], self.pixel_sub[index])

    # --- likelihood -------------------------------------------------------------------------
    def _nll(self, total: Tensor, x: Tensor) -> Tensor:
        """``-log p(x | T)`` summed over each image's pixels, for canvas totals ``T`` ``[..., C, H, W]``."""
        if self.config.likelihood == "bernoulli":
            # log p(on) = log(1 - exp(-T)), log p(off) = -T; T >= softplus(background) > 0
            nll = -(x * torch.log(-torch.expm1(-total)) - (1.0 - x) * total)
        else:
            s = self.config.gaussian_std
            nll = 0.5 * ((x + torch.expm1(-total)) / s) ** 2 + math.log(s) + 0.5 * LOG_2PI
        return nll.flatten(-3).sum(-1)

    def _prefix_nll(self, placed: Tensor, x: Tensor) -> Tensor:
        """``-log p(x | first k objects)`` for k = 0..K: ``[B, K + 1]``."""
        base = F.softplus(self.background).expand_as(x).unsqueeze(1)
        total = torch.cat([base, base + placed.cumsum(1)], 1)  # [B, K+1, C, H, W]
        return self._nll(total, x.unsqueeze(1))

    def _total(self, index: Tensor, sprites: Tensor, active: Tensor) -> Tensor:
        """Canvas total ``T`` ``[B, C, H, W]`` of hard locations ``[B, K]``, objects ``active`` ``[B, K]``."""
        _, h, w = self.image_shape
        return F.softplus(self.background) + place_by_index(index, sprites * active[..., None, None, None], h, w)

    # --- contract: encode -------------------------------------------------------------------
    def encode(self, images: Tensor, deterministic: bool = True) -> EncoderOutput:
        if deterministic:
            features, peaks, index = self._detect(images)
            presence = torch.sigmoid((peaks - self.config.threshold) / self.log_d)  # q(n >= k)
            what = self._mean_appearance(features, index)
        else:
            post = self._posterior(images)
            index, n = self._sample_hard(post, 1)
            index, n = index[0], n[0]
            mu, logvar = self._appearance_at(post, index)
            what = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            presence = (torch.arange(self.config.max_objects, device=images.device) < n[:, None]).float()
        position = self._position(index)
        return EncoderOutput(slots=torch.cat([position, what], -1), presence=presence, position=position)

    def count(self, images: Tensor) -> Tensor:
        """Predicted object counts ``[N]`` by the counting rule."""
        cfg = self.config
        return count_objects(self._location_logits(images)[1], cfg.threshold, cfg.peak_window, cfg.max_objects)

    # --- training ---------------------------------------------------------------------------
    def loss(self, batch: Mapping[str, Tensor], step: int) -> ModelLoss:
        x = batch["image"]
        b, (c, h, w), k = x.shape[0], self.image_shape, self.config.max_objects
        post = self._posterior(x)
        eps = torch.randn(b, k, self.config.appearance_dim, device=x.device)
        # draw the noise the estimator is about to draw, to fix the without-replacement masks
        shape_probe = post["logits"].new_empty(b, k, self.num_pixels)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            noise = dist.uniform(shape_probe)
        rows, _ = sequential_masks(post["logits"], noise, (h, w), self.config.peak_window)
        q_n, at_least = post["count_probs"], post["at_least"]
        warm = min(1.0, max(0.0, 2.0 - step / self.config.warmup_steps)) if self.config.warmup_steps else 0.0
        if self.config.warmup_single_object and warm > 0:
            # q(n) pulled to n = 1: one sprite per scene first, so that sprites learn whole objects
            # before several of them can share one (still an ELBO, for this q(n))
            one = F.one_hot(torch.ones(b, dtype=torch.long, device=x.device), k + 1).to(q_n.dtype)
            q_n = warm * one + (1.0 - warm) * q_n
            at_least = warm * one[:, 1:] + (1.0 - warm) * at_least  # q(n >= k) of n = 1 is [1, 0, ...]

        def downstream(where: Tensor) -> Tensor:
            mu, logvar = self._appearance(post, where)
            z = mu + eps * (0.5 * logvar).exp()
            kl_what = torch.cat([z.new_zeros(b, 1), gaussian_kl(mu, logvar).cumsum(1)], 1)
            placed = place_by_convolution(where.reshape(b, k, h, w), self.decoder(z))
            return (q_n * (self._prefix_nll(placed, x) + kl_what)).sum(1)

        est = self.estimator(rows, downstream)
        log_q = F.log_softmax(rows, -1)
        remaining = self.num_pixels - torch.arange(k, device=x.device, dtype=x.dtype)
        kl_where = (log_q.exp() * log_q).sum(-1) + remaining.log()  # KL to uniform without replacement
        kl_where = (at_least * kl_where).sum(1)
        log_prior_n = F.log_softmax(self.count_prior_logits, 0)
        kl_n = (q_n * (q_n.clamp_min(1e-12).log() - log_prior_n)).sum(1)
        extra = kl_where + kl_n
        neg_elbo = (est.loss + extra).mean().detach()
        if warm > 0:
            extra = extra + warm * self._kl_map(x, post["logits"])
        expected_n = (q_n * torch.arange(k + 1, device=x.device)).sum(1)
        return ModelLoss(
            (est.surrogate + extra).mean(),
            {
                "neg_elbo": neg_elbo.item(),
                "kl_where": kl_where.mean().item(),
                "kl_count": kl_n.mean().item(),
                "expected_count": expected_n.mean().item(),
            },
        )

    def _kl_map(self, x: Tensor, logits: Tensor) -> Tensor:
        """Warm-up loss ``KL(t || q(first location))`` ``[B]``, ``t`` a map peaked where a
        sprite-sized window holds the most foreground. Without it a run can settle, from the
        start, on uniform locations and empty sprites (each makes the other useless); with it the
        first draws land on objects, so sprites pay off. It shapes only the softmax, not the
        logit level the count reads, and is not part of the reported ELBO."""
        size = self.config.sprite_size
        mass = F.avg_pool2d(x.sum(1, keepdim=True), size, stride=1, padding=size // 2).flatten(1)
        target = torch.softmax(10.0 * mass / mass.amax(1, keepdim=True).clamp_min(1e-6), -1)
        return (target * (target.clamp_min(1e-30).log() - F.log_softmax(logits, -1))).sum(-1)

    # --- evaluation -------------------------------------------------------------------------
    def _sample_hard(self, post: dict[str, Tensor], samples: int) -> tuple[Tensor, Tensor]:
        """``samples`` draws of (locations ``[S, B, K]``, count ``[S, B]``) from q."""
        b, k = post["logits"].shape[0], self.config.max_objects
        _, h, w = self.image_shape
        logits = post["logits"].repeat(samples, 1)
        noise = dist.uniform(logits.new_empty(samples * b, k, self.num_pixels))
        _, index = sequential_masks(logits, noise, (h, w), self.config.peak_window)
        n = torch.multinomial(post["count_probs"].repeat(samples, 1), 1).squeeze(1)
        return index.reshape(samples, b, k), n.reshape(samples, b)

    @torch.no_grad()
    def importance_weighted_nll(self, images: Tensor, num_samples: int, batch: int = 50, chunk: int = 10) -> Tensor:
        """IWAE bound ``-log (1/S sum_s p(x, z_s) / q(z_s | x))`` in nats, ``[N]``."""
        parts = [self._iw_nll(images[i : i + batch], num_samples, chunk) for i in range(0, len(images), batch)]
        return torch.cat(parts)

    def _iw_nll(self, images: Tensor, num_samples: int, chunk: int) -> Tensor:
        post = self._posterior(images)
        b, k, (_, h, w) = images.shape[0], self.config.max_objects, self.image_shape
        log_prior_n = F.log_softmax(self.count_prior_logits, 0)
        log_p_where = -torch.log(self.num_pixels - torch.arange(k, device=images.device, dtype=images.dtype))
        log_w = []
        for start in range(0, num_samples, chunk):
            s = min(chunk, num_samples - start)
            index, n = self._sample_hard(post, s)  # [s, b, k], [s, b]
            # appearance of every draw, gathered from the un-repeated feature map
            mu, logvar = self._appearance_at(post, index.permute(1, 0, 2).reshape(b, s * k))
            mu, logvar = (t.reshape(b, s, k, -1).transpose(0, 1).reshape(s * b, k, -1) for t in (mu, logvar))
            index, n = index.reshape(s * b, k), n.reshape(s * b)
            logits = post["logits"].repeat(s, 1)
            mask = torch.zeros_like(logits, dtype=torch.bool)
            log_q_where = []
            for i in range(k):
                row = logits.masked_fill(mask, MASKED)
                log_q_where.append(F.log_softmax(row, -1).gather(1, index[:, i : i + 1]).squeeze(1))
                mask = suppress(mask, index[:, i], (h, w), self.config.peak_window)
            log_q_where = torch.stack(log_q_where, 1)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
            log_qz = -0.5 * (((z - mu) ** 2) / logvar.exp() + logvar + LOG_2PI).sum(-1)
            active = (torch.arange(k, device=images.device) < n[:, None]).to(images.dtype)
            log_px = -self._nll(self._total(index, self.decoder(z), active), images.repeat(s, 1, 1, 1))
            per_object = (log_p_where - log_q_where + log_pz - log_qz) * active
            log_qn = post["count_probs"].repeat(s, 1).gather(1, n[:, None]).squeeze(1).clamp_min(1e-30).log()
            log_w.append((log_px + log_prior_n[n] - log_qn + per_object.sum(1)).reshape(s, b))
        log_w = torch.cat(log_w, 0)
        return -(torch.logsumexp(log_w, 0) - math.log(num_samples))

    def reconstruct(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Deterministic reconstruction: (mean image, peak indices ``[B, K]``, presence ``[B, K]``)."""
        features, peaks, index = self._detect(images)
        present = (peaks > self.config.threshold).to(images.dtype)
        total = self._total(index, self.decoder(self._mean_appearance(features, index)), present)
        return -torch.expm1(-total), index, present

    def visualize(self, images: Tensor) -> dict[str, Tensor]:
        from perception.train.images import draw_boxes

        recon, index, present = self.reconstruct(images)
        _, h, w = self.image_shape
        r = self.config.sprite_size / 2
        x, y = (index % w).float() + 0.5, torch.div(index, w, rounding_mode="floor").float() + 0.5
        boxes = torch.stack([x - r, y - r, x + r, y + r], -1)
        return {"input": images, "reconstruction": recon, "objects": draw_boxes(images, boxes, present > 0)}
