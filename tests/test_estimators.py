"""Discrete gradient estimators: unbiasedness against the exact gradient, bias of the relaxation,
learned variance reduction, pathwise gradients, the score-function API and user errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from perception.errors import InputError, PerceptionError
from perception.estimators import ESTIMATORS, build_estimator

UNBIASED = ["reinforce", "nvil", "rebar", "relax"]


SHAPES = {"categorical": (2, 3), "bernoulli": (3,)}  # two (three) variables per example


def build(name, dist, **hyper):
    classes = SHAPES[dist][-1] if dist == "categorical" else None
    return build_estimator(name, dist, num_classes=classes, **hyper)


def toy(dist, seed=0):
    """Fixed logits and target; the loss has a parameter w to check pathwise gradients."""
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[dist]
    return torch.randn(shape, generator=g), torch.rand(shape, generator=g)


def loss_of(t, w):
    return lambda c: ((t - w * c) ** 2).reshape(c.shape[0], -1).sum(1)


def exact_gradients(dist, logits, t):
    """Closed form: the loss is a sum over variables, so each variable's gradient is its own."""
    if dist == "categorical":
        p = torch.softmax(logits, -1)
        states = torch.eye(logits.shape[-1])  # state k of a variable: one-hot e_k
        f = ((t[:, None, :] - states) ** 2).sum(-1)  # [V, K]
        df_dw = (-2 * states * (t[:, None, :] - states)).sum(-1)
        mean_f = (p * f).sum(-1, keepdim=True)
        return p * (f - mean_f), (p * df_dw).sum()
    p = torch.sigmoid(logits)
    f1, f0 = (t - 1) ** 2, t**2
    return p * (1 - p) * (f1 - f0), (p * -2 * (t - 1)).sum()


def per_sample_gradients(est, logits, t, n, score_api=False):
    """n independent single-sample gradient estimates for the logits and for w."""
    rows = logits.expand(n, *logits.shape).clone().requires_grad_()
    w = torch.ones(n, *[1] * logits.dim(), requires_grad=True)
    loss_fn = loss_of(t, w)
    if score_api:
        sample = est.sample(rows)
        loss = loss_fn(sample)
        surrogate = loss + est.score_surrogate(rows, sample, loss)
    else:
        surrogate = est(rows, loss_fn).surrogate
    g_logits, g_w = torch.autograd.grad(surrogate.sum(), [rows, w])
    return g_logits, g_w.flatten()


def warm_up(est, logits, t, steps=30, batch=64, lr=0.05):
    """Give the estimator's own parameters (baseline, control variate) something to have learnt."""
    opt = torch.optim.Adam(est.parameters(), lr=lr) if list(est.parameters()) else None
    for _ in range(steps):
        rows = logits.expand(batch, *logits.shape).contiguous()
        surrogate = est(rows, loss_of(t, 1.0)).surrogate
        if opt:
            opt.zero_grad()
            surrogate.mean().backward()
            opt.step()


def assert_matches(samples, exact, what):
    mean, se = samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5
    err = (mean - exact).abs()
    assert bool((err < 4 * se + 1e-4).all()), f"{what}: mean {mean} exact {exact} se {se}"


@pytest.mark.parametrize("dist", ["categorical", "bernoulli"])
@pytest.mark.parametrize("name", UNBIASED)
def test_unbiased_estimators_match_the_exact_gradient(name, dist):
    torch.manual_seed(1)
    logits, t = toy(dist)
    est = build(name, dist)
    warm_up(est, logits, t)
    g, g_w = per_sample_gradients(est, logits, t, n=20000)
    exact_logits, exact_w = exact_gradients(dist, logits, t)
    assert_matches(g.reshape(g.shape[0], -1), exact_logits.flatten(), f"{name} logits")
    assert_matches(g_w[:, None], exact_w[None], f"{name} pathwise w")


@pytest.mark.parametrize("name", ["reinforce", "nvil", "relax"])
def test_score_function_api_is_unbiased(name):
    torch.manual_seed(2)
    logits, t = toy("categorical")
    est = build(name, "categorical")
    g, _ = per_sample_gradients(est, logits, t, n=20000, score_api=True)
    assert_matches(g.reshape(g.shape[0], -1), exact_gradients("categorical", logits, t)[0].flatten(), name)


