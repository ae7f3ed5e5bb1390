"""Exact expectation by enumerating every joint state of an example's variables.

The surrogate is ``sum_s p(s) f(s)`` itself, so its gradient is the true gradient for the logits
and the expected pathwise gradient for loss_fn's parameters, with zero variance. loss_fn runs
once per state (the same state for the whole batch), or once on all states where it broadcasts
(:mod:`base`), hence the state limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from perception.config import CheckedConfig
from perception.errors import PerceptionError
from perception.estimators.base import ESTIMATORS, Estimate, Estimator, LossFn


@dataclass
class ExactConfig(CheckedConfig):
    max_states: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_states < 1:
            raise PerceptionError(f"exact max_states must be positive, got {self.max_states}")


@ESTIMATORS.register("exact")
class Exact(Estimator):
    Config = ExactConfig
    name = "exact"

    def _estimate(self, logits: Tensor, loss_fn: LossFn, context: Tensor | None) -> Estimate:
        states = self._states(logits)  # [S, *logits.shape[1:]]
        batch = logits.shape[0]
        flat = states.reshape(len(states), -1)
        if self.distribution == "bernoulli":
            log_p = flat @ _rows(F.logsigmoid(logits)).T + (1 - flat) @ _rows(F.logsigmoid(-logits)).T
        else:
            log_p = flat @ _rows(F.log_softmax(logits, -1)).T  # [S, B]
        losses = self._evaluate_rows(loss_fn, states.unsqueeze(1).expand(len(states), *logits.shape))  # [S, B]
        probs = log_p.exp()
        pick = torch.multinomial(probs.detach().T, 1).squeeze(1)
        rows = torch.arange(batch, device=logits.device)
        return Estimate(states[pick], losses[pick, rows].detach(), (probs * losses).sum(0))

    def _states(self, logits: Tensor) -> Tensor:
        bernoulli = self.distribution == "bernoulli"
        var_shape = logits.shape[1:] if bernoulli else logits.shape[1:-1]
        values = 2 if bernoulli else logits.shape[-1]
        count = values ** math.prod(var_shape)
        if count > self.config.max_states:
            raise PerceptionError(
                f"exact enumeration needs {count} states > max_states={self.config.max_states}; "
                "use reinforce, nvil, concrete, rebar or relax instead"
            )
        n_vars = math.prod(var_shape)
        index = torch.arange(count, device=logits.device)
        digits = index[:, None] // values ** torch.arange(n_vars, device=logits.device) % values
        if bernoulli:
            return digits.to(logits.dtype).reshape(count, *var_shape)
        return F.one_hot(digits, values).to(logits.dtype).reshape(count, *logits.shape[1:])


def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)
