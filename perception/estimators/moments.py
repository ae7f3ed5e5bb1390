"""Running mean and variance of a cost, shared by NVIL (its signal normalisation) and RELAX (the
units of its control-variate network).

The variance is that of the batch around the *updated* running mean, so a batch of one still
measures a spread (the toy benchmark trains on single examples); the first update sets both
statistics from its batch alone. Buffers, so they are saved and moved with the estimator.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RunningMoments(nn.Module):
    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        weight = 1.0
        if self.seen:
            weight -= self.decay
        else:
            self.seen.fill_(True)
        self.mean.lerp_(x.mean(), weight)
        self.var.lerp_((x - self.mean).square().mean(), weight)
