"""Small convolutional encoders/decoders sized from the image shape."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def conv_encoder(in_channels: int, image_size: int, channels: int = 32, min_size: int = 4) -> tuple[nn.Module, int]:
    """Stride-2 conv stack down to ``min_size`` or below, then flatten. Returns (module, features)."""
    layers: list[nn.Module] = []
    size, c_in = image_size, in_channels
    while size > min_size:
        layers += [nn.Conv2d(c_in, channels, 4, stride=2, padding=1), nn.ReLU()]
        c_in, size = channels, size // 2
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), c_in * size * size


class ConvDecoder(nn.Module):
    """Mirror of :func:`conv_encoder`: a linear layer to a small map, then transposed convs."""

    def __init__(self, latent_dim: int, out_channels: int, image_size: int, channels: int = 32, min_size: int = 4):
        super().__init__()
        ups = 0
        size = image_size
        while size > min_size:
            size //= 2
            ups += 1
        self.start = size
        self.channels = channels
        self.fc = nn.Sequential(nn.Linear(latent_dim, channels * size * size), nn.ReLU())
        layers: list[nn.Module] = []
        for i in range(ups):
            last = i == ups - 1
            layers.append(nn.ConvTranspose2d(channels, out_channels if last else channels, 4, stride=2, padding=1))
            if not last:
                layers.append(nn.ReLU())
        self.deconv = nn.Sequential(*layers) if layers else nn.Identity()
        self.image_size = image_size

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).view(z.shape[0], self.channels, self.start, self.start)
        out = self.deconv(h)
        if out.shape[-1] != self.image_size:  # sizes that are not a power of two
            out = nn.functional.interpolate(out, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return out


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over the last dimension."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def bernoulli_nll(logits: Tensor, target: Tensor) -> Tensor:
    """Per-image negative log-likelihood (nats), summed over pixels."""
    return nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(1)


LOG_2PI = math.log(2 * math.pi)
