"""The clustering benchmark's restarts: selection by the prior gap; resuming, re-scoring and
refusing run directories."""

from __future__ import annotations

import json

import pytest

from perception.bench import clustering
from perception.errors import CheckpointError, InputError, OutputExistsError

ARGS = ["--dataset", "mnist", "--model", "dvae", "--batch-size", "16", "--seeds", "1",
        "--model-option", "channels=4", "--model-option", "hidden=8"]


def run(out, steps, *extra):
    assert clustering.main([*ARGS, "--steps", str(steps), "--out", str(out), *extra]) == 0
    return json.loads((out / "mnist-dvae-default.json").read_text())["by_clusters"]["10"]


def test_restarts_keep_the_run_closest_to_the_uniform_prior(tmp_path):
    report = run(tmp_path, 3, "--restarts", "2")
    chosen = report["seeds"][0]
    gaps = {r["seed"]: r["prior_gap"] for r in chosen["restarts"]}
    assert sorted(gaps) == [0, 1] and all(g >= 0 for g in gaps.values())
    assert chosen["seed"] == min(gaps, key=gaps.get) and not chosen["resumed"]
    assert report["summary"]["accuracy_all_restarts"]["n"] == 2


def test_run_directories_are_resumed_rescored_or_refused_never_overwritten(tmp_path):
    first = run(tmp_path, 3)["seeds"][0]
    run_dir = tmp_path / "runs" / "mnist-dvae-default-L10-s0"
    checkpoint = run_dir / "checkpoint.pt"
    stamp = checkpoint.stat().st_mtime_ns

    again = run(tmp_path, 3)["seeds"][0]  # finished: only re-scored, to the same numbers
    assert again["resumed"] and checkpoint.stat().st_mtime_ns == stamp
    assert again["accuracy"] == first["accuracy"] and again["train_seconds"] == first["train_seconds"]

    longer = run(tmp_path, 5)["seeds"][0]  # a longer budget continues the run
    assert longer["resumed"] and json.loads((run_dir / "metrics.json").read_text())["steps"] == 5
    assert longer["train_seconds"] > first["train_seconds"]

    before = checkpoint.read_bytes()
    with pytest.raises(CheckpointError, match="run of 5 steps, more than --steps 3"):
        clustering.main([*ARGS, "--steps", "3", "--out", str(tmp_path)])
    with pytest.raises(CheckpointError, match="another batch_size"):
        clustering.main([*[a if a != "16" else "8" for a in ARGS], "--steps", "5", "--out", str(tmp_path)])
    assert checkpoint.read_bytes() == before

    stray = tmp_path / "other" / "runs" / "mnist-dvae-default-L10-s0"
    stray.mkdir(parents=True)
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="no checkpoint.pt and config.json"):
        clustering.main([*ARGS, "--steps", "3", "--out", str(tmp_path / "other")])
    assert (stray / "notes.txt").read_text() == "mine"


def test_restarts_must_be_positive(tmp_path):
    with pytest.raises(InputError, match="--restarts must be 1 or more"):
        clustering.main([*ARGS, "--steps", "3", "--restarts", "0", "--out", str(tmp_path)])
