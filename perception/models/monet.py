"""MONet (Burgess et al. 2019): recurrent attention plus a component VAE per slot.

An attention network (U-Net) peels objects off the image one at a time: with the scope ``s``
(the share of each pixel not yet explained, ``s_0 = 1``), step ``k`` predicts ``alpha_k`` and
takes mask ``m_k = s_{k-1} alpha_k``, leaving ``s_k = s_{k-1} (1 - alpha_k)``; the last slot
takes the remaining scope, so masks sum to one. All of it in log space, which keeps small
scopes exact. A component VAE encodes (image, log mask) of each slot into ``z_k`` and decodes,
with a spatial broadcast decoder, the slot's pixels and mask logits. The loss is the mixture
NLL with the attention masks as weights (slot 0 is the background with ``sigma_bg``), plus
``beta`` KL(z) and ``gamma`` KL(attention masks || decoded masks), so that the latents alone
describe the segmentation.

Contract: slots = posterior means ``z_k``; masks = attention masks; presence and position from
the masks (:func:`masks_to_contract`); the slot with the largest mask area is the background,
never present (usually slot 0, which has ``sigma_bg``, but not always).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from perception.config import CheckedConfig
from perception.contract import EncoderOutput, ModelLoss
from perception.errors import PerceptionError
from perception.models.lds import lds_penalty
from perception.models.mixture import MixtureEncoder, gaussian_log_density, masks_to_contract, mixture_image
from perception.nn.blocks import conv_encoder, gaussian_kl
from perception.nn.broadcast_decoder import SpatialBroadcastDecoder
from perception.nn.unet import UNet


@dataclass
class MONetConfig(CheckedConfig):
    num_slots: int = 6  # multi-dSprites: up to 5 sprites + background
    test_slots: int = 0  # slots outside training (0: as in training); the attention simply runs longer
    latent_dim: int = 16
    unet_channels: int = 32
    unet_depth: int = 4
    encoder_channels: int = 32
    decoder_channels: int = 32
    decoder_layers: int = 4
    beta: float = 0.5
    gamma: float = 0.5
    sigma_bg: float = 0.09
    sigma_fg: float = 0.11
    lds: bool = False
    lds_weight: float = 0.5
    lds_on_means: bool = False  # LDS on the posterior means instead of the samples (see models/lds.py)
    presence_min_area: float = 0.004  # share of the image a slot's argmax mask must cover

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_slots < 1 or self.test_slots < 0:
            raise PerceptionError(
                f"monet: need num_slots >= 1 and test_slots >= 0, got {self.num_slots}, {self.test_slots}"
            )


def log_sigmoid(x: Tensor) -> Tensor:
    """``log sigmoid(x)`` that stays finite in exported graphs: ONNX exporters write
    ``F.logsigmoid`` as ``Log(Sigmoid(x))``, which is -inf once the sigmoid underflows (and the
    -inf log scope then turns the component encoder's output into NaN in onnxruntime)."""
    return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-x.abs()))


class MONet(MixtureEncoder):
    Config = MONetConfig
    name = "monet"
    default_dataset = "multi-dsprites"

    def __init__(self, config: MONetConfig, image_shape: tuple[int, int, int]):
        super().__init__(config, image_shape)
        c, h, w = self.image_shape
        self.attention = UNet(c + 1, 1, config.unet_channels, config.unet_depth)
        conv, features = conv_encoder(c + 1, h, config.encoder_channels)
        self.encoder = nn.Sequential(conv, nn.Linear(features, 256), nn.ReLU(), nn.Linear(256, 2 * config.latent_dim))
        self.decoder = SpatialBroadcastDecoder(
            config.latent_dim, c + 1, (h, w), config.decoder_channels, config.decoder_layers
        )
        sigma = torch.full((config.num_slots,), config.sigma_fg)
        sigma[0] = config.sigma_bg
        self.register_buffer("sigma", sigma.view(1, -1, 1, 1, 1), persistent=False)

    def attend(self, x: Tensor, slots: int) -> Tensor:
        """Stick-breaking log masks ``[N, slots, H, W]`` (they sum to one over the slots)."""
        log_scope = torch.zeros_like(x[:, :1])
        log_masks = []
        for _ in range(slots - 1):
            logits = self.attention(torch.cat([x, log_scope], dim=1))
            log_masks.append(log_scope + log_sigmoid(logits))
            log_scope = log_scope + log_sigmoid(-logits)
        log_masks.append(log_scope)
        return torch.cat(log_masks, dim=1)

    def posterior(self, x: Tensor, log_masks: Tensor) -> tuple[Tensor, Tensor]:
        n, k = log_masks.shape[:2]
        inputs = torch.cat([x.unsqueeze(1).expand(-1, k, -1, -1, -1), log_masks.unsqueeze(2)], dim=2)
        mu, logvar = self.encoder(inputs.flatten(0, 1)).view(n, k, -1).chunk(2, dim=-1)
        return mu, logvar.clamp(-10.0, 10.0)

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Per-slot means ``[N, K, C, H, W]`` in [0, 1] and mask logits ``[N, K, H, W]``."""
        n, k = z.shape[:2]
        out = self.decoder(z.flatten(0, 1)).view(n, k, -1, *self.image_shape[1:])
        return torch.sigmoid(out[:, :, :-1]), out[:, :, -1]

    def encode(self, images: Tensor, deterministic: bool = True, slots: int | None = None) -> EncoderOutput:
        if slots is not None and slots < 1:
            raise PerceptionError(f"monet: slots must be >= 1, got {slots}")
        log_masks = self.attend(images, slots or self.num_slots)
        mu, logvar = self.posterior(images, log_masks)
        z = mu if deterministic else mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        masks = log_masks.exp()
        presence, position = masks_to_contract(masks, self.config.presence_min_area)
        return EncoderOutput(slots=z, presence=presence, position=position, masks=masks)

    def loss(self, batch: Mapping[str, Tensor], step: int) -> ModelLoss:
        x = batch["image"]
        log_masks = self.attend(x, self.config.num_slots)
        mu, logvar = self.posterior(x, log_masks)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        means, mask_logits = self.decode(z)
        log_lik = gaussian_log_density(x.unsqueeze(1), means, self.sigma)  # [N, K, H, W]
        nll = -torch.logsumexp(log_masks + log_lik, dim=1).flatten(1).sum(1)
        kl_z = gaussian_kl(mu, logvar).sum(1)
        masks = log_masks.exp()
        kl_mask = (masks * (log_masks - F.log_softmax(mask_logits, dim=1))).flatten(1).sum(1)
        loss = nll + self.config.beta * kl_z + self.config.gamma * kl_mask
        metrics = {
            "neg_elbo": (nll + kl_z).mean().item(),
            "nll": nll.mean().item(),
            "kl": kl_z.mean().item(),
            "kl_mask": kl_mask.mean().item(),
            "mse": mixture_image(masks, means).sub(x).pow(2).mean().item(),
        }
        if self.config.lds and self.training:
            lds = lds_penalty(mu if self.config.lds_on_means else z)
            loss = loss + self.config.lds_weight * lds
            metrics["lds"] = lds.mean().item()
        return ModelLoss(loss.mean(), metrics)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Deterministic reconstruction, attention masks and per-slot means (``num_slots`` slots)."""
        log_masks = self.attend(images, self.num_slots)
        mu, _ = self.posterior(images, log_masks)
        means, _ = self.decode(mu)
        masks = log_masks.exp()
        return mixture_image(masks, means), masks, means
