"""Data-parallel pretraining with Ray Train (``--num-workers N``).

Each Ray Train worker runs the shared loop with its rank; gradients are averaged with
``torch.distributed`` (gloo on CPU, NCCL on GPUs) and rank 0 writes the run directory. Set
``RAY_ADDRESS`` to use an existing cluster; otherwise a local Ray instance is started.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from perception.config import config_from_dict
from perception.errors import PerceptionError
from perception.train.config import TrainConfig
from perception.train.loop import prepare_out_dir


def _worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch

    from perception.train.loop import train

    ctx = ray.train.get_context()
    cfg = config_from_dict(TrainConfig, config["cfg"], "training")
    torch.set_num_threads(max(1, config["threads"]))
    metrics = train(
        cfg, config["out"], resume=config["resume"], progress=False, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
        out_checked=True,
    )
    # report() is a collective in Ray Train: every rank calls it (only rank 0's metrics are kept),
    # or rank 0 waits for the others until Ray's barrier times out.
    ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def train_distributed(cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict[str, float]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(out).resolve()
    prepare_out_dir(cfg, out, resume)  # fail fast, before starting Ray
    use_gpu = cfg.device in ("auto", "cuda") and _cuda_available()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=max(cfg.num_workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=progress)
    threads = max(1, (os.cpu_count() or 1) // cfg.num_workers)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.to_dict(), "out": str(out), "resume": resume, "threads": threads},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(out / "ray"), name="train"),
    )
    result = trainer.fit()
    if result.error is not None:
        raise PerceptionError(f"distributed training failed: {result.error}")
    # Rank 0 wrote the final metrics beside the checkpoint; read them from there rather than
    # from Ray's result object, whose metrics depend on the Ray Train version.
    metrics_file = out / "metrics.json"
    if not metrics_file.is_file():
        raise PerceptionError(f"distributed training finished without writing {metrics_file}")
    return json.loads(metrics_file.read_text())


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
