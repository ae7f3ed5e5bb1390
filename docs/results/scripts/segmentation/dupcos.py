"""Do LDS's cosines see MONet's duplicates? cosine of the two slots claiming one object vs other present pairs.

usage: python docs/results/scripts/segmentation/dupcos.py RUN_DIR [RUN_DIR ...]
"""
import json, sys
from pathlib import Path
import numpy as np, torch
from perception.metrics import DUPLICATE_MIN_SHARE
from _run import load_run
torch.set_num_threads(1); torch.manual_seed(0)
for run in map(Path, sys.argv[1:]):
    m, sc = load_run(run, 300)
    x = torch.from_numpy(sc.float_images())
    with torch.no_grad():
        outs = [m.encode(c) for c in x.split(100)]
        samples = torch.cat([m.encode(c, deterministic=False).slots for c in x.split(100)]).numpy()
    masks = torch.cat([o.masks for o in outs]).numpy(); z = torch.cat([o.slots for o in outs]).numpy()
    pres = torch.cat([o.presence for o in outs]).numpy() > 0.5
    t = sc.instance_masks(np.arange(len(x))).reshape(len(x), -1, masks.shape[2] * masks.shape[3]).astype(float)
    p = masks.reshape(len(x), masks.shape[1], -1)
    inter = t @ p.transpose(0, 2, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = inter / t.sum(2)[:, :, None]; prec = inter / p.sum(2)[:, None, :]
    claims = (share >= DUPLICATE_MIN_SHARE) & (prec > 0.5) & pres[:, None, :]
    def cos(a, b): return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    dup_c, dup_s, other_c, other_s = [], [], [], []
    for i in range(len(x)):
        dpairs = set()
        for o in range(t.shape[1]):
            ks = np.flatnonzero(claims[i, o])
            for a in ks:
                for b in ks:
                    if a < b: dpairs.add((a, b))
        present = np.flatnonzero(pres[i])
        for a in present:
            for b in present:
                if a < b:
                    (dup_c if (a, b) in dpairs else other_c).append(cos(z[i, a], z[i, b]))
                    (dup_s if (a, b) in dpairs else other_s).append(cos(samples[i, a], samples[i, b]))
    f = lambda v: f"n={len(v)} mean {np.mean(v):.3f} |mean| {np.mean(np.abs(v)):.3f} median {np.median(v):.3f}"
    print(run.name, "\n duplicate pairs mu:", f(dup_c), "\n other pairs mu:    ", f(other_c),
          "\n duplicate pairs sampled:", f(dup_s), "\n other pairs sampled:    ", f(other_s))
