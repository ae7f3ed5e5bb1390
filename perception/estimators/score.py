"""Score-function estimators: REINFORCE and NVIL.

Both only evaluate the loss at hard samples, so they also serve sequential models through
:meth:`Estimator.score_surrogate`.

NVIL (Mnih & Gregor 2014, Algorithm 1) centres the learning signal with a learned baseline
(an MLP on the context, or a learned scalar without one) plus a running mean, and divides by
``max(1, sqrt(running variance))``; the baseline regresses the centred signal. Two deliberate
differences: the running statistics used for a batch are those from *before* it (the paper folds
the current batch in first), which keeps the estimate exactly unbiased; and the variance is taken
around the running mean (:class:`RunningMoments`, shared with RELAX), which a batch of one
still measures. Statistics update only in training mode; the very first training call
initialises them from its own batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from perception.config import CheckedConfig
from perception.errors import PerceptionError
from perception.estimators import distributions as D
from perception.estimators.base import ESTIMATORS, Estimate, Estimator, LossFn, inject
from perception.estimators.moments import RunningMoments


class _ScoreFunction(Estimator):
    supports_score_function = True

    def _estimate(self, logits: Tensor, loss_fn: LossFn, context: Tensor | None) -> Estimate:
        sample = self.sample(logits)
        loss = self._evaluate(loss_fn, sample)
        surrogate = loss + self._score_surrogate(logits, sample, loss.detach(), context)
        return Estimate(sample, loss.detach(), surrogate)


@dataclass
class ReinforceConfig(CheckedConfig):
    pass


@ESTIMATORS.register("reinforce")
class Reinforce(_ScoreFunction):
    """Plain score function, no baseline: the unbiased reference."""

    Config = ReinforceConfig
    name = "reinforce"

    def _score_surrogate(self, logits: Tensor, sample: Tensor, cost: Tensor, context: Tensor | None) -> Tensor:
        log_p = D.log_prob(self.distribution, logits, sample)
        return (log_p - log_p.detach()) * cost


@dataclass
class NVILConfig(CheckedConfig):
    hidden: int = 100  # baseline MLP width (used with a context)
    decay: float = 0.8  # running-statistics decay (alpha in the paper)
    lr: float | None = 0.1  # the baseline's learning rate, as in the thesis

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden < 1 or not 0.0 <= self.decay < 1.0:
            raise PerceptionError(f"nvil needs hidden >= 1 and 0 <= decay < 1, got {self.hidden}, {self.decay}")


@ESTIMATORS.register("nvil")
class NVIL(_ScoreFunction):
    Config = NVILConfig
    name = "nvil"
    uses_context = True

    def __init__(self, config: NVILConfig, distribution: str, **kwargs) -> None:
        super().__init__(config, distribution, **kwargs)
        if self.context_dim is None:
            self.bias = nn.Parameter(torch.zeros(()))
        else:
            self.net = nn.Sequential(
                nn.Linear(self.context_dim, config.hidden), nn.Tanh(), nn.Linear(config.hidden, 1)
            )
        self.moments = RunningMoments(config.decay)

    def baseline(self, context: Tensor | None, batch: int) -> Tensor:
        if context is None:
            return self.bias.expand(batch)
        return self.net(context).squeeze(-1)

    def _score_surrogate(self, logits: Tensor, sample: Tensor, cost: Tensor, context: Tensor | None) -> Tensor:
        baseline = self.baseline(context, logits.shape[0])
        centred = cost - baseline.detach()
        moments = self.moments
        if self.training and not moments.started():
            moments.update(centred)
        signal = (centred - moments.mean) / moments.var.sqrt().clamp(min=1.0)
        if self.training:
            moments.update(centred)
        log_p = D.log_prob(self.distribution, logits, sample)
        # encoder: signal * grad log p; baseline: regress the centred signal (gradient -signal).
        return (log_p - log_p.detach()) * signal + inject(baseline.unsqueeze(1), -signal.unsqueeze(1))
