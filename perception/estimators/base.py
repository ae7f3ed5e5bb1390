"""One interface for every discrete gradient estimator.

A model hands its logits and a per-example loss of the sample to the estimator and minimises the
mean of the returned ``surrogate``; which estimator runs is a constructor string, never a branch
in the model. The surrogate carries, in one backward pass:

- the estimator's gradient for the logits (and through them the encoder);
- the pathwise gradient for the other parameters of ``loss_fn`` (decoder and the like);
- the training signal of the estimator's own parameters (NVIL baseline, REBAR/RELAX temperature,
  scale and control-variate network).

Extra terms are injected by :func:`inject`, which is exactly zero in value, so the surrogate's
value is the loss at the hard sample (``exact``: the expected loss), and logging it
does not mislead.

``loss_fn`` must be per-example: row ``i`` of its output may depend only on row ``i`` of the
sample (no batch statistics). It may be called several times (relaxed samples, enumeration) and
must compute the same function each time: any noise inside it (reparameterisation, dropout) is
drawn once, outside. REBAR/RELAX difference two of its calls (lambda's curvature term), so fresh
noise per call would turn that term into amplified noise. A caller whose loss_fn also broadcasts
over leading sample dimensions (samples ``[R, B, ...]`` -> losses ``[R, B]``, e.g. elementwise
maths against per-example tensors ``[B, ...]``) passes ``broadcasts=True``: REBAR, RELAX and
``exact`` then evaluate all their samples in one call (on the toy benchmark that removes ~40 of
RELAX's ~220 ops per step). The toy benchmark and AIR's / DAIR's costs (linear in the sample)
use it. D-VAE's loss (a mixture of prototype images) does not: broadcast, it would materialise
R x the ``[B, L, C, H, W]`` mixture product at once (``exact`` evaluates R = L states).

Every sampling estimator draws its hard sample as ``hard(perturb(logits, u))`` with ``u =
uniform(logits)`` its first random draw, so a caller can reproduce the sample beforehand under a
forked RNG (LAVAE fixes its without-replacement masks that way). ``exact`` draws differently.

Sequential models (AIR: presence at step t changes later steps) cannot write the loss as a
function of one sample; they use the score-function API instead: :meth:`Estimator.sample`, then
:meth:`Estimator.score_surrogate` with the realised downstream cost, added to their own loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from perception.errors import InputError, PerceptionError
from perception.estimators import distributions as D
from perception.registry import Registry

LossFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Estimate:
    """``sample``: hard sample; ``loss``: detached loss at it, ``[B]``; ``surrogate``: ``[B]``."""

    sample: Tensor
    loss: Tensor
    surrogate: Tensor


class Estimator(nn.Module):
    """Base class; subclasses set ``Config`` (a dataclass) and implement :meth:`_estimate`."""

    Config: ClassVar[type]
    name: ClassVar[str] = ""
    supports_score_function: ClassVar[bool] = False
    uses_context: ClassVar[bool] = False  # only estimators with a network read the context

    def __init__(
        self,
        config: Any,
        distribution: str,
        *,
        num_classes: int | None = None,
        context_dim: int | None = None,
    ) -> None:
        super().__init__()
        if distribution not in D.DISTRIBUTIONS:
            raise PerceptionError(
                f"unknown distribution '{distribution}'; valid: {', '.join(D.DISTRIBUTIONS)}"
            )
        if distribution == "bernoulli" and num_classes is not None:
            raise PerceptionError("num_classes is only meaningful for a categorical distribution")
        if num_classes is not None and num_classes < 2:
            raise PerceptionError(f"a categorical needs num_classes >= 2, got {num_classes}")
        if context_dim is not None and context_dim < 1:
            raise PerceptionError(f"context_dim must be positive, got {context_dim}")
        self.config = config
        self.distribution = distribution
        self.num_classes = num_classes
        self.context_dim = context_dim

    # --- optimiser plumbing ------------------------------------------------------------------
    @property
    def lr(self) -> float | None:
        """The estimator's own learning rate; None means the model's."""
        return getattr(self.config, "lr", None)

    def param_groups(self, default_lr: float) -> list[dict[str, Any]]:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return []
        return [{"params": params, "lr": default_lr if self.lr is None else self.lr}]

    # --- public calls -------------------------------------------------------------------------
    def forward(
        self, logits: Tensor, loss_fn: LossFn, context: Tensor | None = None, broadcasts: bool = False
    ) -> Estimate:
        """``broadcasts``: loss_fn maps samples ``[R, B, ...]`` to ``[R, B]`` too (module docstring)."""
        self._check_logits(logits)
        loss_fn = _Broadcasting(loss_fn) if broadcasts else loss_fn
        return self._estimate(logits, loss_fn, self._check_context(context, logits))

    def sample(self, logits: Tensor) -> Tensor:
        """A hard sample (no gradient), for the score-function API."""
        self._check_logits(logits)
        with torch.no_grad():
            return D.hard(self.distribution, D.perturb(self.distribution, logits, D.uniform(logits)))

    def score_surrogate(
        self, logits: Tensor, sample: Tensor, cost: Tensor, context: Tensor | None = None
    ) -> Tensor:
        """``[B]``, zero in value; its gradient is the estimator's gradient for the logits given
        the realised downstream ``cost`` ``[B]`` of ``sample`` (detached here), plus the
        estimator's own training signal. Add it to the model's loss."""
        if not self.supports_score_function:
            raise PerceptionError(
                f"estimator '{self.name}' needs the loss as a function of the sample; for a "
                f"sequential model use one of: {', '.join(score_function_estimators())}"
            )
        self._check_logits(logits)
        if sample.shape != logits.shape:
            raise InputError(f"sample shape {tuple(sample.shape)} != logits {tuple(logits.shape)}")
        if cost.shape != logits.shape[:1]:
            raise InputError(f"cost must have shape [B]={tuple(logits.shape[:1])}, got {tuple(cost.shape)}")
        context = self._check_context(context, logits)
        return self._score_surrogate(logits, sample.detach(), cost.detach(), context)

    # --- for subclasses -----------------------------------------------------------------------
    def _estimate(self, logits: Tensor, loss_fn: LossFn, context: Tensor | None) -> Estimate:
        raise NotImplementedError

    def _score_surrogate(
        self, logits: Tensor, sample: Tensor, cost: Tensor, context: Tensor | None
    ) -> Tensor:
        raise NotImplementedError

    def _evaluate(self, loss_fn: LossFn, sample: Tensor) -> Tensor:
        loss = loss_fn(sample)
        if not isinstance(loss, Tensor) or loss.shape != sample.shape[:1]:
            got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise InputError(
                f"loss_fn must return one loss per example, shape [B]={tuple(sample.shape[:1])}; got {got}"
            )
        return loss

    def _evaluate_rows(self, loss_fn: LossFn, samples: Tensor) -> Tensor:
        """loss_fn at every row of ``samples`` ``[R, B, ...]`` -> ``[R, B]``: in one call where it
        broadcasts, else one call per row."""
        if not isinstance(loss_fn, _Broadcasting):
            return torch.stack([self._evaluate(loss_fn, row) for row in samples.unbind()])
        loss = loss_fn(samples)
        if not isinstance(loss, Tensor) or loss.shape != samples.shape[:2]:
            got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise InputError(
                f"loss_fn declared broadcasts=True must map samples {tuple(samples.shape)} to losses "
                f"{tuple(samples.shape[:2])}; got {got}"
            )
        return loss

    def _check_logits(self, logits: Tensor) -> None:
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            raise InputError("logits must be a floating-point tensor")
        if self.distribution == "bernoulli":
            if logits.dim() < 1:
                raise InputError("Bernoulli logits must be [B, ...]")
            return
        if logits.dim() < 2 or logits.shape[-1] < 2:
            raise InputError(f"categorical logits must be [B, ..., C] with C >= 2, got {tuple(logits.shape)}")
        if self.num_classes is not None and logits.shape[-1] != self.num_classes:
            raise InputError(f"logits have {logits.shape[-1]} classes, estimator built for {self.num_classes}")

    def _check_context(self, context: Tensor | None, logits: Tensor) -> Tensor | None:
        """The context (detached) where this estimator was built to use one, else None."""
        if not self.uses_context or self.context_dim is None:
            return None
        expected = (logits.shape[0], self.context_dim)
        if context is None or tuple(context.shape) != expected:
            got = None if context is None else tuple(context.shape)
            raise InputError(
                f"estimator '{self.name}' was built with context_dim; context must be {expected}, got {got}"
            )
        return context.detach()


@dataclass(frozen=True)
class _Broadcasting:
    """A loss_fn its caller declared broadcasting over leading sample dimensions."""

    fn: LossFn

    def __call__(self, sample: Tensor) -> Tensor:
        return self.fn(sample)


ESTIMATORS: Registry[type[Estimator]] = Registry("estimator")


def score_function_estimators() -> list[str]:
    return [n for n in ESTIMATORS.names() if ESTIMATORS.get(n).supports_score_function]


class _Inject(torch.autograd.Function):
    """Zeros ``[B]`` whose backward hands precomputed gradients to its inputs, as one autograd
    node (``(p - p.detach()) * g`` terms would cost several nodes per parameter)."""

    @staticmethod
    def forward(ctx: Any, grads: tuple[Tensor, ...], target: Tensor, *params: Tensor) -> Tensor:
        ctx.grads = grads
        return target.new_zeros(target.shape[0])

    @staticmethod
    def backward(ctx: Any, out: Tensor) -> tuple[Tensor | None, ...]:
        target_grad, *param_grads = ctx.grads
        total = out.sum()  # every row carries the same zero for the parameters
        return (
            None,
            out.reshape(-1, *[1] * (target_grad.dim() - 1)) * target_grad,
            *(total * g for g in param_grads),
        )


def inject(
    target: Tensor, grad: Tensor, params: Sequence[tuple[Tensor, Tensor | None]] = ()
) -> Tensor:
    """``[B]``, zero in value; minimising its mean gives ``target`` ``[B, ...]`` the gradient
    ``grad / B`` (``grad`` holds one row per example) and each parameter its paired gradient."""
    pairs = [(p, _constant(g)) for p, g in params if g is not None]
    grads = (_constant(grad), *(g for _, g in pairs))
    return _Inject.apply(grads, target, *(p for p, _ in pairs))


def _constant(x: Tensor) -> Tensor:
    """Without a graph, and an ordinary tensor: an inference tensor (REBAR/RELAX compute theirs in
    inference mode) could not be saved by a double backward through the surrogate."""
    if x.is_inference():
        return x.clone()
    return x.detach() if x.requires_grad else x
