"""Fast glimpse sampling for AIR-style models, on CPU.

Same conventions and the same numbers as :mod:`perception.nn.spatial_transformer` (bilinear,
zero padding, ``align_corners=False``, object-to-canvas transforms; the tests compare them), but
built for speed: ``F.affine_grid`` forms its grid with a batched matmul of inner size 3, which
dominated AIR's step time on a CPU.

* :func:`cut` / :func:`paste`: axis-aligned transforms (scale and centre), as two small matrix
  products per image. Bilinear interpolation under such a transform is separable, so the
  sampling is ``W_y @ image @ W_x^T`` with tent-function weights; it is differentiable in the
  scale and centre exactly like ``grid_sample``.
* :func:`warp_affine`: a general affine warp whose sampling grid is built by broadcasting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _pair(x: Tensor) -> Tensor:
    return torch.stack([x, x], -1) if x.dim() == 1 else x


def _centres(n: int, like: Tensor) -> Tensor:
    """Normalised coordinates of the centres of ``n`` pixels."""
    return (2 * torch.arange(n, dtype=like.dtype, device=like.device) + 1) / n - 1


def _axis_weights(out_n: int, in_n: int, scale: Tensor, shift: Tensor) -> Tensor:
    """``[N, out_n, in_n]`` bilinear weights for output coordinate u read at source ``scale u + shift``."""
    v = scale[:, None] * _centres(out_n, scale) + shift[:, None]
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


def warp_affine(objects: Tensor, matrix: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
    """``spatial_transformer.warp``: render ``objects`` with object-to-canvas ``matrix`` ``[N, 2, 3]``."""
    a, b, tx = matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 0, 2]
    c, d, ty = matrix[:, 1, 0], matrix[:, 1, 1], matrix[:, 1, 2]
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det  # A^-1
    oh, ow = out_size if out_size is not None else objects.shape[-2:]
    xs = _centres(ow, matrix)[None, None, :] - tx[:, None, None]
    ys = _centres(oh, matrix)[None, :, None] - ty[:, None, None]
    gx = ia[:, None, None] * xs + ib[:, None, None] * ys
    gy = ic[:, None, None] * xs + id_[:, None, None] * ys
    grid = torch.stack([gx, gy], -1)
    return F.grid_sample(objects, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
