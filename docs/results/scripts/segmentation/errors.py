"""Where do a MONet run's fg-ARI errors come from? Eval only, on the bench's 300 held-out scenes.

usage: python docs/results/scripts/segmentation/errors.py RUN_DIR [RUN_DIR ...]
Per run: per-image fg-ARI spread; the foreground pixels not in their object's majority slot,
split by where they went (background = largest slot / another slot) and where they are (boundary =
4-neighbour of another true label, or interior); merges (two objects, one majority slot).
"""
import sys
from pathlib import Path

import numpy as np
import torch

from _run import load_run
from perception.metrics import _ari_scores

torch.set_num_threads(1)
for run in sys.argv[1:]:
    run = Path(run)
    model, scenes = load_run(run, 300)
    x = torch.from_numpy(scenes.float_images())
    with torch.no_grad():
        masks = torch.cat([model.encode(c).masks for c in x.split(100)]).numpy()
    seg = scenes.segmentation  # [N,H,W]
    pred = masks.argmax(1)
    bg_slot = masks.mean(axis=(2, 3)).argmax(1)[:, None, None]  # the largest slot, as in MONet.encode
    ari = _ari_scores(seg, masks, ignore_background=True)
    pad = np.pad(seg, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    boundary = np.zeros_like(seg, dtype=bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        nb = pad[:, dy:dy + seg.shape[1], dx:dx + seg.shape[2]]
        boundary |= (nb != seg) & (nb != -1)
    fg = seg > 0
    wrong = np.zeros_like(fg)
    merges = 0
    for i in range(len(seg)):
        owners = {}
        for o in np.unique(seg[i][seg[i] > 0]):
            vals = pred[i][seg[i] == o]
            owner = np.bincount(vals, minlength=masks.shape[1]).argmax()
            owners[o] = owner
            wrong[i] |= (seg[i] == o) & (pred[i] != owner)
        merges += len(owners) - len(set(owners.values()))
    to_bg = wrong & (pred == bg_slot)
    bg_claimed = (~fg) & (pred != bg_slot)
    conf = masks.max(1)
    print(f"== {run}")
    print(f"fg-ARI mean {np.nanmean(ari):.4f}; images <0.9: {(ari < 0.9).sum()}, <0.99: {(ari < 0.99).sum()}, ==1: {(ari >= 0.9999).sum()} of {len(ari)}")
    worst = np.argsort(ari)[:8]
    print("worst images", [(int(i), round(float(ari[i]), 3)) for i in worst])
    print(f"fg pixels {fg.sum()}, wrong {wrong.sum()} ({wrong.sum() / fg.sum():.4f}): to bg slot {to_bg.sum()}, to other fg slot {(wrong & ~to_bg).sum()}")
    print(f"  wrong on boundary {(wrong & boundary).sum()}, interior {(wrong & ~boundary).sum()}; fg boundary pixels {(fg & boundary).sum()}")
    print(f"  fg pixels whose argmax is the bg slot: {(fg & (pred == bg_slot)).sum()}; bg pixels claimed by fg slots: {bg_claimed.sum()} (boundary {(bg_claimed & boundary).sum()})")
    print(f"  merges (objects sharing a majority slot): {merges}; mean max-mask on wrong px {conf[wrong].mean() if wrong.any() else float('nan'):.3f}, on right fg px {conf[fg & ~wrong].mean():.3f}")
    # wrong pixels per image: concentrated or spread?
    per = wrong.reshape(len(seg), -1).sum(1)
    print(f"  wrong px per image: 0 in {(per == 0).sum()}, 1-3 in {((per > 0) & (per <= 3)).sum()}, 4-10 in {((per > 3) & (per <= 10)).sum()}, >10 in {(per > 10).sum()}")
    np.save(f"/tmp/hmonet_worst_{run.name}.npy", worst)
