"""REBAR (Tucker et al. 2017) and RELAX (Grathwohl et al. 2018): unbiased, with a learned
control variate built on the concrete relaxation.

Per example, the gradient estimate for the logits theta is

    g = [f(b) - c(z~)] d/dtheta log p(b) + d/dtheta c(z) - d/dtheta c(z~)

with ``z`` the reparameterised noise, ``b = H(z)`` the hard sample and ``z~ ~ p(z | b)``
reparameterised (:func:`distributions.conditional`). REBAR: ``c(z) = eta f(s(z))`` with
``s(z) = sigma_lambda(z)`` the relaxed sample; RELAX: ``c(z) = eta f(s(z)) + r(s(z)[, context])``,
``r`` a small MLP applied to every variable and summed (so it fits any number of variables; its
output layer starts at zero, so RELAX starts as REBAR). ``loss_fn`` is evaluated three times:
at ``b`` (pathwise gradient for its parameters) and at ``s(z)``, ``s(z~)`` (control variate only).

The estimator's parameters (log lambda, eta, r) minimise ``E|g|^2``, i.e. the variance of the
unbiased ``g``: ``g`` is formed with ``create_graph=True``, one ``autograd.grad`` of
``mean_B |g|^2`` gives their gradients, which are injected into the surrogate so that one
``backward()`` of the model's loss trains everything. ``g`` itself reaches the logits as an
injected constant (the decoder gets only the pathwise gradient at ``b``).

Second order through loss_fn: ``d|g|^2/d lambda`` differentiates ``df/ds`` at the relaxed
samples, i.e. needs loss_fn's second derivative in its input. If loss_fn holds an op without
double backward (``torch.cdist``, tested; reportedly cuDNN's grid sampler, which grid_sample
uses on GPU for bilinear, zero padding and ``align_corners=True``: not run here, no GPU), the
first training call fails over, with a warning and for good, to treating ``df/ds`` at ``s(z)`` and
``s(z~)`` as a constant inside the variance objective: ``d/dtheta f(s)`` is formed as
``J_theta(s)^T stop_grad(df/ds)``. Then ``d|g|^2/d lambda`` keeps the relaxation's own
dependence on lambda but drops the loss-Hessian term; eta, r and the ``c(z~)`` coefficient keep
exact gradients, and ``g`` (hence unbiasedness) is unchanged. ``loss_hessian=False`` selects this
mode from the start (cheaper: no double backward through loss_fn). CPU grid_sample (torch 2.13)
has a double backward, so spatial transformers on CPU keep the exact objective. Functions
marked ``once_differentiable`` do not raise: autograd silently cuts the graph behind them, which
would also lose eta's dependence through them, so use ``loss_hessian=False`` with such loss_fns.

Score-function API (sequential models): RELAX implements it with ``c = r`` alone (there is no
``f`` to relax). The ``z`` coupled with a given ``b`` is drawn from ``p(z | b)`` — ``(b, z)`` then
has exactly the joint law of ``(H(z), z)`` — and rewritten with its noise fixed,
``z = location(theta) + stop_grad(z - location(theta))``, so ``d/dtheta c(z)`` is the ordinary
reparameterisation gradient and ``g`` stays unbiased. REBAR has nothing learnable without ``f``
and refuses (use relax, nvil or reinforce).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from perception.errors import PerceptionError
from perception.estimators import distributions as D
from perception.estimators.base import (
    ESTIMATORS,
    Estimate,
    Estimator,
    LossFn,
    inject,
)

Pairs = list[tuple[Tensor, Tensor | None]]


class _NoDoubleBackward(Exception):
    """Internal: the variance objective hit an op of loss_fn without double backward."""


@dataclass
class RebarConfig:
    temperature: float = 0.5  # initial lambda (learned)
    eta: float = 1.0  # initial control-variate scale (learned)
    loss_hessian: bool = True  # differentiate loss_fn twice (falls back automatically)
    lr: float | None = None  # None: the model's learning rate

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise PerceptionError(f"temperature must be positive, got {self.temperature}")


@dataclass
class RelaxConfig(RebarConfig):
    hidden: int = 32  # width of the per-variable control-variate MLP

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden < 1:
            raise PerceptionError(f"relax hidden must be >= 1, got {self.hidden}")


class _ControlVariate(Estimator):
    def __init__(self, config: RebarConfig, distribution: str, **kwargs) -> None:
        super().__init__(config, distribution, **kwargs)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(config.temperature)))
        self.eta = nn.Parameter(torch.tensor(float(config.eta)))
        self.loss_hessian = config.loss_hessian

    def _residual(self, relaxed: Tensor, context: Tensor | None) -> Tensor | None:
        return None

    def _estimate(self, logits: Tensor, loss_fn: LossFn, context: Tensor | None) -> Estimate:
        noise, v = D.noise(self.distribution, D.uniform(logits)), D.uniform(logits)
        with torch.no_grad():
            sample = D.hard(self.distribution, D.location(self.distribution, logits) + noise)
        loss = self._evaluate(loss_fn, sample)
        if not torch.is_grad_enabled():
            return Estimate(sample, loss, loss)
        g, own = self._gradient(logits, sample, loss.detach(), noise, v, loss_fn, context)
        return Estimate(sample, loss.detach(), loss + inject(logits, g, own))

    def _gradient(
        self,
        logits: Tensor,
        sample: Tensor,
        cost: Tensor,
        noise: Tensor,
        v: Tensor,
        loss_fn: LossFn | None,
        context: Tensor | None,
    ) -> tuple[Tensor, Pairs]:
        args = (logits, sample, cost, noise, v, loss_fn, context)
        if self.training and self.loss_hessian and loss_fn is not None:
            try:
                return self._attempt(*args, hessian=True)
            except _NoDoubleBackward as exc:
                warnings.warn(
                    f"{self.name}: loss_fn cannot be differentiated twice ({exc.__cause__}); the "
                    "variance objective now treats df/ds at the relaxed samples as constant",
                    stacklevel=4,
                )
                self.loss_hessian = False
        return self._attempt(*args, hessian=not self.training)

    def _attempt(
        self,
        logits: Tensor,
        sample: Tensor,
        cost: Tensor,
        noise: Tensor,
        v: Tensor,
        loss_fn: LossFn | None,
        context: Tensor | None,
        hessian: bool,
    ) -> tuple[Tensor, Pairs]:
        train = self.training
        theta = logits.detach().requires_grad_()
        with torch.enable_grad():
            loc = D.location(self.distribution, theta)
            z_tilde = D.conditional(self.distribution, loc, sample, v)
            both = D.relax(self.distribution, torch.stack([loc + noise, z_tilde]), self.log_temperature.exp())
            c_tilde, linear = self._control(both, loss_fn, context, hessian)
            (path,) = torch.autograd.grad(linear.sum(), theta, create_graph=train, allow_unused=True)
            coef = (cost - c_tilde).reshape(-1, *[1] * (theta.dim() - 1))
            g = coef * D.score(self.distribution, logits.detach(), sample)
            if path is not None:
                g = g + path
            if not train:
                return g.detach(), []
            params = [p for p in self.parameters() if p.requires_grad]
            variance = g.pow(2).sum() / g.shape[0]
            try:  # the only step that differentiates loss_fn twice
                grads = torch.autograd.grad(variance, params, allow_unused=True)
            except RuntimeError as exc:
                if not hessian or loss_fn is None:
                    raise
                raise _NoDoubleBackward() from exc
        return g.detach(), list(zip(params, grads))

    def _control(
        self, both: Tensor, loss_fn: LossFn | None, context: Tensor | None, hessian: bool
    ) -> tuple[Tensor, Tensor]:
        """From the relaxed ``[s(z), s(z~)]``: ``c(z~)`` and ``c(z) - c(z~)`` (or, without
        hessian, a stand-in with the same gradient for theta)."""
        value: Tensor | float = 0.0
        linear: Tensor | float = 0.0
        if loss_fn is not None:
            f = [self._evaluate(loss_fn, s) for s in both]
            if not hessian:
                df = torch.autograd.grad(f[0].sum() + f[1].sum(), both, retain_graph=True)[0]
                f_linear = D.per_example((both * df).flatten(0, 1)).reshape(2, -1)
                linear = self.eta * (f_linear[0] - f_linear[1])
            else:
                linear = self.eta * (f[0] - f[1])
            value = self.eta * f[1]
        residual = self._residual(both.flatten(0, 1), context)
        if residual is not None:
            r = residual.reshape(2, -1)
            value, linear = value + r[1], linear + r[0] - r[1]
        return value, linear  # type: ignore[return-value]


@ESTIMATORS.register("rebar")
class Rebar(_ControlVariate):
    Config = RebarConfig
    name = "rebar"


@ESTIMATORS.register("relax")
class Relax(_ControlVariate):
    Config = RelaxConfig
    name = "relax"
    supports_score_function = True
    uses_context = True

    def __init__(self, config: RelaxConfig, distribution: str, **kwargs) -> None:
        super().__init__(config, distribution, **kwargs)
        if distribution == "categorical" and self.num_classes is None:
            raise PerceptionError("relax on a categorical needs num_classes (its control-variate network's input size)")
        features = 1 if distribution == "bernoulli" else self.num_classes
        self.inp = nn.Linear(features, config.hidden)
        self.ctx = nn.Linear(self.context_dim, config.hidden, bias=False) if self.context_dim else None
        self.out = nn.Linear(config.hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _residual(self, relaxed: Tensor, context: Tensor | None) -> Tensor:
        batch = relaxed.shape[0]
        h = self.inp(relaxed.reshape(batch, -1, self.inp.in_features))
        if context is not None:  # relaxed stacks [s(z), s(z~)]: the context repeats
            h = h + self.ctx(context).repeat(batch // context.shape[0], 1).unsqueeze(1)
        return self.out(torch.tanh(h)).reshape(batch, -1).sum(1)

    def _score_surrogate(self, logits: Tensor, sample: Tensor, cost: Tensor, context: Tensor | None) -> Tensor:
        if not torch.is_grad_enabled():
            return torch.zeros_like(cost)
        u, v = D.uniform(logits), D.uniform(logits)
        with torch.no_grad():  # the z coupled with this sample, as fixed reparameterisation noise
            loc = D.location(self.distribution, logits)
            noise = D.conditional(self.distribution, loc, sample, u) - loc
        g, own = self._gradient(logits, sample, cost, noise, v, None, context)
        return inject(logits, g, own)
