"""Running mean and variance of a cost, shared by NVIL (its signal normalisation) and RELAX (the
units of its control-variate network).

The variance is that of the batch around the *updated* running mean, so a batch of one still
measures a spread (the toy benchmark trains on single examples); the first update sets both
statistics from its batch alone. Buffers, so they are saved and moved with the estimator.
Whether the first update happened is read from the device once and then remembered in Python,
so a training step never waits on the device for it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class RunningMoments(nn.Module):
    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))
        self._started = False  # mirror of ``seen`` once it is True

    def started(self) -> bool:
        """Whether the statistics hold at least one batch."""
        if not self._started:
            self._started = bool(self.seen)
        return self._started

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        first = not self.started()
        weight = 1.0 if first else 1.0 - self.decay
        self.mean.lerp_(x.mean(), weight)
        self.var.lerp_((x - self.mean).square().mean(), weight)
        if first:
            self.seen.fill_(True)
            self._started = True

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._started = False  # re-read ``seen`` from the loaded state
