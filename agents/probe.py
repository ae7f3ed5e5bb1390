"""``python -m agents.probe``: what an agent can read from an encoder's slots, without PPO.

Every number goes through the converter of the :class:`envs.ObjectSlots` wrapper that
``agents.environment.make_env`` builds, the agents' own (``--encoders`` as in
``agents.train --encoder``: ``air``, ``lavae@4``, ``lavae@4+air``):

* ``collect``: frames of random-policy Collect episodes; how often a present slot lies within
  ``AGENT_PX`` of the agent sprite's centre (can the agent see itself?), split by the number of
  digits left, how many digits have a present slot within ``DIGIT_PX`` of their centre, and
  whether a digit is a target (even: the class information Collect needs), read from its
  nearest slot's row by logistic regression and 5-NN (fit on the first 2/3 of the frames, scored
  on the later episodes' frames); ``return_ceiling_of_best``: on those later frames, the expected
  return left to a perfect navigator that takes, in random order, every digit the logistic probe
  calls a target (the episode ends with the last target), as a fraction of the best (taking exactly
  the targets) — roughly what the slots' class information allows a policy.
* ``oddoneout``: OddOneOut scenes; each digit is matched to the nearest present slot (within
  ``DIGIT_PX``) and the slot rows (features + position) are probed on held-out scenes: 10-way
  class (logistic regression, 5-NN), same/different class of a pair (logistic regression on
  ``|a - b|`` and ``a * b``), and the odd one out read from those pair probabilities (the digit
  outside the most-alike pair). A class probe uses labels the agent never gets: it measures what
  the slots hold, an upper bound, not what PPO learns.

Writes ``OUT/probe.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from agents.environment import ObservationSource, make_env
from envs.encoders import REPRESENTATIONS, nearest_present
from envs.scene import CANVAS
from perception.contract import unit_to_pixels
from perception.errors import PerceptionError
from perception.metrics import PRESENCE_THRESHOLD
from perception.train.loop import json_safe

AGENT_PX = 4.0
DIGIT_PX = 6.0
PAIRS = ((0, 1), (0, 2), (1, 2))
MIN_SCENES = 30  # matched scenes needed to fit the probes
PROBE_ENVS = {"collect": "MultiMNIST-Collect-v0", "oddoneout": "MultiMNIST-OddOneOut-v0"}


def _encode(converter: Any, frames: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    parts = [converter(frames[i : i + batch]) for i in range(0, len(frames), batch)]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _slot_pixels(obs: dict[str, np.ndarray]) -> np.ndarray:
    """Slot positions (the rows' last two columns) in pixel units."""
    return unit_to_pixels(obs["slots"][..., -2:], CANVAS)


def _collect_frames(episodes: int) -> tuple[np.ndarray, list[dict[str, Any]], np.ndarray]:
    """Frames and infos of random-policy episodes, in episode order, and the env's target classes."""
    import gymnasium as gym

    env = gym.make("MultiMNIST-Collect-v0", disable_env_checker=True)
    rng = np.random.default_rng(0)
    frames, infos = [], []
    for episode in range(episodes):
        obs, info = env.reset(seed=episode)
        done = False
        while not done:
            frames.append(obs)
            infos.append(info)
            obs, _, terminated, truncated, info = env.step(int(rng.integers(4)))
            done = terminated or truncated
    return np.stack(frames), infos, env.unwrapped.targets


def _fit(model: Any, x: np.ndarray, y: np.ndarray, train: np.ndarray) -> Any:
    """``model`` (after a StandardScaler) fit on the rows ``x[train]``, flattened to one sample per feature row."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), model).fit(x[train].reshape(-1, x.shape[-1]), y[train].reshape(-1))


def _score(model: Any, x: np.ndarray, y: np.ndarray, train: np.ndarray) -> float:
    return float(model.score(x[~train].reshape(-1, x.shape[-1]), y[~train].reshape(-1)))


def probe_collect(
    converter: Any, frames: np.ndarray, infos: list[dict[str, Any]], targets: np.ndarray
) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    obs = _encode(converter, frames)
    on = obs["mask"] > PRESENCE_THRESHOLD
    xy = _slot_pixels(obs)
    left = np.array([int(i["present"].sum()) for i in infos])
    agent = np.array([i["agent_position"] for i in infos])
    seen = nearest_present(agent[:, None].astype(np.float64), xy, obs["mask"])[1][:, 0] < AGENT_PX
    present = np.array([i["present"] for i in infos])
    nearest, dist = nearest_present(np.array([i["positions"] for i in infos], np.float64), xy, obs["mask"])
    found = present & (dist < DIGIT_PX)  # [frames, digits]
    is_target = present & np.isin(np.array([i["labels"] for i in infos]), targets)
    held = np.arange(len(frames)) >= 2 * len(frames) // 3  # the later episodes' frames (episodes in order)
    # is a digit a target? read from its slot row; the first 2/3 of the frames fit
    rows = np.take_along_axis(obs["slots"], nearest[..., None], 1)[found]
    target = is_target[found]
    train = ~held[np.nonzero(found)[0]]
    result = {
        "frames": len(frames),
        "agent_has_slot": float(seen.mean()),
        "agent_has_slot_by_digits_left": {int(k): float(seen[left == k].mean()) for k in np.unique(left)},
        "digits_with_slot": float(found.sum() / present.sum()),
        "present_slots_mean": float(on.sum(1).mean()),
    }
    if train.sum() < MIN_SCENES or (~train).sum() < MIN_SCENES or len(np.unique(target[train])) < 2:
        return result
    linear = _fit(LogisticRegression(max_iter=2000), rows, target, train)
    knn = _fit(KNeighborsClassifier(5), rows, target, train)
    # a perfect navigator that takes, in random order, every digit the probe calls a target (a digit
    # without a slot is never taken); once every target left is taken the episode ends, so of its n
    # non-targets only those before the last of its t targets count: n * t / (t + 1) on average
    taken = np.zeros_like(found)
    taken[found] = linear.predict(rows)
    t, n = (taken & is_target).sum(1), (taken & ~is_target).sum(1)
    ends = ~(is_target & ~taken).any(1)
    gain = t - np.where(ends, n * t / (t + 1), n)
    return {
        **result,
        "target_probe_logistic": _score(linear, rows, target, train),
        "target_probe_5nn": _score(knn, rows, target, train),
        "target_base_rate": float(max(target[~train].mean(), 1 - target[~train].mean())),
        "return_ceiling_of_best": float(gain[held].sum() / is_target[held].sum()),
    }


def _oddoneout_rows(converter: Any, scenes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matched slot rows ``[S, 3, D]`` and labels ``[S, 3]`` of the scenes where every digit got
    its own present slot, and the fraction of such scenes."""
    import gymnasium as gym

    env = gym.make("MultiMNIST-OddOneOut-v0", disable_env_checker=True)
    frames, centres, labels = [], [], []
    for n in range(scenes):
        obs, info = env.reset(seed=100_000 + n)
        frames.append(obs)
        centres.append(info["positions"])
        labels.append(info["labels"])
    obs = _encode(converter, np.stack(frames))
    xy = _slot_pixels(obs)
    nearest, dist = nearest_present(np.array(centres), xy, obs["mask"])  # [S, 3 digits]
    ok = (dist < DIGIT_PX).all(1)
    ok &= np.array([len(set(row)) == 3 for row in nearest])
    rows = np.take_along_axis(obs["slots"], nearest[..., None], 1)
    return rows[ok], np.array(labels)[ok], ok


def _pair_features(rows: np.ndarray) -> np.ndarray:
    """``[S, 3 pairs, 2D]``: ``|a - b|`` and ``a * b`` of each pair of the scene's digits."""
    a, b = rows[:, [p[0] for p in PAIRS]], rows[:, [p[1] for p in PAIRS]]
    return np.concatenate([np.abs(a - b), a * b], -1)


def probe_oddoneout(converter: Any, scenes: int) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    rows, labels, ok = _oddoneout_rows(converter, scenes)
    if len(rows) < MIN_SCENES:  # e.g. a one-slot encoder: no digit pairs to probe
        return {"scenes": scenes, "scenes_matched": float(ok.mean())}
    train = np.arange(len(rows)) < 2 * len(rows) // 3  # the rest is held out
    d = rows.shape[-1]
    linear = _fit(LogisticRegression(max_iter=2000), rows, labels, train)
    knn = _fit(KNeighborsClassifier(5), rows, labels, train)
    pairs = _pair_features(rows)
    same = np.stack([labels[:, i] == labels[:, j] for i, j in PAIRS], 1)
    pair_model = _fit(LogisticRegression(max_iter=3000), pairs, same, train)
    p_same = pair_model.predict_proba(pairs[~train].reshape(-1, 2 * d))[:, 1].reshape(-1, len(PAIRS))
    outside = np.array([2, 1, 0])[p_same.argmax(1)]  # the digit not in the most-alike pair
    odd = np.array([[k for k in range(3) if (row == row[k]).sum() == 1][0] for row in labels[~train]])
    return {
        "scenes": scenes,
        "scenes_matched": float(ok.mean()),
        "class_probe_logistic": _score(linear, rows, labels, train),
        "class_probe_5nn": _score(knn, rows, labels, train),
        "pair_same_class_logistic": _score(pair_model, pairs, same, train),
        "pair_same_class_base_rate": float(max(same[~train].mean(), 1 - same[~train].mean())),
        "odd_one_out_from_pairs": float((outside == odd).mean()),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m agents.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", default="air,lavae@4", help="comma-separated, as agents.train --encoder")
    parser.add_argument("--probes", default="collect,oddoneout")
    parser.add_argument("--representation", default="slots", choices=REPRESENTATIONS)
    parser.add_argument("--episodes", type=int, default=100, help="collect: random-policy episodes")
    parser.add_argument("--scenes", type=int, default=3000, help="oddoneout: scenes (2/3 fit, 1/3 held out)")
    parser.add_argument("--out", default="bench_results/agents/probe")
    args = parser.parse_args(argv)
    args.encoders = [e for e in args.encoders.split(",") if e]
    args.probes = [p for p in args.probes.split(",") if p]
    args.command = "python -m agents.probe " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(1)  # the machine is shared
    args = parse_args(argv)
    results: dict[str, Any] = {"command": args.command}
    unknown = set(args.probes) - set(PROBE_ENVS)
    if unknown:
        print(f"error: unknown probe(s) {sorted(unknown)}; valid: {', '.join(PROBE_ENVS)}", file=sys.stderr)
        return 2
    collect = _collect_frames(args.episodes) if "collect" in args.probes else None
    for encoder in args.encoders:
        try:  # one converter serves every probe: the probe envs share one image space
            source = ObservationSource(PROBE_ENVS[args.probes[0]], encoder, representation=args.representation)
            env = make_env(source)
            converter = env.converter
            env.close()  # the converter holds the encoder; the env is only its image space
        except PerceptionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for name in args.probes:
            row = probe_collect(converter, *collect) if name == "collect" else probe_oddoneout(converter, args.scenes)
            results.setdefault(name, {})[encoder] = row
            print(name, encoder, json.dumps(json_safe(row)), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(json_safe(results), indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
