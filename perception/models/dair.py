"""DAIR: AIR whose object model is a D-VAE-ST, so every object gets a digit class without labels.

Each glimpse (already centred and scaled by z_where) is explained by one of C learned prototype
images, warped by a small per-class affine transform (reparameterised Gaussian around the
identity). The class is a categorical latent with its own estimator (``class_estimator``;
``exact`` enumerates the C classes, which is cheap because the per-class glimpse losses are
computed once for all classes).

What makes it train, where the thesis' DAIR (78.76% count accuracy, no useful prototypes) did not:

* the class posterior is the one the prototypes themselves give: q(class | glimpse) =
  softmax of minus each class' glimpse cost (the D-VAE-ST loss of the glimpse under that class'
  prototype and amortised transform). The glimpse is normalised by z_where, so the classes only
  have to explain centred digits. (A separate class network, fitted by the estimator and even by
  cross-entropy to the chosen class, stayed near uniform with one class as the argmax everywhere
  in the time we could train.) ``class_estimator`` differentiates the expected glimpse cost
  under q, weighted by the probability that the step is on;
* the image canvas is written with the most probable class' warped prototype (hard EM) rather
  than a sample from q(class): early on, random prototypes explain the image worse than nothing,
  and AIR then learns to switch every object off. So DAIR's ``neg_elbo`` uses the argmax class,
  not a sample of q;
* the choice is frequency-sensitive (as in competitive learning): each class' glimpse cost gets
  ``balance_nats * log(C * usage)``, ``usage`` being a running average of how often present
  objects choose it. Without it one blurry prototype wins every glimpse (plain online k-means
  collapses; a batch-entropy bonus on q did not prevent it). It also revives unused prototypes;
* ``init_from``: the localisation (embedding, LSTM, where and presence heads) can start from a
  trained AIR checkpoint, so the prototypes never have to be learned from random glimpses;
* prototypes start from k-means++ on the first glimpses the model takes of present objects.

Slots: [where (3), transform (6, :data:`~perception.nn.spatial_transformer.PARAM_NAMES`), class
one-hot (C)]; ``class_probs`` ``[N, K, C]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perception.contract import ModelLoss
from perception.errors import CheckpointError, PerceptionError
from perception.models.air import AIR, AIRConfig, ObjectCode, mlp
from perception.nn.glimpse import cut, paste, warp_affine
from perception.nn.spatial_transformer import PARAM_NAMES, affine_from_params


@dataclass
class DAIRConfig(AIRConfig):
    num_classes: int = 10
    class_estimator: str = "exact"
    transform_prior_std: float = 0.2  # on the six affine parameters (log scales, angle, shear, shift)
    balance_nats: float = 100.0  # cost per e-fold of over-use of a class (frequency-sensitive choice)
    usage_decay: float = 0.99
    prototype_init_step: int = 0  # k-means++ on present glimpses at the first training step >= this
    init_from: str = ""  # AIR checkpoint (path or bundled name) to start the localisation from
    keypoints: int = 0  # the bundled DAIR was trained before AIR's residual keypoints
    explore: float = 0.0


class PrototypeWhat(nn.Module):
    """Glimpse = class prototype warped by a per-class affine transform."""

    def __init__(self, channels: int, glimpse: int, cfg: DAIRConfig):
        super().__init__()
        from perception.estimators import build_estimator

        c = cfg.num_classes
        self.num_classes = c
        self.std = cfg.likelihood_std
        self.prior_std = cfg.transform_prior_std
        self.trunk = nn.Sequential(mlp([channels * glimpse * glimpse, cfg.mlp, cfg.mlp]), nn.ReLU())
        self.transform_head = nn.Linear(cfg.mlp, c * 2 * len(PARAM_NAMES))
        with torch.no_grad():  # identity transforms with a small spread to begin with
            self.transform_head.weight.mul_(0.01)
            bias = self.transform_head.bias.view(c, 2, len(PARAM_NAMES))
            bias[:, 0].zero_()
            bias[:, 1].fill_(-3.0)
        self.prototypes = nn.Parameter(torch.randn(c, channels, glimpse, glimpse) * 0.1 - 1.0)  # logits
        self.balance = cfg.balance_nats
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("usage", torch.full((c,), 1.0 / c))
        self.estimator = build_estimator(cfg.class_estimator, "categorical", num_classes=c, context_dim=cfg.mlp)
        self.feature_names = [f"transform_{n}" for n in PARAM_NAMES] + [f"class_{i}" for i in range(c)]
        self.feedback_dim = len(PARAM_NAMES) + c

    def class_reconstructions(self, transforms: Tensor) -> Tensor:
        """``[B, C, ch, g, g]``: every prototype under its own transform ``[B, C, 6]``."""
        b, c, _ = transforms.shape
        protos = torch.sigmoid(self.prototypes)
        flat = protos.unsqueeze(0).expand(b, *protos.shape).reshape(b * c, *protos.shape[1:])
        out = warp_affine(flat, affine_from_params(transforms.reshape(b * c, -1)))
        return out.view(b, c, *protos.shape[1:])

    def forward(self, glimpse: Tensor, sample: bool) -> ObjectCode:
        b, c = glimpse.shape[0], self.num_classes
        h = self.trunk(glimpse.flatten(1))
        mean, raw_std = self.transform_head(h).view(b, c, 2, -1).unbind(2)
        std = F.softplus(raw_std) + 1e-4
        transforms = mean + torch.randn_like(mean) * std if sample else mean
        prior = self.prior_std
        transform_kl = (math.log(prior) - std.log() + (std.pow(2) + mean.pow(2)) / (2 * prior**2) - 0.5).sum(-1)
        recon = self.class_reconstructions(transforms)
        # Compared at half resolution (x4 to keep the scale of a full-resolution sum), so that a
        # sharp prototype slightly out of place is not beaten by a blurry average one.
        diff = F.avg_pool2d((glimpse.unsqueeze(1) - recon).flatten(0, 1), 2)
        nll = 2.0 * (diff / self.std).pow(2).view(b, c, -1).sum(-1)  # [B, C] (+ const)
        cost = nll + transform_kl + self.balance * torch.log(c * self.usage.clamp(min=1e-3 / c))
        logits = -cost
        log_q = F.log_softmax(logits, -1)
        choice = F.one_hot(logits.detach().argmax(-1), c).to(logits.dtype)  # hard EM
        aux = None
        if sample and self.training:
            aux = self.estimator(logits, lambda y: (y * cost).sum(-1), context=h).surrogate
        appearance = (choice[:, :, None, None, None] * recon).sum(1)
        chosen_transform = (choice.unsqueeze(-1) * transforms).sum(1)
        kl = (log_q.exp() * (log_q + math.log(c))).sum(-1) + (choice * transform_kl).sum(-1)
        features = torch.cat([chosen_transform, choice], -1)
        # For importance weights the class is what the canvas used: q is a point mass on the
        # argmax (log q = 0) against a uniform prior, so the ratio is -log C plus the transform's.
        transform_ratio = (std.log() - math.log(prior) - 0.5 * (transforms / prior).pow(2) + 0.5 * ((transforms - mean) / std).pow(2)).sum(-1)
        log_ratio = (choice * transform_ratio).sum(-1) - math.log(c)
        return ObjectCode(features, kl, appearance, features, log_q.exp(), aux, log_ratio)

    @torch.no_grad()
    def init_prototypes(self, glimpses: Tensor, generator: torch.Generator | None = None) -> bool:
        """k-means++ seeding plus a few Lloyd steps on ``glimpses`` ``[M, ch, g, g]``; False if too few."""
        c = self.num_classes
        x = glimpses.flatten(1)
        if x.shape[0] < 2 * c:
            return False
        centres = [x[torch.randint(len(x), (1,), generator=generator)]]
        for _ in range(c - 1):
            d2 = torch.cdist(x, torch.cat(centres)).pow(2).min(1).values
            centres.append(x[torch.multinomial(d2 + 1e-12, 1, generator=generator)])
        centres = torch.cat(centres)
        for _ in range(10):
            assign = torch.cdist(x, centres).argmin(1)
            for k in range(c):
                members = x[assign == k]
                if len(members):
                    centres[k] = members.mean(0)
        self.prototypes.copy_(torch.logit(centres.view_as(self.prototypes).clamp(0.02, 0.98)))
        self.initialised.fill_(True)
        return True


class DAIR(AIR):
    Config = DAIRConfig
    name = "dair"

    def __init__(self, config: DAIRConfig, image_shape: tuple[int, int, int]):
        if config.num_classes < 2:
            raise PerceptionError(f"dair needs num_classes >= 2, got {config.num_classes}")
        super().__init__(config, image_shape)
        self.register_buffer("warm_started", torch.zeros((), dtype=torch.bool))

    def build_object_model(self) -> nn.Module:
        return PrototypeWhat(self.image_shape[0], self.config.glimpse_size, self.config)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def visualize(self, images: Tensor) -> dict[str, Tensor]:
        rows = super().visualize(images)
        protos = torch.sigmoid(self.objects.prototypes)
        c, h, w = self.image_shape
        n = protos.shape[0]
        native = protos.new_full((n,), self.config.glimpse_size / w)  # at their own size, centred
        rows["prototypes"] = paste(protos, native, protos.new_zeros(n, 2), (h, w))
        return rows

    def loss(self, batch: Mapping[str, Tensor], step: int) -> ModelLoss:
        x = batch["image"]
        if self.training:
            self.prepare(x, step)
        loss, metrics, steps, on_prob = self.loss_terms(x, step)
        w = on_prob.detach().unsqueeze(-1)
        probs = torch.stack([o.class_probs for o in steps.objects], 1)  # [B, K, C]
        mean = (w * probs).sum((0, 1)) / w.sum().clamp(min=1e-6)
        metrics["class_entropy_gap"] = (math.log(self.num_classes) + (mean * mean.clamp(min=1e-12).log()).sum()).item()
        if self.training:  # presence-weighted frequency of the classes the canvas used
            chosen = torch.stack([o.features[:, -self.num_classes :] for o in steps.objects], 1)
            freq = (w * chosen).sum((0, 1)) / w.sum().clamp(min=1e-6)
            decay = self.config.usage_decay
            self.objects.usage.mul_(decay).add_((1 - decay) * freq.detach())
        return ModelLoss(loss.mean(), metrics)

    @torch.no_grad()
    def prepare(self, images: Tensor, step: int) -> None:
        """One-off initialisations at the start of training (kept in buffers, so a resumed or
        reloaded model does not redo them)."""
        if self.config.init_from and not self.warm_started:
            self.load_localisation(self.config.init_from)
            self.warm_started.fill_(True)
        if not self.objects.initialised and step >= self.config.prototype_init_step:
            steps = self.run_steps(images, self.config.max_steps, sample=False, threshold=True)
            on = steps.on.bool()
            if on.any():
                g = self.config.glimpse_size
                objects = images.unsqueeze(1).expand(-1, on.shape[1], -1, -1, -1)[on]
                where = steps.where[on]
                self.objects.init_prototypes(cut(objects, where[:, 0].exp(), where[:, 1:], (g, g)))

    def load_localisation(self, source: str) -> None:
        """Copy an AIR checkpoint's embedding, LSTM, where and presence heads; the LSTM's
        input weights for the what-feedback (which differs) start at zero."""
        from perception import resolve_encoder_path
        from perception.train.checkpoint import read_checkpoint

        state = read_checkpoint(resolve_encoder_path(source))
        if state["model"] != "air" or tuple(state["image_shape"]) != self.image_shape:
            raise CheckpointError(f"init_from: {source} is not an AIR checkpoint for images {list(self.image_shape)}")
        if state["model_config"].get("keypoints", 0) != self.config.keypoints:
            raise CheckpointError(f"init_from: {source} has keypoints={state['model_config'].get('keypoints', 0)}; give dair the same keypoints option")
        weights = state["state_dict"]
        own = self.state_dict()
        keep = self.config.embed + 2 * self.config.keypoints + 3
        for name, value in weights.items():
            prefix = name.split(".")[0]
            if prefix not in ("embed", "keypoint_maps", "rnn", "pres_head", "where_head"):
                continue
            if name == "rnn.weight_ih":
                target = torch.zeros_like(own[name])
                target[:, :keep] = value[:, :keep]
                target[:, -1] = value[:, -1]  # the previous-presence input
                value = target
            if own[name].shape != value.shape:
                raise CheckpointError(f"init_from: {source} has {name} of shape {list(value.shape)}, expected {list(own[name].shape)}")
            own[name].copy_(value)
