"""IODINE: are the decoded masks spatial? per-slot spatial std of the softmax masks and their entropy,
with fg-ARI / mIoU / count accuracy on the same scenes; eval only.

usage: python docs/results/scripts/segmentation/iodiag.py [--checkpoint] [--scenes N] RUN_DIR [RUN_DIR ...]
(--checkpoint: the run's latest training checkpoint.pt instead of its final encoder.pt)
"""
import argparse
from pathlib import Path
import torch
from _run import load_run
from perception.metrics import evaluate_encoder
torch.set_num_threads(1)
parser = argparse.ArgumentParser()
parser.add_argument("runs", nargs="+", type=Path)
parser.add_argument("--checkpoint", action="store_true")
parser.add_argument("--scenes", type=int, default=64)
args = parser.parse_args()
for run in args.runs:
    m, sc = load_run(run, args.scenes, "checkpoint.pt" if args.checkpoint else "encoder.pt")
    x = torch.from_numpy(sc.float_images())
    with torch.no_grad():
        masks = m.encode(x).masks
    ent = -(masks.clamp_min(1e-9).log() * masks).sum(1).mean() / torch.log(torch.tensor(float(masks.shape[1])))
    scores = evaluate_encoder(m, sc, batch_size=100, device="cpu")
    print(run.name, "mask spatial std", round(masks.flatten(2).std(-1).mean().item(), 4), "normalised entropy", round(ent.item(), 3),
          "slot mean areas", [round(v, 3) for v in masks.mean((0, 2, 3)).tolist()],
          {k: round(scores[k], 3) for k in ("fg_ari", "ari", "miou", "count_accuracy", "duplicate_rate")})
