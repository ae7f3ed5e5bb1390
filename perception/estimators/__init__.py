"""Discrete gradient estimators behind one interface (see :mod:`perception.estimators.base`).

``build_estimator("relax", "categorical", num_classes=10)`` returns an ``nn.Module``; the model
keeps it as a submodule and calls it with its logits and a per-example loss of the sample.

| name | unbiased | loss_fn needs | score-function API |
| --- | --- | --- | --- |
| reinforce | yes | hard samples only | yes |
| nvil | yes | hard samples only | yes |
| concrete | no (bias -> 0 as temperature -> 0) | differentiable in the sample | no |
| rebar | yes | differentiable in the sample | no |
| relax | yes | differentiable in the sample | yes (learned control variate only) |
| exact | exact | every joint state (<= max_states) | no |
"""

from __future__ import annotations

import dataclasses
from typing import Any

from perception.config import config_from_dict
from perception.errors import PerceptionError
from perception.estimators import concrete, exact, relax, score  # noqa: F401  (registration)
from perception.estimators.base import (
    ESTIMATORS,
    Estimate,
    Estimator,
    LossFn,
    score_function_estimators,
)

__all__ = [
    "ESTIMATORS",
    "Estimate",
    "Estimator",
    "LossFn",
    "build_estimator",
    "score_function_estimators",
]


def build_estimator(
    name: str,
    distribution: str,
    *,
    num_classes: int | None = None,
    context_dim: int | None = None,
    **hyper: Any,
) -> Estimator:
    """An estimator by name; ``hyper`` fills its ``Config`` (unknown names are refused)."""
    cls = ESTIMATORS.get(name)
    if hyper and not dataclasses.fields(cls.Config):
        raise PerceptionError(f"estimator '{name}' takes no options; got {', '.join(sorted(hyper))}")
    config = config_from_dict(cls.Config, hyper, f"estimator '{name}'")
    return cls(config, distribution, num_classes=num_classes, context_dim=context_dim)
