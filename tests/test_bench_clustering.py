"""The clustering benchmark's restarts: selection by the prior gap, resume of finished runs."""

from __future__ import annotations

import json

import pytest

from perception.bench import clustering
from perception.errors import CheckpointError, InputError

ARGS = ["--dataset", "mnist", "--model", "dvae", "--steps", "3", "--batch-size", "16", "--seeds", "1",
        "--model-option", "channels=4", "--model-option", "hidden=8"]


def test_restarts_keep_the_run_closest_to_the_uniform_prior_and_resume(tmp_path, capsys):
    out = tmp_path / "bench"
    assert clustering.main([*ARGS, "--restarts", "2", "--out", str(out)]) == 0
    report = json.loads((out / "mnist-dvae-default.json").read_text())["by_clusters"]["10"]
    chosen = report["seeds"][0]
    gaps = {r["seed"]: r["prior_gap"] for r in chosen["restarts"]}
    assert sorted(gaps) == [0, 1] and all(g >= 0 for g in gaps.values())
    assert chosen["seed"] == min(gaps, key=gaps.get) and not chosen["resumed"]
    assert report["summary"]["accuracy_all_restarts"]["n"] == 2

    # a second call finds both runs finished: it only re-scores them, to the same numbers
    assert clustering.main([*ARGS, "--restarts", "2", "--out", str(out)]) == 0
    again = json.loads((out / "mnist-dvae-default.json").read_text())["by_clusters"]["10"]["seeds"][0]
    assert again["resumed"] and again["restarts"] == chosen["restarts"]

    # another configuration in the same directory is refused, and the runs are left as they were
    before = (out / "runs" / "mnist-dvae-default-L10-s0" / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="holds another run .*batch_size"):
        clustering.main([*[a if a != "16" else "8" for a in ARGS], "--restarts", "2", "--out", str(out)])
    assert (out / "runs" / "mnist-dvae-default-L10-s0" / "checkpoint.pt").read_bytes() == before


def test_restarts_must_be_positive(tmp_path):
    with pytest.raises(InputError, match="--restarts must be 1 or more"):
        clustering.main([*ARGS, "--restarts", "0", "--out", str(tmp_path)])
