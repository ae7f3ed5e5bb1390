"""IODINE: are the decoded masks spatial? per-slot spatial std of the softmax masks and their entropy; eval only.

usage: python docs/results/scripts/segmentation/iodiag.py RUN_DIR [RUN_DIR ...]
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
    x = torch.from_numpy(load_data(cfg, "test", 64, EVAL_SEED).float_images())
    with torch.no_grad():
        masks = m.encode(x).masks
    ent = -(masks.clamp_min(1e-9).log() * masks).sum(1).mean() / torch.log(torch.tensor(float(masks.shape[1])))
    print(run.name, "mask spatial std", round(masks.flatten(2).std(-1).mean().item(), 4), "normalised entropy", round(ent.item(), 3),
          "slot mean areas", [round(v, 3) for v in masks.mean((0, 2, 3)).tolist()])