@pytest.mark.parametrize("name", ["concrete", "rebar", "exact"])
def test_score_function_api_refused_names_the_alternatives(name):
    est = build(name, "categorical")
    logits = torch.zeros(4, 2, 3)
    with pytest.raises(PerceptionError, match="nvil, reinforce, relax"):
        est.score_surrogate(logits, est.sample(logits), torch.zeros(4))


@pytest.mark.parametrize("dist", ["categorical", "bernoulli"])
def test_exact_equals_the_analytic_gradient_and_expectation(dist):
    logits, t = toy(dist)
    rows = logits[None].clone().requires_grad_()
    w = torch.ones((), requires_grad=True)
    out = build("exact", dist)(rows, loss_of(t, w))
    g, g_w = torch.autograd.grad(out.surrogate.sum(), [rows, w])
    exact_logits, exact_w = exact_gradients(dist, logits, t)
    torch.testing.assert_close(g[0], exact_logits)
    torch.testing.assert_close(g_w, exact_w)
    assert out.sample.shape == rows.shape and set(out.sample.unique().tolist()) <= {0.0, 1.0}


def test_concrete_is_biased_and_the_bias_shrinks_with_temperature():
    torch.manual_seed(3)
    logits, t = toy("categorical")
    exact = exact_gradients("categorical", logits, t)[0]
    bias = {}
    for temperature in (1.0, 0.2):
        g, _ = per_sample_gradients(build("concrete", "categorical", temperature=temperature), logits, t, n=40000)
        mean, se = g.mean(0), g.std(0) / g.shape[0] ** 0.5
        bias[temperature] = (mean - exact).norm().item()
        noise = se.norm().item()
    assert bias[1.0] > 10 * noise  # clearly biased at a warm temperature
    assert bias[0.2] + 4 * noise < bias[1.0]


def test_straight_through_concrete_passes_hard_values_and_relaxed_gradients():
    torch.manual_seed(4)
    logits = torch.zeros(5, 2, 3, requires_grad=True)
    out = build("concrete", "categorical", straight_through=True)(logits, lambda c: c[..., 0].sum(-1))
    assert set(out.sample.detach().unique().tolist()) <= {0.0, 1.0}
    out.surrogate.mean().backward()
    assert logits.grad.abs().sum() > 0


def gradient_variance(est, logits, t, n=4000):
    est.eval()
    g, _ = per_sample_gradients(est, logits, t, n)
    est.train()
    return g.var(0).sum().item()


def test_nvil_baseline_is_trained_and_lowers_variance():
    torch.manual_seed(5)
    logits, t = toy("categorical")
    est = build("nvil", "categorical")
    before = gradient_variance(est, logits, t)
    rows = logits.expand(8, *logits.shape).clone().requires_grad_()
    for _ in range(2):  # the first call sets the running mean to its batch mean: zero signal
        est(rows, loss_of(t, 1.0)).surrogate.mean().backward()
    assert est.bias.grad is not None and est.bias.grad.abs() > 0
    warm_up(est, logits, t, steps=100, batch=8, lr=est.lr)
    assert gradient_variance(est, logits, t) < 0.5 * before


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_control_variate_parameters_are_trained_and_lower_variance(name):
    torch.manual_seed(6)
    logits, t = toy("categorical")
    est = build(name, "categorical", eta=1.0)  # relax starts at eta = 0, with nothing through s
    rows = logits.expand(8, *logits.shape).clone().requires_grad_()
    for _ in range(2):  # relax's r is scaled by cost statistics that the first call initialises
        est(rows, loss_of(t, 1.0)).surrogate.mean().backward()
    pieces = est.theta.grad.split(est.sizes)  # log lambda, eta, then relax's network
    if name == "relax":  # w_in and b_in sit behind the zero-initialised output layer
        pieces = pieces[:2] + pieces[-2:]
    assert all(piece.abs().sum() > 0 for piece in pieces)
    est = build(name, "categorical", eta=0.0)  # starts as plain REINFORCE
    before = gradient_variance(est, logits, t)
    warm_up(est, logits, t, steps=100, batch=16, lr=0.05)
    assert gradient_variance(est, logits, t) < 0.5 * before


