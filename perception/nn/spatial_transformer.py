"""Affine spatial transformer: place an object image on a canvas, or cut it back out.

Conventions (those of the encoder contract):

* normalised coordinates in ``[-1, 1]``, x to the right, y downward, ``-1`` / ``+1`` at the
  image *edges* (``align_corners=False``), so a translation is directly a contract position;
* an affine ``matrix`` ``[..., 2, 3]`` = ``[A | t]`` maps **object** coordinates ``p`` (the
  prototype's / glimpse's own frame) to **canvas** coordinates ``A p + t``: ``t`` is where the
  object's centre lands, ``A = I`` keeps its size, a scale of 2 makes it twice as large;
* :func:`warp` renders an object onto the canvas with that matrix (decoders), :func:`crop` cuts
  the object's frame out of the canvas with the same matrix (AIR-style encoders), so
  ``crop(warp(x, m), m) == x`` (up to bilinear resampling) wherever the object stays inside
  the canvas.

Areas outside the source read as 0 (``padding_mode="zeros"``): warp probabilities or
intensities, not logits, so the empty background is black. Rotation and shear act in
normalised coordinates; on non-square images they are not pixel-isotropic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Names of the six parameters :func:`affine_from_params` reads, in order.
PARAM_NAMES: tuple[str, ...] = ("log_scale_x", "log_scale_y", "rotation", "shear", "where_x", "where_y")


def affine_matrix(
    scale: Tensor, translation: Tensor, rotation: Tensor | None = None, shear: Tensor | None = None
) -> Tensor:
    """Object-to-canvas matrices ``[..., 2, 3]`` with ``A = R(rotation) @ S(shear) @ diag(scale)``.

    ``scale`` ``[..., 2]`` (sx, sy) or ``[...]`` (isotropic), ``translation`` ``[..., 2]`` (x, y);
    ``rotation`` (radians, clockwise on screen since y points down) and ``shear`` (x += shear * y)
    ``[...]``, zero when omitted.
    """
    if scale.dim() == translation.dim() - 1:
        scale = torch.stack([scale, scale], dim=-1)
    zero = torch.zeros_like(translation[..., 0])
    rotation = zero if rotation is None else rotation
    shear = zero if shear is None else shear
    cos, sin = torch.cos(rotation), torch.sin(rotation)
    sx, sy = scale[..., 0], scale[..., 1]
    # R @ [[1, shear], [0, 1]] @ diag(sx, sy)
    a11, a12 = cos * sx, (cos * shear - sin) * sy
    a21, a22 = sin * sx, (sin * shear + cos) * sy
    row0 = torch.stack([a11, a12, translation[..., 0]], dim=-1)
    row1 = torch.stack([a21, a22, translation[..., 1]], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def affine_from_params(params: Tensor) -> Tensor:
    """Matrices ``[..., 2, 3]`` from ``[..., 6]`` parameters named :data:`PARAM_NAMES`.

    All zeros is the identity, so a network whose last layer is zero-initialised starts there.
    """
    return affine_matrix(params[..., 0:2].exp(), params[..., 4:6], rotation=params[..., 2], shear=params[..., 3])


def identity_matrix(batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.eye(2, 3, device=device, dtype=dtype).expand(batch, 2, 3).clone()


def pixel_centres(n: int, like: Tensor) -> Tensor:
    """Normalised coordinates of the centres of ``n`` pixels."""
    return (2 * torch.arange(n, dtype=like.dtype, device=like.device) + 1) / n - 1


def _sample(images: Tensor, theta: Tensor, out_size: tuple[int, int] | None) -> Tensor:
    """``out[q] = images[theta q]`` for every output location ``q`` (F.affine_grid's meaning)."""
    n, c, h, w = images.shape
    oh, ow = out_size if out_size is not None else (h, w)
    grid = F.affine_grid(theta, [n, c, oh, ow], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def warp(objects: Tensor, matrix: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
    """Render ``objects`` ``[N, C, h, w]`` onto canvases ``[N, C, *out_size]`` (default: same size).

    A canvas point ``p`` shows the object at ``A^-1 (p - t)``; e.g. ``t = (0.5, 0)`` moves the
    content right by a quarter of the canvas width. The sampling grid is built by broadcasting
    with the 2x2 inverse written out: no ``linalg.inv`` (which ONNX lacks, and DAIR exports
    warped prototypes) and no ``F.affine_grid`` (a batched matmul of inner size 3, slow on CPU).
    """
    a, b, tx = matrix[:, 0, 0], matrix[:, 0, 1], matrix[:, 0, 2]
    c, d, ty = matrix[:, 1, 0], matrix[:, 1, 1], matrix[:, 1, 2]
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det  # A^-1
    oh, ow = out_size if out_size is not None else objects.shape[-2:]
    xs = pixel_centres(ow, matrix)[None, None, :] - tx[:, None, None]
    ys = pixel_centres(oh, matrix)[None, :, None] - ty[:, None, None]
    gx = ia[:, None, None] * xs + ib[:, None, None] * ys
    gy = ic[:, None, None] * xs + id_[:, None, None] * ys
    grid = torch.stack([gx, gy], -1)
    return F.grid_sample(objects, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def crop(canvas: Tensor, matrix: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
    """Cut the object frame of ``matrix`` out of ``canvas``: the inverse of :func:`warp`."""
    return _sample(canvas, matrix, out_size)
