"""``python -m perception.bench clustering``: unsupervised classification with D-VAE / D-VAE-ST.

Each seed trains the model with the shared trainer on the training pool (MNIST: digits
0-7999) and is scored on the held-out pool (digits 8000-9999): clustering accuracy of the
argmax class (Hungarian mapping when clusters == classes, majority vote when overclustering)
as ``encode`` reads it (the model's ``class_inference``) and of the amortised classifier alone,
the negative ELBO split into NLL and KL, and a PNG of the learned prototypes. Several
``--clusters`` values run the overclustering experiment (e.g. ``--clusters 10 11 12``).

Example::

    python -m perception.bench clustering --dataset mnist --model dvaest --estimator exact \\
        --seeds 5 --steps 3600 --clusters 10 11 12
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perception.cli import parse_options, run_cli
from perception.metrics import clustering_accuracy, summarise
from perception.train.config import TrainConfig
from perception.train.images import image_grid

DATASETS = ("mnist", "simplified-mnist", "fashion-mnist")
MODELS = ("dvae", "dvaest")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perception.bench clustering", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist", choices=DATASETS)
    p.add_argument("--model", default="dvaest", choices=MODELS)
    p.add_argument("--estimator", default=None, help="discrete estimator (default: the model's)")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1")
    p.add_argument("--seed-list", type=int, nargs="+", metavar="SEED", help="these seeds instead of 0 .. N-1")
    p.add_argument("--steps", type=int, default=3600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--clusters", type=int, nargs="+", help="number(s) of prototype classes L (default: the number of classes)"
    )
    p.add_argument("--model-option", action="append", metavar="KEY=VALUE", help="model hyper-parameter (repeatable)")
    p.add_argument("--data-dir", help="directory of MNIST IDX files (else $PERCEPTION_DATA_DIR)")
    p.add_argument("--jobs", type=int, default=1, help="seeds trained in parallel processes (one thread each)")
    p.add_argument("--tag", default="", help="suffix of the result names (e.g. 'baseline')")
    p.add_argument("--out", default="bench_results/clustering")
    return p


def save_prototypes(model: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        grid = image_grid([model.prototypes()])
    plt.imsave(path, grid.permute(1, 2, 0).numpy())


def score(model: Any, scenes: Any, num_clusters: int) -> dict[str, float]:
    """Held-out accuracy, NLL and KL of a trained model."""
    from perception.train.loop import mean_model_metrics

    labels = np.unique(scenes.labels[:, 0], return_inverse=True)[1]  # 0..C-1 (simplified-mnist: 2, 6, 9)
    model.eval()
    with torch.no_grad():
        images = torch.from_numpy(scenes.float_images())
        chunks = [images[i : i + 500] for i in range(0, len(images), 500)]
        probs = torch.cat([model.encode(c).class_probs[:, 0] for c in chunks])
        amortised = torch.cat([model.classifier_logits(model.hidden(c))[:, model.keep] for c in chunks])
        own = mean_model_metrics(model, scenes, torch.device("cpu"))
    pred = probs.argmax(-1).numpy()
    used = np.bincount(pred, minlength=num_clusters)
    return {
        "accuracy": clustering_accuracy(pred, labels, num_clusters),
        "accuracy_classifier": clustering_accuracy(amortised.argmax(-1).numpy(), labels, num_clusters),
        "neg_elbo": own["neg_elbo"],
        "nll": own["model_nll"],
        "kl": own["model_kl"],
        "clusters_used": int((used > 0).sum()),
        "test_size": int(len(labels)),
    }


def run_seed(args: argparse.Namespace, num_clusters: int, seed: int, run_dir: Path) -> dict[str, Any]:
    from perception.data import make_dataset
    from perception.train.loop import build_run_model, train

    # the whole training pool (MNIST: digits 0-7999) and the whole held-out pool (8000-9999)
    train_size = len(make_dataset(args.dataset, "train", data_dir=args.data_dir))
    test = make_dataset(args.dataset, "test", data_dir=args.data_dir)

    options = parse_options(args.model_option, "model")
    options["num_classes"] = num_clusters
    cfg = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        estimator=args.estimator,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=seed,
        device="cpu",
        train_size=train_size,
        eval_size=len(test),
        data_dir=args.data_dir,
        checkpoint_every=args.steps,
        log_every=max(1, args.steps // 20),
        image_every=0,
        model_options=options,
    )
    start = time.perf_counter()
    train(cfg, run_dir, progress=False)
    seconds = time.perf_counter() - start
    state = torch.load(run_dir / "encoder.pt", map_location="cpu", weights_only=False)
    model = build_run_model(cfg, tuple(state["image_shape"]))
    model.load_state_dict(state["state_dict"])
    result = score(model, test, num_clusters)
    result.update(seed=seed, train_seconds=seconds)
    save_prototypes(model, run_dir.parent / f"{run_dir.name}-prototypes.png")
    return result


def run_seed_job(args: argparse.Namespace, num_clusters: int, seed: int, run_dir: Path) -> dict[str, Any]:
    torch.set_num_threads(1)  # the benchmark machine is shared; timings assume one thread
    return run_seed(args, num_clusters, seed, run_dir)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    estimator = args.estimator or "default"
    report: dict[str, Any] = {"command": "python -m perception.bench clustering " + " ".join(argv), "by_clusters": {}}
    if not args.clusters:
        from perception.data import make_dataset

        args.clusters = [len(np.unique(make_dataset(args.dataset, "train", data_dir=args.data_dir).labels))]
    for num_clusters in args.clusters:
        name = f"{args.dataset}-{args.model}-{estimator}-L{num_clusters}" + (f"-{args.tag}" if args.tag else "")
        seed_ids = args.seed_list or list(range(args.seeds))
        run_dirs = [out / "runs" / f"{name}-s{seed}" for seed in seed_ids]
        if args.jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(run_seed_job, args, num_clusters, s, d) for s, d in zip(seed_ids, run_dirs)]
                seeds = [f.result() for f in futures]
        else:
            seeds = [run_seed_job(args, num_clusters, s, d) for s, d in zip(seed_ids, run_dirs)]
        for run_dir, result in zip(run_dirs, seeds):
            print(json.dumps({"run": run_dir.name, **result}), flush=True)
        summary = {k: summarise(r[k] for r in seeds) for k in ("accuracy", "neg_elbo", "nll", "kl", "train_seconds")}
        report["by_clusters"][str(num_clusters)] = {"name": name, "seeds": seeds, "summary": summary}
        acc = summary["accuracy"]
        print(f"{name}: accuracy best {acc['max']:.4f} worst {acc['min']:.4f} mean {acc['mean']:.4f} over {len(seeds)} seeds", flush=True)
    path = out / (f"{args.dataset}-{args.model}-{estimator}" + (f"-{args.tag}" if args.tag else "") + ".json")
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
