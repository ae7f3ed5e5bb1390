"""``python -m perception.bench data``: scene generation throughput on one thread.

Generation runs once per dataset before training, but it must still be cheap next to a
training step (~10-50 ms per batch of 64), so this records scenes per second for each
registered dataset at a fixed size. The digit pool is loaded (and resized) in a warm-up call
first, so the timing is generation only. Both wall-clock and process CPU time are kept: on a
shared machine the wall clock mostly measures the neighbours, CPU time the generator.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from perception.data import DATASETS, dataset_description, make_dataset
from perception.errors import PerceptionError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m perception.bench data")
    parser.add_argument("--out", default="bench_results/data", help="output directory")
    parser.add_argument("--n", type=int, default=5000, help="scenes per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per dataset (best is kept)")
    parser.add_argument(
        "--data-dir", default=None, help="MNIST IDX directory (default: $PERCEPTION_DATA_DIR)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    rows = []
    for name in DATASETS.names():
        try:
            make_dataset(name, size=None if DATASETS.get(name).whole_split else 16, data_dir=args.data_dir)
        except PerceptionError as exc:  # e.g. Fashion-MNIST not installed
            print(f"{name:24s} skipped: {exc}")
            rows.append({"dataset": name, "skipped": str(exc)})
            continue
        size = None if DATASETS.get(name).whole_split else args.n
        wall, cpu = [], []
        for r in range(args.repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            scenes = make_dataset(name, size=size, seed=r, data_dir=args.data_dir)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        n = len(scenes)
        rows.append(
            {
                "dataset": name,
                "description": dataset_description(name, data_dir=args.data_dir),
                "n": n,
                "best_wall_s": min(wall),
                "best_cpu_s": min(cpu),
                "scenes_per_wall_s": n / min(wall),
                "scenes_per_cpu_s": n / min(cpu),
            }
        )
        print(f"{name:24s} n={n:6d}  {n / min(wall):9.0f} scenes/s wall  {n / min(cpu):9.0f} scenes/s CPU")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "data generation throughput, 1 torch thread, best of repeats",
        "command": " ".join(["python -m perception.bench data", *argv]),
        "data_dir": args.data_dir or os.environ.get("PERCEPTION_DATA_DIR"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "repeats": args.repeats,
        "results": rows,
    }
    (out / "data.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'data.json'}")
    return 0
