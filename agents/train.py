"""``python -m agents.train``: PPO (RLlib new API stack) on a Multi-MNIST task from pixels,
the oracle state, or a frozen encoder's slots.

The run directory holds ``checkpoint/`` (``Algorithm.save_to_path``, rewritten every
``--checkpoint-every`` iterations and at the end), ``history.jsonl`` (one line per training
iteration: env steps, RLlib's ``episode_return_mean``, episodes, wall time),
``run.json`` (the configuration) and ``tb/`` (TensorBoard scalars). ``--resume`` restores the
checkpoint and continues until ``--timesteps`` env steps in total.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.environment import RLLIB_ENV_NAME, ObservationSource, rllib_env_creator
from envs.encoders import BACKENDS, REPRESENTATIONS
from perception.errors import OutputExistsError, PerceptionError


@dataclass
class PPOSettings:
    num_envs: int = 16  # sub-envs of the (single, local) env runner, encoded in one batch
    train_batch: int = 1024
    minibatch: int = 256
    epochs: int = 4
    lr: float = 5e-4
    gamma: float = 0.95
    entropy_coeff: float = 0.01
    hidden: int = 64
    num_env_runners: int = 0  # 0: sample in the driver process (best on a 2-core machine)


@dataclass
class RunConfig:
    source: ObservationSource
    timesteps: int
    seed: int = 0
    ppo: PPOSettings = field(default_factory=PPOSettings)
    checkpoint_every: int = 10  # iterations


def build_algorithm(run: RunConfig):
    """The PPO algorithm for ``run`` (Ray must be initialised)."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.tune.registry import register_env

    from agents.modules import PixelCNNModule, SlotSetModule

    register_env(RLLIB_ENV_NAME, rllib_env_creator)
    p = run.ppo
    module = PixelCNNModule if run.source.encoder == "pixels" else SlotSetModule
    config = (
        PPOConfig()
        .api_stack(enable_rl_module_and_learner=True, enable_env_runner_and_connector_v2=True)
        .environment(env=RLLIB_ENV_NAME, env_config=run.source.as_config())
        .env_runners(
            num_env_runners=p.num_env_runners,
            num_envs_per_env_runner=p.num_envs,
            gym_env_vectorize_mode="vector_entry_point",
            rollout_fragment_length="auto",
        )
        .learners(num_learners=0)
        .training(
            train_batch_size_per_learner=p.train_batch,
            minibatch_size=p.minibatch,
            num_epochs=p.epochs,
            lr=p.lr,
            gamma=p.gamma,
            lambda_=0.95,
            entropy_coeff=p.entropy_coeff,
        )
        .rl_module(rl_module_spec=RLModuleSpec(module_class=module, model_config={"hidden": p.hidden}))
        .debugging(seed=run.seed, log_level="ERROR")
    )
    return config.build_algo()


def summarize(result: dict[str, Any]) -> dict[str, float]:
    runners = result.get("env_runners", {})
    return {
        "env_steps": float(
            result.get("num_env_steps_sampled_lifetime", runners.get("num_env_steps_sampled_lifetime", 0))
        ),
        "episode_return_mean": float(runners.get("episode_return_mean", math.nan)),
        "episodes": float(runners.get("num_episodes_lifetime", 0)),
    }


def train(run: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> list[dict[str, float]]:
    """Train until ``run.timesteps`` env steps; returns the per-iteration history."""
    import ray
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    out = Path(out_dir)
    ckpt = out / "checkpoint"
    history_path = out / "history.jsonl"
    if ckpt.exists() and not resume:
        raise OutputExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if resume and not ckpt.exists():
        raise PerceptionError(f"--resume: no checkpoint in {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(dataclasses.asdict(run), indent=2))
    history = [json.loads(line) for line in history_path.read_text().splitlines()] if resume else []
    if not resume:
        history_path.write_text("")

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    algo = build_algorithm(run)
    if resume:
        algo.restore_from_path(str(ckpt.resolve()))
    writer = SummaryWriter(str(out / "tb"))
    steps = int(history[-1]["env_steps"]) if history else 0
    wall0 = time.perf_counter() - (history[-1]["wall_s"] if history else 0.0)
    bar = tqdm(total=run.timesteps, initial=min(steps, run.timesteps), disable=not progress, unit="step")
    try:
        iteration = len(history)
        while steps < run.timesteps:
            result = algo.train()
            row = summarize(result)
            if row["env_steps"] <= steps:  # a lifetime counter that restarted after a restore
                sampled = result.get("env_runners", {}).get("num_env_steps_sampled", 0)
                if not sampled:
                    raise RuntimeError("a PPO iteration sampled no env steps")
                row["env_steps"] = float(steps + sampled)
            row["wall_s"] = time.perf_counter() - wall0
            iteration += 1
            bar.update(int(row["env_steps"]) - steps)
            steps = int(row["env_steps"])
            bar.set_postfix(ret=f"{row['episode_return_mean']:.3f}")
            history.append(row)
            with history_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            for key in ("episode_return_mean", "episodes"):
                if math.isfinite(row[key]):
                    writer.add_scalar(f"agent/{key}", row[key], steps)
            if iteration % run.checkpoint_every == 0:
                algo.save_to_path(str(ckpt.resolve()))
        algo.save_to_path(str(ckpt.resolve()))
    finally:
        bar.close()
        writer.close()
        algo.stop()
    return history


def parse_args(argv: list[str] | None) -> tuple[RunConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m agents.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="MultiMNIST-Collect-v0")
    parser.add_argument(
        "--encoder",
        default="oracle",
        help="pixels | oracle | bundled encoder name | checkpoint | .onnx file; NAME@K sets the encoder's number "
        "of slots where the model can change it; encoders joined by + are fused by position (the first one's "
        "slots are the objects)",
    )
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS])
    parser.add_argument("--representation", default="slots", choices=REPRESENTATIONS)
    parser.add_argument("--digit-split", default="train", choices=["train", "test"])
    parser.add_argument(
        "--data-dir", default=None, help="MNIST IDX directory (else $PERCEPTION_DATA_DIR, else embedded digits)"
    )
    parser.add_argument("--timesteps", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-envs", type=int, default=PPOSettings.num_envs)
    parser.add_argument("--train-batch", type=int, default=PPOSettings.train_batch)
    parser.add_argument("--lr", type=float, default=PPOSettings.lr)
    parser.add_argument("--out", default=None, help="run directory (default runs/agents/ENV-ENCODER-sSEED)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the learner and torch encoders")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    env_kwargs: dict[str, Any] = {"digit_split": args.digit_split}
    if args.data_dir:
        env_kwargs["data_dir"] = args.data_dir
    source = ObservationSource(args.env, args.encoder, args.backend, args.representation, env_kwargs)
    ppo = PPOSettings(num_envs=args.num_envs, train_batch=args.train_batch, lr=args.lr)
    if args.out is None:
        args.out = f"runs/agents/{args.env}-{source.tag}-s{args.seed}"
    return RunConfig(source, args.timesteps, args.seed, ppo), args


def main(argv: list[str] | None = None) -> int:
    import torch

    try:
        run, args = parse_args(argv)
        torch.set_num_threads(args.threads)
        history = train(run, args.out, resume=args.resume, progress=not args.no_progress)
    except PerceptionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    last = history[-1] if history else {}
    print(json.dumps({"out": args.out, **last}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
