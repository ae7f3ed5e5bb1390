"""``python -m perception.bench estimators``: the thesis' toy comparison of the estimators.

A categorical ``c`` with logits optimised by Adam (lr 0.01; NVIL's baseline 0.1, its estimator
default) to minimise ``E[mean((t - c)^2)]``, from uniform logits. Problems: three classes with
``t = (0.34, 0.33, 0.33)`` (thesis Table 4.1) and two classes with ``t = (0.499, 0.501)`` (the
REBAR/RELAX papers' replication case). The expected loss is linear in the probabilities, so the
optimum is the best vertex of the simplex (computed, not assumed). Per estimator and seed:

- error: ``|E_p[f] - f*|`` at the end, computed exactly from the final logits;
- gradient variance: variance over ``--var-samples`` independent single-sample estimates of the
  logits' gradient (estimator in eval mode), averaged over logits, at evenly spaced checkpoints;
  since each estimator is measured on its own trajectory (a near-converged categorical has a
  small variance whatever the estimator), also its ratio to plain REINFORCE's exact variance at
  the same logits (geometric mean over checkpoints and seeds);
- step time: zero_grad + estimate + backward + Adam step (fused: one kernel for all parameters,
  the cheapest CPU Adam for every estimator; one group per learning rate), one thread, as wall
  time and as this process's CPU time (steadier on a shared machine).

Writes ``estimators.json`` and ``estimators.png`` (error and log-variance curves) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from perception.estimators import build_estimator

PROBLEMS = {"three_class": (0.34, 0.33, 0.33), "two_class": (0.499, 0.501)}
NAMES = ("reinforce", "nvil", "concrete", "rebar", "relax", "exact")
LR = 0.01


def vertex_losses(target: torch.Tensor) -> torch.Tensor:
    """``f(e_k)`` for every class k: the loss of each one-hot outcome."""
    return ((target - torch.eye(len(target))) ** 2).mean(-1)


def reinforce_variance(logits: torch.Tensor, vertex: torch.Tensor) -> float:
    """Exact variance of plain REINFORCE's single-sample logit gradient ``f(b) (b - p)`` at these
    logits, mean over logits: the reference that makes variances along different trajectories
    comparable."""
    p = torch.softmax(logits.detach()[0], -1)
    g = vertex[:, None] * (torch.eye(len(p)) - p)  # row k: the estimate when b = e_k
    mean = p @ g
    return (p @ (g - mean) ** 2).mean().item()


def gradient_variance(est, logits: torch.Tensor, loss_fn, samples: int) -> float:
    est.eval()
    rows = logits.detach().expand(samples, -1).contiguous().requires_grad_()
    (grads,) = torch.autograd.grad(est(rows, loss_fn, broadcasts=True).surrogate.sum(), rows)
    est.train()
    return grads.var(0).mean().item()


def run(name: str, target: tuple[float, ...], seed: int, steps: int, checkpoints: int, samples: int) -> dict:
    torch.manual_seed(seed)
    t = torch.tensor(target)
    vertex = vertex_losses(t)
    est = build_estimator(name, "categorical", num_classes=len(t))
    logits = torch.zeros(1, len(t), requires_grad=True)
    by_lr: dict[float, list[torch.Tensor]] = {}
    for group in [{"params": [logits], "lr": LR}, *est.param_groups(LR)]:
        by_lr.setdefault(group["lr"], []).extend(group["params"])
    opt = torch.optim.Adam([{"params": p, "lr": lr} for lr, p in by_lr.items()], fused=True)

    def loss_fn(c: torch.Tensor) -> torch.Tensor:
        return ((t - c) ** 2).mean(-1)

    def error() -> float:
        return abs((torch.softmax(logits.detach()[0], -1) @ vertex - vertex.min()).item())

    every = max(1, steps // checkpoints)
    at, errors, variances, reference, wall, cpu = [], [], [], [], 0.0, 0.0
    for step in range(1, steps + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        est(logits, loss_fn, broadcasts=True).surrogate.mean().backward()
        opt.step()
        wall += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        if step % every == 0 or step == steps:
            at.append(step)
            errors.append(error())
            variances.append(gradient_variance(est, logits, loss_fn, samples))
            reference.append(reinforce_variance(logits, vertex))
    probs = torch.softmax(logits.detach()[0], -1)
    return {
        "error": errors[-1],
        "p_optimal": probs[int(vertex.argmin())].item(),
        "step_ms": 1000.0 * wall / steps,
        "step_cpu_ms": 1000.0 * cpu / steps,
        "steps": at,
        "errors": errors,
        "variances": variances,
        "reinforce_variances": reference,
    }


def summarise(runs: list[dict]) -> dict:
    errors = np.array([r["error"] for r in runs]) * 1000
    ms = np.array([r["step_ms"] for r in runs])
    cpu_ms = np.array([r["step_cpu_ms"] for r in runs])
    var = np.array([r["variances"] for r in runs])  # [seeds, checkpoints]
    ratio = var / np.array([r["reinforce_variances"] for r in runs])
    with np.errstate(divide="ignore"):
        log_var = np.log10(var)
        log_ratio = np.log10(ratio)
    return {
        "error_x1000_mean": float(errors.mean()),
        "error_x1000_std": float(errors.std()),
        "error_x1000_per_seed": errors.round(4).tolist(),
        "p_optimal_mean": float(np.mean([r["p_optimal"] for r in runs])),
        "grad_var_mean": float(var.mean()),
        "grad_var_last": float(var[:, -1].mean()),
        # geometric mean over checkpoints and seeds of var / REINFORCE's exact var at the same logits
        "var_ratio_to_reinforce": float(10 ** log_ratio.mean()),
        "step_ms_mean": float(ms.mean()),
        "step_ms_std": float(ms.std()),
        "step_cpu_ms_mean": float(cpu_ms.mean()),
        "curve_steps": runs[0]["steps"],
        "curve_error_x1000": (np.array([r["errors"] for r in runs]) * 1000).mean(0).tolist(),
        "curve_log10_var": [float(x) if math.isfinite(x) else None for x in log_var.mean(0)],
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.2 * len(results)), squeeze=False)
    for row, (problem, per_name) in enumerate(results.items()):
        for name, s in per_name.items():
            axes[row, 0].plot(s["curve_steps"], s["curve_error_x1000"], label=name)
            finite = [(x, y) for x, y in zip(s["curve_steps"], s["curve_log10_var"]) if y is not None]
            if finite:
                axes[row, 1].plot(*zip(*finite), label=name)
        axes[row, 0].set(title=f"{problem}: |E[f] - f*| x1000", xlabel="step", yscale="log")
        axes[row, 1].set(title=f"{problem}: log10 gradient variance", xlabel="step")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m perception.bench estimators", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--checkpoints", type=int, default=20, help="variance/error measurements per run")
    parser.add_argument("--var-samples", type=int, default=100, help="single-sample estimates per variance")
    parser.add_argument("--out", type=Path, default=Path("bench_results/estimators"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors; also the fair setting on a shared machine

    # Seeds outermost and estimators innermost, so machine-load drift hits every estimator alike.
    runs: dict[str, dict[str, list[dict]]] = {p: {n: [] for n in NAMES} for p in PROBLEMS}
    for name in NAMES:  # untimed: one-off costs (lazy initialisation) out of the first run
        run(name, PROBLEMS["three_class"], 0, 20, 1, args.var_samples)
    started, load_start = time.perf_counter(), os.getloadavg()
    for seed in range(args.seeds):
        for problem, target in PROBLEMS.items():
            for name in NAMES:
                runs[problem][name].append(run(name, target, seed, args.steps, args.checkpoints, args.var_samples))
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", flush=True)

    results = {p: {n: summarise(r) for n, r in per.items()} for p, per in runs.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python -m perception.bench estimators " + " ".join(argv),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "lr": LR,
        "targets": PROBLEMS,
        "optimal_loss": {p: vertex_losses(torch.tensor(t)).min().item() for p, t in PROBLEMS.items()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": 1,
            "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
        },
        "wall_s": time.perf_counter() - started,
        "results": results,
    }
    (args.out / "estimators.json").write_text(json.dumps(report, indent=1))
    plot(results, args.out / "estimators.png")
    for problem, per_name in results.items():
        print(f"\n{problem}: estimator  error x1000 (mean, std)  p(opt)  grad var (mean, last, / REINFORCE's)  "
              "step ms (wall, cpu)")
        for name, s in per_name.items():
            print(
                f"  {name:10s} {s['error_x1000_mean']:7.3f} ± {s['error_x1000_std']:6.3f}   "
                f"{s['p_optimal_mean']:.3f}   {s['grad_var_mean']:.2e} {s['grad_var_last']:.2e} "
                f"{s['var_ratio_to_reinforce']:.1e}   "
                f"{s['step_ms_mean']:.3f}, {s['step_cpu_ms_mean']:.3f}"
            )
    print(f"\nwrote {args.out / 'estimators.json'} and {args.out / 'estimators.png'}")
    return 0
