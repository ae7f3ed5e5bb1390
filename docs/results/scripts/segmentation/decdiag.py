"""Does MONet's component decoder draw spatial masks? eval only.

usage: python docs/results/scripts/segmentation/decdiag.py RUN_DIR [RUN_DIR ...]
"""
import json, sys
from pathlib import Path
import torch
from torch.nn import functional as F
from _run import load_run
torch.set_num_threads(1)
for run in map(Path, sys.argv[1:]):
    m, sc = load_run(run, 100)
    x = torch.from_numpy(sc.float_images())
    with torch.no_grad():
        lm = m.attend(x, m.num_slots); mu, _ = m.posterior(x, lm); means, logits = m.decode(mu)
    att = lm.exp(); dec = F.softmax(logits, 1)
    seg = torch.from_numpy(sc.segmentation); fg = seg > 0
    agree = (att.argmax(1) == dec.argmax(1))[fg].float().mean()
    kl = (att * (lm - F.log_softmax(logits, 1))).flatten(1).sum(1).mean()
    print(run.name, "logit spatial std", logits.flatten(2).std(-1).mean().item(), "between slots", logits.mean((2,3)).std(1).mean().item(),
          "fg argmax agreement", agree.item(), "kl_mask/img", kl.item(), "means spatial std", means.flatten(3).std(-1).mean().item())
