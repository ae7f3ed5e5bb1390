"""``python -m perception.bench segmentation``: unsupervised segmentation with MONet / IODINE.

Each seed trains the model with the shared trainer, then scores the final weights on held-out
scenes (the trainer's fixed evaluation seed): foreground ARI, ARI, Hungarian mIoU, duplicate
rate, mean pairwise cosine of present slots, count accuracy (all from
``perception.metrics.evaluate_encoder``) and the per-pixel MSE of the deterministic
reconstruction; a PNG shows input, reconstruction and each slot's masked component. ``--lds``
trains with the latent duplicate suppression prior; run with and without it to compare.

``--eval-option KEY=VALUE`` changes an inference-only model option for the held-out scoring
(``test_slots``, IODINE's ``test_iterations``, ``presence_min_area``; ``neg_elbo`` is then left
out, since the loss keeps the training K and T); with ``--score-only`` nothing is trained and the
runs already in ``--runs-dir`` are scored again, into files named after the options (or
``-rescored``), never over the training run's own results.

``--cost`` trains nothing: it measures one training step's time and peak memory for the model
at the paper's sizes and at this library's defaults (and the steps in between), each in a
fresh process so that peak memory is the step's own.

Examples::

    python -m perception.bench segmentation --model monet --dataset tetris --seeds 3 --steps 3000
    python -m perception.bench segmentation --model monet --lds --dataset tetris --seeds 3 --steps 3000
    python -m perception.bench segmentation --model monet --dataset tetris --seeds 3 --score-only \
        --eval-option test_slots=5
    python -m perception.bench segmentation --model iodine --cost --batch-size 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perception.cli import parse_options, run_cli
from perception.errors import PerceptionError
from perception.metrics import summarise
from perception.train.config import TrainConfig, read_train_config

MODELS = ("monet", "iodine")
DATASETS = ("multi-dsprites", "tetris", "multi-mnist")
METRICS = (
    "fg_ari", "ari", "miou", "mse", "duplicate_rate", "slot_cosine", "count_accuracy", "neg_elbo", "train_seconds",
)

# Model options that only change inference, so they may differ at scoring time (--eval-option).
EVAL_OPTIONS = ("test_slots", "test_iterations", "presence_min_area")

# Per-dataset slot counts: the most objects a scene holds, plus one for the background.
SLOTS = {"multi-dsprites": 6, "tetris": 4, "multi-mnist": 4}

# IODINE at the scale of the paper's CLEVR networks (convolutions 64 ch x 4, MLP/LSTM 256).
PAPER_IODINE = {"decoder_channels": 64, "decoder_layers": 4, "refine_channels": 64, "refine_layers": 4, "hidden": 256}
# The choices of DeepMind's IODINE configuration for Tetrominoes (deepmind-research,
# iodine/configurations.py, as read in session 12) that this model has options for. Not matched:
# its refinement network's pooling, its pixel range, and the training settings (batch 128,
# lr 2.1e-4, Adam beta1 0.95).
DEEPMIND_TETROMINOES = {
    "iterations": 5, "latent_dim": 32, "decoder_channels": 32, "decoder_layers": 4,
    "decoder_frequencies": 3, "kernel_size": 5, "refine_channels": 32, "recurrent": False,
    "likelihood": "logistic", "sigma": 0.03,
}
# The small IODINE trained on Tetris in docs/results/segmentation.md (sessions 2 and 12).
SMALL_TETRIS = {"decoder_channels": 16, "refine_channels": 16, "hidden": 64, "iterations": 2, "test_iterations": 4}
# Cost variants, from the paper's sizes to this library's defaults, one change at a time.
COST_VARIANTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "iodine": [
        ("paper", {**PAPER_IODINE, "iterations": 5}),
        ("paper, T=3 in training", {**PAPER_IODINE, "iterations": 3}),
        ("T=3, decoder 32x3", {**PAPER_IODINE, "iterations": 3, "decoder_channels": 32, "decoder_layers": 3}),
        ("default (T=3, decoder 32x3, refinement 32x3, LSTM 128)", {}),
        ("small Tetris model (16 ch, LSTM 64, T=2)", SMALL_TETRIS),
        ("DeepMind Tetrominoes choices (logistic 0.03, T=5, latent 32, decoder 32x4 5x5 + 3 frequencies, "
         "refinement 32 ch 5x5, no LSTM)", DEEPMIND_TETROMINOES),
    ],
    "monet": [
        ("default (U-Net 32 ch x 4 levels, decoder 32 ch x 4)", {}),
    ],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perception.bench segmentation", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="monet", choices=MODELS)
    p.add_argument("--dataset", default="multi-dsprites", choices=DATASETS)
    p.add_argument("--lds", action="store_true", help="train with the latent duplicate suppression prior")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--eval-size", type=int, default=500)
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--model-option", action="append", metavar="KEY=VALUE", help="model hyper-parameter (repeatable)")
    p.add_argument(
        "--eval-option", action="append", metavar="KEY=VALUE",
        help="model option for the held-out scoring only, e.g. test_slots=7 (repeatable)",
    )
    p.add_argument("--score-only", action="store_true", help="train nothing: score the runs already in --runs-dir")
    p.add_argument("--cost", action="store_true", help="measure training-step cost instead of training")
    p.add_argument("--out", default="bench_results/segmentation")
    p.add_argument("--runs-dir", help="where run directories go (default OUT/runs)")
    p.add_argument(
        "--continue-from", metavar="RUNS_DIR",
        help="second training stage: start each seed from the same variant's checkpoint in RUNS_DIR, "
        "with this command's model options and --lr, up to --steps in total",
    )
    return p


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"num_slots": SLOTS[args.dataset]}
    if args.lds:
        options["lds"] = True
    options.update(parse_options(args.model_option, "model"))
    return options


def variant_name(args: argparse.Namespace) -> str:
    return f"{args.dataset}-{args.model}" + ("-lds" if args.lds else "")


def eval_options_of(args: argparse.Namespace, bases: list[dict[str, Any]]) -> dict[str, Any]:
    """``--eval-option`` pairs, checked before any training or scoring: inference-only keys the
    model has, with values that each run's options (``bases``) accept."""
    from perception.models import build_model, model_class

    options = parse_options(args.eval_option, "eval")
    fields = model_class(args.model).Config.__dataclass_fields__
    allowed = [key for key in EVAL_OPTIONS if key in fields]
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise PerceptionError(f"--eval-option {', '.join(bad)}: {args.model} accepts only {', '.join(allowed)}")
    if options:  # building the model checks the values the way the scoring will (milliseconds)
        from perception.data import make_dataset

        shape = make_dataset(args.dataset, "test", 1, 0).image_shape
        distinct = {json.dumps(base, sort_keys=True): base for base in bases}  # seeds usually share options
        for base in distinct.values():
            build_model(args.model, {**base, **options}, shape)
    return options


