"""Image grids for TensorBoard and benchmark figures, without torchvision (no CPU wheel here)."""

from __future__ import annotations

import torch
from torch import Tensor


def image_grid(rows: list[Tensor], pad: int = 2) -> Tensor:
    """Tile rows of ``[N, C, H, W]`` images (same N, H, W; C 1 or 3) into one ``[3, H', W']``."""
    rows = [r.detach().float().cpu().clamp(0, 1) for r in rows]
    rows = [r.expand(-1, 3, -1, -1) if r.shape[1] == 1 else r[:, :3] for r in rows]
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    grid = torch.ones(3, len(rows) * (h + pad) + pad, n * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y : y + h, x : x + w] = img
    return grid


def draw_boxes(images: Tensor, boxes: Tensor, present: Tensor, colours: Tensor | None = None) -> Tensor:
    """Draw 1-pixel rectangle outlines.

    images ``[N, C, H, W]`` in [0, 1]; boxes ``[N, K, 4]`` as (x0, y0, x1, y1) in pixel units;
    present ``[N, K]`` bool. Returns RGB ``[N, 3, H, W]``.
    """
    out = images.detach().float().cpu().clone()
    out = out.expand(-1, 3, -1, -1).clone() if out.shape[1] == 1 else out[:, :3].clone()
    n, _, h, w = out.shape
    if colours is None:
        colours = torch.tensor([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.3, 0.5, 1.0], [1.0, 1.0, 0.2], [1.0, 0.3, 1.0], [0.2, 1.0, 1.0]])
    b = boxes.detach().cpu().round().long()
    for i in range(n):
        for k in range(b.shape[1]):
            if not bool(present[i, k]):
                continue
            x0, y0, x1, y1 = b[i, k].tolist()
            x0, x1 = max(0, min(w - 1, x0)), max(0, min(w - 1, x1 - 1))
            y0, y1 = max(0, min(h - 1, y0)), max(0, min(h - 1, y1 - 1))
            c = colours[k % len(colours)].view(3, 1)
            out[i, :, y0, x0 : x1 + 1] = c
            out[i, :, y1, x0 : x1 + 1] = c
            out[i, :, y0 : y1 + 1, x0] = c
            out[i, :, y0 : y1 + 1, x1] = c
    return out
