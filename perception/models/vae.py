"""Convolutional VAE: the single-slot baseline the object-centric papers compare against.

It exists so the training, export and RL pipelines are exercised end to end by a real model,
and as the NLL baseline for LAVAE. One slot holding the posterior mean; presence is always 1
and position is the image centre, because a whole-image code has no object location.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from perception.config import CheckedConfig
from perception.contract import Encoder, EncoderOutput, ModelLoss
from perception.nn.blocks import ConvDecoder, bernoulli_nll, conv_encoder, gaussian_kl


@dataclass
class VAEConfig(CheckedConfig):
    latent_dim: int = 16
    channels: int = 32
    beta: float = 1.0


class ConvVAE(Encoder):
    Config = VAEConfig
    name = "vae"

    def __init__(self, config: VAEConfig, image_shape: tuple[int, int, int]):
        super().__init__(config, image_shape)
        c, h, w = self.image_shape
        self.encoder, features = conv_encoder(c, h, config.channels)
        self.to_posterior = nn.Linear(features, 2 * config.latent_dim)
        self.decoder = ConvDecoder(config.latent_dim, c, h, config.channels)

    @property
    def num_slots(self) -> int:
        return 1

    @property
    def slot_layout(self) -> list[str]:
        return [f"z_{i}" for i in range(self.config.latent_dim)]

    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.to_posterior(self.encoder(images)).chunk(2, dim=-1)
        return mu, logvar.clamp(-10.0, 10.0)

    def encode(self, images: Tensor, deterministic: bool = True) -> EncoderOutput:
        mu, logvar = self.posterior(images)
        z = mu if deterministic else mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        n = images.shape[0]
        return EncoderOutput(
            slots=z.unsqueeze(1),
            presence=images.new_ones(n, 1),
            position=images.new_zeros(n, 1, 2),
        )

    def loss(self, batch: Mapping[str, Tensor], step: int) -> ModelLoss:
        x = batch["image"]
        mu, logvar = self.posterior(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        nll = bernoulli_nll(self.decoder(z), x)
        kl = gaussian_kl(mu, logvar)
        neg_elbo = (nll + kl).mean().detach()
        loss = (nll + self.config.beta * kl).mean()
        return ModelLoss(loss, {"neg_elbo": neg_elbo.item(), "nll": nll.mean().item(), "kl": kl.mean().item()})

    def reconstruct(self, images: Tensor) -> Tensor:
        mu, _ = self.posterior(images)
        return torch.sigmoid(self.decoder(mu))

    def visualize(self, images: Tensor) -> dict[str, Tensor]:
        return {"input": images, "reconstruction": self.reconstruct(images)}
