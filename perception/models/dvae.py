"""D-VAE: a categorical latent whose decoder is one learned prototype image per class.

q(c|x) is a small conv classifier, p(c) is uniform over L classes and p(x|c) is a Bernoulli
image whose pixel probabilities *are* prototype c, so the prototypes are directly viewable
(:meth:`DVAE.prototypes`). Minimising -ELBO = E_q[-log p(x|c)] + KL(q(c|x) || uniform) is a
soft k-means under the Bernoulli likelihood; the expectation over c goes through the
configured discrete estimator.

Plain training falls into the local minima of k-means (thesis: duplicate prototypes, noise
prototypes that no image picks). Two remedies, both on by default and both switchable so the
benchmark can show their effect:

* ``init="kmeans++"``: the first training batch seeds the prototypes by k-means++ (distant
  digits, not random noise), so every class starts as a plausible, distinct image;
* ``balance``: a penalty ``log L - H(mean_batch q(c|x))`` that keeps every class in use, decayed
  linearly to 0 over ``warmup_steps`` so the final objective is the plain ELBO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perception.contract import Encoder, EncoderOutput, ModelLoss
from perception.errors import PerceptionError
from perception.nn.blocks import conv_encoder

PROB_EPS = 1e-4  # keeps log p(x|c) finite where a prototype pixel reaches exactly 0 or 1
INITS = ("kmeans++", "random")


@dataclass
class DVAEConfig:
    num_classes: int = 10
    estimator: str = "exact"
    channels: int = 32
    hidden: int = 128
    init: str = "kmeans++"  # prototypes from the first batch by k-means++, or "random" logits
    prototype_lr: float = 10.0  # prototype learning-rate multiplier: pixels move in a few steps
    balance: float = 30.0  # weight (nats) of the class-usage penalty at step 0: comparable to the
    # NLL gaps between prototypes, else the best prototype for the average digit takes every image
    warmup_steps: int = 600  # steps over which the balance weight decays to 0


class PrototypeBank(nn.Module):
    """L learnable images stored as logits; the optimiser gives them their own learning rate."""

    def __init__(self, num: int, shape: tuple[int, int, int], lr_scale: float):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(num, *shape) * 0.5 - 2.0)
        self.lr_scale = lr_scale
        self.register_buffer("seeded", torch.zeros((), dtype=torch.bool))

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [self.logits], "lr": lr * self.lr_scale}]

    def probs(self) -> Tensor:
        return torch.sigmoid(self.logits)

    @torch.no_grad()
    def seed_kmeanspp(self, images: Tensor) -> None:
        """k-means++ seeding (D^2 sampling) on a batch; images are softened towards the batch
        mean so no pixel starts saturated."""
        n, num = images.shape[0], self.logits.shape[0]
        flat = images.flatten(1)
        chosen = [int(torch.randint(n, ()).item())]
        dist = (flat - flat[chosen[0]]).pow(2).sum(1)
        for _ in range(1, num):
            if n <= len(chosen) or float(dist.sum()) <= 0:
                chosen.append(int(torch.randint(n, ()).item()))
            else:
                chosen.append(int(torch.multinomial(dist, 1).item()))
            dist = torch.minimum(dist, (flat - flat[chosen[-1]]).pow(2).sum(1))
        self.logits.copy_(soft_logits(images[chosen], images))
        self.seeded.fill_(True)


def soft_logits(picked: Tensor, batch: Tensor) -> Tensor:
    """Prototype logits from data images, softened towards the batch mean so that no pixel
    starts saturated (a saturated pixel has no gradient)."""
    return torch.logit((0.7 * picked + 0.3 * batch.mean(0, keepdim=True)).clamp(0.02, 0.98))


def bernoulli_nll_probs(probs: Tensor, target: Tensor) -> Tensor:
    """Per-image -log p(target | probs) in nats, summed over pixels."""
    p = probs.clamp(PROB_EPS, 1.0 - PROB_EPS)
    return -(target * p.log() + (1.0 - target) * (1.0 - p).log()).flatten(1).sum(1)


def mix(weights: Tensor, placed: Tensor) -> Tensor:
    """``sum_l weights[n, l] * placed[n, l]``: [N, L] x [N or 1, L, C, H, W] -> [N, C, H, W]."""
    return (weights[:, :, None, None, None] * placed).sum(1)


def categorical_kl_uniform(logits: Tensor) -> Tensor:
    """KL(softmax(logits) || uniform) per row."""
    logq = F.log_softmax(logits, dim=-1)
    return (logq.exp() * logq).sum(-1) + math.log(logits.shape[-1])


class DVAE(Encoder):
    Config = DVAEConfig
    name = "dvae"
    default_dataset = "mnist"

    def __init__(self, config: DVAEConfig, image_shape: tuple[int, int, int]):
        super().__init__(config, image_shape)
        if config.num_classes < 2:
            raise PerceptionError(f"num_classes must be at least 2, got {config.num_classes}")
        if config.init not in INITS:
            raise PerceptionError(f"unknown prototype init '{config.init}'; valid: {', '.join(INITS)}")
        from perception.estimators import build_estimator

        c, h, _ = self.image_shape
        self.features, n_features = conv_encoder(c, h, config.channels)
        self.to_hidden = nn.Sequential(nn.Linear(n_features, config.hidden), nn.ReLU())
        self.to_logits = nn.Linear(config.hidden, config.num_classes)
        self.bank = PrototypeBank(config.num_classes, self.image_shape, config.prototype_lr)
        self.estimator = build_estimator(
            config.estimator, "categorical", num_classes=config.num_classes, context_dim=config.hidden
        )

    # --- contract -------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return 1

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def transform_names(self) -> list[str]:
        return []

    @property
    def slot_layout(self) -> list[str]:
        return self.transform_names + [f"class_{i}" for i in range(self.num_classes)]

    def prototypes(self) -> Tensor:
        """The L prototype images ``[L, C, H, W]`` in [0, 1]."""
        return self.bank.probs()

    def hidden(self, images: Tensor) -> Tensor:
        return self.to_hidden(self.features(images))

    def transform(
        self, images: Tensor, hidden: Tensor, deterministic: bool, step: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per class: (transform params [N, L, T], their KL [N, L], matrices [N, L, 2, 3] or None);
        ``step`` is the training step (None outside training)."""
        n, num = images.shape[0], self.num_classes
        return images.new_zeros(n, num, 0), images.new_zeros(n, num), None

    def placed(self, matrix: Tensor | None) -> Tensor:
        """Every prototype as it would appear in each image: ``[N or 1, L, C, H, W]``."""
        return self.prototypes().unsqueeze(0)

    def render(self, weights: Tensor, matrix: Tensor | None) -> Tensor:
        """Pixel probabilities of the prototype mixture ``weights`` [N, L] (one-hot or relaxed)."""
        return mix(weights, self.placed(matrix))

    def position(self, params: Tensor) -> Tensor:
        return params.new_zeros(params.shape[0], 1, 2)

    def encode(self, images: Tensor, deterministic: bool = True) -> EncoderOutput:
        hidden = self.hidden(images)
        logits = self.to_logits(hidden)
        if deterministic:
            cls = logits.argmax(-1)
        else:
            cls = torch.distributions.Categorical(logits=logits).sample()
        one_hot = F.one_hot(cls, self.num_classes).to(images.dtype)
        n = images.shape[0]
        params, _, _ = self.transform(images, hidden, deterministic)
        params = params[torch.arange(n, device=images.device), cls]  # the chosen class's transform
        return EncoderOutput(
            slots=torch.cat([params, one_hot], dim=-1).unsqueeze(1),
            presence=images.new_ones(n, 1),
            position=self.position(params),
            class_probs=logits.softmax(-1).unsqueeze(1),
        )

    # --- training -------------------------------------------------------------------------
    def balance_weight(self, step: int) -> float:
        cfg = self.config
        if cfg.balance <= 0 or step >= cfg.warmup_steps:
            return 0.0
        return cfg.balance * (1.0 - step / cfg.warmup_steps)

    def loss(self, batch: Mapping[str, Tensor], step: int) -> ModelLoss:
        x = batch["image"]
        if self.training and self.config.init == "kmeans++" and not bool(self.bank.seeded):
            self.bank.seed_kmeanspp(x)
        hidden = self.hidden(x)
        logits = self.to_logits(hidden)
        _, kl_z, matrix = self.transform(x, hidden, deterministic=False, step=step if self.training else None)
        placed = self.placed(matrix)  # warped once; every class sample is a mixture of these

        def nll_of(sample: Tensor) -> Tensor:  # -log p(x|c, z_c) + KL(q(z_c|x) || p(z))
            return bernoulli_nll_probs(mix(sample, placed), x) + (sample * kl_z).sum(-1)

        est = self.estimator(logits, nll_of, context=hidden.detach())
        kl_c = categorical_kl_uniform(logits)
        loss = est.surrogate.mean() + kl_c.mean()
        usage = logits.softmax(-1).mean(0)
        usage_gap = math.log(self.num_classes) + (usage * usage.clamp_min(1e-12).log()).sum()
        weight = self.balance_weight(step)
        if weight:
            loss = loss + weight * usage_gap

        with torch.no_grad():  # exact expectation over classes for the reported ELBO
            q = logits.softmax(-1)
            every = placed.expand(x.shape[0], -1, -1, -1, -1)
            target = x.unsqueeze(1).expand_as(every)
            nll = bernoulli_nll_probs(every.flatten(0, 1), target.flatten(0, 1)).view(-1, self.num_classes)
            expected_nll = (q * nll).sum(-1)
            kl = kl_c + (q * kl_z).sum(-1)
        metrics = {
            "neg_elbo": (expected_nll + kl).mean().item(),
            "nll": expected_nll.mean().item(),
            "kl": kl.mean().item(),
            "kl_class": kl_c.mean().item(),
            "usage_gap": usage_gap.item(),
        }
        return ModelLoss(loss, metrics)

    def reconstruct(self, images: Tensor) -> Tensor:
        hidden = self.hidden(images)
        one_hot = F.one_hot(self.to_logits(hidden).argmax(-1), self.num_classes).to(images.dtype)
        _, _, matrix = self.transform(images, hidden, deterministic=True)
        return self.render(one_hot, matrix)

    def visualize(self, images: Tensor) -> dict[str, Tensor]:
        rows = {"input": images, "reconstruction": self.reconstruct(images)}
        protos = self.prototypes()
        n = images.shape[0]
        for start in range(0, self.num_classes, n):  # prototypes, n per row
            chunk = protos[start : start + n]
            pad = chunk.new_zeros(n - chunk.shape[0], *chunk.shape[1:])
            rows[f"prototypes_{start}"] = torch.cat([chunk, pad])
        return rows
