"""REBAR (Tucker et al. 2017) and RELAX (Grathwohl et al. 2018): unbiased, with a learned
control variate built on the concrete relaxation.

Per example, the gradient estimate for the logits theta is

    g = [f(b) - c(z~)] d/dtheta log p(b) + d/dtheta c(z) - d/dtheta c(z~)

with ``z`` the reparameterised noise, ``b = H(z)`` the hard sample and ``z~ ~ p(z | b)``
reparameterised (:func:`distributions.conditional`). REBAR: ``c(z) = eta f(s(z))`` with
``s(z) = sigma_lambda(z)`` the relaxed sample. RELAX: ``c(z) = m + eta (f(s(z)) - m) + sd r(s(z)[,
context])``, ``r`` a small MLP applied to every variable and summed (so it fits any number of
variables), ``m`` and ``sd`` running mean and standard deviation of the cost over past batches.
``m`` is a constant, so eta = 1 is the paper's ``f(s) + r``; expressing ``r`` in cost units lets it
centre a loss of any level at once and resolve differences far below the level (a plain ``r``
learns a level of 0.22 or 1000 with Adam at the model's learning rate step by step, and jitters
by about that rate around it). RELAX starts at ``eta = 0`` and ``r = 0`` (output layer zero),
i.e. as REINFORCE centred by the running mean, and turns the relaxation on only as far as it
lowers the variance: on the toy benchmark starting at eta = 1 costs about 1000x the variance over
the first 100 steps. The statistics of a batch are folded in after it is estimated, so ``c``
never depends on the current sample and ``g`` stays unbiased. ``loss_fn`` is evaluated three
times: at ``b`` (pathwise gradient for its parameters) and at ``s(z)``, ``s(z~)`` (control
variate only).

The estimator's parameters (log lambda, eta, r) minimise ``E|g|^2``, i.e. the variance of the
unbiased ``g``. Both ``g`` and the gradient of ``mean_B |g|^2`` are written out by hand (the
derivatives of the relaxation, the conditional noise, the log-softmax and the MLP), so autograd
only differentiates loss_fn: once for ``df/ds`` at the relaxed samples and once more, as a
Hessian-vector product, for lambda's loss-Hessian term. The own parameters' gradients are
injected into the surrogate, so one ``backward()`` of the model's loss trains everything. ``g``
itself reaches the logits as an injected constant (the decoder gets only the pathwise gradient
at ``b``). The hand-written pass is tested against autograd through the same formulas.

Second order through loss_fn: if loss_fn holds an op without double backward (``torch.cdist``,
tested; reportedly cuDNN's grid sampler, which grid_sample uses on GPU for bilinear, zero padding
and ``align_corners=True``: not run here, no GPU), the first training call fails over, with a
warning and for good, to treating ``df/ds`` at ``s(z)`` and ``s(z~)`` as a constant inside the
variance objective: lambda's gradient keeps the relaxation's own dependence on lambda but drops
the loss-Hessian term; eta, r and ``g`` (hence unbiasedness) are unchanged. ``loss_hessian=False``
selects this mode from the start (one autograd pass fewer). CPU grid_sample (torch 2.13) has a
double backward, so spatial transformers on CPU keep the exact objective. Functions marked
``once_differentiable`` cut the graph silently, which amounts to the same fallback.

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
    eta: float = 0.0  # start as "REINFORCE + r": the relaxation is turned on as it lowers variance
    hidden: int = 32  # width of the per-variable control-variate MLP
    decay: float = 0.8  # running cost statistics that r's output is expressed in (as NVIL's)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden < 1 or not 0.0 <= self.decay < 1.0:
            raise PerceptionError(f"relax needs hidden >= 1 and 0 <= decay < 1, got {self.hidden}, {self.decay}")


class _ControlVariate(Estimator):
    def __init__(self, config: RebarConfig, distribution: str, **kwargs) -> None:
        super().__init__(config, distribution, **kwargs)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(config.temperature)))
        self.eta = nn.Parameter(torch.tensor(float(config.eta)))
        self.loss_hessian = config.loss_hessian

    def _residual(self, relaxed: Tensor, context: Tensor | None) -> _Residual | None:
        """RELAX's ``r`` at the stacked relaxed samples ``[2, B, ...]``; None for REBAR."""
        return None

    def _observe(self, cost: Tensor) -> None:
        pass

    def _unseen(self) -> bool:
        return False

    def _level(self) -> Tensor | float:
        """A constant taken off ``f(s)`` inside ``c``; it changes no gradient of ``c`` but keeps
        eta's from being dominated by the loss's offset (RELAX: the running mean cost)."""
        return 0.0

    def _estimate(self, logits: Tensor, loss_fn: LossFn, context: Tensor | None) -> Estimate:
        noise, v = D.noise(self.distribution, D.uniform(logits)), D.uniform(logits)
        with torch.no_grad():
            loc = D.location(self.distribution, logits)
            z = loc + noise
            sample = D.hard(self.distribution, z)
        loss = self._evaluate(loss_fn, sample)
        if not torch.is_grad_enabled():
            return Estimate(sample, loss, loss)
        if self.training and self._unseen():  # start the cost statistics from an independent draw
            with torch.no_grad():
                extra = D.hard(self.distribution, D.perturb(self.distribution, logits, D.uniform(logits)))
                self._observe(self._evaluate(loss_fn, extra))
        g, own = self._gradient(logits.detach(), loc, sample, loss.detach(), z, v, loss_fn, context)
        return Estimate(sample, loss.detach(), loss + inject(logits, g, own))

    def _gradient(
        self,
        logits: Tensor,
        loc: Tensor,
        sample: Tensor,
        cost: Tensor,
        z: Tensor,
        v: Tensor,
        loss_fn: LossFn | None,
        context: Tensor | None,
    ) -> tuple[Tensor, Pairs]:
        args = (logits, loc, sample, cost, z, v, loss_fn, context)
        result = None
        if self.training and self.loss_hessian and loss_fn is not None:
            try:
                result = self._attempt(*args, hessian=True)
            except _NoDoubleBackward as exc:
                warnings.warn(
                    f"{self.name}: loss_fn cannot be differentiated twice ({exc.__cause__}); the "
                    "variance objective now treats df/ds at the relaxed samples as constant",
                    stacklevel=4,
                )
                self.loss_hessian = False
        if result is None:
            result = self._attempt(*args, hessian=False)
        self._observe(cost)
        return result

    @torch.no_grad()
    def _attempt(
        self,
        logits: Tensor,
        loc: Tensor,
        sample: Tensor,
        cost: Tensor,
        z: Tensor,
        v: Tensor,
        loss_fn: LossFn | None,
        context: Tensor | None,
        hessian: bool,
    ) -> tuple[Tensor, Pairs]:
        """``g`` for the (detached) logits and, in training, the own parameters' gradients of
        ``V = mean_B |g|^2``, both written out by hand (softmax, conditional-noise, log-softmax
        and MLP derivatives): autograd only differentiates loss_fn, once for ``df/ds`` and, for
        lambda's loss-Hessian term, once more as a Hessian-vector product. (Every tensor here is
        tiny in the toy problems: the cost is the number of ops, so they are kept few.)"""
        dist, train, eta = self.distribution, self.training, self.eta
        categorical = dist == "categorical"
        p = loc.exp() if categorical else torch.sigmoid(logits)
        z_tilde, dz_tilde = D.conditional(dist, loc, sample, v)
        points = torch.stack([z, z_tilde])
        temperature = self.log_temperature.exp()
        s = D.relax(dist, points, temperature)  # [2, B, ...]: s(z), s(z~)
        s_t = s / temperature if categorical else s * (1.0 - s) / temperature
        # c = eta f(s) + r(s) at s(z~) and dc/ds at both points
        residual = self._residual(s, context)
        c_tilde = cost.new_zeros(()) if residual is None else residual.value[1]
        dc = None if residual is None else residual.grad
        if loss_fn is not None:
            s.requires_grad_()
            with torch.enable_grad():
                f = [self._evaluate(loss_fn, row) for row in s]
                ones = torch.ones_like(cost)
                (df,) = torch.autograd.grad(
                    f, s, (ones, ones), create_graph=train and hessian, materialize_grads=True
                )
            f_tilde = f[1].detach() - self._level()
            c_tilde = torch.addcmul(c_tilde, eta, f_tilde)
            dc = eta * df.detach() if dc is None else torch.addcmul(dc, eta, df.detach())
        q_in = dc - (s * dc).sum(-1, keepdim=True) if categorical else dc
        q = s_t * q_in  # dc/dz at both points
        q0, q1 = q
        m = torch.addcmul(q0, dz_tilde, q1, value=-1.0)
        path = torch.addcmul(m, p, m.sum(-1, keepdim=True), value=-1.0) if categorical else m
        score = sample - p
        dims = logits.dim()
        g = torch.addcmul(path, _rows(cost - c_tilde, dims), score)
        if not train:
            return g, []

        # reverse pass of V = mean_B |g|^2 to the own parameters
        g_bar = g * (2.0 / g.shape[0])
        c_bar = D.per_example(g_bar * score).neg_()  # [B], for c(z~)
        m_bar = g_bar - (p * g_bar).sum(-1, keepdim=True) if categorical else g_bar
        q_bar = torch.stack([m_bar, (dz_tilde * m_bar).neg_()])
        if categorical:
            s_q = (s * q_bar).sum(-1, keepdim=True)
            dc_bar = s_t * (q_bar - s_q)  # the relaxation's Jacobian is symmetric
            s_bar = (q_bar * q_in - dc * s_q) / temperature  # d <q_bar, q> / ds, dc fixed
        else:
            dc_bar = s_t * q_bar
            s_bar = q_bar * dc * (1.0 - 2.0 * s) / temperature
        log_temperature_bar = -(q_bar * q).sum()
        grads: dict[Tensor, Tensor] = {}
        if loss_fn is not None:
            grads[eta] = (dc_bar * df).sum() + (c_bar * f_tilde).sum()
            s_bar[1].addcmul_(_rows(c_bar * eta, dims), df[1])
            if train and hessian and df.requires_grad:
                try:  # the only step that differentiates loss_fn twice
                    (hvp,) = torch.autograd.grad(df, s, eta * dc_bar, materialize_grads=True)
                except RuntimeError as exc:
                    raise _NoDoubleBackward() from exc
                s_bar += hvp
        if residual is not None:
            grads.update(self._residual_backward(residual, c_bar, dc_bar, s_bar, context))
        # s = relax(z / lambda): ds/dlog(lambda) = -J z, J the (symmetric) Jacobian in z
        z_bar = s_t * (s_bar - (s * s_bar).sum(-1, keepdim=True)) if categorical else s_t * s_bar
        grads[self.log_temperature] = log_temperature_bar - (z_bar * points).sum()
        return g, [(param, grads.get(param)) for param in self.parameters() if param.requires_grad]


