"""Greedy evaluation of a trained agent: its most likely action, on episodes it never trained on.

The bench's final return is RLlib's ``episode_return_mean`` of the last training iterations,
i.e. of the *stochastic* training policy (PPO samples its actions; the entropy bonus keeps them
spread). On a one-step task that mixes what the policy knows with how unsure it still is.
:func:`greedy_return` takes, in every state, the action with the highest logit, on episodes seeded
from ``EVAL_SEED`` on (training episodes come from RLlib's own seeding), through the same
observation pipeline the agent trained with (``run.json``): the usual "evaluation return" of RL
papers. Episodes run one at a time (batch 1), which is fast enough for a few hundred.

``python -m agents.evaluate RUN_DIR [RUN_DIR ...] [--episodes N]`` prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from agents.environment import ObservationSource, make_env
from perception.errors import PerceptionError

EVAL_SEED = 1_000_000


def load_module(run_dir: str | Path) -> Any:
    """The trained RLModule of a run directory (``agents.train`` / ``agents.bench``), in eval mode."""
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_LEARNER_GROUP, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
    from ray.rllib.core.rl_module.rl_module import RLModule

    parts = ("checkpoint", COMPONENT_LEARNER_GROUP, COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID)
    path = Path(run_dir).joinpath(*parts)
    if not path.is_dir():
        raise PerceptionError(f"{run_dir}: no trained agent to evaluate (expected {path})")
    try:
        module = RLModule.from_checkpoint(str(path.resolve()))
    except Exception as exc:  # a truncated or foreign checkpoint: one line, not RLlib's traceback
        raise PerceptionError(f"{path}: cannot load the agent ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    module.eval()
    return module


def read_source(run_dir: str | Path) -> ObservationSource:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise PerceptionError(f"{run_dir}: no run.json (not an agents run directory)")
    try:
        return ObservationSource(**json.loads(path.read_text())["source"])
    except (ValueError, KeyError, TypeError) as exc:
        raise PerceptionError(f"{path}: not a run description ({type(exc).__name__}: {exc})") from exc


def _batch(obs: Any) -> Any:
    import torch

    if isinstance(obs, dict):
        return {key: torch.from_numpy(np.asarray(value))[None] for key, value in obs.items()}
    return torch.from_numpy(np.asarray(obs))[None]


def greedy_return(run_dir: str | Path, episodes: int, seed: int = EVAL_SEED) -> float:
    """Mean return of ``episodes`` episodes (seeds ``seed``, ``seed + 1``, ...) acting greedily."""
    import torch
    from ray.rllib.core.columns import Columns

    if episodes < 1:
        raise PerceptionError(f"episodes must be >= 1, got {episodes}")
    source = read_source(run_dir)
    module = load_module(run_dir)
    env = make_env(source)
    returns = []
    try:
        with torch.no_grad():
            for episode in range(episodes):
                obs, _ = env.reset(seed=seed + episode)
                total, done = 0.0, False
                while not done:
                    logits = module.forward_inference({Columns.OBS: _batch(obs)})[Columns.ACTION_DIST_INPUTS]
                    obs, reward, terminated, truncated, _ = env.step(int(logits[0].argmax()))
                    total += float(reward)
                    done = terminated or truncated
                returns.append(total)
    finally:
        env.close()
    return float(np.mean(returns))


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m agents.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the first episode")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error(f"--episodes must be >= 1, got {args.episodes}")
    torch.set_num_threads(1)
    failed = 0
    for run_dir in args.run_dirs:  # a bad directory is reported and skipped; the others still run
        try:
            value = greedy_return(run_dir, args.episodes, args.seed)
        except PerceptionError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            failed += 1
            continue
        print(json.dumps({"run": str(run_dir), "episodes": args.episodes, "greedy_return": value}), flush=True)
    return 2 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
