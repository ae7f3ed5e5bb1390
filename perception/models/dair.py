"""DAIR: AIR whose object model is a D-VAE-ST, so every object gets a digit class without labels.

Each glimpse AIR cuts out is re-centred on its centre of mass (MNIST digits are centred that way; AIR's boxes are ~1 px off, which costs a
single-digit D-VAE-ST 5 points of class accuracy), the frame centre is then chosen among a few
nearby candidates as the one the D-VAE-ST explains best (:meth:`DVAESTWhat.align`: its classifier
loses points at half a pixel of offset), the digit's frame is cut from it at
``frame_scale`` (the canonical scenes' 20 px digits are whole 28x28 MNIST frames resized) and a
D-VAE-ST (a :class:`~perception.models.dvaest.DVAEST` without spare prototypes: classifier, 10
prototypes and a per-class affine + thickness transform) explains the frame
(:meth:`~perception.models.dvae.DVAE.read`). The canvas gets the argmax class' warped prototype
pasted back (hard EM: a sampled class would write wrong digits early on and AIR
would switch objects off), so DAIR's ``neg_elbo`` uses the argmax class. Training adds the
D-VAE-ST loss of every frame (``E_q[cost] + KL(q(c) || uniform)``, the class through
``class_estimator``), weighted by the probability that the step is on.

The intended start is two unsupervised checkpoints: ``init_from`` an AIR (localisation: embedding,
keypoints, LSTM, where and presence heads) and ``init_what_from`` a ``dvaest`` trained on single
digits of the same training pool (its read-out classes: :meth:`~perception.models.dvae.DVAE.load_read_out`). Learning prototypes from scratch inside DAIR is what failed
before (the thesis: 78.76% count accuracy, no useful prototypes; this repo's earlier object
model of learned 20x20 prototypes with a frequency-sensitive class choice, since removed: 55%
class accuracy, docs/results/multi_mnist.md), while a D-VAE-ST on isolated digits has
split-and-merge moves and balance schedules that make its prototypes distinct classes.

Slots: [where (3), transform (7: the six of :data:`~perception.nn.spatial_transformer.PARAM_NAMES`
and thickness), class one-hot (C)]; ``class_probs`` ``[N, K, C]``. ``position`` is the centre of
the frame each step reads (the box centre plus the re-centring offset), not AIR's box centre: the
box of a scene's last digit is sometimes several pixels off (on OddOneOut scenes 5.5% of digits
had no box centre within 6 px; with the frame centre 2.0%, median error 1.0 -> 0.6 px).
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
from perception.models.air import AIR, AIRConfig, ObjectCode
from perception.models.dvae import categorical_kl_uniform, mix
from perception.models.dvaest import DVAEST, DVAESTConfig
from perception.nn.glimpse import cut, paste


@dataclass
class DAIRConfig(AIRConfig):
    glimpse_size: int = 28  # read at this resolution, then the frame is cut from it
    num_classes: int = 10
    class_estimator: str = "exact"
    frame_scale: float = 0.88  # the digit's frame as a fraction of AIR's glimpse width
    align_iters: int = 2  # centre-of-mass re-centring steps of the frame inside the glimpse
    # then the frame's centre is chosen among align_search x align_search offsets, align_step frame
    # pixels apart, as the one the D-VAE-ST explains best (1: off); see DVAESTWhat.align
    align_search: int = 3
    align_step: float = 0.7
    init_what_from: str = ""  # dvaest checkpoint (path or bundled name) to start the object model from
    init_from: str = ""  # AIR checkpoint (path or bundled name) to start the localisation from
    keypoints: int = 0  # the bundled AIR (the usual init_from) has no residual keypoints
    explore: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes < 2:
            raise PerceptionError(f"dair needs num_classes >= 2, got {self.num_classes}")
        if not 0 < self.frame_scale <= 2 or self.align_iters < 0:
            raise PerceptionError("dair needs 0 < frame_scale <= 2 and align_iters >= 0")
        if self.align_search < 1 or self.align_search % 2 == 0 or self.align_step <= 0:
            raise PerceptionError(
                f"dair needs an odd align_search >= 1 (the centre-of-mass frame is a candidate) and align_step > 0, "
                f"got {self.align_search}, {self.align_step}"
            )


DVAEST_FRAME = 28  # the D-VAE-ST reads MNIST-sized frames (the digit's 20 px box is a 28x28 digit resized)


def centre_of_mass(images: Tensor) -> Tensor:
    """``[N, 2]`` intensity-weighted (x, y) of ``images`` ``[N, C, H, W]`` in [-1, 1] units."""
    mass = images.sum(1)
    total = mass.sum((1, 2)).clamp(min=1e-6)
    h, w = mass.shape[-2:]
    xs = (2 * torch.arange(w, dtype=images.dtype, device=images.device) + 1) / w - 1
    ys = (2 * torch.arange(h, dtype=images.dtype, device=images.device) + 1) / h - 1
    return torch.stack([(mass.sum(1) * xs).sum(-1), (mass.sum(2) * ys).sum(-1)], -1) / total.unsqueeze(-1)


class DVAESTWhat(nn.Module):
    """The glimpse's object is a D-VAE-ST digit: the glimpse is re-centred on its centre of mass
    (MNIST digits are centred that way, and AIR's boxes are ~1 px off: the bundled dvaest's class
    accuracy on the bundled AIR's glimpses goes from 80% to 92.5%, as on the true digit boxes), the
    centre is refined by :meth:`align`, the digit's frame is cut at ``frame_scale`` of the
    glimpse, and the D-VAE-ST explains the frame. The canvas gets the argmax class' warped prototype
    pasted back into the glimpse; the class probabilities are the D-VAE-ST's amortised q(c | frame)."""

    def __init__(self, channels: int, glimpse: int, cfg: DAIRConfig):
        super().__init__()
        self.num_classes = cfg.num_classes
        self.glimpse = glimpse
        self.frame_scale = cfg.frame_scale
        self.align_iters = cfg.align_iters
        self.align_search = cfg.align_search
        self.align_step = cfg.align_step
        # Exactly the classes read out (no spares); its estimator is the class estimator, and its
        # prototypes train at DAIR's learning rate. DAIR uses its read(), costs() and estimator, never its
        # own loss() or moves.
        what = DVAESTConfig(num_classes=cfg.num_classes, estimator=cfg.class_estimator, extra_classes=0, prototype_lr=1.0)
        self.digits = DVAEST(what, (channels, DVAEST_FRAME, DVAEST_FRAME))
        names = self.digits.transform_names
        self.feature_names = [f"transform_{n}" for n in names] + [f"class_{i}" for i in range(cfg.num_classes)]
        self.feedback_dim = len(names) + cfg.num_classes

    def frame_centre(self, glimpse: Tensor) -> Tensor:
        """``[B, 2]`` centre of the digit's frame in glimpse units (fixed: no gradient)."""
        g = glimpse.detach().clamp(0, 1)
        if not self.align_iters:
            return g.new_zeros(g.shape[0], 2)
        centre = centre_of_mass(g)
        scale = g.new_full((g.shape[0],), self.frame_scale)
        for _ in range(self.align_iters - 1):
            centre = centre + centre_of_mass(cut(g, scale, centre, (DVAEST_FRAME, DVAEST_FRAME))) * self.frame_scale
        return centre

    @torch.no_grad()
    def align(self, glimpse: Tensor, centre: Tensor) -> Tensor:
        """``[B, 2]``: of a grid of frame centres around ``centre`` (``align_search`` per axis,
        ``align_step`` frame pixels apart), the one whose frame the D-VAE-ST explains best (lowest
        cost of its classifier's class: -log p(frame | class, transform) + KL). Why: its amortised
        classifier only ever saw MNIST's centre-of-mass-centred frames, and a centre-of-mass
        estimate inside a scene is ~0.6 px off (MNIST centres on the 28 px grid, the scene draws
        the digit at 20 px): half a pixel costs it several points of class accuracy, a whole
        pixel in x and y a third. The likelihood, which warps the prototype, is not fooled."""
        k = self.align_search
        if k == 1:
            return centre
        g, pixel = k * k, 2 * self.frame_scale / DVAEST_FRAME  # one frame pixel in glimpse units
        steps = (torch.arange(k, dtype=glimpse.dtype, device=glimpse.device) - (k - 1) / 2) * (self.align_step * pixel)
        grid = torch.stack(torch.meshgrid(steps, steps, indexing="xy"), -1).reshape(g, 2)  # (x, y) offsets
        grid = torch.cat([grid[g // 2 : g // 2 + 1], grid[: g // 2], grid[g // 2 + 1 :]])  # centre first: ties keep it
        candidates = centre.unsqueeze(1) + grid  # [B, G, 2]; the batch size stays symbolic for export
        flat = candidates.reshape(-1, 2)
        scale = torch.full_like(flat[:, 0], self.frame_scale)
        frames = cut(glimpse.repeat_interleave(g, 0), scale, flat, (DVAEST_FRAME, DVAEST_FRAME)).clamp(0, 1)
        best = self.digits.classified_cost(frames).view(-1, g).argmin(1)
        return candidates.gather(1, best.view(-1, 1, 1).expand(-1, 1, 2)).squeeze(1)

    def frames(self, glimpse: Tensor, align: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """(frames ``[B, C, 28, 28]``, their scale ``[B]`` and centre ``[B, 2]`` in the glimpse);
        ``align=False``: centre of mass only (before the D-VAE-ST has prototypes to align with)."""
        centre = self.frame_centre(glimpse)
        centre = self.align(glimpse, centre) if align else centre
        scale = glimpse.new_full((glimpse.shape[0],), self.frame_scale)
        return cut(glimpse, scale, centre, (DVAEST_FRAME, DVAEST_FRAME)).clamp(0, 1), scale, centre

    def forward(self, glimpse: Tensor, sample: bool) -> ObjectCode:
        c = self.num_classes
        frame, scale, centre = self.frames(glimpse)
        # Detached: the frame's D-VAE-ST cost would otherwise pull the glimpses to empty places,
        # which cost nothing (the localisation learns from the image likelihood only).
        frame = frame.detach()
        r = self.digits.read(frame, deterministic=not sample)
        choice = F.one_hot(r.logits.detach().argmax(-1), c).to(r.logits.dtype)  # the canvas' class
        kl_class = categorical_kl_uniform(r.logits)
        aux = None
        if sample and self.training:  # trained like D-VAE-ST on the frames: E_q[cost] + KL(q || U)
            costs = self.digits.costs(frame, r.params, r.kl, r.placed)
            est = self.digits.estimator(r.logits, lambda y: (y * costs).sum(-1), context=r.hidden, broadcasts=True)
            aux = est.surrogate + kl_class
        appearance = paste(mix(choice, r.placed), scale, centre, (self.glimpse, self.glimpse))
        chosen = (choice.unsqueeze(-1) * r.params).sum(1)
        kl = kl_class + (choice * r.kl).sum(-1)
        features = torch.cat([chosen, choice], -1)
        log_ratio = (choice * r.log_ratio).sum(-1) - math.log(c)  # class as a point mass on the argmax
        return ObjectCode(features, kl, appearance, features, r.logits.softmax(-1), aux, log_ratio, centre)

    def load(self, source: str) -> None:
        from perception import resolve_encoder_path
        from perception.train.checkpoint import read_checkpoint

        self.digits.load_read_out(read_checkpoint(resolve_encoder_path(source)), f"init_what_from: {source}")


class DAIR(AIR):
    Config = DAIRConfig
    name = "dair"

    def __init__(self, config: DAIRConfig, image_shape: tuple[int, int, int]):
        super().__init__(config, image_shape)
        self.register_buffer("warm_started", torch.zeros((), dtype=torch.bool))

    def build_object_model(self) -> nn.Module:
        return DVAESTWhat(self.image_shape[0], self.config.glimpse_size, self.config)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def visualize(self, images: Tensor) -> dict[str, Tensor]:
        rows = super().visualize(images)
        protos = self.objects.digits.prototypes()
        c, h, w = self.image_shape
        n = protos.shape[0]
        native = protos.new_full((n,), protos.shape[-1] / w)  # at their own size, centred
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
        return ModelLoss(loss.mean(), metrics)

    @torch.no_grad()
    def prepare(self, images: Tensor, step: int) -> None:
        """One-off initialisations at the start of training (kept in buffers, so a resumed or
        reloaded model does not redo them)."""
        if self.config.init_from and not self.warm_started:
            self.load_localisation(self.config.init_from)
            self.warm_started.fill_(True)
        bank = self.objects.digits.bank
        if self.config.init_what_from and not bank.seeded:
            self.objects.load(self.config.init_what_from)
        if not bank.seeded:  # k-means++ on the frames of the first present glimpses
            glimpses = self.present_glimpses(images)
            if len(glimpses) >= self.num_classes:
                bank.seed_kmeanspp(self.objects.frames(glimpses, align=False)[0])

    def present_glimpses(self, images: Tensor) -> Tensor:
        """``[M, C, g, g]`` glimpses of the objects the current model finds (deterministic)."""
        steps = self.run_steps(images, self.config.max_steps, sample=False, threshold=True)
        on = steps.on.bool()
        g = self.config.glimpse_size
        objects = images.unsqueeze(1).expand(-1, on.shape[1], -1, -1, -1)[on]
        where = steps.where[on]
        return cut(objects, where[:, 0].exp(), where[:, 1:], (g, g))

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
