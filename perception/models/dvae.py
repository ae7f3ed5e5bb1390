"""D-VAE: a categorical latent whose decoder is one learned prototype image per class.

q(c|x) is a small conv classifier, p(c) is uniform over L classes and p(x|c) is a Bernoulli
image whose pixel probabilities *are* prototype c, so the prototypes are directly viewable
(:meth:`DVAE.prototypes`). Minimising -ELBO = E_q[-log p(x|c)] + KL(q(c|x) || uniform) is a
soft k-means under the Bernoulli likelihood; the expectation over c goes through the
configured discrete estimator.

Plain training falls into the local minima of k-means (thesis: duplicate prototypes, noise
prototypes that no image picks). Four remedies, all on by default and all switchable so the
benchmark can show their effect (docs/results/clustering.md):

* ``init="kmeans++"``: the first training batch seeds the prototypes by k-means++ (distant
  digits, not random noise), so every class starts as a plausible, distinct image;
* ``balance``: a penalty ``log L - H(mean_batch q(c|x))`` that keeps every class in use, decayed
  linearly to 0 over ``warmup_steps`` so the final objective is the plain ELBO;
* split-and-merge moves (``split_every``/``split_until``): the most redundant prototype is
  re-seeded on one half of a 2-means split of another cluster when that lowers the cost of
  recent training images; both halves (and, for a fair comparison, the unsplit prototype) are
  first fitted to the cluster's images (``split_refit_steps``); no moves after
  ``split_until``, so training ends on the plain ELBO;
* ``extra_classes``: over-cluster, then prune. Training starts with ``num_classes +
  extra_classes`` prototypes; at ``split_until`` the most redundant ones (whose removal raises
  the probe cost least) are switched off for good, their images going to the next-best class,
  and the rest of training fine-tunes the ``num_classes`` survivors. At L = 10 on MNIST the
  likelihood rates a second '2' style about as well as a separate '5' or '4', and removing the
  duplicate to split the merged cluster rarely pays; with spares, a split replaces a cheap
  spare or duplicate, and pruning the duplicates comes last. The read-out (``encode``, :meth:`DVAE.prototypes`)
  covers only the ``num_classes`` survivors (``keep``, derived from the saved ``alive``), so the
  exported model has exactly ``num_classes`` classes; the pruned rows stay in the checkpoint (a
  few KB), and :meth:`DVAE.load_read_out` loads only the survivors into a model without spares.

``encode`` reads the class from the amortised classifier (``class_inference="classifier"``, the
default: it exports to ONNX within tolerance and is what training optimises) or by enumerating
the L classes with their inferred transforms (``"posterior"``: ~1 point more accurate on MNIST,
but its near-tied probabilities move ~3e-4 between torch and onnxruntime, so export refuses it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perception.config import CheckedConfig
from perception.contract import Encoder, EncoderOutput, ModelLoss
from perception.errors import CheckpointError, PerceptionError
from perception.nn.blocks import conv_encoder
from perception.nn.prototype_split import removal_costs, two_means

PROB_EPS = 1e-4  # keeps log p(x|c) finite where a prototype pixel reaches exactly 0 or 1
SPLIT_EPS = 1e-3  # candidate prototypes from pixel means are clamped to [eps, 1 - eps]
DEAD_LOGIT = -1e4  # classifier logit of a pruned class: its probability is exactly 0 in float32
REFIT_LR = 0.1  # Adam step on candidate prototype logits while fitting a move's candidates
INITS = ("kmeans++", "random")
CLASS_INFERENCE = ("posterior", "classifier")


@dataclass
class DVAEConfig(CheckedConfig):
    num_classes: int = 10
    estimator: str = "exact"
    channels: int = 32
    hidden: int = 128
    init: str = "kmeans++"  # prototypes from the first batch by k-means++, or "random" logits
    prototype_lr: float = 10.0  # prototype learning-rate multiplier: pixels move in a few steps
    balance: float = 30.0  # weight (nats) of the class-usage penalty at step 0: comparable to the
    # NLL gaps between prototypes, else the best prototype for the average digit takes every image
    warmup_steps: int = 600  # steps over which the balance weight decays to 0
    # Split-and-merge moves (perception/nn/prototype_split.py): every split_every training steps
    # up to split_until, try replacing the most redundant prototype by one half of a 2-means
    # split of another cluster; kept only if the probe batch's cost falls by split_min_gain nats
    # per image. The probe is the last probe_batches training batches.
    split_every: int = 100  # 0: never
    split_until: int = 1600  # the benchmark trains 3600 steps: the last 2000 are plain ELBO
    # Spare prototypes trained until split_until, then pruned to num_classes (module docstring).
    extra_classes: int = 2
    split_min_gain: float = 0.5
    probe_batches: int = 8
    # Candidate prototypes of a move (the unsplit one and the two halves) are fitted to the
    # cluster's images by this many steps of hard EM under their transforms before scoring: a
    # pixel mean of aligned images is blurrier than a trained prototype, so unfitted halves lose
    # to it even where the cluster holds two digits. 0: score the pixel means.
    split_refit_steps: int = 30
    # How encode() reads the class: "classifier" is the amortised q(c|x) trained by the ELBO;
    # "posterior" enumerates the L classes, p(c|x) proportional to p(x|c, z_c) exp(-KL_z_c) with
    # each class's inferred transform, which removes the classifier's amortisation gap but
    # compares ~100-nat likelihoods, so float32 noise between runtimes exceeds the export tolerance.
    class_inference: str = "classifier"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_classes < 2:
            raise PerceptionError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.extra_classes < 0:
            raise PerceptionError(f"extra_classes must be 0 or more, got {self.extra_classes}")
        if self.init not in INITS:
            raise PerceptionError(f"unknown prototype init '{self.init}'; valid: {', '.join(INITS)}")
        if self.class_inference not in CLASS_INFERENCE:
            raise PerceptionError(
                f"unknown class_inference '{self.class_inference}'; valid: {', '.join(CLASS_INFERENCE)}"
            )


class Reading(NamedTuple):
    """Everything the model infers about a batch of images, for every prototype ``P`` (spares
    included): what training, the split-and-merge moves and DAIR's object model use."""

    hidden: Tensor  # [N, hidden] the classifier's features (an estimator's context)
    logits: Tensor  # [N, P] amortised q(c|x) (pruned prototypes at DEAD_LOGIT)
    params: Tensor  # [N, P, T] each prototype's transform (sampled, or the posterior mean)
    kl: Tensor  # [N, P] KL(q(z_c|x) || p(z))
    log_ratio: Tensor  # [N, P] log p(z_c) - log q(z_c|x) at params
    placed: Tensor  # [N or 1, P, C, H, W] each prototype under its transform
    # Per-class costs are not part of it: encode/eval never need them and training needs them
    # only without gradient (or, in DAIR, only when training); ``DVAE.costs(images, r.params, r.kl, r.placed)``.


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


