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

    def update(self, x: Tensor) -> None:
        x = x.detach()  # cheaper than a no_grad context: this runs every training step
        first = not self.started()
        weight = 1.0 if first else 1.0 - self.decay
        self.mean.lerp_(_mean(x), weight)
        self.var.lerp_(_mean((x - self.mean).square_()), weight)
        if first:
            self.seen.fill_(True)
            self._started = True

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._started = False  # re-read ``seen`` from the loaded state


def _mean(x: Tensor) -> Tensor:
    """The mean as a 0-d tensor; a view for a single element (a batch of one, as on the toy
    benchmark), where ``Tensor.mean`` is a reduction kernel costing a few microseconds more."""
    return x.reshape(()) if x.numel() == 1 else x.mean()
