"""Sampling maths shared by the estimators, for both discrete families.

Shapes: Bernoulli logits are ``[B, ...]`` (every entry an independent variable); categorical
logits are ``[B, ..., C]`` (every row of the last dimension a variable). Hard samples are float
tensors of the logits' shape ({0, 1} or one-hot), so losses can consume them directly.

Relaxed estimators use the "noise in logit space" view: ``z = location + noise`` with logistic
noise (Bernoulli, ``location`` = logits) or Gumbel noise (categorical, ``location`` =
log-probabilities), and the hard sample is ``H(z)`` (sign / argmax). :func:`conditional` draws
``z ~ p(z | H(z) = sample)`` reparameterised in the logits (Tucker et al. 2017, appendix), which
REBAR and RELAX need for their control variate; it also returns its derivative, so that they can
form the control variate's gradient without a backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DISTRIBUTIONS = ("bernoulli", "categorical")


def per_example(x: Tensor) -> Tensor:
    """Sum every dimension but the batch one: ``[B, ...] -> [B]``."""
    return x.reshape(x.shape[0], -1).sum(1)


def uniform(like: Tensor) -> Tensor:
    """U(0, 1) noise that is never exactly 0 (logs of it stay finite)."""
    return torch.rand_like(like).clamp_(min=torch.finfo(like.dtype).tiny)


def location(distribution: str, logits: Tensor) -> Tensor:
    return logits if distribution == "bernoulli" else F.log_softmax(logits, -1)


def noise(distribution: str, u: Tensor) -> Tensor:
    """Logistic (Bernoulli) or Gumbel (categorical) noise from uniform ``u``."""
    if distribution == "bernoulli":
        return torch.logit(u)
    return torch.log(u).neg_().log_().neg_()


def perturb(distribution: str, logits: Tensor, u: Tensor) -> Tensor:
    """Reparameterised ``z`` from uniform noise ``u``; ``hard(z)`` is an exact sample."""
    return location(distribution, logits) + noise(distribution, u)


def hard(distribution: str, z: Tensor) -> Tensor:
    if distribution == "bernoulli":
        return (z > 0).to(z.dtype)
    return torch.zeros_like(z).scatter_(-1, z.argmax(-1, keepdim=True), 1.0)


def conditional(distribution: str, loc: Tensor, sample: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``z ~ p(z | hard(z) = sample)`` from uniform noise ``v``, reparameterised in the location
    (:func:`location` of the logits), and its derivative in the location, which is elementwise.

    Written in log space so that extreme probabilities give finite values and gradients.
    """
    if distribution == "bernoulli":
        # sample 0: u' = v (1 - p) and z = logit + logit(u'); sample 1 mirrors it (1 - v is U(0,1) too).
        sign = 1.0 - 2.0 * sample
        m = sign * loc
        tail = v * torch.sigmoid(-m)
        z = sign * (torch.log(v) + F.logsigmoid(m) - torch.log1p(-tail))
        return z, torch.sigmoid(-m) * (1.0 - v) / (1.0 - tail)
    e = torch.log(v).neg_().log_()
    top = (e * sample).sum(-1, keepdim=True)  # the argmax entry is a standard Gumbel: -top
    gap = e - loc
    others = torch.logaddexp(gap, top)  # -z_i = log(-log v_i / p_i - log v_b)
    slope = torch.exp(gap - others)  # sigmoid(gap - top); the argmax entry does not move
    return torch.lerp(others, top, sample).neg_(), torch.addcmul(slope, slope, sample, value=-1.0)


def relax(distribution: str, z: Tensor, temperature: Tensor | float) -> Tensor:
    """Concrete / Gumbel-softmax relaxation of ``hard(z)``."""
    if distribution == "bernoulli":
        return torch.sigmoid(z / temperature)
    return torch.softmax(z / temperature, -1)


def log_prob(distribution: str, logits: Tensor, sample: Tensor) -> Tensor:
    """``log p(sample)`` summed over the variables of each example: ``[B]``."""
    if distribution == "bernoulli":
        return -per_example(F.binary_cross_entropy_with_logits(logits, sample, reduction="none"))
    return per_example(sample * F.log_softmax(logits, -1))


def score(distribution: str, logits: Tensor, sample: Tensor) -> Tensor:
    """``d log p(sample) / d logits`` in closed form (same shape as the logits)."""
    if distribution == "bernoulli":
        return sample - torch.sigmoid(logits)
    return sample - torch.softmax(logits, -1)
