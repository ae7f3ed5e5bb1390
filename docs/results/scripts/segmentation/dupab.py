"""Paired duplicate-rate comparison of A/B runs on the same held-out scenes, with a bootstrap
over scenes: is arm B's duplicate rate half of arm A's?

usage: python docs/results/scripts/segmentation/dupab.py [--scenes N] [--slots K,K,...] RUN_A RUN_B [RUN_A RUN_B ...]
Prints, per test-time slot count K and per pair (e.g. one pair per seed), both arms' duplicated /
total objects and the ratio B/A with a 95% percentile interval from 2,000 resamples of the
scenes (both arms resampled together). With several pairs it also prints the pooled ratio (all
B duplicates over all A duplicates; every pair sees the same scenes, so they are resampled
together): the interval still covers the scenes only, not training noise.
"""
import argparse
import functools
from pathlib import Path

import numpy as np
import torch
from _run import load_run
from perception.metrics import _duplicate_counts

torch.set_num_threads(1)
parser = argparse.ArgumentParser()
parser.add_argument("runs", nargs="+", type=Path, help="pairs: RUN_A RUN_B [RUN_A RUN_B ...]")
parser.add_argument("--scenes", type=int, default=1000)
parser.add_argument("--slots", default="0", help="test-time slot counts, comma-separated (0: as trained)")
args = parser.parse_args()
if len(args.runs) % 2:
    parser.error(f"runs come in A/B pairs; got {len(args.runs)} paths")


@functools.cache  # a run may sit in several pairs (e.g. one no-LDS arm against two LDS weights)
def per_scene_duplicates(run: Path, slots: int) -> tuple[np.ndarray, np.ndarray]:
    model, scenes = load_run(run, args.scenes, options={"test_slots": slots} if slots else None)
    x = torch.from_numpy(scenes.float_images())
    dup, obj = [], []
    with torch.no_grad():
        for start in range(0, len(x), 100):
            out = model.encode(x[start : start + 100])
            idx = np.arange(start, min(start + 100, len(x)))
            masks, presence = out.masks.numpy(), out.presence.numpy()
            for j, i in enumerate(idx):
                d, t = _duplicate_counts(scenes.instance_masks(i[None]), masks[j : j + 1],
                                         scenes.valid[i][None], presence[j : j + 1])
                dup.append(d)
                obj.append(t)
    return np.array(dup), np.array(obj)


def ratio_with_interval(da, ta, db, tb, draws) -> tuple[float, float, float]:
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (db[draws].sum(1) / tb[draws].sum(1)) / (da[draws].sum(1) / ta[draws].sum(1))
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5])
    ratio = (db.sum() / tb.sum()) / (da.sum() / ta.sum()) if da.sum() else float("nan")
    return ratio, lo, hi


def report(label, da, ta, db, tb, draws) -> None:
    ratio, lo, hi = ratio_with_interval(da, ta, db, tb, draws)
    print(f"{label}: A {da.sum()}/{ta.sum()} = {da.sum() / ta.sum():.4f}, "
          f"B {db.sum()}/{tb.sum()} = {db.sum() / tb.sum():.4f}, B/A {ratio:.2f} [95% {lo:.2f}, {hi:.2f}]")


rng = np.random.default_rng(0)
pairs = list(zip(args.runs[::2], args.runs[1::2]))
for k in map(int, args.slots.split(",")):
    counts = [[per_scene_duplicates(run, k) for run in pair] for pair in pairs]
    objects = counts[0][0][1]
    if any(not np.array_equal(t, objects) for pair in counts for _, t in pair):
        raise SystemExit("the runs were scored on different scenes (different datasets?): no paired comparison")
    draws = rng.integers(0, len(objects), size=(2000, len(objects)))
    for (a, b), ((da, ta), (db, tb)) in zip(pairs, counts):
        # Name B by its OUT dir and run: pairs may share a run name (one seed, several arms).
        label = f"K={k or 'as trained'}" + (f" {b.parent.parent.name}/{b.name}" if len(pairs) > 1 else "")
        report(label, da, ta, db, tb, draws)
    if len(pairs) > 1:
        # Pooled over pairs per scene: the same scenes, so one resample index serves them all.
        (da, ta), (db, tb) = np.sum(counts, axis=0)
        report(f"K={k or 'as trained'} pooled over {len(pairs)} pairs", da, ta, db, tb, draws)
