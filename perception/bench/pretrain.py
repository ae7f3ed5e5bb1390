"""``python -m perception.bench pretrain``: training step time of registered models.

Times ``loss + backward + Adam step`` on one fixed batch of generated scenes (data generation
is timed separately by ``perception.bench data``), after warm-up, as the median of repeats.
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


def time_model(name: str, batch_size: int, repeats: int, device: torch.device, dataset: str | None = None) -> dict:
    from perception.data import make_dataset
    from perception.models import build_model, model_class
    from perception.train.optim import make_optimizer

    dataset = dataset or model_class(name).default_dataset
    scenes = make_dataset(dataset, split="train", size=batch_size, seed=0)
    model = build_model(name, {}, scenes.image_shape).to(device).train()
    optimizer = make_optimizer(model, 1e-4)
    batch = {"image": torch.from_numpy(scenes.float_images()).to(device)}

    def step(i: int) -> None:
        result = model.loss(batch, i)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(3):
        step(i)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1000
    return {
        "model": name,
        "dataset": dataset,
        "batch_size": batch_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_ms_median": round(ms, 2),
        "images_per_s": round(batch_size / (ms / 1000), 1),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m perception.bench pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vae", help="comma-separated registered model names, or 'all'")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench_results/pretrain")
    args = p.parse_args(argv)

    from perception.models import MODELS
    from perception.train.loop import resolve_device

    torch.set_num_threads(args.threads)
    names = MODELS.names() if args.models == "all" else args.models.split(",")
    for name in names:
        MODELS.get(name)
    device = resolve_device(args.device)
    rows = [time_model(name, args.batch_size, args.repeats, device) for name in names]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {device}",
        "torch": torch.__version__,
        "results": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':<10} {'dataset':<20} {'batch':>5} {'params':>9} {'ms/step':>8} {'img/s':>8}")
    for r in rows:
        print(f"{r['model']:<10} {r['dataset']:<20} {r['batch_size']:>5} {r['parameters']:>9} {r['step_ms_median']:>8} {r['images_per_s']:>8}")
    print(f"wrote {out / 'pretrain.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
