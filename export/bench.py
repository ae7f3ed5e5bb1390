"""``python -m export.bench [--out DIR]``: torch eager vs onnxruntime, per encoder, in one process.

Encoders: every bundled checkpoint, and every registered model without one, untrained at its
default config (labelled "untrained": speed depends on the architecture, hardly on the weights).
Both backends get the same float32 inputs and the same number of threads; the two are timed in
alternation (one torch call, one onnxruntime call, ...) so that load from other processes on a
shared machine hits both alike, and both wall and CPU time are recorded (CPU time is what load
from other processes hardly changes). Latency is the median over the repeats after a warm-up (fewer
repeats when an encoder exceeds the per-batch-size time budget); parity is the max
|onnxruntime - torch| over every output at both batch sizes. Writes ``DIR/export.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from perception.cli import run_cli

BATCH_SIZES = (1, 64)


def _untrained(name: str) -> Any:
    """A registered model at its default config, seeded so that every call builds the same weights."""
    import torch

    from perception.data import default_image_shape
    from perception.models import build_model, model_class

    torch.manual_seed(0)
    return build_model(name, {}, default_image_shape(model_class(name).default_dataset)).eval()


def _encoders() -> list[tuple[str, str, Any]]:
    """(name, weights, torch encoder or the PerceptionError that loading it raised): every bundled
    checkpoint, then every registered model without a loadable one, untrained at its default config."""
    from perception import load_encoder
    from perception.errors import PerceptionError
    from perception.models import MODELS
    from perception.pretrained import bundled_names

    encoders: list[tuple[str, str, Any]] = []
    for name in bundled_names():
        try:
            encoders.append((name, "bundled", load_encoder(name)))
        except PerceptionError as exc:  # e.g. a checkpoint older than its model's code
            encoders.append((name, "bundled", exc))
    covered = {encoder.name for _, _, encoder in encoders if not isinstance(encoder, Exception)}
    encoders += [(name, "untrained", _untrained(name)) for name in MODELS.names() if name not in covered]
    return encoders


def encoder_named(name: str) -> tuple[str, Any]:
    """(weights, torch encoder) for one name: its bundled checkpoint, else the untrained model."""
    from perception import load_encoder
    from perception.errors import PerceptionError
    from perception.models import MODELS
    from perception.pretrained import bundled_names

    if name in bundled_names():
        return "bundled", load_encoder(name)
    if name in MODELS.names():
        return "untrained", _untrained(name)
    raise PerceptionError(
        f"no bundled encoder or registered model named '{name}'; "
        f"known: {', '.join(sorted(set(bundled_names()) | set(MODELS.names())))}"
    )


def _alternating_timings(
    calls: list[Callable[[], Any]], warmup: int, repeats: int, budget_s: float
) -> list[tuple[list[float], list[float]]]:
    """Per callable, (wall seconds, CPU seconds) per call; stops early (after at least 3 rounds)
    once ``budget_s`` is spent. CPU time is ``time.process_time`` (every thread of this process,
    nothing of others), which load on a shared machine hardly moves; wall time is what a caller waits."""
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in calls]
    deadline = time.perf_counter() + budget_s
    for i in range(repeats):
        if i >= 3 and time.perf_counter() > deadline:
            break
        for call, (wall, cpu) in zip(calls, times):
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return times


def bench_encoder(encoder: Any, onnx_path: Path, threads: int, repeats: int, budget_s: float) -> dict[str, Any]:
    import torch

    from export.runtime import OnnxEncoder

    session = OnnxEncoder(onnx_path, device="cpu", threads=threads)
    result: dict[str, Any] = {"max_abs_diff": 0.0}
    for n in BATCH_SIZES:
        images = np.random.default_rng(n).random((n, *encoder.image_shape), dtype=np.float32)
        as_torch = torch.from_numpy(images)
        with torch.inference_mode():
            expected = {k: v.numpy() for k, v in encoder(as_torch).as_dict().items()}
            got = session(images)
            diff = max(float(np.abs(got[k] - expected[k]).max()) for k in expected)
            result["max_abs_diff"] = max(result["max_abs_diff"], diff)
            calls = [partial(encoder, as_torch), partial(session, images)]
            warmup, r = (5, repeats) if n == 1 else (1, max(10, repeats // 8))
            (wall_torch, cpu_torch), (wall_ort, cpu_ort) = _alternating_timings(calls, warmup, r, budget_s)
            t_torch, t_ort = statistics.median(wall_torch), statistics.median(wall_ort)
            c_torch, c_ort = statistics.median(cpu_torch), statistics.median(cpu_ort)
        result[f"batch_{n}"] = {
            "repeats": len(wall_torch),
            "torch_ms": t_torch * 1e3,
            "onnxruntime_ms": t_ort * 1e3,
            "speedup": t_torch / t_ort,
            "torch_cpu_ms": c_torch * 1e3,
            "onnxruntime_cpu_ms": c_ort * 1e3,
            "speedup_cpu": c_torch / c_ort,
            "torch_images_per_s": n / t_torch,
            "onnxruntime_images_per_s": n / t_ort,
        }
    return result


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| encoder | weights | torch ms (b=1) | ORT ms (b=1) | speed-up b=1 | speed-up b=1, CPU time "
        "| torch img/s (b=64) | ORT img/s (b=64) | speed-up b=64 | speed-up b=64, CPU time | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | {row['source']} | {row['error']} | | | | | | | | |")
            continue
        b1, b64 = row["batch_1"], row["batch_64"]
        lines.append(
            f"| {row['name']} | {row['source']} | {b1['torch_ms']:.2f} | {b1['onnxruntime_ms']:.2f} | "
            f"{b1['speedup']:.1f}x | {b1['speedup_cpu']:.1f}x | {b64['torch_images_per_s']:.0f} | "
            f"{b64['onnxruntime_images_per_s']:.0f} | {b64['speedup']:.1f}x | {b64['speedup_cpu']:.1f}x | "
            f"{row['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_results/export", help="directory for export.json")
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--repeats", type=int, default=200, help="timed calls at batch 1 (batch 64: repeats / 8, >= 10)")
    p.add_argument("--budget", type=float, default=60.0, help="seconds of timing per encoder and batch size, at most")
    p.add_argument("--models", nargs="*", metavar="NAME", help="only these encoders")
    args = p.parse_args(argv)

    import onnxruntime
    import torch

    from export.onnx_export import export_onnx
    from perception.errors import PerceptionError

    torch.set_num_threads(args.threads)
    load_at_start = list(os.getloadavg())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, source, encoder in _encoders():
            if args.models and name not in args.models:
                continue
            if isinstance(encoder, PerceptionError):
                rows.append({"name": name, "source": source, "error": "cannot load: " + str(encoder).splitlines()[0]})
                print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
                continue
            row: dict[str, Any] = {"name": name, "source": source, "model": encoder.name}
            try:
                # batch 64 is compared below, on the benchmark's own inputs
                path = export_onnx(encoder, Path(tmp) / f"{name}.onnx", batch_sizes=(1, 3)).path
            except PerceptionError as exc:
                row["error"] = "export failed: " + str(exc)
            else:
                row.update(bench_encoder(encoder, path, args.threads, args.repeats, args.budget))
            rows.append(row)
            print(markdown_table([row]).splitlines()[-1], flush=True)
    report = {
        "command": "python -m export.bench " + " ".join(argv),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "torch_threads": torch.get_num_threads(),
            "onnxruntime_threads": args.threads,
            "load_average_1_5_15_min_at_start": load_at_start,
            "load_average_1_5_15_min_at_end": list(os.getloadavg()),
        },
        "encoders": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(rows))
    print(f"wrote {out / 'export.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
