"""Split-and-merge moves for prototype clustering under a hard-assignment cost.

k-means-like models (D-VAE, D-VAE-ST) get stuck where one class has two prototypes (a
duplicate) while two classes share one (a merge): no gradient step moves a prototype from one
digit to another. A move removes the prototype whose images are served almost as well by the
others and splits a cluster in two with 2-means; the caller accepts it only if the cost of a
probe batch falls.
"""

from __future__ import annotations

import torch
from torch import Tensor


def removal_costs(cost: Tensor) -> Tensor:
    """``[L]``: how much ``sum_n min_k cost[n, k]`` grows if prototype ``j`` is removed (each of
    its images moves to its second-best prototype). ``cost`` is ``[N, L]``."""
    best2 = cost.topk(2, dim=1, largest=False).values
    gaps = best2[:, 1] - best2[:, 0]
    return cost.new_zeros(cost.shape[1]).index_add_(0, cost.argmin(1), gaps)


def two_means(points: Tensor, iters: int = 10) -> Tensor:
    """Two centres ``[2, P]`` of ``points`` ``[M, P]`` by Lloyd's algorithm, started from the
    point farthest from the mean and the point farthest from that one (deterministic)."""
    a = points[(points - points.mean(0)).pow(2).sum(1).argmax()]
    b = points[(points - a).pow(2).sum(1).argmax()]
    centres = torch.stack([a, b])
    for _ in range(iters):
        side = torch.cdist(points, centres).argmin(1)
        for k in range(2):
            if (side == k).any():
                centres[k] = points[side == k].mean(0)
    return centres
