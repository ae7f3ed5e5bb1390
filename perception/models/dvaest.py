"""D-VAE-ST: D-VAE plus a Gaussian affine-transform latent that warps the class prototype.

A second network infers q(z|x, c) over the six parameters of
:data:`perception.nn.spatial_transformer.PARAM_NAMES` (log scales, rotation, shear, centre)
*for every class c*: the transform that aligns prototype c with the image. A single transform
inferred without knowing the class cannot align one image with both its '1' and its '7'
hypothesis, and then the class comparison is between misaligned prototypes (the idea of
transformation-invariant clustering). The network's last layer is zero-initialised, so every
image starts at the identity transform with a small posterior spread; the prior is
N(0, prior_std^2) per parameter, centred on the identity. Each prototype is warped with
:func:`~perception.nn.spatial_transformer.warp`, so it only has to explain a digit's shape, not
its position, size or slant. The contract position is the chosen class's translation: where
the prototype's centre lands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from perception.models.dvae import DVAE, DVAEConfig
from perception.nn.spatial_transformer import PARAM_NAMES, affine_from_params, warp

INITIAL_LOGVAR = -6.0  # posterior std ~0.05 at the start: near-deterministic identity warps


@dataclass
class DVAESTConfig(DVAEConfig):
    prior_std: float = 0.3  # prior N(0, prior_std^2) on every transform parameter
    # Training steps with every transform held at the identity, so the prototypes first settle
    # as plain k-means clusters. Off by default: on MNIST it gave ten distinct prototypes but
    # lower accuracy (docs/results/clustering.md).
    align_after: int = 0


class DVAEST(DVAE):
    Config = DVAESTConfig
    name = "dvaest"

    def __init__(self, config: DVAESTConfig, image_shape: tuple[int, int, int]):
        super().__init__(config, image_shape)
        d, num = len(PARAM_NAMES), config.num_classes
        self.to_transform = nn.Sequential(
            nn.Linear(config.hidden, config.hidden), nn.ReLU(), nn.Linear(config.hidden, num * 2 * d)
        )
        last = self.to_transform[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.view(num, 2, d)[:, 0] = 0.0
            last.bias.view(num, 2, d)[:, 1] = INITIAL_LOGVAR

    @property
    def transform_names(self) -> list[str]:
        return list(PARAM_NAMES)

    def transform(
        self, images: Tensor, hidden: Tensor, deterministic: bool, step: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if step is not None and step < self.config.align_after:
            n, num, d = images.shape[0], self.num_classes, len(PARAM_NAMES)
            z = images.new_zeros(n, num, d)
            return z, images.new_zeros(n, num), affine_from_params(z)
        out = self.to_transform(hidden).view(hidden.shape[0], self.num_classes, 2, len(PARAM_NAMES))
        mu, logvar = out[:, :, 0], out[:, :, 1].clamp(-12.0, 4.0)
        z = mu if deterministic else mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        log_var_p = 2.0 * math.log(self.config.prior_std)
        kl = 0.5 * ((mu.pow(2) + logvar.exp()) / math.exp(log_var_p) - 1.0 - logvar + log_var_p).sum(-1)
        return z, kl, affine_from_params(z)

    def placed(self, matrix: Tensor | None) -> Tensor:
        protos = self.prototypes()
        n, num = matrix.shape[:2]
        stacked = protos.unsqueeze(0).expand(n, -1, -1, -1, -1).flatten(0, 1)
        return warp(stacked, matrix.flatten(0, 1)).view(n, num, *protos.shape[1:])

    def position(self, params: Tensor) -> Tensor:
        return params[:, 4:6].unsqueeze(1)
