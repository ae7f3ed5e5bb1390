"""What the spatial-mixture encoders (MONet, IODINE) share.

Both explain each pixel by a mixture over K slots (a soft mask per slot and a pixel mean per
slot), so they read the contract off the masks the same way, score pixels with the same
Gaussian, and draw the same decomposition figure. Kept apart from either model so that
neither imports the other.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor
from torch.nn import functional as F

from perception.contract import Encoder
from perception.nn.blocks import LOG_2PI
from perception.nn.broadcast_decoder import coordinate_grid


def masks_to_contract(masks: Tensor, min_area: float) -> tuple[Tensor, Tensor]:
    """Presence and position from soft masks ``[N, K, H, W]``.

    A slot is present (1) when the pixels where it wins the argmax cover at least ``min_area``
    of the image and it is not the background, the slot with the largest mask (MONet's slot 0
    is meant to take it, but training may hand it to another slot); otherwise 0.
    Position is the centroid of the soft mask in contract units (x right, y down, edges +-1).
    """
    n, k, h, w = masks.shape
    owner = F.one_hot(masks.argmax(dim=1), k).permute(0, 3, 1, 2).to(masks.dtype)
    area = owner.mean(dim=(2, 3))
    background = F.one_hot(masks.mean(dim=(2, 3)).argmax(dim=1), k).bool()
    presence = ((area >= min_area) & ~background).to(masks.dtype)
    grid = coordinate_grid(h, w).to(masks)  # pixel centres in [-1, 1]
    total = masks.sum(dim=(2, 3)).clamp_min(1e-6)
    position = torch.einsum("nkhw,chw->nkc", masks, grid) / total[..., None]
    return presence, position


def gaussian_log_density(x: Tensor, mean: Tensor, sigma: Tensor | float) -> Tensor:
    """Sum over channels of log N(x; mean, sigma^2): ``[..., C, H, W] -> [..., H, W]``."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return (-0.5 * ((x - mean) / sigma).pow(2) - sigma.log() - 0.5 * LOG_2PI).sum(dim=-3)


def mixture_image(masks: Tensor, means: Tensor) -> Tensor:
    """The image the mixture explains: masks ``[N, K, H, W]`` weighting slot means
    ``[N, K, C, H, W]`` -> ``[N, C, H, W]``."""
    return (masks.unsqueeze(2) * means).sum(1)


class MixtureEncoder(Encoder):
    """Base of the mixture models: slots are ``latent_dim``-vectors, one per mixture component.

    A subclass's config has ``num_slots``, ``test_slots`` (0: as in training) and
    ``latent_dim``; the subclass implements :meth:`reconstruct`.
    """

    @property
    def num_slots(self) -> int:
        """Slots of the encoder's output: ``test_slots`` when set (training uses ``num_slots``)."""
        return self.config.test_slots or self.config.num_slots

    @property
    def slot_layout(self) -> list[str]:
        return [f"z_{i}" for i in range(self.config.latent_dim)]

    @property
    def has_masks(self) -> bool:
        return True

    @abc.abstractmethod
    def reconstruct(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Deterministic reconstruction ``[N,C,H,W]``, masks ``[N,K,H,W]`` and slot means
        ``[N,K,C,H,W]``, without autograd (``visualize`` draws them)."""

    def visualize(self, images: Tensor) -> dict[str, Tensor]:
        """Input, reconstruction, then each slot's means drawn through its mask on white."""
        recon, masks, means = self.reconstruct(images)
        rows = {"input": images, "reconstruction": recon.clamp(0, 1)}
        for k in range(masks.shape[1]):
            mask = masks[:, k : k + 1]
            rows[f"slot_{k}"] = (mask * means[:, k] + (1 - mask)).clamp(0, 1)
        return rows
