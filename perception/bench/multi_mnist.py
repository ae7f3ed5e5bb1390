"""``python -m perception.bench multi-mnist``: count, locate and classify objects, over seeds.

Each seed trains ``--model`` with the shared trainer (a run directory that already holds a
checkpoint is resumed, so an interrupted benchmark continues), or ``--checkpoint`` scores
existing encoders instead. Held-out metrics per seed: count accuracy on scenes like the training
ones and on a count-generalisation set with more objects (``--gen-counts``, default 4-5; K is
raised when the model offers the optional hook ``with_max_objects(k) -> model copy``), median
position error in pixels, negative ELBO (and ``importance_weighted_nll(images, num_samples)``
when the model has it), class accuracy for models with ``class_probs`` (Hungarian), training
steps and wall time. Writes ``MODEL-DATASET.json`` with per-seed rows and best / worst / mean,
and ``MODEL-DATASET.png`` with the best seed's decompositions, under ``--out``.

Example::

    python -m perception.bench multi-mnist --model air --seeds 2 --steps 5000
    python -m perception.bench multi-mnist --model lavae --dataset multi-dsprites-binary \
        --dataset-option min_objects=1 --dataset-option max_objects=3 --gen-counts 7,7 \
        --model-option sprite_size=25
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perception.cli import parse_options, run_cli
from perception.errors import PerceptionError

EVAL_SEED = 1234
GEN_SEED = 4321
METRICS = {  # reported name -> key in a seed's row; "higher" says which end is best
    "count_accuracy": True,
    "gen_count_accuracy": True,
    "position_error_median_px": False,
    "neg_elbo": False,
    "iw_nll": False,
    "class_accuracy": True,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perception.bench multi-mnist", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="air")
    p.add_argument("--dataset", default="multi-mnist")
    p.add_argument("--seeds", type=int, default=1, help="number of training seeds (0, 1, ...)")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--estimator")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--model-option", action="append", metavar="KEY=VALUE")
    p.add_argument(
        "--dataset-option", action="append", metavar="KEY=VALUE",
        help="for training and both test sets (the generalisation set's counts come from --gen-counts)",
    )
    p.add_argument("--checkpoint", action="append", help="score this encoder instead of training (repeatable)")
    p.add_argument("--eval-size", type=int, default=1000, help="held-out scenes per test set")
    p.add_argument("--gen-counts", default="4,5", help="object counts MIN,MAX of the generalisation set")
    p.add_argument("--iw-samples", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir")
    p.add_argument("--out", default="bench_results/multi-mnist")
    return p


def count_options(dataset: str, low: int, high: int) -> dict[str, int]:
    """The dataset's own option names for the object-count range."""
    from perception.data import DATASETS

    fields = {f.name for f in dataclasses.fields(DATASETS.get(dataset).config)}
    for lo, hi in (("min_digits", "max_digits"), ("min_objects", "max_objects")):
        if lo in fields and hi in fields:
            return {lo: low, hi: high}
    raise PerceptionError(f"dataset '{dataset}' has no object-count options, so --gen-counts does not apply")


def score(
    model, dataset: str, data_dir: str | None, size: int, gen: tuple[int, int], iw_samples: int, options: dict[str, Any]
) -> dict[str, float]:
    from perception.data import make_dataset
    from perception.metrics import evaluate_encoder
    from perception.train.loop import mean_model_metrics

    device = torch.device("cpu")
    model = model.to(device).eval()
    test = make_dataset(dataset, split="test", size=size, seed=EVAL_SEED, data_dir=data_dir, **options)
    row: dict[str, float] = {}
    held = evaluate_encoder(model, test)
    row["count_accuracy"] = held["count_accuracy"]
    row["position_error_median_px"] = held["position_error_median_px"]
    if "clustering_accuracy" in held:
        row["class_accuracy"] = held["clustering_accuracy"]
    with torch.enable_grad():  # some estimators differentiate inside the loss
        row["neg_elbo"] = mean_model_metrics(model, test, device)["neg_elbo"]
    if hasattr(model, "importance_weighted_nll"):
        with torch.no_grad():
            images = torch.from_numpy(test.float_images())
            row["iw_nll"] = float(model.importance_weighted_nll(images, iw_samples).mean())
    gen_options = {**options, **count_options(dataset, *gen)}
    gen_set = make_dataset(dataset, split="test", size=size, seed=GEN_SEED, data_dir=data_dir, **gen_options)
    bigger = model.with_max_objects(gen[1]) if hasattr(model, "with_max_objects") else model
    row["gen_count_accuracy"] = evaluate_encoder(bigger, gen_set)["count_accuracy"]
    row["gen_slots"] = float(bigger.num_slots)
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, higher in METRICS.items():
        values = [r[name] for r in rows if name in r and np.isfinite(r[name])]
        if values:
            pick = max if higher else min
            worst = min if higher else max
            out[name] = {"best": pick(values), "worst": worst(values), "mean": float(np.mean(values)), "n": len(values)}
    return out


