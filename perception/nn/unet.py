"""U-Net for MONet's attention network: per-pixel logits that keep full resolution.

Skip connections let the attention network draw sharp object boundaries, which a plain
encoder-decoder blurs. Down-sampling is 2x2 max-pooling; up-sampling is nearest-neighbour to
the skip's exact size, so odd sizes (Tetris, 35x35) work. Instance norm as in MONet.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.InstanceNorm2d(c_out, affine=True),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """``depth`` levels of ``channels`` feature maps; returns ``out_channels`` logits at input size."""

    def __init__(self, in_channels: int, out_channels: int, channels: int = 32, depth: int = 4):
        super().__init__()
        self.down = nn.ModuleList(_block(in_channels if i == 0 else channels, channels) for i in range(depth))
        self.bottleneck = _block(channels, channels)
        self.up = nn.ModuleList(_block(2 * channels, channels) for _ in range(depth))
        self.out = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return self.out(x)
