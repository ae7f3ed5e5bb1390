"""D-VAE-ST's object model as a plain module: a class classifier q(c | x), L prototype images and
a per-class Gaussian transform (affine warp + stroke thickness) that aligns each prototype with
the image.

The architecture and parameter names are those of :class:`perception.models.dvaest.DVAEST`, so a
``dvaest`` checkpoint loads into it (:meth:`DigitReader.load_dvaest`); it is a copy rather than
the model itself so that DAIR does not inherit that model's training machinery (split-and-merge,
pruning, balance schedules), which changes independently.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch
from torch import Tensor, nn

from perception.errors import CheckpointError
from perception.nn.blocks import conv_encoder
from perception.nn.glimpse import warp_affine
from perception.nn.spatial_transformer import PARAM_NAMES, affine_from_params

PROB_EPS = 1e-4  # keeps log p(x|c) finite where a prototype pixel reaches exactly 0 or 1
TRANSFORM_NAMES = list(PARAM_NAMES) + ["thickness"]
LOADED = ("features.", "to_hidden.", "to_logits.", "bank.logits", "to_transform.")


class Reading(NamedTuple):
    """Everything a D-VAE-ST infers about a batch of images, for every class."""

    hidden: Tensor  # [N, hidden] (context for an estimator)
    logits: Tensor  # [N, L] amortised q(c | x)
    mean: Tensor  # [N, L, 7] transform posterior mean per class
    std: Tensor  # [N, L, 7]
    z: Tensor  # [N, L, 7] the transform used (sample or mean)
    kl: Tensor  # [N, L] KL of each class' transform posterior from the prior
    placed: Tensor  # [N, L, C, H, W] every prototype under its transform, in [0, 1]
    costs: Tensor  # [N, L] -log p(x | c, z_c) (Bernoulli) + kl: the class' cost of the image


class DigitReader(nn.Module):
    def __init__(self, num_classes: int, shape: tuple[int, int, int], channels: int = 32, hidden: int = 128,
                 prior_std: float = 0.3, thickness_std: float = 1.0):
        super().__init__()
        c, h, _ = shape
        self.num_classes = num_classes
        self.features, n_features = conv_encoder(c, h, channels)
        self.to_hidden = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU())
        self.to_logits = nn.Linear(hidden, num_classes)
        self.prototype_logits = nn.Parameter(torch.randn(num_classes, *shape) * 0.5 - 2.0)
        d = len(TRANSFORM_NAMES)
        self.to_transform = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes * 2 * d))
        nn.init.zeros_(self.to_transform[-1].weight)
        with torch.no_grad():  # identity transforms with a small spread to begin with
            self.to_transform[-1].bias.view(num_classes, 2, d)[:, 1] = -6.0
        self.register_buffer("prior_std", torch.tensor([prior_std] * len(PARAM_NAMES) + [thickness_std]))
        self.register_buffer("seeded", torch.zeros((), dtype=torch.bool))

    def prototypes(self) -> Tensor:
        return torch.sigmoid(self.prototype_logits)

    def forward(self, images: Tensor, sample: bool) -> Reading:
        n, num, d = images.shape[0], self.num_classes, len(TRANSFORM_NAMES)
        hidden = self.to_hidden(self.features(images))
        out = self.to_transform(hidden).view(n, num, 2, d)
        mean, logvar = out[:, :, 0], out[:, :, 1].clamp(-12.0, 4.0)
        std = (0.5 * logvar).exp()
        z = mean + torch.randn_like(mean) * std if sample else mean
        prior = self.prior_std
        kl = (prior.log() - std.log() + (std.pow(2) + mean.pow(2)) / (2 * prior.pow(2)) - 0.5).sum(-1)
        placed = self.place(z)
        p = placed.clamp(PROB_EPS, 1.0 - PROB_EPS)
        x = images.unsqueeze(1)
        nll = -(x * p.log() + (1.0 - x) * (1.0 - p).log()).flatten(2).sum(-1)
        return Reading(hidden, self.to_logits(hidden), mean, std, z, kl, placed, nll + kl)

    def place(self, z: Tensor) -> Tensor:
        """``[N, L, C, H, W]``: prototype l warped by ``z[:, l, :6]``, logits shifted by its thickness."""
        n, num = z.shape[:2]
        protos = self.prototypes()
        stacked = protos.unsqueeze(0).expand(n, -1, -1, -1, -1).flatten(0, 1)
        flat = z.flatten(0, 1)
        warped = warp_affine(stacked, affine_from_params(flat[:, : len(PARAM_NAMES)]))  # exports to ONNX (no matrix inverse op)
        logits = torch.logit(warped.clamp(PROB_EPS, 1.0 - PROB_EPS)) + flat[:, -1, None, None, None]
        return torch.sigmoid(logits).view(n, num, *protos.shape[1:])

    @torch.no_grad()
    def seed(self, images: Tensor) -> None:
        """k-means++ seeding of the prototypes on ``images`` (softened towards their mean)."""
        flat = images.flatten(1)
        chosen = [int(torch.randint(len(flat), ()).item())]
        dist = (flat - flat[chosen[0]]).pow(2).sum(1)
        for _ in range(1, self.num_classes):
            pick = torch.multinomial(dist, 1) if float(dist.sum()) > 0 else torch.randint(len(flat), (1,))
            chosen.append(int(pick.item()))
            dist = torch.minimum(dist, (flat - flat[chosen[-1]]).pow(2).sum(1))
        soft = 0.7 * images[chosen] + 0.3 * images.mean(0, keepdim=True)
        self.prototype_logits.copy_(torch.logit(soft.clamp(0.02, 0.98)))
        self.seeded.fill_(True)

    @torch.no_grad()
    def load_dvaest(self, state: Mapping[str, Any], source: str) -> None:
        """Copy a ``dvaest`` checkpoint's classifier, prototypes and transform network (only the
        classes it reads out, when it pruned spare prototypes)."""
        cfg, weights = state["model_config"], state["state_dict"]
        if state["model"] != "dvaest" or cfg.get("thickness_std", 1.0) <= 0:
            raise CheckpointError(f"init_what_from: {source} is not a dvaest checkpoint with a thickness latent")
        keep = weights.get("keep", torch.arange(self.num_classes))
        if len(keep) != self.num_classes:
            raise CheckpointError(f"init_what_from: {source} has {len(keep)} classes, dair has {self.num_classes}")
        own = self.state_dict()
        d = len(TRANSFORM_NAMES)
        for name, value in weights.items():
            if not name.startswith(LOADED):
                continue
            if name.startswith("to_logits."):
                value = value[keep]
            elif name == "to_transform.2.weight":
                value = value.view(-1, 2 * d, value.shape[-1])[keep].flatten(0, 1)
            elif name == "to_transform.2.bias":
                value = value.view(-1, 2 * d)[keep].flatten()
            elif name == "bank.logits":
                name, value = "prototype_logits", value[keep]
            if own[name].shape != value.shape:
                raise CheckpointError(f"init_what_from: {source} has {name} of shape {list(value.shape)}, expected {list(own[name].shape)}")
            own[name].copy_(value)
        self.prior_std.copy_(torch.tensor([cfg.get("prior_std", 0.3)] * len(PARAM_NAMES) + [cfg["thickness_std"]]))
        self.seeded.fill_(True)