def save_figure(model, dataset: str, data_dir: str | None, path: Path, options: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from perception.data import make_dataset
    from perception.train.images import image_grid

    scenes = make_dataset(dataset, split="test", size=8, seed=EVAL_SEED, data_dir=data_dir, **options)
    with torch.no_grad():
        rows = model.eval().visualize(torch.from_numpy(scenes.float_images()))
    if rows:
        plt.imsave(path, image_grid(list(rows.values())).permute(1, 2, 0).numpy())


def main(argv: list[str]) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from perception.train.checkpoint import load_encoder_checkpoint
    from perception.train.config import TrainConfig
    from perception.train.loop import train

    torch.set_num_threads(args.threads)
    gen = tuple(int(v) for v in args.gen_counts.split(","))
    if len(gen) != 2 or gen[0] > gen[1]:
        raise PerceptionError(f"--gen-counts must be MIN,MAX, got {args.gen_counts}")
    data_options = parse_options(args.dataset_option, "dataset")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    models = []
    if args.checkpoint:
        from perception import resolve_encoder_path

        for path in args.checkpoint:
            model = load_encoder_checkpoint(resolve_encoder_path(path))
            row: dict[str, Any] = {"checkpoint": str(path)}
            trained = Path(path) / "metrics.json"  # a run directory says how long it trained
            if trained.is_file():
                row["steps"] = json.loads(trained.read_text()).get("steps")
            row.update(score(model, args.dataset, args.data_dir, args.eval_size, gen, args.iw_samples, data_options))
            rows.append(row)
            models.append(model)
            print(json.dumps(row), flush=True)
    for seed in range(0 if args.checkpoint else args.seeds):
        run = out / "runs" / f"{args.model}-{args.dataset}-s{seed}"
        cfg = TrainConfig(
            model=args.model, dataset=args.dataset, estimator=args.estimator, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, seed=seed, device="cpu", train_size=args.train_size,
            eval_size=args.eval_size, data_dir=args.data_dir, image_every=1000,
            model_options=parse_options(args.model_option, "model"), dataset_options=data_options,
        )
        start = time.perf_counter()
        metrics = train(cfg, run, resume=(run / "checkpoint.pt").is_file(), progress=False)
        wall = time.perf_counter() - start
        model = load_encoder_checkpoint(run / "encoder.pt")
        row = {"seed": seed, "steps": int(metrics["steps"]), "wall_s": wall, "run": str(run)}
        row.update(score(model, args.dataset, args.data_dir, args.eval_size, gen, args.iw_samples, data_options))
        rows.append(row)
        models.append(model)
        print(json.dumps(row), flush=True)
    if not rows:
        raise PerceptionError("nothing to do: give --seeds >= 1 or --checkpoint")
    stem = f"{args.model if not args.checkpoint else models[0].name}-{args.dataset}"
    best = int(np.argmax([r["count_accuracy"] for r in rows]))
    save_figure(models[best], args.dataset, args.data_dir, out / f"{stem}.png", data_options)
    result = {
        "model": models[0].name, "dataset": args.dataset, "dataset_options": data_options, "gen_counts": list(gen),
        "eval_size": args.eval_size,
        "threads": args.threads, "machine": "CPU", "seeds": rows, "summary": summary(rows),
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return 0
