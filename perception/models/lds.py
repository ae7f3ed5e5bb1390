"""Latent duplicate suppression prior (Li & Fisher, BMVC 2021).

Two slots that explain the same object end up with similar latents; the LDS prior makes that
unlikely: ``log p(z) += sum_{h != j} log N(cos(z_h, z_j); 0, sigma^2)`` over ordered slot pairs,
with ``sigma = 0.1``, weighted by ``lambda`` in the ELBO. Models add :func:`lds_penalty` (the
negative log prior) to their training loss only, never to what they report as the ELBO.

As a term of the ELBO the prior is scored on the posterior samples (the default). The models'
``lds_on_means`` scores it on the posterior means instead: on multi-dSprites MONet's duplicate
slot pairs have posterior means with cosine ~0.95, but their samples only ~0.3-0.5, because the
unused latent dimensions are prior noise; a penalty on samples is diluted by that noise and can
be lowered by more of it (docs/results/segmentation.md).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

LDS_SIGMA = 0.1


def lds_penalty(z: Tensor, sigma: float = LDS_SIGMA) -> Tensor:
    """``-sum_{h != j} log N(cos(z_h, z_j); 0, sigma^2)`` per example: ``z [B, K, D] -> [B]``."""
    unit = F.normalize(z, dim=-1, eps=1e-8)
    cos = unit @ unit.transpose(1, 2)
    k = z.shape[1]
    off = ~torch.eye(k, dtype=torch.bool, device=z.device)
    nll = cos.pow(2) / (2 * sigma**2) + math.log(sigma * math.sqrt(2 * math.pi))
    return (nll * off).sum(dim=(1, 2))
