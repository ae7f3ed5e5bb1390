"""``python -m perception.pretrain``: train an encoder (defaults: the default model and data).

Examples::

    python -m perception.pretrain                                  # default model, default data
    python -m perception.pretrain --model vae --steps 2000 --out runs/vae
    python -m perception.pretrain --out runs/vae --resume --steps 4000   # continue / extend
    python -m perception.pretrain --num-workers 2                  # data-parallel with Ray Train
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from perception.cli import parse_options, run_cli
from perception.train.config import TrainConfig, read_train_config
from perception.train.loop import json_safe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perception.pretrain", description=__doc__.split("\n\n")[0])
    # Every default is None so that --resume can tell which options were given explicitly.
    p.add_argument("--model", help="registered model name (default: %s)" % TrainConfig.model)
    p.add_argument("--dataset", help="registered dataset name (default: %s)" % TrainConfig.dataset)
    p.add_argument("--estimator", help="discrete gradient estimator for the model's discrete latents")
    p.add_argument("--steps", type=int, help="total optimisation steps (default: %d)" % TrainConfig.steps)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--train-size", type=int, help="number of generated training scenes")
    p.add_argument("--eval-size", type=int, help="number of held-out scenes for the final metrics")
    p.add_argument("--data-dir", help="directory of MNIST IDX files (else $PERCEPTION_DATA_DIR, else the embedded digits)")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--image-every", type=int)
    p.add_argument("--model-option", action="append", metavar="KEY=VALUE", help="model hyper-parameter (repeatable)")
    p.add_argument("--dataset-option", action="append", metavar="KEY=VALUE", help="dataset option (repeatable)")
    p.add_argument("--num-workers", type=int, help="data-parallel Ray Train workers (default 1: no Ray)")
    p.add_argument("--out", help="run directory (default: runs/MODEL-DATASET-sSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if args.model_option:
        given["model_options"] = parse_options(args.model_option, "model")
    if args.dataset_option:
        given["dataset_options"] = parse_options(args.dataset_option, "dataset")
    base = TrainConfig()
    if args.resume and args.out and (Path(args.out) / "config.json").is_file():
        base = read_train_config(Path(args.out) / "config.json")
    cfg = dataclasses.replace(base, **given)
    out = Path(args.out or f"runs/{cfg.model}-{cfg.dataset}-s{cfg.seed}")
    return cfg, out


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg, out = resolve_config(args)
    if cfg.num_workers > 1:
        from perception.train.distributed import train_distributed

        metrics = train_distributed(cfg, out, resume=args.resume, progress=not args.no_progress)
    else:
        from perception.train.loop import train

        metrics = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(json_safe(metrics), indent=2, sort_keys=True))
    print(f"run directory: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