def read_out_index(alive: Tensor, num_classes: int) -> Tensor:
    """The prototypes read out, in order: the first ``num_classes`` alive ones (all are alive
    until pruning leaves exactly ``num_classes``)."""
    return alive.nonzero().squeeze(1)[:num_classes]


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


def usage_gap(usage: Tensor) -> Tensor:
    """KL(usage || uniform) of class frequencies ``usage`` ``[L]`` (summing to 1), in nats."""
    return math.log(usage.shape[-1]) + (usage * usage.clamp_min(1e-12).log()).sum(-1)


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
        from perception.estimators import build_estimator

        c, h, _ = self.image_shape
        self.features, n_features = conv_encoder(c, h, config.channels)
        self.to_hidden = nn.Sequential(nn.Linear(n_features, config.hidden), nn.ReLU())
        total = self.num_prototypes
        self.to_logits = nn.Linear(config.hidden, total)
        self.bank = PrototypeBank(total, self.image_shape, config.prototype_lr)
        self.estimator = build_estimator(config.estimator, "categorical", num_classes=total, context_dim=config.hidden)
        # alive: prototypes still trained (all until pruned); without spares nothing is ever
        # pruned, so it follows from the config and is not saved. keep: the num_classes read out
        # (read_out_index of alive), a buffer so that it follows the model's device.
        self.register_buffer("alive", torch.ones(total, dtype=torch.bool), persistent=config.extra_classes > 0)
        self.register_buffer("keep", read_out_index(self.alive, config.num_classes), persistent=False)
        self._probe: list[Tensor] = []  # recent training batches for split-and-merge (not saved)
        self.moves = 0  # accepted split-and-merge moves in this process

    # --- contract -------------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return 1

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def num_prototypes(self) -> int:
        """Prototypes trained, spares included (the read-out has :attr:`num_classes`)."""
        return self.config.num_classes + self.config.extra_classes

    @property
    def transform_names(self) -> list[str]:
        return []

    @property
    def slot_layout(self) -> list[str]:
        return self.transform_names + [f"class_{i}" for i in range(self.num_classes)]

    def prototypes(self) -> Tensor:
        """The L prototype images ``[L, C, H, W]`` in [0, 1] that the read-out uses."""
        return self.bank.probs()[self.keep]

    def hidden(self, images: Tensor) -> Tensor:
        return self.to_hidden(self.features(images))

    def transform(
        self, images: Tensor, hidden: Tensor, deterministic: bool, step: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per prototype: (transform params [N, P, T], their KL [N, P], log p(z) - log q(z|x) at
        the params [N, P]); ``step`` is the training step (None outside training)."""
        n, num = images.shape[0], self.num_prototypes
        return images.new_zeros(n, num, 0), images.new_zeros(n, num), images.new_zeros(n, num)

    def placed(self, params: Tensor) -> Tensor:
        """Every prototype (spares included) as it would appear in each image: ``[N or 1, P, C, H, W]``."""
        return self.bank.probs().unsqueeze(0)

    def render(self, weights: Tensor, params: Tensor) -> Tensor:
        """Pixel probabilities of the prototype mixture ``weights`` [N, P] (one-hot or relaxed)."""
        return mix(weights, self.placed(params))

    def position(self, params: Tensor) -> Tensor:
        return params.new_zeros(params.shape[0], 1, 2)

    def aligned(self, images: Tensor, params: Tensor) -> Tensor:
        """Images brought into a prototype's own frame (``params`` ``[N, T]`` of that class)."""
        return images

    def place_one(self, proto: Tensor, params: Tensor) -> Tensor:
        """One prototype ``[C, H, W]`` as it would appear in the images of ``params`` ``[N, T]``."""
        return proto.expand(params.shape[0], *proto.shape)

    def class_rows(self) -> list[Tensor]:
        """Parameters whose first dimension (after a reshape) indexes the classes."""
        return [self.to_logits.weight, self.to_logits.bias]

    @torch.no_grad()
    def copy_class(self, src: int, dst: int) -> None:
        for p in self.class_rows():
            rows = p.view(self.num_prototypes, -1)
            rows[dst] = rows[src]

    def costs(self, images: Tensor, params: Tensor, kl_z: Tensor, placed: Tensor | None = None) -> Tensor:
        """``[N, P]``: -log p(x|c, z_c) + KL(q(z_c|x) || p(z)) for every prototype c (``placed``:
        :meth:`placed` of ``params`` when already computed)."""
        placed = self.placed(params) if placed is None else placed
        placed = placed.expand(images.shape[0], *placed.shape[1:])
        target = images.unsqueeze(1).expand_as(placed)
        return bernoulli_nll_probs(placed.flatten(0, 1), target.flatten(0, 1)).view(images.shape[0], -1) + kl_z

    def classifier_logits(self, hidden: Tensor) -> Tensor:
        """Amortised q(c|x) logits ``[N, P]``; pruned prototypes get :data:`DEAD_LOGIT`."""
        return self.to_logits(hidden).masked_fill(~self.alive, DEAD_LOGIT)

    def read(self, images: Tensor, deterministic: bool = True, step: int | None = None) -> Reading:
        hidden = self.hidden(images)
        params, kl_z, log_ratio = self.transform(images, hidden, deterministic, step)
        return Reading(hidden, self.classifier_logits(hidden), params, kl_z, log_ratio, self.placed(params))

    def read_logits(self, images: Tensor, deterministic: bool = True) -> tuple[Tensor, Tensor]:
        """(logits [N, P] as ``class_inference`` reads them, transform params [N, P, T]) for every
        prototype, spares included."""
        hidden = self.hidden(images)
        params, kl_z, _ = self.transform(images, hidden, deterministic)
        if self.config.class_inference == "classifier":
            return self.to_logits(hidden), params
        return -self.costs(images, params, kl_z), params

    def class_logits(self, images: Tensor, deterministic: bool = True) -> tuple[Tensor, Tensor]:
        """(class logits [N, L], transform params [N, L, T]) over the ``num_classes`` read-out classes."""
        logits, params = self.read_logits(images, deterministic)
        return logits[:, self.keep], params[:, self.keep]

    def encode(self, images: Tensor, deterministic: bool = True) -> EncoderOutput:
        logits, params = self.class_logits(images, deterministic)
        if deterministic:
            cls = logits.argmax(-1)
        else:
            cls = torch.distributions.Categorical(logits=logits).sample()
        one_hot = F.one_hot(cls, self.num_classes).to(images.dtype)
        n = images.shape[0]
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

    @torch.no_grad()
    def split_and_merge(self, x: Tensor) -> float:
        """Try one move on the probe images ``x``; returns the accepted gain in nats per image
        (0 if rejected). Removal of prototype ``drop`` frees a class; cluster ``s`` is split by
        2-means of its members in ``s``'s frame into ``s`` and ``drop``, which inherits ``s``'s
        classifier and transform rows, so both start with half of ``s``'s images."""
        n, num = x.shape[0], self.num_prototypes
        r = self.read(x)
        params, kl_z = r.params, r.kl
        cost = self.costs(x, params, kl_z, r.placed)
        assign = cost.argmin(1)
        drop = int(removal_costs(cost).argmin())

        def column(proto: Tensor, s: int) -> Tensor:
            return bernoulli_nll_probs(self.place_one(proto.clamp(SPLIT_EPS, 1 - SPLIT_EPS), params[:, s]), x) + kl_z[:, s]

        best_gain, best = 0.0, None
        for s in range(num):
            members = assign == s
            if s == drop or int(members.sum()) < 4:
                continue
            frame = self.aligned(x[members], params[members, s])
            halves = two_means(frame.flatten(1)).view(2, *frame.shape[1:])
            if self.config.split_refit_steps > 0:
                one = column(self.refit(self.bank.probs()[s : s + 1], x[members], params[members, s])[0], s)
                halves = self.refit(halves, x[members], params[members, s])
            else:
                one = column(frame.mean(0), s)
            refreshed, split = cost.clone(), cost.clone()
            refreshed[:, s] = one  # the fair baseline: s re-fitted to its members, unsplit
            split[:, s], split[:, drop] = column(halves[0], s), column(halves[1], s)
            before = min(float(cost.min(1).values.sum()), float(refreshed.min(1).values.sum()))
            gain = (before - float(split.min(1).values.sum())) / n
            if gain > best_gain:
                best_gain, best = gain, (s, halves)
        if best is None or best_gain < self.config.split_min_gain:
            return 0.0
        s, halves = best
        logits = torch.logit(halves.clamp(SPLIT_EPS, 1 - SPLIT_EPS))
        self.bank.logits[s], self.bank.logits[drop] = logits[0], logits[1]
        self.copy_class(s, drop)
        self.moves += 1
        return best_gain

    def refit(self, protos: Tensor, x: Tensor, params: Tensor) -> Tensor:
        """Candidate prototypes ``[K, C, H, W]`` fitted to images ``x`` (seen through their
        transforms ``params`` ``[M, T]``) by ``split_refit_steps`` steps of hard EM: each image
        counts for its best candidate, whose pixel logits take an Adam step."""
        with torch.enable_grad():
            logits = torch.logit(protos.detach().clamp(0.02, 0.98)).requires_grad_(True)
            opt = torch.optim.Adam([logits], lr=REFIT_LR)
            for _ in range(self.config.split_refit_steps):
                nll = torch.stack([bernoulli_nll_probs(self.place_one(p, params), x) for p in torch.sigmoid(logits)], 1)
                opt.zero_grad()
                nll.min(1).values.sum().backward()
                opt.step()
        return torch.sigmoid(logits).detach()

    @torch.no_grad()
    def prune(self, x: Tensor) -> list[int]:
        """Switch off the spare prototypes, one at a time the one whose removal raises the probe
        images' cost ``sum_n min_c C[n, c]`` least; returns the pruned indices."""
        r = self.read(x)
        cost = self.costs(x, r.params, r.kl, r.placed)
        alive, dropped = self.alive.clone(), []
        while int(alive.sum()) > self.num_classes:
            live = alive.nonzero().squeeze(1)
            drop = int(live[removal_costs(cost[:, live]).argmin()])
            alive[drop] = False
            dropped.append(drop)
        self.alive.copy_(alive)
        self.keep = read_out_index(alive, self.num_classes)
        return dropped

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        state_dict.pop(prefix + "keep", None)  # saved until 22 Nov 2026; it is derived from alive
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.keep = read_out_index(self.alive, self.num_classes)

    @torch.no_grad()
    def load_read_out(self, state: Mapping[str, Any], source: str) -> None:
        """Load the ``num_classes`` read-out classes of a checkpoint ``state`` of this model
        (trained with or without spares) into this model, which has none; the estimator's own
        parameters are not loaded. DAIR reads its digits with a ``dvaest`` this way."""
        from perception.train.checkpoint import encoder_from_state

        if state.get("model") != self.name or list(state.get("image_shape", ())) != list(self.image_shape):
            raise CheckpointError(f"{source} is not a {self.name} checkpoint for images {list(self.image_shape)}")
        if self.config.extra_classes:
            raise PerceptionError(f"load_read_out needs a model without spares, this one has extra_classes={self.config.extra_classes}")
        trained = encoder_from_state(state, source)  # the spares' model; its keep follows from its alive
        for field in ("num_classes", "prior_std", "thickness_std"):  # the weights' shapes do not show them all
            theirs, ours = getattr(trained.config, field, None), getattr(self.config, field, None)
            if theirs != ours:
                raise CheckpointError(f"{source} has {field}={theirs}, expected {ours}")
        rows = {id(p) for p in self.class_rows()} | {id(self.bank.logits)}
        weights = trained.state_dict(keep_vars=True)
        for name, target in self.state_dict(keep_vars=True).items():
            if name.startswith("estimator."):
                continue
            if name not in weights:
                raise CheckpointError(f"{source} has no {name}")
            value = weights[name]
            if id(target) in rows:  # one row per prototype: the read-out ones, in keep's order
                value = value.view(trained.num_prototypes, -1)[trained.keep]
            if value.numel() != target.numel():
                raise CheckpointError(f"{source} has {name} of shape {list(weights[name].shape)}, expected {list(target.shape)}")
            target.copy_(value.view_as(target))
        self.bank.seeded.fill_(True)  # trained prototypes: no k-means++ seeding over them

    def loss(self, batch: Mapping[str, Tensor], step: int) -> ModelLoss:
        x = batch["image"]
        if self.training and self.config.init == "kmeans++" and not bool(self.bank.seeded):
            self.bank.seed_kmeanspp(x)
        cfg = self.config
        if self.training and (cfg.split_every > 0 or cfg.extra_classes > 0) and step <= cfg.split_until:
            self._probe = (self._probe + [x.detach()])[-cfg.probe_batches :]
            if cfg.split_every > 0 and 0 < step < cfg.split_until and step % cfg.split_every == 0:
                self.split_and_merge(torch.cat(self._probe))
            if step == cfg.split_until and bool(self.alive.all()) and cfg.extra_classes > 0:
                self.prune(torch.cat(self._probe))
        r = self.read(x, deterministic=False, step=step if self.training else None)  # warped once:
        logits, kl_z = r.logits, r.kl  # every class sample below is a mixture of r.placed

        def nll_of(sample: Tensor) -> Tensor:  # -log p(x|c, z_c) + KL(q(z_c|x) || p(z))
            return bernoulli_nll_probs(mix(sample, r.placed), x) + (sample * kl_z).sum(-1)

        est = self.estimator(logits, nll_of, context=r.hidden.detach())
        live = logits[:, self.alive]  # pruned classes have q = 0: KL and usage over the live ones
        kl_c = categorical_kl_uniform(live)
        loss = est.surrogate.mean() + kl_c.mean()
        gap = usage_gap(live.softmax(-1).mean(0))
        weight = self.balance_weight(step)
        if weight:
            loss = loss + weight * gap

        with torch.no_grad():  # exact expectation over classes for the reported ELBO
            q = logits.softmax(-1)
            expected_nll = (q * (self.costs(x, r.params, kl_z, r.placed) - kl_z)).sum(-1)
            kl = kl_c + (q * kl_z).sum(-1)
        metrics = {
            "neg_elbo": (expected_nll + kl).mean().item(),
            "nll": expected_nll.mean().item(),
            "kl": kl.mean().item(),
            "kl_class": kl_c.mean().item(),
            "usage_gap": gap.item(),
        }
        if self.training and cfg.split_every > 0:
            metrics["split_moves"] = float(self.moves)  # accepted so far in this process
        return ModelLoss(loss, metrics)

    def reconstruct(self, images: Tensor) -> Tensor:
        logits, params = self.read_logits(images)
        cls = self.keep[logits[:, self.keep].argmax(-1)]
        return self.render(F.one_hot(cls, self.num_prototypes).to(images.dtype), params)

    def visualize(self, images: Tensor) -> dict[str, Tensor]:
        rows = {"input": images, "reconstruction": self.reconstruct(images)}
        protos = self.prototypes()
        n = images.shape[0]
        for start in range(0, self.num_classes, n):  # prototypes, n per row
            chunk = protos[start : start + n]
            pad = chunk.new_zeros(n - chunk.shape[0], *chunk.shape[1:])
            rows[f"prototypes_{start}"] = torch.cat([chunk, pad])
        return rows
