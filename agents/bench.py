"""``python -m agents.bench``: compare observation sources for PPO, and measure ObjectSlots throughput.

Learning (default): for every env x encoder x seed, ``agents.train`` runs for ``--timesteps``
env steps into ``OUT/runs/ENV-ENCODER-sSEED`` (an existing run is resumed, so an interrupted
benchmark continues). The final return of a run is the mean, over its last ``FINAL_WINDOW``
training iterations, of RLlib's ``episode_return_mean`` (episodes sampled with the stochastic
policy while training; one-step tasks finish ~1,000 episodes per iteration, Collect ~20). Each
finished run is also evaluated greedily on ``--eval-episodes`` fresh episodes
(:func:`agents.evaluate.greedy_return`; 0 skips it; remembered in the run directory for the
checkpoint it scored, so re-invoking the bench does not replay it). Writes ``OUT/learning.json`` (per run: final
and greedy return, curve, wall time; per env and encoder: means over seeds and their ratios to the
oracle's) and one ``OUT/curves-ENV.png`` per env. Encoders are given as
in ``agents.train --encoder`` (``lavae@4``, ``lavae@4+air``).

``--throughput``: env steps per second through :class:`envs.VectorObjectSlots` with the ONNX
backend (a ``.pt`` checkpoint is exported to ``OUT/onnx/`` first) on ``--threads`` onnxruntime
threads, and the wrapper's overhead: each wrapped vector step is split into the sub-environments'
step, onnxruntime's inference and the rest (the wrapper), timed inside the same calls in wall and
CPU time (see :func:`step_decomposition`); ``wrapper_overhead`` = wrapper / encoder, medians over
``--steps`` steps. Writes ``OUT/throughput.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from perception.train.loop import json_safe

from agents.environment import ObservationSource, encoder_tag
from agents.evaluate import EVAL_SEED, greedy_return, read_source
from envs.encoders import BACKENDS, REPRESENTATIONS
from agents.train import PPOSettings, RunConfig, train
from perception.errors import PerceptionError

SHORT_NAMES = {name: f"MultiMNIST-{name}-v0" for name in ("Count", "Collect", "OddOneOut")}
FINAL_WINDOW = 4  # training iterations averaged for the final return


def _env_id(name: str) -> str:
    return SHORT_NAMES.get(name, name)


def run_one(args: argparse.Namespace, out: Path, env: str, encoder: str, seed: int) -> dict[str, Any]:
    """Train (or resume) one run; a failed run is a result too: recorded with its error."""
    source = ObservationSource(_env_id(env), encoder, args.backend, args.representation, args.env_kwargs)
    run_dir = out / "runs" / f"{env}-{source.tag}-s{seed}"
    run = RunConfig(source, args.timesteps, seed, PPOSettings(num_envs=args.num_envs))
    record: dict[str, Any] = {"env": env, "encoder": encoder, "seed": seed, "dir": str(run_dir)}
    try:
        history = train(run, run_dir, resume=(run_dir / "checkpoint").exists(), progress=not args.no_progress)
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        print(f"{env} {encoder} seed {seed}: FAILED {record['error']}", file=sys.stderr)
        return record
    finals = [h["episode_return_mean"] for h in history[-FINAL_WINDOW:]]
    if args.eval_episodes:
        try:
            record["greedy_return"] = cached_greedy_return(run_dir, args.eval_episodes, history[-1]["env_steps"])
        except Exception as exc:  # the training result stands; the evaluation's failure is recorded
            record["eval_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"{env} {encoder} seed {seed}: greedy evaluation FAILED {record['eval_error']}", file=sys.stderr)
    record.update(
        final_return=float(np.mean(finals)),
        env_steps=history[-1]["env_steps"],
        wall_s=history[-1]["wall_s"],
        curve=[[h["env_steps"], h["episode_return_mean"]] for h in history],
    )
    greedy = f", greedy {record['greedy_return']:.3f}" if "greedy_return" in record else ""
    print(f"{env} {encoder} seed {seed}: final return {record['final_return']:.3f}{greedy} "
          f"({record['env_steps']:.0f} steps, {record['wall_s']:.0f} s)", flush=True)  # fmt: skip
    return record


def cached_greedy_return(run_dir: Path, episodes: int, env_steps: float) -> float:
    """:func:`greedy_return`, remembered in ``run_dir/greedy.json`` for what it scored: episodes,
    first seed, the run's observation source (``run.json``) and its checkpoint (env steps and the
    checkpoint directory's modification time, so a retrained run is scored again). Re-invoking the
    bench over finished runs then does not replay their episodes (deterministic, ~15 s to a few
    minutes per run). An unreadable cache file is a miss; failing to write one only warns."""
    path = run_dir / "greedy.json"
    key = {
        "episodes": episodes,
        "seed": EVAL_SEED,
        "env_steps": env_steps,
        "source": dataclasses.asdict(read_source(run_dir)),
        "checkpoint_mtime_ns": (run_dir / "checkpoint").stat().st_mtime_ns,
    }
    try:
        saved = json.loads(path.read_text())
        if {k: saved[k] for k in key} == key:
            return float(saved["greedy_return"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = greedy_return(run_dir, episodes)
    try:
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps({**key, "greedy_return": value}))
        partial.replace(path)
    except OSError as exc:
        print(f"warning: could not cache the greedy return in {path}: {exc}", file=sys.stderr)
    return value


def run_learning(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import ray

    for env, encoder in itertools.product(args.envs, args.encoders):  # a bad env, backend or spec syntax fails before any run trains
        ObservationSource(_env_id(env), encoder, args.backend, args.representation, args.env_kwargs)
    own_session = not ray.is_initialized()  # a caller's (e.g. a test's) Ray session is used as it is
    if own_session:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    grid = itertools.product(args.envs, args.encoders, range(args.seeds))
    try:
        runs = [run_one(args, out, env, encoder, seed) for env, encoder, seed in grid]
    finally:
        if own_session:
            ray.shutdown()
    summary = summarize_runs(runs)
    result = {
        "command": args.command, "timesteps": args.timesteps, "seeds": args.seeds,
        "representation": args.representation, "summary": summary, "runs": runs,
    }  # fmt: skip
    (out / "learning.json").write_text(json.dumps(json_safe(result), indent=2, allow_nan=False))
    plot_curves(runs, out)
    return result


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for env in dict.fromkeys(r["env"] for r in runs):
        per_encoder = {}
        for encoder in dict.fromkeys(r["encoder"] for r in runs if r["env"] == env):
            mine = [r for r in runs if r["env"] == env and r["encoder"] == encoder]
            finals = [r["final_return"] for r in mine if "final_return" in r]
            greedy = [r["greedy_return"] for r in mine if "greedy_return" in r]
            per_encoder[encoder] = {
                "final_return_mean": float(np.mean(finals)) if finals else math.nan,
                "final_return_per_seed": finals,
                "greedy_return_mean": float(np.mean(greedy)) if greedy else math.nan,
                "greedy_return_per_seed": greedy,
                "failed_runs": sum(1 for r in mine if "error" in r),
                "failed_evaluations": sum(1 for r in mine if "eval_error" in r),
            }
        ratios = (("final_return_mean", "fraction_of_oracle"), ("greedy_return_mean", "greedy_fraction_of_oracle"))
        for key, ratio in ratios:
            oracle = per_encoder.get("oracle", {}).get(key, math.nan)
            usable = oracle and math.isfinite(oracle)
            for stats in per_encoder.values():
                stats[ratio] = stats[key] / oracle if usable else math.nan
        summary[env] = per_encoder
    return summary


def plot_curves(runs: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for env in dict.fromkeys(r["env"] for r in runs):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, encoder in enumerate(dict.fromkeys(r["encoder"] for r in runs if r["env"] == env)):
            for j, r in enumerate(r for r in runs if r["env"] == env and r["encoder"] == encoder and "curve" in r):
                curve = np.array(r["curve"], dtype=float)
                label = encoder_tag(encoder) if j == 0 else None
                ax.plot(curve[:, 0], curve[:, 1], color=f"C{i}", alpha=0.8, label=label)
        ax.set(xlabel="env steps", ylabel="mean episode return per iteration", title=env)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"curves-{env}.png", dpi=100)
        plt.close(fig)


def _onnx_file(encoder: str, out: Path) -> str:
    if encoder.endswith(".onnx") or not (encoder.endswith(".pt") or Path(encoder).is_dir()):
        return encoder  # an ONNX file or a bundled name
    from export import export_onnx

    target = out / "onnx" / f"{encoder_tag(encoder)}.onnx"
    export_onnx(encoder, target, overwrite=True)
    return str(target)


def run_throughput(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import envs
    from envs.encoders import OnnxBackend

    rows = []
    for encoder in args.encoders:
        if encoder in ("pixels", "oracle"):
            continue
        backend = OnnxBackend(_onnx_file(encoder, out), device="cpu", threads=args.threads)
        for env in args.envs:
            for num_envs in args.batch_sizes:
                wrapped = envs.make_vector_env(
                    _env_id(env), num_envs, encoder=backend, backend="onnx", **args.env_kwargs
                )
                t = step_decomposition(wrapped, args.steps)
                wrapped.close()
                row = {
                    "env": env, "encoder": encoder, "num_envs": num_envs, "threads": args.threads,
                    "steps": args.steps,
                    "env_steps_per_s": num_envs / t["wall"]["step"],
                    "env_steps_per_cpu_s": num_envs / t["cpu"]["step"],
                    **{f"{clock}_{part}_ms": 1e3 * v for clock in ("wall", "cpu") for part, v in t[clock].items()},
                    "wrapper_overhead_cpu": t["cpu"]["wrapper"] / t["cpu"]["encoder"],
                    "wrapper_overhead_wall": t["wall"]["wrapper"] / t["wall"]["encoder"],
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"command": args.command, "load_average_1_5_15_min_at_end": list(os.getloadavg()), "rows": rows}
    (out / "throughput.json").write_text(json.dumps(json_safe(result), indent=2, allow_nan=False))
    return result


class _Clock:
    """A callable that adds the wall and CPU (process) seconds spent inside ``fn`` to its totals."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.wall = self.cpu = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.wall += time.perf_counter() - wall
            self.cpu += time.process_time() - cpu


