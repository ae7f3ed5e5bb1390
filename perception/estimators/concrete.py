"""Concrete / Gumbel-softmax relaxation (Maddison et al. 2017; Jang et al. 2017).

Biased: the gradient is that of the loss at the relaxed sample, a bias that shrinks as the
temperature goes to 0 (while the variance grows). Without straight-through the loss_fn sees the
relaxed sample (the decoder trains on it too) and is evaluated once more, without gradient, at
the hard sample for the reported loss. With straight-through it sees the hard sample in the
forward pass and the relaxed sample's gradient in the backward pass (one evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from perception.config import CheckedConfig
from perception.errors import PerceptionError
from perception.estimators import distributions as D
from perception.estimators.base import ESTIMATORS, Estimate, Estimator, LossFn


@dataclass
class ConcreteConfig(CheckedConfig):
    temperature: float = 0.66
    straight_through: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise PerceptionError(f"concrete temperature must be positive, got {self.temperature}")


@ESTIMATORS.register("concrete")
class Concrete(Estimator):
    Config = ConcreteConfig
    name = "concrete"

    def _estimate(self, logits: Tensor, loss_fn: LossFn, context: Tensor | None) -> Estimate:
        z = D.perturb(self.distribution, logits, D.uniform(logits))
        relaxed = D.relax(self.distribution, z, self.config.temperature)
        sample = D.hard(self.distribution, z.detach())
        if self.config.straight_through:
            sample = sample + (relaxed - relaxed.detach())  # hard values stay exact
            loss = self._evaluate(loss_fn, sample)
            return Estimate(sample, loss.detach(), loss)
        relaxed_loss = self._evaluate(loss_fn, relaxed)
        with torch.no_grad():
            loss = self._evaluate(loss_fn, sample)
        return Estimate(sample, loss, relaxed_loss - relaxed_loss.detach() + loss)
