"""IODINE (Greff et al. 2019): a spatial mixture refined by learned iterative inference.

Each of K slots has a Gaussian posterior ``lambda_k = (mu_k, logvar_k)``, starting from a
trainable initial posterior shared by all slots (slots differ through their samples). A spatial
broadcast decoder maps ``z_k`` to pixel means and mask logits; masks are a softmax over slots
and pixels a mixture of fixed-scale Gaussian (the paper) or logistic (DeepMind's Tetrominoes
configuration) densities. A refinement network (convolutions, an MLP, an LSTM unless
``recurrent`` is off) reads the paper's auxiliary inputs and updates
``lambda_k`` T times; the training loss is ``sum_t (t / T) L_t`` with ``L_t`` the negative ELBO
after refinement ``t``.

The gradients fed to the refinement network are computed without autograd, so the
deterministic ``encode`` is plain tensor algebra (exportable to ONNX, runnable under
``torch.no_grad``): w.r.t. means and masks they are closed-form for the mixture (see
:func:`mixture_terms`), w.r.t. the posterior they are a hand-written vector-Jacobian product
through the decoder (:meth:`SpatialBroadcastDecoder.vjp`) plus the Gaussian KL's own gradient.
A test checks them against autograd.

K and T may differ at test time (``test_slots``, ``test_iterations``, or the ``slots`` /
``iterations`` arguments of :meth:`IODINE.encode`). In deterministic mode slot ``k``'s initial
sample uses a fixed noise vector (a buffer, the same for every image) to break the slots'
symmetry, and later steps decode posterior means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from perception.config import CheckedConfig
from perception.contract import EncoderOutput, ModelLoss
from perception.errors import PerceptionError
from perception.models.lds import lds_penalty
from perception.models.mixture import MixtureEncoder, gaussian_log_density, masks_to_contract, mixture_image
from perception.nn.blocks import gaussian_kl
from perception.nn.broadcast_decoder import SpatialBroadcastDecoder, coordinate_grid

LikelihoodKind = Literal["gaussian", "logistic"]
MAX_SLOTS = 32  # size of the fixed symmetry-breaking noise used by the deterministic encode
MAX_RATIO_LOG = 30.0  # dL/dmask = -p_k / p(x) can overflow float32 where a slot's mask ~ 0


@dataclass
class IODINEConfig(CheckedConfig):
    num_slots: int = 6
    iterations: int = 3  # refinement steps in training
    test_slots: int = 0  # 0: as in training
    test_iterations: int = 5  # 0: as in training
    latent_dim: int = 16
    decoder_channels: int = 32
    decoder_layers: int = 3
    decoder_frequencies: int = 0  # Fourier coordinate features in the decoder (0: x and y only)
    kernel_size: int = 3  # odd; of the decoder's and the refinement network's convolutions
    refine_channels: int = 32
    refine_layers: int = 3
    hidden: int = 128  # refinement MLP and LSTM width
    recurrent: bool = True  # the refinement LSTM; False: none, the head reads the MLP directly
    likelihood: LikelihoodKind = "gaussian"  # per-channel pixel density of a slot
    sigma: float = 0.1  # that density's scale: the Gaussian's std or the logistic's scale
    beta: float = 1.0
    lds: bool = False
    lds_weight: float = 1.0
    lds_on_means: bool = False  # LDS on the posterior means instead of the samples (see models/lds.py)
    presence_min_area: float = 0.004  # share of the image a slot's argmax mask must cover

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iterations < 1:
            raise PerceptionError(f"iodine: iterations must be >= 1, got {self.iterations}")
        counts = (self.num_slots, self.test_slots, self.test_iterations, self.decoder_frequencies)
        if self.num_slots < 1 or min(counts) < 0:
            raise PerceptionError(
                "iodine: need num_slots >= 1 and test_slots, test_iterations, decoder_frequencies >= 0,"
                f" got {counts}"
            )
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise PerceptionError(f"iodine: kernel_size must be odd and >= 1, got {self.kernel_size}")
        if not math.isfinite(self.sigma) or self.sigma <= 0:
            raise PerceptionError(f"iodine: sigma must be > 0, got {self.sigma}")
        if max(self.num_slots, self.test_slots) > MAX_SLOTS:
            raise PerceptionError(f"iodine: at most {MAX_SLOTS} slots, got {max(self.num_slots, self.test_slots)}")


@dataclass
class MixtureTerms:
    """The mixture NLL and the quantities the refinement network reads (all ``[N, K, ...]``)."""

    nll: Tensor  # [N], summed over pixels
    log_masks: Tensor  # [N, K, H, W]
    log_lik: Tensor  # [N, K, H, W]: log p(x | mean_k), summed over channels
    log_mix: Tensor  # [N, 1, H, W]: log p(x) per pixel
    responsibility: Tensor  # [N, K, H, W]: posterior mask


@dataclass(frozen=True)
class PixelLikelihood:
    """A slot's density of each pixel channel around its mean, with a fixed scale.

    The logistic (DeepMind's Tetrominoes setting, scale 0.03) has heavier tails than the
    Gaussian: a pixel far from a slot's colour costs linearly, not quadratically.
    """

    kind: LikelihoodKind
    scale: float

    def log_density(self, x: Tensor, means: Tensor) -> Tensor:
        """Sum over channels: ``[..., C, H, W] -> [..., H, W]``."""
        if self.kind == "gaussian":
            return gaussian_log_density(x, means, self.scale)
        u = ((x - means) / self.scale).abs()  # the density is symmetric
        return (-u - 2.0 * F.softplus(-u) - math.log(self.scale)).sum(dim=-3)

    def score(self, x: Tensor, means: Tensor) -> Tensor:
        """``d log p(x | mean) / d mean`` per channel."""
        if self.kind == "gaussian":
            return (x - means) / self.scale**2
        return torch.tanh((x - means) / (2.0 * self.scale)) / self.scale


def mixture_terms(x: Tensor, means: Tensor, mask_logits: Tensor, likelihood: PixelLikelihood) -> MixtureTerms:
    log_masks = F.log_softmax(mask_logits, dim=1)
    log_lik = likelihood.log_density(x.unsqueeze(1), means)
    joint = log_masks + log_lik
    log_mix = torch.logsumexp(joint, dim=1, keepdim=True)
    return MixtureTerms(
        nll=-log_mix.flatten(1).sum(1),
        log_masks=log_masks,
        log_lik=log_lik,
        log_mix=log_mix,
        responsibility=(joint - log_mix).exp(),
    )


def mixture_gradients(
    x: Tensor, means: Tensor, t: MixtureTerms, likelihood: PixelLikelihood
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form gradients of the NLL w.r.t. means ``[N,K,C,H,W]``, masks and mask logits ``[N,K,H,W]``.

    With ``gamma_k`` the responsibilities: ``dL/dmean_k = -gamma_k score_k`` (for the Gaussian
    ``score_k = (x - mean_k) / sigma^2``),
    ``dL/dmask_k = -p_k / p(x)`` (masks as free variables, as autograd on the masks gives) and
    ``dL/dlogit_k = mask_k - gamma_k`` (through the softmax).
    """
    d_means = -t.responsibility.unsqueeze(2) * likelihood.score(x.unsqueeze(1), means)
    d_masks = -(t.log_lik - t.log_mix).clamp(max=MAX_RATIO_LOG).exp()
    d_logits = t.log_masks.exp() - t.responsibility
    return d_means, d_masks, d_logits


def leave_one_out(t: MixtureTerms) -> Tensor:
    """log of the mixture likelihood without slot k, renormalised: ``[N, K, H, W]``."""
    k = t.log_masks.shape[1]
    joint = (t.log_masks + t.log_lik).unsqueeze(1).expand(-1, k, -1, -1, -1)  # [N, k, j, H, W]
    ids = torch.arange(k, device=joint.device)
    drop = (ids.view(k, 1) == ids.view(1, k)).view(1, k, k, 1, 1)  # not eye(bool): no ONNX Runtime kernel
    others = torch.logsumexp(joint.masked_fill(drop, -1e9), dim=2)
    rest = torch.logsumexp(t.log_masks.unsqueeze(1).expand(-1, k, -1, -1, -1).masked_fill(drop, -1e9), dim=2)
    return others - rest


def _layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[1:])


