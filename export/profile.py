"""``python -m export.profile NAME``: where torch eager and onnxruntime spend one encoder call.

For a bundled encoder or a registered model (untrained at its default config when no checkpoint
is bundled): exports it to a temporary file, saves the graph onnxruntime actually runs
(``optimized_model_filepath``) and counts its node types (shows constant folding, fusions and
the NCHWc layout), then profiles both runtimes on the same input with ``torch.profiler`` and
onnxruntime's ``enable_profiling``. The profilers measure wall time, which load from other
processes inflates; each runtime's per-op shares are therefore scaled to its median CPU time
per call (``time.process_time``, calls alternated), which load hardly moves.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from perception.cli import run_cli

TOP = 12


def _torch_ops(encoder: Any, images: Any, runs: int) -> collections.Counter:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            encoder(images)
    return collections.Counter({e.key: e.self_cpu_time_total for e in prof.key_averages()})


def _onnxruntime_ops(path: Path, threads: int, images: np.ndarray, runs: int, tmp: Path) -> collections.Counter:
    import onnxruntime as ort

    from export.runtime import session_options

    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp / "ort")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"image": images})  # the first run (allocations) is left out below
    for _ in range(runs):
        session.run(None, {"image": images})
    events = json.loads(Path(session.end_profiling()).read_text())
    first_run = min(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    ops: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > first_run:
            ops[e["args"]["op_name"]] += e["dur"]
    return ops


def optimized_node_counts(path: Path, threads: int, tmp: Path) -> tuple[collections.Counter, collections.Counter]:
    """Node types in the file and in the graph onnxruntime runs after its optimisations."""
    import onnx
    import onnxruntime as ort

    from export.runtime import session_options

    options = session_options(threads)
    options.optimized_model_filepath = str(tmp / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def count(model: Any) -> collections.Counter:
        return collections.Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in model.graph.node)

    return count(onnx.load(str(path))), count(onnx.load(options.optimized_model_filepath))


def _table(title: str, ops: collections.Counter, cpu_ms: float) -> list[str]:
    total = sum(ops.values()) or 1
    lines = [f"{title}: {cpu_ms:.1f} CPU ms per call", "| op | CPU ms | share |", "|---|---|---|"]
    for op, t in ops.most_common(TOP):
        lines.append(f"| {op} | {cpu_ms * t / total:.1f} | {100 * t / total:.1f}% |")
    return lines


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m export.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="a bundled encoder or a registered model name (untrained)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    p.add_argument("--repeats", type=int, default=10, help="alternated calls timed for the CPU time per call")
    p.add_argument("--runs", type=int, default=3, help="calls profiled per runtime")
    args = p.parse_args(argv)

    import torch

    from export.bench import _alternating_timings, encoder_named
    from export.onnx_export import export_onnx
    from export.runtime import OnnxEncoder

    torch.set_num_threads(args.threads)
    source, encoder = encoder_named(args.name)
    images = np.random.default_rng(0).random((args.batch, *encoder.image_shape), dtype=np.float32)
    as_torch = torch.from_numpy(images)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = export_onnx(encoder, tmp / f"{args.name}.onnx", batch_sizes=(1, 3)).path
        in_file, optimized = optimized_node_counts(path, args.threads, tmp)
        session = OnnxEncoder(path, device="cpu", threads=args.threads)
        with torch.inference_mode():
            timed = _alternating_timings([lambda: encoder(as_torch), lambda: session(images)], 2, args.repeats, 1e9)
            cpu = {name: 1e3 * statistics.median(t[1]) for name, t in zip(("torch", "onnxruntime"), timed)}
        torch_ops = _torch_ops(encoder, as_torch, args.runs)
        ort_ops = _onnxruntime_ops(path, args.threads, images, args.runs, tmp)
    print(f"{args.name} ({source}), batch {args.batch}, {args.threads} thread(s); CPU ms per call: torch "
          f"{cpu['torch']:.1f}, onnxruntime {cpu['onnxruntime']:.1f}, ratio {cpu['torch'] / cpu['onnxruntime']:.2f}")
    print(f"nodes in the file: {sum(in_file.values())}; after onnxruntime's optimisations: {sum(optimized.values())}")
    print("  " + ", ".join(f"{k} {in_file.get(k, 0)}->{v}" for k, v in optimized.most_common()))
    folded = {k: n for k, n in in_file.items() if optimized.get(k, 0) < n}
    print("  fewer after optimisation: " + ", ".join(f"{k} {n}->{optimized.get(k, 0)}" for k, n in folded.items()))
    print("\n".join(_table("torch (self time per aten op)", torch_ops, cpu["torch"])))
    print("\n".join(_table("onnxruntime (kernel time per op)", ort_ops, cpu["onnxruntime"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
