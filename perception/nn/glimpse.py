"""Fast glimpse sampling for AIR-style models, on CPU.

Same conventions and the same numbers as :mod:`perception.nn.spatial_transformer` (bilinear,
zero padding, ``align_corners=False``, object-to-canvas transforms; the tests compare them), but
built for speed: ``F.affine_grid`` forms its grid with a batched matmul of inner size 3, which
dominated AIR's step time on a CPU.

:func:`cut` / :func:`paste`: axis-aligned transforms (scale and centre), as two small matrix
products per image. Bilinear interpolation under such a transform is separable, so the sampling
is ``W_y @ image @ W_x^T`` with tent-function weights; it is differentiable in the scale and
centre exactly like ``grid_sample``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from perception.nn.spatial_transformer import pixel_centres


def _pair(x: Tensor) -> Tensor:
    return torch.stack([x, x], -1) if x.dim() == 1 else x


def _axis_weights(out_n: int, in_n: int, scale: Tensor, shift: Tensor) -> Tensor:
    """``[N, out_n, in_n]`` bilinear weights for output coordinate u read at source ``scale u + shift``."""
    v = scale[:, None] * pixel_centres(out_n, scale) + shift[:, None]
    src = ((v + 1) * in_n - 1) / 2  # source pixel index
    index = torch.arange(in_n, dtype=scale.dtype, device=scale.device)
    return (1 - (src.unsqueeze(-1) - index).abs()).clamp(min=0)


def cut(canvas: Tensor, scale: Tensor, centre: Tensor, size: tuple[int, int]) -> Tensor:
    """Glimpses ``[N, C, *size]`` of the window of half-width ``scale`` (``[N]`` or ``[N, 2]``,
    as a fraction of the canvas) centred at ``centre`` ``[N, 2]`` (x, y in [-1, 1])."""
    scale = _pair(scale)
    h, w = canvas.shape[-2:]
    wy = _axis_weights(size[0], h, scale[:, 1], centre[:, 1])
    wx = _axis_weights(size[1], w, scale[:, 0], centre[:, 0])
    return wy.unsqueeze(1) @ canvas @ wx.transpose(1, 2).unsqueeze(1)


def paste(objects: Tensor, scale: Tensor, centre: Tensor, size: tuple[int, int]) -> Tensor:
    """Canvases ``[N, C, *size]`` showing ``objects`` in the window :func:`cut` reads."""
    scale = _pair(scale)
    h, w = objects.shape[-2:]
    wy = _axis_weights(size[0], h, 1 / scale[:, 1], -centre[:, 1] / scale[:, 1])
    wx = _axis_weights(size[1], w, 1 / scale[:, 0], -centre[:, 0] / scale[:, 0])
    return wy.unsqueeze(1) @ objects @ wx.transpose(1, 2).unsqueeze(1)