def output_name(args: argparse.Namespace, eval_options: dict[str, Any]) -> str:
    suffix = "".join(f"-{key}{value}" for key, value in sorted(eval_options.items()))
    if args.score_only and not suffix:
        suffix = "-rescored"  # never over the training run's JSON and figures
    return variant_name(args) + suffix


def save_decomposition(model: Any, images: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from perception.train.images import image_grid

    model.eval()
    with torch.no_grad():
        rows = model.visualize(images)
    plt.imsave(path, image_grid(list(rows.values())).permute(1, 2, 0).numpy())


def reconstruction_mse(model: Any, images: torch.Tensor, batch: int = 100) -> float:
    model.eval()
    with torch.no_grad():
        total = sum(
            model.reconstruct(chunk)[0].sub(chunk).pow(2).mean().item() * len(chunk) for chunk in images.split(batch)
        )
    return float(total / len(images))


def run_seed(
    args: argparse.Namespace, seed: int, run_dir: Path, png: Path, eval_options: dict[str, Any]
) -> dict[str, Any]:
    from perception.train.loop import train

    cfg = TrainConfig(
        model=args.model, dataset=args.dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        seed=seed, device=args.device, train_size=args.train_size, eval_size=8,
        checkpoint_every=max(1, args.steps // 4), log_every=max(1, args.steps // 50), image_every=0,
        model_options=model_options(args),
    )
    if args.continue_from:
        fork_run(Path(args.continue_from) / run_dir.name, run_dir, cfg)
    start = time.perf_counter()
    train(cfg, run_dir, resume=bool(args.continue_from), progress=False)
    result = score_run(cfg, run_dir, args.eval_size, png, eval_options)
    result.update(seed=seed, train_seconds=time.perf_counter() - start, steps=args.steps)
    return result


def read_run_config(run_dir: Path) -> TrainConfig:
    """The configuration of a finished run, for ``--score-only``."""
    if not (run_dir / "encoder.pt").is_file() or not (run_dir / "config.json").is_file():
        raise PerceptionError(f"--score-only: no finished run in {run_dir} (encoder.pt or config.json missing)")
    return read_train_config(run_dir / "config.json")


def fork_run(source: Path, run_dir: Path, cfg: TrainConfig) -> None:
    """Seed ``run_dir`` with ``source``'s training checkpoint (weights, Adam moments, step, RNG
    states) under ``cfg``, so that the trainer's resume continues it with other options and
    learning rates (resume takes every group's rate from the configuration); ``source`` is left
    as it was."""
    from perception.errors import OutputExistsError
    from perception.train.checkpoint import atomic_save, read_checkpoint
    from perception.train.loop import write_json

    if run_dir.exists() and any(run_dir.iterdir()):
        raise OutputExistsError(f"output directory {run_dir} is not empty; choose another --runs-dir")
    state = read_checkpoint(source / "checkpoint.pt")
    if state["step"] >= cfg.steps:
        raise PerceptionError(f"--steps {cfg.steps} must exceed the {state['step']} steps already run in {source}")
    state["train_config"] = cfg.to_dict()
    atomic_save(state, run_dir / "checkpoint.pt")
    write_json(cfg.to_dict(), run_dir / "config.json")


def score_run(
    cfg: TrainConfig, run_dir: Path, eval_size: int, png: Path, eval_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Held-out metrics of a finished run's ``encoder.pt`` and its decomposition figure, with the
    model options in ``eval_options`` changed for the scoring."""
    from perception.metrics import evaluate_encoder
    from perception.train.loop import EVAL_SEED, build_run_model, load_data, mean_model_metrics, resolve_device

    state = torch.load(run_dir / "encoder.pt", map_location="cpu", weights_only=False)
    device = resolve_device(cfg.device)
    scored = dataclasses.replace(cfg, model_options={**cfg.model_options, **(eval_options or {})})
    model = build_run_model(scored, tuple(state["image_shape"])).to(device)
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise PerceptionError(f"{run_dir}: the weights do not fit the model built from its config.json ({err})") from None
    scenes = load_data(cfg, "test", eval_size, EVAL_SEED)
    result = evaluate_encoder(model, scenes, batch_size=100, device=str(device))
    images = torch.from_numpy(scenes.float_images()).to(device)
    result["mse"] = reconstruction_mse(model, images)
    if not eval_options:  # the loss keeps the training K and T, so it would not match the rest
        result["neg_elbo"] = mean_model_metrics(model, scenes, device, batch_size=100)["neg_elbo"]
    save_decomposition(model, images[:8], png)
    return result


# --- cost ------------------------------------------------------------------------------------
def _cost_worker(spec: dict[str, Any]) -> dict[str, float]:
    """One fresh process: build, warm up, then time ``repeats`` training steps."""
    from perception.data import make_dataset
    from perception.models import build_model

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    scenes = make_dataset(spec["dataset"], "train", spec["batch_size"], 0)
    x = torch.from_numpy(scenes.float_images()).to(device)
    model = build_model(spec["model"], spec["options"], scenes.image_shape).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = model.loss({"image": x}, 0).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times = [], []
    for _ in range(spec["repeats"]):
        t, c = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    out = {
        "ms_per_step": 1000 * float(np.median(times)),
        # CPU time is what a step costs on a shared machine, where wall time depends on the load
        "cpu_ms_per_step": 1000 * float(np.median(cpu_times)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024,
        "parameters": float(sum(p.numel() for p in model.parameters())),
    }
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def measure_cost(args: argparse.Namespace) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    results = []
    for label, options in COST_VARIANTS[args.model]:
        spec = {
            "model": args.model, "dataset": args.dataset, "batch_size": args.batch_size, "device": args.device,
            "threads": args.threads, "repeats": 2, "options": {**model_options(args), **options},
        }
        with ctx.Pool(1) as pool:
            row = pool.apply(_cost_worker, (spec,))
        row.update(variant=label, options=spec["options"])
        print(json.dumps(row), flush=True)
        results.append(row)
    return {"batch_size": args.batch_size, "device": args.device, "threads": args.threads, "variants": results}


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": "python -m perception.bench segmentation " + " ".join(argv)}
    if args.cost and (args.eval_option or args.score_only):
        raise PerceptionError("--cost measures training steps: it takes no --eval-option or --score-only")
    if args.score_only and (args.continue_from or args.model_option):
        raise PerceptionError(
            "--score-only scores finished runs with their own options: it takes no --continue-from "
            "or --model-option (use --eval-option for inference options)"
        )
    if args.cost:
        report["cost"] = measure_cost(args)
        path = out / f"cost-{args.dataset}-{args.model}-{args.device}.json"
    else:
        name = variant_name(args)
        runs = Path(args.runs_dir) if args.runs_dir else out / "runs"
        seed_range = range(args.first_seed, args.first_seed + args.seeds)
        # --score-only: every run must be there before anything is written
        finished = {s: read_run_config(runs / f"{name}-s{s}") for s in seed_range} if args.score_only else {}
        bases = [cfg.model_options for cfg in finished.values()] if args.score_only else [model_options(args)]
        eval_options = eval_options_of(args, bases)
        scored = output_name(args, eval_options)
        seeds = []
        for seed in seed_range:
            run_dir, png = runs / f"{name}-s{seed}", out / f"{scored}-s{seed}.png"
            if args.score_only:
                cfg = dataclasses.replace(finished[seed], device=args.device)
                result = score_run(cfg, run_dir, args.eval_size, png, eval_options)
                result.update(seed=seed, steps=cfg.steps, model_options=cfg.model_options)
            else:
                result = run_seed(args, seed, run_dir, png, eval_options)
            print(json.dumps({"run": f"{name}-s{seed}", **result}), flush=True)
            seeds.append(result)
        report.update(
            model_options=None if args.score_only else model_options(args), eval_options=eval_options, seeds=seeds,
            summary={k: summarise(r[k] for r in seeds if k in r) for k in METRICS},
        )
        fg = report["summary"]["fg_ari"]
        spread = f"min {fg['min']:.4f}, max {fg['max']:.4f}"
        print(f"{scored}: fg-ARI mean {fg['mean']:.4f} ({spread}) over {len(seeds)} seeds", flush=True)
        suffix = f"-seeds{args.first_seed}-{args.first_seed + args.seeds - 1}" if args.first_seed else ""
        path = out / f"{scored}{suffix}.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
