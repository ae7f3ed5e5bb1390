"""IODINE: are the decoded masks spatial? per-slot spatial std of the softmax masks and their entropy; eval only.

usage: python docs/results/scripts/segmentation/iodiag.py RUN_DIR [RUN_DIR ...]
"""
import json, sys
from pathlib import Path
import torch
from _run import load_run
torch.set_num_threads(1)
for run in map(Path, sys.argv[1:]):
    m, sc = load_run(run, 64)
    x = torch.from_numpy(sc.float_images())
    with torch.no_grad():
        masks = m.encode(x).masks
    ent = -(masks.clamp_min(1e-9).log() * masks).sum(1).mean() / torch.log(torch.tensor(float(masks.shape[1])))
    print(run.name, "mask spatial std", round(masks.flatten(2).std(-1).mean().item(), 4), "normalised entropy", round(ent.item(), 3),
          "slot mean areas", [round(v, 3) for v in masks.mean((0, 2, 3)).tolist()])
