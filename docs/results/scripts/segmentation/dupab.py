"""Paired duplicate-rate comparison of two runs (an A/B) on the same held-out scenes, with a
bootstrap over scenes: is arm B's duplicate rate half of arm A's?

usage: python docs/results/scripts/segmentation/dupab.py [--scenes N] [--slots K,K,...] RUN_A RUN_B
Prints, per test-time slot count K, both arms' duplicated / total objects and the ratio B/A with
a 95% percentile interval from 2,000 resamples of the scenes (both arms resampled together).
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from _run import load_run
from perception.metrics import _duplicate_counts

torch.set_num_threads(1)
parser = argparse.ArgumentParser()
parser.add_argument("runs", nargs=2, type=Path)
parser.add_argument("--scenes", type=int, default=1000)
parser.add_argument("--slots", default="0", help="test-time slot counts, comma-separated (0: as trained)")
args = parser.parse_args()


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


rng = np.random.default_rng(0)
for k in map(int, args.slots.split(",")):
    (da, ta), (db, tb) = (per_scene_duplicates(run, k) for run in args.runs)
    draws = rng.integers(0, len(da), size=(2000, len(da)))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = (db[draws].sum(1) / tb[draws].sum(1)) / (da[draws].sum(1) / ta[draws].sum(1))
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5])
    ratio = (db.sum() / tb.sum()) / (da.sum() / ta.sum()) if da.sum() else float("nan")
    print(f"K={k or 'as trained'}: A {da.sum()}/{ta.sum()} = {da.sum() / ta.sum():.4f}, "
          f"B {db.sum()}/{tb.sum()} = {db.sum() / tb.sum():.4f}, B/A {ratio:.2f} [95% {lo:.2f}, {hi:.2f}]")