def test_relax_with_context_and_score_function_trains_its_network():
    torch.manual_seed(7)
    est = build_estimator("relax", "bernoulli", context_dim=4)
    logits = torch.randn(6, 3, requires_grad=True)
    sample = est.sample(logits)
    context = torch.randn(6, 4)
    opt = torch.optim.Adam(est.parameters(), lr=0.05)
    for _ in range(3):  # the network's output layer starts at zero
        opt.zero_grad()
        extra = est.score_surrogate(logits, sample, sample.sum(1), context=context)
        assert torch.all(extra == 0)
        extra.mean().backward()
        opt.step()
    assert logits.grad.abs().sum() > 0
    log_temperature, eta, *net = est.theta.grad.split(est.sizes)
    assert eta == 0  # eta scales f, which the score-function form does not have
    assert all(piece.abs().sum() > 0 for piece in [log_temperature, *net])


def test_nvil_with_context_uses_its_network():
    est = build_estimator("nvil", "categorical", context_dim=5)
    logits = torch.randn(4, 3, requires_grad=True)
    out = est(logits, lambda c: c[:, 0], context=torch.randn(4, 5))
    out.surrogate.mean().backward()
    assert all(p.grad is not None for p in est.net.parameters())
    with pytest.raises(InputError, match="context"):
        est(logits, lambda c: c[:, 0])


@pytest.mark.parametrize("name", sorted(ESTIMATORS.names()))
@pytest.mark.parametrize("dist", ["categorical", "bernoulli"])
def test_every_estimator_serves_several_variable_dims_and_trains_loss_params(name, dist):
    torch.manual_seed(8)
    shape = (4, 2, 2, 3) if dist == "categorical" else (4, 2, 3)
    logits = torch.randn(shape, requires_grad=True)
    w = torch.ones((), requires_grad=True)
    est = build_estimator(name, dist, num_classes=3 if dist == "categorical" else None)
    t = torch.tensor([0.1, 0.45, 0.8])  # distinct losses: a batch whose costs all equal its baseline gets g = 0
    out = est(logits, lambda c: ((t - w * c) ** 2).reshape(4, -1).sum(1))
    assert out.sample.shape == shape and out.loss.shape == out.surrogate.shape == (4,)
    if dist == "categorical":
        torch.testing.assert_close(out.sample.detach().sum(-1), torch.ones(shape[:-1]))
    if name == "exact":  # the surrogate is the expectation, the loss one draw of it
        assert not torch.allclose(out.surrogate, out.loss)
    else:  # injected terms are zero in value: logging the surrogate shows the loss
        torch.testing.assert_close(out.surrogate.detach(), out.loss)
    out.surrogate.mean().backward()
    assert logits.grad.abs().sum() > 0 and w.grad.abs() > 0 and torch.isfinite(logits.grad).all()


