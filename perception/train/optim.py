"""Optimiser construction: estimators bring their own learning rates for what they own."""

from __future__ import annotations

import torch
from torch import nn


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam over the model; parameters owned by an estimator (NVIL's baseline, RELAX's control
    variate...) form groups with the estimator's own learning rate when it sets one."""
    groups: list[dict] = []
    owned: set[int] = set()
    for module in model.modules():
        param_groups = getattr(module, "param_groups", None)
        if module is model or not callable(param_groups):
            continue
        for group in param_groups(lr):
            fresh = [p for p in group["params"] if p.requires_grad and id(p) not in owned]
            owned.update(id(p) for p in fresh)
            if fresh:
                groups.append({**group, "params": fresh})
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
    if rest:
        groups.insert(0, {"params": rest, "lr": lr})
    return torch.optim.Adam(groups, lr=lr)
