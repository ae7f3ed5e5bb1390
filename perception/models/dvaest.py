"""D-VAE-ST: D-VAE plus a Gaussian affine-transform latent that warps the class prototype.

A second network infers q(z|x, c) over the six parameters of
:data:`perception.nn.spatial_transformer.PARAM_NAMES` (log scales, rotation, shear, centre)
plus a stroke "thickness" (a logit offset), *for every class c*: the transform that aligns
prototype c with the image. A single transform inferred without knowing the class cannot align
one image with both its '1' and its '7' hypothesis, and then the class comparison is between
misaligned prototypes (the idea of transformation-invariant clustering). The network's last
layer is zero-initialised, so every image starts at the identity transform with a small
posterior spread; the prior is N(0, prior_std^2) per affine parameter (thickness:
N(0, thickness_std^2)), centred on the identity. Each prototype is warped by
:func:`~perception.nn.spatial_transformer.warp`, so it only has to explain a digit's shape,
not its position, size, slant or stroke width. The contract position is the chosen class's
translation: where the prototype's centre lands.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from perception.models.dvae import PROB_EPS, DVAE, DVAEConfig, bernoulli_nll_probs
from perception.nn.spatial_transformer import PARAM_NAMES, affine_from_params, crop, warp

INITIAL_LOGVAR = -6.0  # posterior std ~0.05 at the start: near-deterministic identity warps


@dataclass
class DVAESTConfig(DVAEConfig):
    prior_std: float = 0.3  # prior N(0, prior_std^2) on every affine parameter
    # A seventh latent, "thickness": an offset added to the warped prototype's logits. On a soft
    # prototype that moves the 0.5 contour outward or inward, a cheap stand-in for the
    # dilation/erosion of transformation-invariant clustering (stroke width varies a lot within
    # a digit class). Prior N(0, thickness_std^2); 0 removes the latent.
    thickness_std: float = 1.0
    # Training steps with every transform held at the identity, so the prototypes first settle
    # as plain k-means clusters. Off by default: on MNIST it gave ten distinct prototypes but
    # lower accuracy (docs/results/clustering.md).
    align_after: int = 0


class DVAEST(DVAE):
    Config = DVAESTConfig
    name = "dvaest"

    def __init__(self, config: DVAESTConfig, image_shape: tuple[int, int, int]):
        super().__init__(config, image_shape)
        d, num = len(self.transform_names), self.num_prototypes
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
        return list(PARAM_NAMES) + (["thickness"] if self.config.thickness_std > 0 else [])

    def transform(
        self, images: Tensor, hidden: Tensor, deterministic: bool, step: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, num, d = images.shape[0], self.num_prototypes, len(self.transform_names)
        if step is not None and step < self.config.align_after:
            return images.new_zeros(n, num, d), images.new_zeros(n, num), images.new_zeros(n, num)
        out = self.to_transform(hidden).view(n, num, 2, d)
        mu, logvar = out[:, :, 0], out[:, :, 1].clamp(-12.0, 4.0)
        z = mu if deterministic else mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        stds = [self.config.prior_std] * len(PARAM_NAMES) + [self.config.thickness_std] * (d - len(PARAM_NAMES))
        log_var_p = 2.0 * torch.log(torch.tensor(stds, dtype=mu.dtype, device=mu.device))
        kl = 0.5 * ((mu.pow(2) + logvar.exp()) / log_var_p.exp() - 1.0 - logvar + log_var_p).sum(-1)
        log_ratio = 0.5 * ((z - mu).pow(2) / logvar.exp() + logvar - z.pow(2) / log_var_p.exp() - log_var_p).sum(-1)
        return z, kl, log_ratio

    def apply(self, objects: Tensor, params: Tensor) -> Tensor:
        """Warp ``objects`` ``[M, C, H, W]`` by ``params`` ``[M, T]`` and shift their logits by the
        thickness (when the model has one)."""
        warped = warp(objects, affine_from_params(params[:, : len(PARAM_NAMES)]))
        if params.shape[-1] == len(PARAM_NAMES):
            return warped
        logits = torch.logit(warped.clamp(PROB_EPS, 1.0 - PROB_EPS)) + params[:, -1, None, None, None]
        return torch.sigmoid(logits)

    def place_one(self, proto: Tensor, params: Tensor) -> Tensor:
        return self.apply(proto.expand(params.shape[0], *proto.shape), params)

    def placed(self, params: Tensor) -> Tensor:
        protos = self.bank.probs()
        n, num = params.shape[:2]
        stacked = protos.unsqueeze(0).expand(n, -1, -1, -1, -1).flatten(0, 1)
        return self.apply(stacked, params.flatten(0, 1)).view(n, num, *protos.shape[1:])

    def classified_cost(self, images: Tensor) -> Tensor:
        """``[N]``: the cost (-log p(x | c, z_c) + KL, deterministic transform) of the amortised
        classifier's class ``c`` alone: one warp per image instead of one per prototype, for
        callers that compare many candidate framings of the same object (DAIR's alignment)."""
        hidden = self.hidden(images)
        chosen = self.classifier_logits(hidden).argmax(-1)
        params, kl_z, _ = self.transform(images, hidden, deterministic=True)
        at = chosen.unsqueeze(-1)  # gathers, not arange indexing: the batch size stays symbolic for export
        params = params.gather(1, at.unsqueeze(-1).expand(-1, 1, params.shape[-1])).squeeze(1)
        placed = self.apply(self.bank.probs()[chosen], params)
        return bernoulli_nll_probs(placed, images) + kl_z.gather(1, at).squeeze(1)

    def position(self, params: Tensor) -> Tensor:
        return params[:, 4:6].unsqueeze(1)

    def aligned(self, images: Tensor, params: Tensor) -> Tensor:
        return crop(images, affine_from_params(params[:, : len(PARAM_NAMES)]))

    def class_rows(self) -> list[Tensor]:
        last = self.to_transform[-1]
        return super().class_rows() + [last.weight, last.bias]
