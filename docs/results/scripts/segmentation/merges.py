"""Which objects merge (share a majority slot)? colour distance, sizes, contact. eval only.

usage: python docs/results/scripts/segmentation/merges.py RUN_DIR
"""
import json, sys
from pathlib import Path
import numpy as np, torch
from _run import load_run
torch.set_num_threads(1)
run = Path(sys.argv[1])  # one run
m, sc = load_run(run, 300)
x = sc.float_images()
with torch.no_grad():
    masks = torch.cat([m.encode(c).masks for c in torch.from_numpy(x).split(100)]).numpy()
pred = masks.argmax(1); seg = sc.segmentation
merged, allpairs = [], []
nobj = []
for i in range(len(seg)):
    objs = [o for o in np.unique(seg[i]) if o > 0]
    nobj.append(len(objs))
    own = {o: np.bincount(pred[i][seg[i] == o], minlength=masks.shape[1]).argmax() for o in objs}
    col = {o: x[i][:, seg[i] == o].mean(1) for o in objs}
    size = {o: (seg[i] == o).sum() for o in objs}
    for a in objs:
        for b in objs:
            if a < b:
                d = np.abs(col[a] - col[b]).max()
                touch = False
                A = seg[i] == a; B = seg[i] == b
                Ad = A.copy(); Ad[1:] |= A[:-1]; Ad[:-1] |= A[1:]; Ad[:, 1:] |= A[:, :-1]; Ad[:, :-1] |= A[:, 1:]
                touch = bool((Ad & B).any())
                rec = (i, len(objs), round(float(d), 3), touch, int(size[a]), int(size[b]))
                (merged if own[a] == own[b] else allpairs).append(rec)
print("objects per scene", np.bincount(nobj))
print("merged pairs", len(merged), "scenes with 5 objects among them", sum(r[1] == 5 for r in merged))
print("merged: colour max-diff median", np.median([r[2] for r in merged]), "touching", np.mean([r[3] for r in merged]), "min size median", np.median([min(r[4], r[5]) for r in merged]))
print("others: colour max-diff median", np.median([r[2] for r in allpairs]), "touching", np.mean([r[3] for r in allpairs]), "min size median", np.median([min(r[4], r[5]) for r in allpairs]))
print("merged with colour diff < 0.1:", sum(r[2] < 0.1 for r in merged), "others:", sum(r[2] < 0.1 for r in allpairs))
print(merged[:20])
