"""Spatial broadcast decoder (Watters et al. 2019) with a hand-written vector-Jacobian product.

A latent ``z`` is tiled over a grid padded by ``K // 2`` pixels per KxK layer (K = 3 unless
set), two coordinate channels (x, y in [-1, 1]; optionally Fourier features of them,
:func:`fourier_features`) are appended, and unpadded KxK convolutions (ELU) shrink it back to
the image size before a 1x1 output layer. Position is then easy to read from the coordinates and hard to
entangle with appearance, which is why MONet and IODINE decode each slot this way.

The first convolution sees a spatially constant ``z``, so its ``z`` part is exactly a linear map
of ``z`` (the kernel summed over space) and its coordinate part a fixed map: computing it that
way is identical and saves the costliest layer. ``forward_with_cache`` keeps the
activations, from which :meth:`SpatialBroadcastDecoder.vjp` back-propagates a
gradient to ``z`` without autograd (which ``torch.onnx.export`` cannot trace).

The hidden layers run in channels-last memory format: the same sums, but oneDNN's CPU
convolutions are ~1.3x faster forward and backward on them (measured in
``python -m perception.bench segmentation --cost``); the output is returned contiguous.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def coordinate_grid(height: int, width: int) -> Tensor:
    """``[2, H, W]``: x (right) and y (down) of pixel centres in [-1, 1]."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) * (2.0 / height) - 1.0
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) * (2.0 / width) - 1.0
    return torch.stack([xs.view(1, -1).expand(height, width), ys.view(-1, 1).expand(height, width)])


def fourier_features(coords: Tensor, frequencies: int) -> Tensor:
    """``sin`` and ``cos`` of ``pi 2^f x`` and ``pi 2^f y`` for ``f < frequencies``: ``[2, H, W] ->
    [4 F, H, W]``. Extra coordinate channels make position as loud as the latent in the first
    layer (with two linear channels IODINE's decoder shut them out; docs/results/segmentation.md).
    The highest frequency's period is ``2^(1-F)`` of the image width: keep it above 2 pixels.
    """
    scales = torch.pi * 2.0 ** torch.arange(frequencies, dtype=coords.dtype, device=coords.device)
    angles = (coords[:, None] * scales[None, :, None, None]).flatten(0, 1)
    return torch.cat([angles.sin(), angles.cos()])


class SpatialBroadcastDecoder(nn.Module):
    """``z [B, D] -> [B, out_channels, H, W]`` through ``layers`` unpadded KxK convolutions (K odd)."""

    def __init__(
        self, latent_dim: int, out_channels: int, size: tuple[int, int], channels: int = 32, layers: int = 4,
        frequencies: int = 0, kernel_size: int = 3,
    ):
        super().__init__()
        if layers < 1:
            raise ValueError("a broadcast decoder needs at least one convolution layer")
        if type(frequencies) is not int or frequencies < 0:
            raise ValueError(f"frequencies must be an integer >= 0, got {frequencies!r}")
        if type(kernel_size) is not int or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
        h, w = size
        self.latent_dim = latent_dim
        coordinate_channels = 2 + 4 * frequencies
        self.convs = nn.ModuleList(
            nn.Conv2d(latent_dim + coordinate_channels if i == 0 else channels, channels, kernel_size)
            for i in range(layers)
        )
        self.out = nn.Conv2d(channels, out_channels, 1)
        # Coordinates of the padded grid, so the image-sized centre keeps pixel-centre units.
        pad = layers * (kernel_size // 2)
        grid = coordinate_grid(h, w)
        step_x, step_y = 2.0 / w, 2.0 / h
        xs = grid[0, 0, 0] + step_x * torch.arange(-pad, w + pad, dtype=torch.float32)
        ys = grid[1, 0, 0] + step_y * torch.arange(-pad, h + pad, dtype=torch.float32)
        coords = torch.stack([xs.view(1, -1).expand(h + 2 * pad, -1), ys.view(-1, 1).expand(-1, w + 2 * pad)])
        coords = torch.cat([coords, fourier_features(coords, frequencies)])
        self.register_buffer("coords", coords.unsqueeze(0), persistent=False)

    def _first(self, z: Tensor) -> Tensor:
        conv = self.convs[0]
        w_z, w_xy = conv.weight[:, : self.latent_dim], conv.weight[:, self.latent_dim :]
        fixed = F.conv2d(self.coords, w_xy, conv.bias)  # [1, C, H', W']
        return fixed + (z @ w_z.sum(dim=(2, 3)).t())[:, :, None, None]

    def forward_with_cache(self, z: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Output and the ELU activations :meth:`vjp` needs.

        ELU runs in place: no convolution needs its own output for its backward, and an in-place
        ELU's backward reads its result, so autograd keeps one tensor per layer instead of two.
        """
        acts = [F.elu(self._first(z).contiguous(memory_format=torch.channels_last), inplace=True)]
        for conv in self.convs[1:]:
            acts.append(F.elu(conv(acts[-1]), inplace=True))
        return self.out(acts[-1]).contiguous(), acts

    def forward(self, z: Tensor) -> Tensor:
        return self.forward_with_cache(z)[0]

    def vjp(self, acts: list[Tensor], grad_out: Tensor) -> Tensor:
        """``d<grad_out, decoder(z)>/dz`` per slot: ``grad_out [N, K, C, H, W]``, cached
        activations ``[N or 1, K, ...]`` (broadcast over the batch) -> ``[N, K, D]``.

        Transposed convolutions are computed as convolutions with flipped, channel-swapped kernels
        (the same sums; onnxruntime runs ConvTranspose through a slow col2im path and Conv through
        its blocked kernels). ELU's derivative is read off its output: ``min(a, 0) + 1``, which is
        ``exp(x)`` for x <= 0 and exactly 1 for x > 0 (cheaper than recomputing the exponential).
        """
        n, k = grad_out.shape[:2]
        channels_last = torch.channels_last
        g = F.conv2d(grad_out.flatten(0, 1).contiguous(memory_format=channels_last), self.out.weight.transpose(0, 1))
        for i in range(len(self.convs) - 1, 0, -1):
            weight = self.convs[i].weight
            g = (g.view(n, k, *g.shape[1:]) * (acts[i].clamp(max=0) + 1)).flatten(0, 1)
            g = F.conv2d(g, weight.flip(2, 3).transpose(0, 1), padding=weight.shape[-1] - 1)
        w_z = self.convs[0].weight[:, : self.latent_dim].sum(dim=(2, 3))  # [C, D]
        return (g.view(n, k, *g.shape[1:]) * (acts[0].clamp(max=0) + 1)).sum(dim=(3, 4)) @ w_z
