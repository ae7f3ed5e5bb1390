"""``python -m perception.bench pretrain``: training step time of registered models.

Times ``loss + backward + Adam step`` on one fixed batch of generated scenes (data generation
is timed separately by ``perception.bench data``), after warm-up, as the median of repeats.
``--estimators a,b,...`` times each model once per discrete gradient estimator, one step of
each in turn (so machine-load drift hits them alike), and reports wall and CPU time, and CPU
time relative to the first: what an estimator costs at model scale, where the toy benchmark
(``perception.bench estimators``) only sees its fixed per-step overhead.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from perception.cli import run_cli


def time_model(
    name: str,
    batch_size: int,
    repeats: int,
    device: torch.device,
    dataset: str | None = None,
    estimators: tuple[str | None, ...] = (None,),
) -> list[dict]:
    """One row per estimator (None: the model's default)."""
    from perception.data import make_dataset
    from perception.models import build_model, model_class
    from perception.train.optim import make_optimizer

    dataset = dataset or model_class(name).default_dataset
    scenes = make_dataset(dataset, split="train", size=batch_size, seed=0)
    batch = {"image": torch.from_numpy(scenes.float_images()).to(device)}
    variants = []
    for estimator in estimators:
        torch.manual_seed(0)
        options = {} if estimator is None else {"estimator": estimator}
        model = build_model(name, options, scenes.image_shape).to(device).train()
        variants.append((estimator, model, make_optimizer(model, 1e-4)))

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, i: int) -> None:
        result = model.loss(batch, i)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(3):
        for _, model, optimizer in variants:
            step(model, optimizer, i)
    wall: list[list[float]] = [[] for _ in variants]
    cpu: list[list[float]] = [[] for _ in variants]
    for i in range(repeats):
        for k, (_, model, optimizer) in enumerate(variants):
            t0, c0 = time.perf_counter(), time.process_time()
            step(model, optimizer, i)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    rows = []
    for k, (estimator, model, _) in enumerate(variants):
        ms, cpu_ms = statistics.median(wall[k]) * 1000, statistics.median(cpu[k]) * 1000
        rows.append({
            "model": name,
            "estimator": estimator or getattr(model.config, "estimator", None),
            "dataset": dataset,
            "batch_size": batch_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "step_ms_median": round(ms, 2),
            "step_cpu_ms_median": round(cpu_ms, 2),
            "images_per_s": round(batch_size / (ms / 1000), 1),
        })
    for row in rows:
        row["cpu_vs_first"] = round(row["step_cpu_ms_median"] / rows[0]["step_cpu_ms_median"], 2)
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m perception.bench pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vae", help="comma-separated registered model names, or 'all'")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--estimators", default=None, help="comma-separated estimator names to time each model with (default: its own)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench_results/pretrain")
    args = p.parse_args(argv)

    import dataclasses

    from perception.errors import InputError
    from perception.estimators import ESTIMATORS
    from perception.models import MODELS, model_class
    from perception.train.loop import resolve_device

    torch.set_num_threads(args.threads)
    names = MODELS.names() if args.models == "all" else args.models.split(",")
    estimators = tuple(args.estimators.split(",")) if args.estimators else (None,)
    for estimator in estimators:
        if estimator is not None:
            ESTIMATORS.get(estimator)
    for name in names:  # every name and option checked before anything is timed
        fields = {f.name for f in dataclasses.fields(model_class(name).Config)}
        if args.estimators and "estimator" not in fields:
            raise InputError(f"model '{name}' has no discrete latent, so --estimators does not apply to it")
    device = resolve_device(args.device)
    rows = [row for name in names for row in time_model(name, args.batch_size, args.repeats, device, estimators=estimators)]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {device}",
        "torch": torch.__version__,
        "results": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':<10} {'estimator':<10} {'dataset':<20} {'batch':>5} {'params':>9} {'ms/step':>8} {'cpu ms':>8} {'x first':>7} {'img/s':>8}")
    for r in rows:
        print(
            f"{r['model']:<10} {str(r['estimator']):<10} {r['dataset']:<20} {r['batch_size']:>5} {r['parameters']:>9} "
            f"{r['step_ms_median']:>8} {r['step_cpu_ms_median']:>8} {r['cpu_vs_first']:>7} {r['images_per_s']:>8}"
        )
    print(f"wrote {out / 'pretrain.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