def stn_loss(image):
    """Reads a learnable image at the sample's expected position with grid_sample, as a
    spatial transformer does."""
    coords = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]])

    def loss_fn(sample):
        grid = (sample @ coords).reshape(-1, 1, 1, 2)
        read = F.grid_sample(image.expand(len(sample), -1, -1, -1), grid, align_corners=False)
        return (read.flatten(1) - 1.0).pow(2).sum(1)

    return loss_fn


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_grid_sample_loss_trains_rebar_and_relax(name):
    torch.manual_seed(9)
    image = torch.randn(1, 1, 8, 8, requires_grad=True)
    est = build_estimator(name, "categorical", num_classes=4, eta=1.0)
    logits = torch.randn(6, 4, requires_grad=True)
    est(logits, stn_loss(image)).surrogate.mean().backward()
    for grad in [logits.grad, image.grad, est.theta.grad[:1], est.theta.grad[1:2]]:  # log lambda, eta
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_loss_without_double_backward_keeps_the_curvature_term():
    """torch.cdist has no double backward; lambda's loss-curvature term is a forward difference of
    first derivatives, so a cdist loss gets the same gradients (logits, eta, log lambda) as the same
    loss written with twice-differentiable ops. loss_hessian=False drops only that term: g and
    eta's gradient stay, log lambda's changes."""
    points = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]])
    cdist = lambda c: torch.cdist(c, points).sum(1)  # noqa: E731
    explicit = lambda c: ((c[:, None, :] - points) ** 2).sum(-1).sqrt().sum(1)  # noqa: E731
    grads = {}
    for label, loss_fn, hessian in [("explicit", explicit, True), ("cdist", cdist, True), ("off", cdist, False)]:
        torch.manual_seed(10)
        est = build_estimator("rebar", "categorical", num_classes=3, loss_hessian=hessian)
        logits = torch.randn(5, 3, requires_grad=True)
        est(logits, loss_fn).surrogate.mean().backward()
        grads[label] = (logits.grad, est.theta.grad[1], est.theta.grad[0])  # logits, eta, log lambda
    for i in range(3):
        torch.testing.assert_close(grads["cdist"][i], grads["explicit"][i], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(grads["off"][0], grads["cdist"][0])
    torch.testing.assert_close(grads["off"][1], grads["cdist"][1])
    assert (grads["off"][2] - grads["cdist"][2]).abs() > 1e-3 * grads["cdist"][2].abs()


def test_no_grad_calls_skip_the_gradient_machinery():
    est = build("relax", "categorical")
    with torch.no_grad():
        out = est(torch.zeros(3, 2, 3), lambda c: c.sum((1, 2)))
    torch.testing.assert_close(out.surrogate, out.loss)


def test_exact_refuses_too_many_states_and_names_alternatives():
    est = build_estimator("exact", "categorical")
    with pytest.raises(PerceptionError, match="65536 states.*reinforce, nvil, concrete, rebar or relax"):
        est(torch.zeros(2, 8, 4), lambda c: c.sum((1, 2)))


def test_unknown_names_and_options_list_the_valid_ones():
    with pytest.raises(PerceptionError) as info:
        build_estimator("reinforced", "bernoulli")
    assert all(name in str(info.value) for name in ["concrete", "exact", "nvil", "rebar", "reinforce", "relax"])
    with pytest.raises(PerceptionError, match="straight_through, temperature"):
        build_estimator("concrete", "bernoulli", temprature=0.5)
    with pytest.raises(PerceptionError, match="takes no options"):
        build_estimator("reinforce", "bernoulli", lr=0.1)
    with pytest.raises(PerceptionError, match="bernoulli, categorical"):
        build_estimator("reinforce", "gaussian")
    with pytest.raises(PerceptionError, match="num_classes"):
        build_estimator("relax", "categorical")


def test_loss_fn_must_return_one_loss_per_example():
    est = build("reinforce", "categorical")
    with pytest.raises(InputError, match=r"shape \[B\]"):
        est(torch.zeros(3, 2, 3), lambda c: c.sum())


@pytest.mark.parametrize("dist", ["categorical", "bernoulli"])
@pytest.mark.parametrize("name", ["rebar", "relax", "exact"])
def test_a_broadcasting_loss_gives_the_same_estimate_in_one_call(name, dist):
    """broadcasts=True evaluates every sample row in one loss_fn call: the same sample, loss,
    logit gradient, pathwise gradient and own-parameter gradient as one call per row."""
    logits0, t = toy(dist, seed=3)
    results, calls = [], []
    for broadcasts in (False, True):
        torch.manual_seed(11)
        est = build(name, dist)
        logits = logits0.expand(5, *logits0.shape).clone().requires_grad_()
        w = torch.ones((), requires_grad=True)

        def loss_fn(c):
            calls.append(broadcasts)
            return ((t - w * c) ** 2).flatten(-logits0.dim()).sum(-1)  # [..., B, vars] -> [..., B]

        out = est(logits, loss_fn, broadcasts=broadcasts)
        out.surrogate.mean().backward()
        own = [p.grad.clone() for p in est.parameters()]
        results.append((out.sample, out.loss, logits.grad, w.grad, own))
    (s0, l0, g0, w0, o0), (s1, l1, g1, w1, o1) = results
    assert torch.equal(s0, s1)
    torch.testing.assert_close(l1, l0)
    torch.testing.assert_close(g1, g0)
    torch.testing.assert_close(w1, w0)
    for a, b in zip(o0, o1):
        torch.testing.assert_close(b, a)
    assert calls.count(True) < calls.count(False)  # fewer loss_fn calls, not just the same ones


def test_a_loss_declared_broadcasting_that_does_not_broadcast_is_one_clear_error():
    est = build("relax", "categorical")
    logits = torch.zeros(4, 2, 3)
    with pytest.raises(InputError, match=r"broadcasts=True must map samples \(4, 4, 2, 3\) to losses \(4, 4\)"):
        est(logits, lambda c: c.reshape(c.shape[0], -1).sum(1), broadcasts=True)


def test_param_groups_carry_the_estimators_own_learning_rate():
    assert build("reinforce", "bernoulli").param_groups(0.01) == []
    assert build("nvil", "bernoulli").param_groups(0.01)[0]["lr"] == 0.1
    assert build("relax", "bernoulli").param_groups(0.01)[0]["lr"] == 0.01
    assert build("relax", "bernoulli", lr=0.003).param_groups(0.01)[0]["lr"] == 0.003


@pytest.mark.parametrize("name", ["reinforce", "nvil", "concrete", "rebar", "relax"])
def test_the_hard_sample_comes_from_the_first_uniform_draw(name):
    """Callers (LAVAE) reproduce the sample beforehand under a forked RNG."""
    from perception.estimators import distributions as D

    logits = torch.randn(4, 2, 3)
    est = build(name, "categorical")
    with torch.random.fork_rng():
        expected = D.hard("categorical", D.perturb("categorical", logits, D.uniform(logits)))
    out = est(logits, lambda c: c[..., 0].sum(-1))
    torch.testing.assert_close(out.sample.detach(), expected)


def test_relax_control_variate_learns_the_level_of_a_large_loss_quickly():
    """r is expressed in running cost statistics, so a loss far from zero (here ~1000) is centred
    within a few steps at the model's learning rate, not after ~1000/lr of them."""
    torch.manual_seed(11)
    logits, t = toy("categorical")
    loss = loss_of(t, 1.0)
    offset = lambda c: 1000.0 + loss(c)  # noqa: E731
    est = build("relax", "categorical")
    opt = torch.optim.Adam(est.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        est(logits.expand(8, *logits.shape).contiguous(), offset).surrogate.mean().backward()
        opt.step()
    est.eval()
    rows = logits.expand(2000, *logits.shape).clone().requires_grad_()
    relax_var = torch.autograd.grad(est(rows, offset).surrogate.sum(), rows)[0].var(0).sum()
    reinforce = build("reinforce", "categorical")
    reinforce_var = torch.autograd.grad(reinforce(rows, offset).surrogate.sum(), rows)[0].var(0).sum()
    assert relax_var < 1e-3 * reinforce_var


def autograd_reference(est, logits, loss_fn, u, v, context):
    """RELAX's g and the gradient of mean_B |g|^2 by plain autograd (create_graph), from the same
    noise: what the estimator's hand-written derivatives must reproduce."""
    from perception.estimators import distributions as D

    dist, batch = est.distribution, logits.shape[0]
    theta = logits.detach().requires_grad_()
    loc = D.location(dist, theta)
    sample = D.hard(dist, (loc + D.noise(dist, u)).detach())
    cost = loss_fn(sample).detach()
    temperature = est.log_temperature.exp()
    z_tilde = D.conditional(dist, loc, sample, v)[0]
    relaxed = [D.relax(dist, loc + D.noise(dist, u), temperature), D.relax(dist, z_tilde, temperature)]

    w_in, b_in, w_ctx, w_out, b_out = est.network(est.parts()[2:])

    def control(s):
        h = F.linear(s.reshape(batch, -1, w_in.shape[1]), w_in, b_in) + F.linear(context, w_ctx).unsqueeze(1)
        r = (torch.tanh(h) @ w_out + b_out).reshape(batch, -1).sum(1)
        mean = est.cost.mean
        return mean + est.eta * (loss_fn(s) - mean) + est.cost.var.sqrt() * r

    c_z, c_tilde = control(relaxed[0]), control(relaxed[1])
    (path,) = torch.autograd.grad((c_z - c_tilde).sum(), theta, create_graph=True)
    coef = (cost - c_tilde).reshape(-1, *[1] * (logits.dim() - 1))
    g = coef * D.score(dist, logits, sample) + path
    return g.detach(), torch.autograd.grad(g.pow(2).sum() / batch, est.theta)[0]


@pytest.mark.parametrize("dist", ["categorical", "bernoulli"])
@pytest.mark.parametrize("variables", [1, 2])  # one variable per example takes shortcuts
def test_relax_hand_written_derivatives_match_autograd(dist, variables):
    torch.manual_seed(12)
    shape = (3, variables, 4) if dist == "categorical" else (3, 2 * variables + 1 if variables > 1 else 1)
    est = build_estimator(
        "relax", dist, num_classes=4 if dist == "categorical" else None, context_dim=2, hidden=5
    ).double()
    with torch.no_grad():
        for param in est.parameters():  # every path non-zero
            param.copy_(torch.randn_like(param) * 0.5)
        est.cost.mean.fill_(0.3), est.cost.var.fill_(0.5), est.cost.seen.fill_(True)
    logits = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    context, t = torch.randn(3, 2, dtype=torch.float64), torch.rand(shape[1:], dtype=torch.float64)
    loss_fn = lambda c: ((t - c) ** 3).abs().reshape(c.shape[0], -1).sum(1)  # noqa: E731 (Hessian != 0)
    with torch.random.fork_rng():
        from perception.estimators import distributions as D

        u, v = D.uniform(logits), D.uniform(logits)
    g, expected = autograd_reference(est, logits, loss_fn, u, v, context)
    est(logits, loss_fn, context=context).surrogate.mean().backward()
    torch.testing.assert_close(logits.grad * len(logits), g)
    for piece, grad, want in zip(["log lambda", "eta", "w_in", "b_in", "w_ctx", "w_out", "b_out"],
                                 est.theta.grad.split(est.sizes), expected.split(est.sizes)):
        torch.testing.assert_close(grad, want, msg=piece)


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_a_loss_that_ignores_the_sample_gives_zero_relaxed_derivatives(name):
    """df/ds comes straight from autograd's engine: where loss_fn does not read the sample it is
    zero (as with torch.autograd.grad's materialize_grads), not an error, and the loss's own
    parameters get their pathwise gradient."""
    w = torch.tensor(0.7, requires_grad=True)
    logits = torch.zeros(4, 3, requires_grad=True)
    est = build(name, "categorical")
    est(logits, lambda c: w.expand(len(c)) * 2.0).surrogate.mean().backward()
    torch.testing.assert_close(w.grad, torch.tensor(2.0))
    assert torch.isfinite(logits.grad).all() and torch.isfinite(est.theta.grad).all()


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_a_double_backward_through_the_surrogate_works(name):
    """REBAR/RELAX compute their estimate in inference mode; what they inject must still be an
    ordinary tensor, so a backward with create_graph through a weighted surrogate can save it."""
    logits, t = toy("categorical")
    logits = logits.clone().requires_grad_()
    weight = torch.tensor(2.0, requires_grad=True)
    est = build(name, "categorical")
    (g,) = torch.autograd.grad((est(logits, loss_of(t, 1.0)).surrogate * weight).mean(), logits, create_graph=True)
    (dweight,) = torch.autograd.grad(g.sum(), weight)
    assert torch.isfinite(dweight)


def test_relax_first_training_call_is_centred_and_unbiased():
    """The running cost statistics start from an independent extra draw, so even the very first
    estimate is centred (low variance under a loss offset) and stays unbiased."""
    torch.manual_seed(13)
    logits, t = toy("categorical")
    est = build("relax", "categorical")
    offset = loss_of(t - 10.0, 1.0)  # losses around 300: uncentred REINFORCE would be far noisier
    rows = logits.expand(20000, *logits.shape).clone().requires_grad_()
    (g,) = torch.autograd.grad(est(rows, offset).surrogate.sum(), rows)
    p = torch.softmax(logits, -1)
    states = torch.eye(3)
    f = ((t[:, None, :] - 10.0 - states) ** 2).sum(-1)
    exact = p * (f - (p * f).sum(-1, keepdim=True))
    assert_matches(g.reshape(len(g), -1), exact.flatten(), "relax first call")
    assert g.var(0).sum() < 0.01 * (f**2).sum()  # vs. ~E[f^2 |score|^2] uncentred


def test_pretrain_bench_times_a_model_with_each_estimator(tmp_path):
    """`python -m perception.bench pretrain --estimators ...`: one row per estimator, CPU time
    relative to the first; an unknown estimator name fails before anything is timed."""
    import json

    from perception.bench.pretrain import main
    from perception.errors import UnknownNameError

    assert main(["--models", "dvae", "--estimators", "reinforce,relax", "--repeats", "1", "--batch-size", "4",
                 "--threads", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "pretrain.json").read_text())["results"]
    assert [r["estimator"] for r in rows] == ["reinforce", "relax"]
    assert rows[0]["cpu_vs_first"] == 1.0 and rows[1]["step_cpu_ms_median"] > 0
    with pytest.raises(UnknownNameError, match="relax"):
        main(["--models", "dvae", "--estimators", "relaxx", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
