"""How much of MONet's 16-d posterior is used? active dims (mean sd < 0.5), their sd, |mu|; eval only.

usage: python docs/results/scripts/segmentation/postvar.py RUN_DIR [RUN_DIR ...]
"""
import json, sys
from pathlib import Path
import torch
from _run import load_run
torch.set_num_threads(1)
for run in map(Path, sys.argv[1:]):
    m, sc = load_run(run, 100)
    x = torch.from_numpy(sc.float_images())
    with torch.no_grad():
        mu, logvar = m.posterior(x, m.attend(x, m.num_slots))
    sd = (0.5 * logvar).exp()
    active = (sd.mean((0, 1)) < 0.5)
    print(run.name, "active dims (mean sd<0.5):", int(active.sum()), "of", sd.shape[-1], "| mean sd active", round(sd[..., active].mean().item(), 3),
          "inactive", round(sd[..., ~active].mean().item(), 3), "| |mu| per slot", round(mu.norm(dim=-1).mean().item(), 2))
