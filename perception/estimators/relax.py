"""REBAR (Tucker et al. 2017) and RELAX (Grathwohl et al. 2018): unbiased, with a learned
control variate built on the concrete relaxation.

Per example, the gradient estimate for the logits theta is

    g = [f(b) - c(z~)] d/dtheta log p(b) + d/dtheta c(z) - d/dtheta c(z~)

with ``z`` the reparameterised noise, ``b = H(z)`` the hard sample and ``z~ ~ p(z | b)``
reparameterised (:func:`distributions.conditional`). REBAR: ``c(z) = eta f(s(z))`` with
``s(z) = sigma_lambda(z)`` the relaxed sample. RELAX: ``c(z) = m + eta (f(s(z)) - m) + sd r(s(z)[,
context])``, ``r`` a small MLP applied to every variable and summed (so it fits any number of
variables), ``m`` and ``sd`` running mean and standard deviation of the cost over past batches
(:class:`RunningMoments`).
``m`` is a constant, so eta = 1 is the paper's ``f(s) + r``; expressing ``r`` in cost units lets it
centre a loss of any level at once and resolve differences far below the level (a plain ``r``
learns a level of 0.22 or 1000 with Adam at the model's learning rate step by step, and jitters
by about that rate around it). RELAX starts at ``eta = 0`` and ``r = 0`` (output layer zero),
i.e. as REINFORCE centred by the running mean, and turns the relaxation on only as far as it
lowers the variance: on the toy benchmark starting at eta = 1 costs about 1000x the variance over
the first 100 steps. The statistics of a batch are folded in after it is estimated, so ``c``
never depends on the current sample and ``g`` stays unbiased. ``loss_fn`` is evaluated at ``b``
(pathwise gradient for its parameters) and, for the control variate only, at ``s(z)``, ``s(z~)``
and (in training) at the same two samples relaxed at a slightly higher temperature.

The estimator's parameters (log lambda, eta, r; one flat vector ``theta``) minimise ``E|g|^2``,
i.e. the variance of the unbiased ``g``. Both ``g`` and the gradient of ``mean_B |g|^2`` are
written out by hand (the derivatives of the relaxation, the conditional noise, the log-softmax
and the MLP), so autograd differentiates loss_fn once per step, to first order only. Lambda's
gradient has a loss-curvature term, ``<eta dc_bar, H_f ds/dlog(lambda)>`` (without it RELAX's
variance on the toy benchmark is several times higher); ``H_f ds/dlog(lambda)`` is the forward
difference of ``df/ds`` between ``s`` relaxed at ``log(lambda) + h`` and at ``log(lambda)``,
``h = sqrt(machine epsilon)`` (measured against exact second-order autograd: lambda's gradient
within 1e-9 in float64, 1e-4 (categorical) to 1.4e-3 (Bernoulli) of a -0.27 / -0.014 gradient in
float32, i.e. up to ~0.5% of the curvature term itself; loss_fn must be deterministic, see
:mod:`base`). The difference rows ride in the same autograd pass as
``df/ds``, in place of a Hessian-vector product (a second, double-backward pass). It needs no
double backward, so losses with ops that lack one (``torch.cdist``, tested; cuDNN's
grid sampler, not run here: no GPU; ``once_differentiable`` functions) keep the full objective.
``loss_hessian=False`` drops the term (two loss_fn rows fewer); eta, r and ``g`` (hence
unbiasedness) do not depend on it. The own parameters' gradients are injected into the
surrogate, so one ``backward()`` of the model's loss trains everything. ``g`` itself reaches
the logits as an injected constant (the decoder gets only the pathwise gradient at ``b``). The
hand-written pass is tested against autograd through the same formulas.

Score-function API (sequential models): RELAX implements it with ``c = r`` alone (there is no
``f`` to relax). The ``z`` coupled with a given ``b`` is drawn from ``p(z | b)`` — ``(b, z)`` then
has exactly the joint law of ``(H(z), z)`` — and rewritten with its noise fixed,
``z = location(theta) + stop_grad(z - location(theta))``, so ``d/dtheta c(z)`` is the ordinary
reparameterisation gradient and ``g`` stays unbiased. REBAR has nothing learnable without ``f``
and refuses (use relax, nvil or reinforce).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perception.config import CheckedConfig
from perception.errors import PerceptionError
from perception.estimators import distributions as D
from perception.estimators.base import ESTIMATORS, Estimate, Estimator, LossFn, inject
from perception.estimators.moments import RunningMoments


@dataclass
class RebarConfig(CheckedConfig):
    temperature: float = 0.5  # initial lambda (learned)
    eta: float = 1.0  # initial control-variate scale (learned)
    loss_hessian: bool = True  # lambda's objective keeps the loss-curvature term (two more loss_fn rows)
    lr: float | None = None  # None: the model's learning rate

    def __post_init__(self) -> None:
        super().__post_init__()
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
    """REBAR and RELAX. All own parameters live in one flat vector ``theta`` (log lambda, eta,
    then RELAX's network; :meth:`parts` names the pieces): on problems this small every tensor
    costs the optimiser, zero_grad and autograd a fixed overhead, whatever its size."""

    def __init__(self, config: RebarConfig, distribution: str, **kwargs) -> None:
        super().__init__(config, distribution, **kwargs)
        pieces = [torch.tensor([math.log(config.temperature), float(config.eta)]), *self._network()]
        self.sizes = [1, 1, *(piece.numel() for piece in pieces[1:])]
        self.theta = nn.Parameter(torch.cat([piece.flatten() for piece in pieces]))

    def _network(self) -> list[Tensor]:
        """Initial values of the control-variate network's pieces (RELAX)."""
        return []

    def parts(self) -> tuple[Tensor, ...]:
        """Views of ``theta``: log lambda ``[1]``, eta ``[1]``, then the network's pieces (flat)."""
        return self.theta.split(self.sizes)

    @property
    def log_temperature(self) -> Tensor:
        return self.theta[0]

    @property
    def eta(self) -> Tensor:
        return self.theta[1]

    def _residual(self, relaxed: Tensor, net: tuple[Tensor, ...], context: Tensor | None) -> _Residual | None:
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
        cost = loss.detach()
        g, own = self._gradient(logits, loc, sample, cost, z, v, loss_fn, context)
        return Estimate(sample, cost, loss + inject(logits, g, own))

    @torch.inference_mode()
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
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """``g`` for the logits and, in training, the gradient of ``V = mean_B |g|^2``
        for ``theta``, both written out by hand (softmax, conditional-noise, log-softmax and MLP
        derivatives): autograd only differentiates loss_fn, once, for ``df/ds`` at the relaxed
        samples and (lambda's loss-curvature term) at the same samples relaxed at a slightly
        higher temperature. Folds this batch's costs into the running statistics after they
        served it. (Every tensor here is tiny in the toy problems: the cost is the number of ops
        and autograd passes, so they are kept few.)"""
        categorical, train = self.distribution == "categorical", self.training
        log_temperature, eta, *net = self.parts()
        p = loc.exp() if categorical else torch.sigmoid(logits)
        z_tilde, dz_tilde = D.conditional(self.distribution, loc, sample, v)
        points = torch.stack([z, z_tilde])
        temperature = log_temperature.exp()
        s = D.relax(self.distribution, points, temperature)  # [2, B, ...]: s(z), s(z~)
        # ds/dz = s_t * (. - <s, .>) (categorical) or s_t * . (Bernoulli)
        s_t = s / temperature if categorical else torch.addcmul(s, s, s, value=-1.0).div_(temperature)
        # c = eta f(s) + r(s): its value at s(z~) and dc/ds at both points
        residual = self._residual(s, net, context)
        c_tilde = None if residual is None else residual.value
        dc = None if residual is None else residual.grad
        curvature = train and self.config.loss_hessian and loss_fn is not None
        if loss_fn is not None:
            step = torch.finfo(s.dtype).eps ** 0.5  # H_f ds/dlog(lambda) by a forward difference:
            shifted = D.relax(self.distribution, points, temperature * math.exp(step)) if curvature else None
            with torch.inference_mode(False), torch.enable_grad():  # rows must be ordinary tensors
                rows = torch.cat([s, shifted]) if curvature else s.clone()  # s, then s at log(lambda) + step
                rows.requires_grad_()
                f = self._evaluate_rows(loss_fn, rows)  # [R, B]: one call where loss_fn broadcasts
                df_all = _input_gradient(f, rows)
            df = df_all[:2]
            f_tilde = f[1] - self._level()  # no graph: inference mode
            c_tilde = eta * f_tilde if c_tilde is None else torch.addcmul(c_tilde, eta, f_tilde)
            dc_f = eta * df
            dc = dc_f if dc is None else dc + dc_f
        q_in = dc - (s * dc).sum(-1, keepdim=True) if categorical else dc
        q = s_t * q_in  # dc/dz at both points
        m = torch.addcmul(q[0], dz_tilde, q[1], value=-1.0)  # d c(z)/d loc - d c(z~)/d loc
        path = torch.addcmul(m, p, m.sum(-1, keepdim=True), value=-1.0) if categorical else m
        score = sample - p
        dims = logits.dim()
        g = torch.addcmul(path, _rows(cost - c_tilde, dims), score)
        if not train:
            return g, []

        # reverse pass of V = mean_B |g|^2 to theta
        g_bar = g * (2.0 / g.shape[0])
        c_bar = D.per_example(g_bar * score).neg_()  # [B], for c(z~)
        m_bar = g_bar - (p * g_bar).sum(-1, keepdim=True) if categorical else g_bar
        q_bar = torch.stack([m_bar, m_bar * dz_tilde.neg()])
        if categorical:
            s_q = (s * q_bar).sum(-1, keepdim=True)
            dc_bar = s_t * (q_bar - s_q)  # the relaxation's Jacobian is symmetric
            s_bar = torch.addcmul(q_bar * q_in, dc, s_q, value=-1.0).div_(temperature)  # d <q_bar, q>/ds, dc fixed
        else:
            dc_bar = s_t * q_bar
            qd = q_bar * dc
            s_bar = torch.addcmul(qd, qd, s, value=-2.0).div_(temperature)
        eta_bar, curvature_bar = None, None
        if loss_fn is not None:
            eta_bar = (dc_bar * df).sum() + torch.dot(c_bar, f_tilde)
            s_bar[1].addcmul_(_rows(c_bar, dims), dc_f[1])  # eta f(s(z~)) in the coefficient
            if curvature:  # <eta dc_bar, H_f ds/dlog(lambda)>: what s_bar += H_f (eta dc_bar) adds below
                curvature_bar = (dc_bar * (df_all[2:] - df)).mul_(eta / step)
        net_bar = [] if residual is None else self._residual_backward(residual, c_bar, dc_bar, s_bar, context)
        # s = relax(z / lambda): ds/dlog(lambda) = -J z, J the (symmetric) Jacobian in z
        z_bar = s_t * (s_bar - (s * s_bar).sum(-1, keepdim=True)) if categorical else s_t * s_bar
        # log lambda's gradient, every term an elementwise product over [2, B, ...] summed once
        terms = torch.addcmul(q_bar * q, z_bar, points)
        log_temperature_bar = (terms.neg_() if curvature_bar is None else curvature_bar.sub_(terms)).sum()
        head = torch.stack([log_temperature_bar, torch.zeros_like(log_temperature_bar) if eta_bar is None else eta_bar])
        grad = torch.cat([head, *(piece.reshape(-1) for piece in net_bar)]) if net_bar else head
        self._observe(cost)
        return g, [(self.theta, grad)]


class _Residual(NamedTuple):
    """RELAX's ``r`` at ``[s(z), s(z~)]``: ``value`` ``[B]`` at s(z~) (the only point where the
    coefficient uses it), ``grad`` = dr/ds at both points, and what its reverse pass needs.
    (A named tuple: built every step, and cheaper to build than a frozen dataclass.)"""

    value: Tensor
    grad: Tensor
    inputs: Tensor  # [2 B V, F]
    w_in: Tensor  # [H, F]
    hidden: Tensor  # tanh activations [2 B V, H]
    out: Tensor  # output weights times scale
    out_slope: Tensor  # (1 - hidden^2) * out
    scale: Tensor  # r = mean + scale * MLP, from the running cost statistics


def _tanh_slope(x: Tensor, a: Tensor) -> Tensor:
    """``x * (1 - a^2)`` for ``a = tanh(h)`` in one op (the slope itself is never needed)."""
    return torch.ops.aten.tanh_backward(x, a)


def _input_gradient(output: Tensor, inputs: Tensor) -> Tensor:
    """``d sum(output) / d inputs`` (zeros where ``output`` does not depend on ``inputs``) straight
    from autograd's engine, which is what ``torch.autograd.grad`` calls after checking its
    arguments; those checks cost ~30 us a call, a tenth of RELAX's step on the toy benchmark, and
    the arguments here are valid by construction (tested against ``torch.autograd.grad``)."""
    (grad,) = _ENGINE.run_backward(  # keep_graph, create_graph, inputs, allow_unreachable, accumulate_grad
        (output,), (torch.ones_like(output),), False, False, (inputs,), True, False
    )
    return torch.zeros_like(inputs) if grad is None else grad


_ENGINE = torch.autograd.Variable._execution_engine


def _rows(x: Tensor, dims: int) -> Tensor:
    """``[B] -> [B, 1, ...]`` to broadcast over ``dims``-dimensional per-example tensors."""
    return x.reshape(-1, *[1] * (dims - 1))


@ESTIMATORS.register("rebar")
class Rebar(_ControlVariate):
    Config = RebarConfig
    name = "rebar"


@ESTIMATORS.register("relax")
class Relax(_ControlVariate):
    """``r(s) = w_out . tanh(w_in s_v + b_in + w_ctx context) + b_out`` per variable ``v``, summed;
    its pieces in ``theta`` after log lambda and eta: ``w_in [H, F]``, ``b_in [H]``, ``w_ctx
    [H, context_dim]`` (with a context only), ``w_out [H]``, ``b_out [1]``. r is nonlinear in the
    relaxed sample on purpose: a linear r (one learned value per class) costs ~25 fewer ops per
    step but left the late gradient variance on the two-class toy up to 100x higher."""

    Config = RelaxConfig
    name = "relax"
    supports_score_function = True
    uses_context = True

    def __init__(self, config: RelaxConfig, distribution: str, **kwargs) -> None:
        super().__init__(config, distribution, **kwargs)
        self.cost = RunningMoments(config.decay)

    def _network(self) -> list[Tensor]:
        if self.distribution == "categorical" and self.num_classes is None:
            raise PerceptionError("relax on a categorical needs num_classes (its control-variate network's input size)")
        features = 1 if self.distribution == "bernoulli" else self.num_classes
        hidden = self.config.hidden
        inp = nn.Linear(features, hidden)  # PyTorch's default initialisation
        ctx = [nn.Linear(self.context_dim, hidden, bias=False).weight] if self.context_dim else []
        return [inp.weight, inp.bias, *ctx, torch.zeros(hidden), torch.zeros(1)]  # output starts at r = 0

    def network(self, net: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """``(w_in, b_in, w_ctx or None, w_out, b_out)`` shaped, from the flat pieces."""
        hidden = self.config.hidden
        w_in, b_in, *rest = net
        w_ctx = rest.pop(0).view(hidden, -1) if self.context_dim else None
        return w_in.view(hidden, -1), b_in, w_ctx, *rest

    def _residual(self, relaxed: Tensor, net: tuple[Tensor, ...], context: Tensor | None) -> _Residual:
        w_in, b_in, w_ctx, w_out, b_out = self.network(net)
        x = relaxed.reshape(-1, w_in.shape[1])  # [2 B V, F], every variable a row
        batch = relaxed.shape[1]
        variables = len(x) // (2 * batch)
        h = F.linear(x, w_in, b_in)
        if context is not None:  # [B, H], the same for both relaxed samples and every variable
            h = (h.view(2, batch, variables, -1) + F.linear(context, w_ctx).unsqueeze(1)).view(h.shape)
        a = torch.tanh(h)
        scale = self.cost.var.sqrt()
        out = w_out * scale
        out_slope = _tanh_slope(out, a)
        level = torch.addcmul(self.cost.mean, b_out, scale, value=variables)
        tilde = a[len(x) // 2 :]  # [B V, H] at s(z~)
        if variables == 1:
            value = torch.addmv(level, tilde, out)
        else:
            value = (tilde @ out).view(batch, variables).sum(1) + level
        return _Residual(value, (out_slope @ w_in).view(relaxed.shape), x, w_in, a, out, out_slope, scale)

    def _level(self) -> Tensor:
        return self.cost.mean

    def _unseen(self) -> bool:
        return not self.cost.started()

    def _observe(self, cost: Tensor) -> None:
        """Folds this batch's costs into the statistics r's output is expressed in (after they
        served it, so that r stays independent of the current sample); training only."""
        self.cost.update(cost)

    def _residual_backward(
        self,
        res: _Residual,
        value_bar: Tensor,
        grad_bar: Tensor,
        s_bar: Tensor,
        context: Tensor | None,
    ) -> list[Tensor]:
        """Gradients of ``<value_bar, r(s(z~))> + <grad_bar, dr/ds>`` (``value_bar`` ``[B]``,
        ``grad_bar`` at both points) for the network's pieces; adds the derivative in the relaxed
        samples to ``s_bar`` in place."""
        x, w_in, a = res.inputs, res.w_in, res.hidden
        grad_bar = grad_bar.reshape(x.shape)
        batch, half = len(value_bar), len(x) // 2
        y = F.linear(grad_bar, w_in)  # [2 B V, H]
        y_slope = _tanh_slope(y, a)
        a_bar = (a * y).mul_(res.out * -2.0)  # from dr/ds = ((1 - a^2) * out) @ w_in
        variables = half // batch
        # r enters c at s(z~) only, once per variable
        per_row = value_bar if variables == 1 else value_bar.view(-1, 1).expand(batch, variables).reshape(-1)
        a_bar[half:].addr_(per_row, res.out)
        h_bar = _tanh_slope(a_bar, a)
        grads = [
            torch.addmm(h_bar.T @ x, res.out_slope.T, grad_bar),  # w_in
            h_bar.sum(0),  # b_in
            torch.addmv(y_slope.sum(0), a[half:].T, per_row).mul_(res.scale),  # w_out
            value_bar.sum(0, keepdim=True).mul_(res.scale if variables == 1 else res.scale * variables),  # b_out
        ]
        if context is not None:
            grads.insert(2, h_bar.view(2, batch, -1, h_bar.shape[-1]).sum((0, 2)).T @ context)
        s_bar += (h_bar @ w_in).view(s_bar.shape)
        return grads

    def _score_surrogate(self, logits: Tensor, sample: Tensor, cost: Tensor, context: Tensor | None) -> Tensor:
        if not torch.is_grad_enabled():
            return torch.zeros_like(cost)
        u, v = D.uniform(logits), D.uniform(logits)
        with torch.no_grad():  # the z coupled with this sample, as fixed reparameterisation noise
            loc = D.location(self.distribution, logits)
            z = D.conditional(self.distribution, loc, sample, u)[0]
        g, own = self._gradient(logits, loc, sample, cost, z, v, None, context)
        return inject(logits, g, own)