@dataclass(frozen=True)
class _Residual:
    """RELAX's ``r`` at ``[s(z), s(z~)]``: ``value`` ``[2, B]``, ``grad`` = dr/ds, and what its
    reverse pass needs."""

    value: Tensor
    grad: Tensor
    inputs: Tensor  # [2 B V, F]
    hidden: Tensor  # tanh activations [2 B V, H]
    slope: Tensor  # 1 - hidden^2
    out_slope: Tensor  # slope * output weights
    scale: Tensor  # r = mean + scale * MLP, from the running cost statistics


def _rows(x: Tensor, dims: int) -> Tensor:
    """``[B] -> [B, 1, ...]`` to broadcast over ``dims``-dimensional per-example tensors."""
    return x.reshape(-1, *[1] * (dims - 1))


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
        self.register_buffer("cost_mean", torch.zeros(()))
        self.register_buffer("cost_var", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def _residual(self, relaxed: Tensor, context: Tensor | None) -> _Residual:
        w_in, w_out = self.inp.weight, self.out.weight[0]
        x = relaxed.reshape(-1, w_in.shape[1])  # [2 B V, F], every variable a row
        variables = len(x) // (2 * relaxed.shape[1])
        h = torch.addmm(self.inp.bias, x, w_in.T)
        if context is not None:  # [B, H], the same for both relaxed samples and every variable
            h = (h.view(2, len(context), variables, -1) + (context @ self.ctx.weight.T).unsqueeze(1)).view(h.shape)
        a = torch.tanh(h)
        slope = (a * a).neg_().add_(1.0)
        out_slope = slope * w_out
        value = (a @ w_out).view(*relaxed.shape[:2], -1).sum(-1) + variables * self.out.bias
        scale = self.cost_var.sqrt()
        value = torch.addcmul(self.cost_mean, value, scale)
        return _Residual(value, (out_slope @ w_in).view(relaxed.shape) * scale, x, a, slope, out_slope, scale)

    def _level(self) -> Tensor:
        return self.cost_mean

    def _unseen(self) -> bool:
        return not bool(self.seen)

    def _observe(self, cost: Tensor) -> None:
        """Folds this batch's costs into the statistics r's output is expressed in (after they
        served it, so that r stays independent of the current sample)."""
        if not self.training:
            return
        weight = 1.0 - self.config.decay * self.seen  # the first batch sets them (no sync)
        self.seen.fill_(True)
        self.cost_mean.lerp_(cost.mean(), weight)
        self.cost_var.lerp_((cost - self.cost_mean).pow(2).mean(), weight)

    def _residual_backward(
        self, res: _Residual, value_bar: Tensor, grad_bar: Tensor, s_bar: Tensor, context: Tensor | None
    ) -> dict[Tensor, Tensor]:
        """Gradients of ``<value_bar, r(s(z~))> + <grad_bar, dr/ds>`` (``value_bar`` ``[B]``,
        ``grad_bar`` at both points) for r's parameters; adds the derivative in the relaxed
        samples to ``s_bar`` in place."""
        x, a, slope = res.inputs, res.hidden, res.slope
        w_in, w_out = self.inp.weight, self.out.weight[0]
        value_bar, grad_bar = value_bar * res.scale, grad_bar.reshape(x.shape) * res.scale
        y = grad_bar @ w_in.T  # [2 B V, H]
        a_bar = a * y * (-2.0 * w_out)  # from dr/ds = out_slope @ w_in
        half = len(x) // 2  # rows of s(z~): r enters the coefficient there only
        per_row = value_bar.repeat_interleave(half // len(value_bar))
        a_bar[half:].addr_(per_row, w_out)
        h_bar = a_bar.mul_(slope)
        grads = {
            self.out.bias: (value_bar.sum() * (half // len(value_bar))).reshape(1),
            self.out.weight: torch.addmv((y * slope).sum(0), a[half:].T, per_row)[None],
            self.inp.weight: torch.addmm(h_bar.T @ x, res.out_slope.T, grad_bar),
            self.inp.bias: h_bar.sum(0),
        }
        if context is not None:
            grads[self.ctx.weight] = h_bar.view(2, len(context), -1, h_bar.shape[-1]).sum((0, 2)).T @ context
        s_bar += (h_bar @ w_in).view(s_bar.shape)
        return grads

    def _score_surrogate(self, logits: Tensor, sample: Tensor, cost: Tensor, context: Tensor | None) -> Tensor:
        if not torch.is_grad_enabled():
            return torch.zeros_like(cost)
        u, v = D.uniform(logits), D.uniform(logits)
        with torch.no_grad():  # the z coupled with this sample, as fixed reparameterisation noise
            loc = D.location(self.distribution, logits)
            z = D.conditional(self.distribution, loc, sample, u)[0]
        g, own = self._gradient(logits.detach(), loc, sample, cost, z, v, None, context)
        return inject(logits, g, own)
