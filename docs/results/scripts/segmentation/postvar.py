"""How much of MONet's 16-d posterior is used? active dims (mean sd < 0.5), their sd, |mu|; eval only.

usage: python docs/results/scripts/segmentation/postvar.py RUN_DIR [RUN_DIR ...]
"""
import json, sys
from pathlib import Path
import torch
from perception.train.config import TrainConfig
from perception.train.loop import EVAL_SEED, build_run_model, load_data
torch.set_num_threads(1)
for run in map(Path, sys.argv[1:]):
    cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    st = torch.load(run / "encoder.pt", map_location="cpu", weights_only=False)
    m = build_run_model(cfg, tuple(st["image_shape"])); m.load_state_dict(st["state_dict"]); m.eval()
    x = torch.from_numpy(load_data(cfg, "test", 100, EVAL_SEED).float_images())
    with torch.no_grad():
        mu, logvar = m.posterior(x, m.attend(x, m.num_slots))
    sd = (0.5 * logvar).exp()
    active = (sd.mean((0, 1)) < 0.5)
    print(run.name, "active dims (mean sd<0.5):", int(active.sum()), "of", sd.shape[-1], "| mean sd active", round(sd[..., active].mean().item(), 3),
          "inactive", round(sd[..., ~active].mean().item(), 3), "| |mu| per slot", round(mu.norm(dim=-1).mean().item(), 2))
