"""``python -m perception.evaluate --checkpoint PATH --dataset NAME``: held-out metrics as JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from perception.cli import parse_options, run_cli
from perception.errors import InputError, OutputExistsError


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m perception.evaluate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint file, run directory or bundled encoder name")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--size", type=int, default=1000, help="number of scenes")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data-dir")
    p.add_argument("--dataset-option", action="append", metavar="KEY=VALUE")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="JSON file to write (refuses to overwrite)")
    args = p.parse_args(argv)

    from perception import resolve_encoder_path
    from perception.train.checkpoint import load_encoder_checkpoint
    from perception.data import make_dataset
    from perception.metrics import evaluate_encoder
    from perception.train.loop import json_safe, mean_model_metrics, resolve_device

    if args.out and Path(args.out).exists():
        raise OutputExistsError(f"{args.out} exists; choose another --out")
    device = resolve_device(args.device)
    encoder = load_encoder_checkpoint(resolve_encoder_path(args.checkpoint)).to(device)
    options = parse_options(args.dataset_option, "dataset")
    scenes = make_dataset(args.dataset, split=args.split, size=args.size, seed=args.seed, data_dir=args.data_dir, **options)
    if scenes.image_shape != encoder.image_shape:
        raise InputError(
            f"dataset '{args.dataset}' has images {list(scenes.image_shape)} but the encoder expects {list(encoder.image_shape)}"
        )
    metrics = evaluate_encoder(encoder, scenes, device=str(device))
    with torch.enable_grad():  # some estimators differentiate inside the loss
        metrics.update(mean_model_metrics(encoder, scenes, device))
    metrics = {k: metrics[k] for k in sorted(metrics)}
    text = json.dumps(json_safe(metrics), indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