def step_decomposition(wrapped: Any, steps: int, warmup: int = 10) -> dict[str, dict[str, float]]:
    """Median per vector step, in wall and in CPU seconds, of the wrapped step (``step``), the
    sub-environments inside it (``env``), onnxruntime's inference inside it (``encoder``) and
    the rest (``wrapper``: everything the wrapper adds, input checks and conversion included).

    The parts are timed inside the same step calls (the inner env's ``step`` and the
    onnxruntime session's ``run`` are wrapped in clocks), so load from other processes cannot
    move work from one part to another; CPU time (``time.process_time``, all threads of this
    process) is what load hardly changes, wall time what an agent waits for."""
    env_clock = wrapped.env.step = _Clock(wrapped.env.step)
    session = wrapped.converter.encoder.session.session
    encoder_clock = session.run = _Clock(session.run)
    step_clock = _Clock(wrapped.step)
    clocks = (step_clock, env_clock, encoder_clock)
    wrapped.reset(seed=0)
    wrapped.action_space.seed(0)
    totals = [[(c.wall, c.cpu) for c in clocks]]  # running totals after reset, then after each step
    for _ in range(warmup + steps):
        step_clock(wrapped.action_space.sample())
        totals.append([(c.wall, c.cpu) for c in clocks])
    del wrapped.env.step, session.run
    per_step = np.diff(np.array(totals), axis=0)[warmup:]  # [steps, clock, (wall, cpu)]
    step, env, encoder = per_step[:, 0], per_step[:, 1], per_step[:, 2]
    parts = {"env": env, "encoder": encoder, "step": step, "wrapper": step - env - encoder}
    return {
        clock: {part: float(np.median(v[:, j])) for part, v in parts.items()} for j, clock in enumerate(("wall", "cpu"))
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m agents.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", default="Count,Collect", help="comma-separated: Count, Collect, OddOneOut or env ids")
    parser.add_argument("--encoders", default="pixels,vae,oracle", help="comma-separated: pixels, oracle, names, paths")
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS])
    parser.add_argument("--representation", default="slots", choices=REPRESENTATIONS, help="for encoders")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--timesteps", type=int, default=20_000)
    parser.add_argument("--eval-episodes", type=int, default=500, help="greedy evaluation episodes per run (0: none)")
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--throughput", action="store_true", help="measure VectorObjectSlots throughput instead")
    parser.add_argument("--batch-sizes", default="16,64", help="--throughput: numbers of sub-envs")
    parser.add_argument("--steps", type=int, default=500, help="--throughput: timed vector steps")
    parser.add_argument("--threads", type=int, default=2, help="--throughput: onnxruntime intra-op threads")
    parser.add_argument("--out", default="bench_results/agents")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.eval_episodes < 0:
        parser.error(f"--eval-episodes must be >= 0, got {args.eval_episodes}")
    args.envs = [e for e in args.envs.split(",") if e]
    args.encoders = [e for e in args.encoders.split(",") if e]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.env_kwargs = {"data_dir": args.data_dir} if args.data_dir else {}
    args.command = "python -m agents.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(1)  # the machine is shared; the learner is small
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.throughput:
            run_throughput(args, out)
        else:
            result = run_learning(args, out)
            print(json.dumps(json_safe(result["summary"]), indent=2))
    except PerceptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