class LSTMCell(nn.Module):
    """Plain LSTM cell from linear layers (every ONNX exporter handles it)."""

    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.gates = nn.Linear(inputs + hidden, 4 * hidden)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h, c = state
        i, f, g, o = self.gates(torch.cat([x, h], dim=-1)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class RefinementNetwork(nn.Module):
    """Image-sized inputs -> strided convs -> MLP; with the vector inputs -> LSTM -> delta lambda.
    Not recurrent: the head reads the MLP output and the vector inputs directly, and the state
    passes through untouched."""

    def __init__(
        self, in_channels: int, size: tuple[int, int], latent_dim: int, channels: int, layers: int, hidden: int,
        kernel_size: int = 3, recurrent: bool = True,
    ):
        super().__init__()
        (h, w), convs = size, []
        for i in range(layers):
            conv_in = in_channels if i == 0 else channels
            convs += [nn.Conv2d(conv_in, channels, kernel_size, stride=2, padding=kernel_size // 2), nn.ELU()]
            h, w = (h + 1) // 2, (w + 1) // 2
        self.convs = nn.Sequential(*convs, nn.Flatten())
        self.mlp = nn.Sequential(nn.Linear(channels * h * w, hidden), nn.ELU())
        self.lstm = LSTMCell(hidden + 4 * latent_dim, hidden) if recurrent else None
        self.head = nn.Linear(hidden if recurrent else hidden + 4 * latent_dim, 2 * latent_dim)
        self.hidden = hidden

    def forward(
        self, images: Tensor, vectors: Tensor, state: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h = torch.cat([self.mlp(self.convs(images)), vectors], dim=-1)
        if self.lstm is None:
            return self.head(h), state
        h, c = self.lstm(h, state)
        return self.head(h), (h, c)


class IODINE(MixtureEncoder):
    Config = IODINEConfig
    name = "iodine"
    default_dataset = "multi-dsprites"

    def __init__(self, config: IODINEConfig, image_shape: tuple[int, int, int]):
        super().__init__(config, image_shape)
        c, h, w = self.image_shape
        d = config.latent_dim
        self.decoder = SpatialBroadcastDecoder(
            d, c + 1, (h, w), config.decoder_channels, config.decoder_layers, config.decoder_frequencies,
            config.kernel_size,
        )
        self.likelihood = PixelLikelihood(config.likelihood, config.sigma)
        in_channels = 3 * c + 8  # see refinement_inputs
        self.refine = RefinementNetwork(
            in_channels, (h, w), d, config.refine_channels, config.refine_layers, config.hidden,
            config.kernel_size, config.recurrent,
        )
        self.init_posterior = nn.Parameter(torch.zeros(2 * d))
        noise = torch.randn(MAX_SLOTS, d, generator=torch.Generator().manual_seed(0))
        self.register_buffer("fixed_noise", noise)
        self.register_buffer("coords", coordinate_grid(h, w).unsqueeze(0), persistent=False)

    # --- one inference step ------------------------------------------------------------------
    def decode(self, z: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Means ``[N, K, C, H, W]``, mask logits ``[N, K, H, W]`` and the decoder's cache."""
        n, k = z.shape[:2]
        out, cache = self.decoder.forward_with_cache(z.flatten(0, 1))
        out = out.view(n, k, -1, *self.image_shape[1:])
        return out[:, :, :-1], out[:, :, -1], cache

    def refinement_inputs(
        self, x: Tensor, means: Tensor, logits: Tensor, t: MixtureTerms, cache: list[Tensor],
        mu: Tensor, logvar: Tensor, eps: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The paper's inputs, gradients included, with no autograd: image-sized
        ``[N*K, 3C+8, H, W]`` and vector ``[N*K, 4D]``. Call on detached tensors."""
        n, k = logits.shape[:2]
        beta = self.config.beta
        d_means, d_masks, d_logits = mixture_gradients(x, means, t, self.likelihood)
        d_out = torch.cat([d_means, d_logits.unsqueeze(2)], dim=2)
        d_z = self.decoder.vjp([c.view(-1, k, *c.shape[1:]) for c in cache], d_out)
        std = (0.5 * logvar).exp()
        d_mu = d_z + beta * mu
        d_logvar = d_z * eps * 0.5 * std + beta * 0.5 * (logvar.exp() - 1.0)
        per_pixel = [
            x.unsqueeze(1).expand(-1, k, -1, -1, -1),
            means,
            t.log_masks.exp().unsqueeze(2),
            logits.unsqueeze(2),
            _layer_norm(d_means.flatten(0, 1)).view_as(d_means),
            _layer_norm(d_masks.flatten(0, 1)).view_as(d_masks).unsqueeze(2),
            t.responsibility.unsqueeze(2),
            t.log_mix.unsqueeze(1).expand(-1, k, -1, -1, -1),
            leave_one_out(t).unsqueeze(2),
            self.coords.unsqueeze(0).expand(n, k, -1, -1, -1),
        ]
        grads = _layer_norm(torch.cat([d_mu, d_logvar], dim=-1).flatten(0, 1))
        vectors = torch.cat([mu.flatten(0, 1), logvar.flatten(0, 1), grads], dim=-1)
        return torch.cat(per_pixel, dim=2).flatten(0, 1), vectors

    def infer(self, x: Tensor, slots: int, iterations: int, deterministic: bool):
        """Run T refinements; yields (z, mu, logvar, means, logits, terms) after each of the
        T + 1 posteriors (the first is the initial one)."""
        n, d = x.shape[0], self.config.latent_dim
        # Deterministic: the initial posterior and its sample are the same for every image, so the
        # first decode runs once for the batch (and is a constant of the exported graph).
        first = 1 if deterministic else n
        mu, logvar = self.init_posterior.view(1, 1, -1).expand(first, slots, -1).chunk(2, dim=-1)
        logvar = logvar.clamp(-10.0, 10.0)
        state = (x.new_zeros(n * slots, self.refine.hidden), x.new_zeros(n * slots, self.refine.hidden))
        for step in range(iterations + 1):
            if not deterministic:
                eps = torch.randn_like(mu)
            elif step == 0:
                eps = self.fixed_noise[:slots].unsqueeze(0)
            else:
                eps = torch.zeros_like(mu)
            z = mu + eps * (0.5 * logvar).exp()
            # The initial posterior's decode is never scored (loss weight 0 / T): it only feeds the
            # refinement network's stop-gradient inputs, so autograd need not record it.
            with torch.set_grad_enabled(torch.is_grad_enabled() and step > 0):
                means, logits, cache = self.decode(z)
            if step == 0:  # a deterministic first decode ran once for the batch: broadcast it
                means, logits = means.expand(n, -1, -1, -1, -1), logits.expand(n, -1, -1, -1)
                z, mu, logvar, eps = (v.expand(n, -1, -1) for v in (z, mu, logvar, eps))
            terms = mixture_terms(x, means, logits, self.likelihood)
            yield z, mu, logvar, means, logits, terms
            if step == iterations:
                return
            with torch.no_grad():
                detached = [v.detach() for v in (means, logits, mu, logvar, eps)]
                images, vectors = self.refinement_inputs(
                    x, detached[0], detached[1], _detach_terms(terms), [c.detach() for c in cache], *detached[2:]
                )
            delta, state = self.refine(images, vectors, state)
            mu = mu + delta[:, :d].view(n, slots, d)
            logvar = (logvar + delta[:, d:].view(n, slots, d)).clamp(-10.0, 10.0)

    # --- contract ----------------------------------------------------------------------------
    def encode(
        self, images: Tensor, deterministic: bool = True, slots: int | None = None, iterations: int | None = None
    ) -> EncoderOutput:
        slots = slots or self.num_slots
        iterations = iterations if iterations is not None else (self.config.test_iterations or self.config.iterations)
        *_, (z, mu, _, _, _, terms) = self.infer(images, slots, iterations, deterministic)
        masks = terms.log_masks.exp()
        presence, position = masks_to_contract(masks, self.config.presence_min_area)
        return EncoderOutput(slots=mu if deterministic else z, presence=presence, position=position, masks=masks)

    def loss(self, batch: Mapping[str, Tensor], step: int) -> ModelLoss:
        x = batch["image"]
        iterations = self.config.iterations
        total = x.new_zeros(x.shape[0])
        lds_total = x.new_zeros(())
        for t, (z, mu, logvar, means, _, terms) in enumerate(self.infer(x, self.config.num_slots, iterations, False)):
            if t == 0:
                continue  # the initial posterior is not scored (weight 0 / T)
            kl = gaussian_kl(mu, logvar).sum(1)
            step_loss = terms.nll + self.config.beta * kl
            if self.config.lds and self.training:
                lds = lds_penalty(mu if self.config.lds_on_means else z)
                step_loss = step_loss + self.config.lds_weight * lds
                lds_total = lds_total + lds.mean().detach() / iterations
            total = total + (t / iterations) * step_loss
        masks = terms.log_masks.exp()
        metrics = {
            "neg_elbo": (terms.nll + kl).mean().item(),
            "nll": terms.nll.mean().item(),
            "kl": kl.mean().item(),
            "mse": mixture_image(masks, means).sub(x).pow(2).mean().item(),
        }
        if self.config.lds and self.training:
            metrics["lds"] = lds_total.item()
        return ModelLoss(total.mean(), metrics)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Deterministic reconstruction, masks and per-slot means after test-time inference."""
        iterations = self.config.test_iterations or self.config.iterations
        *_, (_, _, _, means, _, terms) = self.infer(images, self.num_slots, iterations, True)
        masks = terms.log_masks.exp()
        return mixture_image(masks, means), masks, means


def _detach_terms(t: MixtureTerms) -> MixtureTerms:
    return MixtureTerms(*(v.detach() for v in (t.nll, t.log_masks, t.log_lik, t.log_mix, t.responsibility)))
