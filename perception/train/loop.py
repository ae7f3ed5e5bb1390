"""The one training loop every model shares.

A run directory holds ``config.json`` (the resolved :class:`TrainConfig`), ``checkpoint.pt``
(weights, optimiser, step and RNG states, rewritten atomically every ``checkpoint_every``
steps), ``encoder.pt`` (the final weights alone, what ``load_encoder`` and export read),
``metrics.json`` and ``tb/`` (TensorBoard). Resuming restores every RNG, so a run that was
killed and resumed ends with the same weights as one that never stopped.

The loop also runs inside Ray Train workers (``distributed.py``): gradients are averaged with
``torch.distributed.all_reduce`` after each backward, rank 0 alone writes files, and each rank
draws its own minibatches from its own sampler stream.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from perception.contract import Encoder
from perception.errors import CheckpointError, NonFiniteLossError, OutputExistsError, PerceptionError
from perception.train.checkpoint import atomic_save, encoder_state, read_checkpoint
from perception.train.config import TrainConfig, read_train_config
from perception.train.images import image_grid
from perception.train.optim import make_optimizer

log = logging.getLogger("perception.train")

EVAL_SEED = 1234  # every run is scored on the same held-out scenes, whatever its seed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise PerceptionError(f"unknown device '{name}'; valid: auto, cpu, cuda, cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PerceptionError(f"device '{name}' asked for, but this torch build sees no CUDA device")
    return torch.device(name)


def build_run_model(cfg: TrainConfig, image_shape: tuple[int, int, int]) -> Encoder:
    from perception.models import build_model, model_class

    options = dict(cfg.model_options)
    if cfg.estimator is not None:
        from perception.estimators import ESTIMATORS

        ESTIMATORS.get(cfg.estimator)  # unknown names list the valid ones
        fields = model_class(cfg.model).Config.__dataclass_fields__
        if "estimator" not in fields:
            raise PerceptionError(f"model '{cfg.model}' has no discrete latent, so --estimator does not apply")
        options["estimator"] = cfg.estimator
    return build_model(cfg.model, options, image_shape)


def load_data(cfg: TrainConfig, split: str, size: int, seed: int):
    from perception.data import make_dataset

    return make_dataset(cfg.dataset, split=split, size=size, seed=seed, data_dir=cfg.data_dir, **cfg.dataset_options)


def json_safe(obj: Any) -> Any:
    """Strict JSON: undefined metrics (NaN, e.g. slot similarity of a one-slot model) become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


def prepare_out_dir(cfg: TrainConfig, out: Path, resume: bool) -> TrainConfig:
    """Refuse to clobber an earlier run; on resume, check the saved config is compatible."""
    saved_config = out / "config.json"
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise OutputExistsError(
                f"output directory {out} is not empty; pass --resume to continue that run or choose another --out"
            )
        return cfg
    if not (out / "checkpoint.pt").is_file() or not saved_config.is_file():
        raise CheckpointError(f"--resume: no checkpoint.pt and config.json in {out}")
    saved = read_train_config(saved_config)
    diff = saved.mismatches(cfg)
    if diff:
        details = ", ".join(f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in diff)
        raise CheckpointError(f"--resume with a different configuration ({details})")
    return cfg


class _Sync:
    """Gradient averaging across Ray Train workers; a no-op in a single process."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def grads(self, params: list[torch.nn.Parameter]) -> None:
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.world_size

    def gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def train(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    on_step: Callable[[int], None] | None = None,
    out_checked: bool = False,
) -> dict[str, float]:
    """Train ``cfg.model`` on ``cfg.dataset``; returns the final held-out metrics (rank 0)."""
    out = Path(out)
    lead = rank == 0
    if lead and not out_checked:
        cfg = prepare_out_dir(cfg, out, resume)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed * 1000 + rank)
    sampler = np.random.default_rng([cfg.seed, rank])

    train_set = load_data(cfg, "train", cfg.train_size, cfg.seed)
    model = build_run_model(cfg, train_set.image_shape).to(device)
    optimizer = make_optimizer(model, cfg.lr)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sync = _Sync(world_size)
    local_batch = max(1, cfg.batch_size // world_size)
    step = 0

    if resume:
        state = read_checkpoint(out / "checkpoint.pt")
        model.load_state_dict(state["state_dict"])
        rates = [g["lr"] for g in optimizer.param_groups]  # the configuration's, not the checkpoint's:
        optimizer.load_state_dict(state["optimizer"])  # a forked run (bench segmentation) may change them
        for group, lr in zip(optimizer.param_groups, rates):
            group["lr"] = lr
        step = int(state["step"])
        torch.set_rng_state(state["torch_rng"][rank])
        if device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state(state["cuda_rng"][rank], device)
        sampler.bit_generator.state = state["sampler_rng"][rank]

    if lead:
        out.mkdir(parents=True, exist_ok=True)
        write_json(cfg.to_dict(), out / "config.json")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"), purge_step=step if resume else None)
        log.info("training %s on %s (%d scenes, %s) on %s", cfg.model, cfg.dataset, len(train_set), train_set.description, device)

    def save_checkpoint() -> None:
        rng = sync.gather(
            (
                torch.get_rng_state(),
                torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                sampler.bit_generator.state,
            )
        )
        if not lead:
            return
        state = encoder_state(model, train_set.description)
        state.update(
            optimizer=optimizer.state_dict(),
            step=step,
            torch_rng=[r[0] for r in rng],
            cuda_rng=[r[1] for r in rng] if device.type == "cuda" else None,
            sampler_rng=[r[2] for r in rng],
            train_config=cfg.to_dict(),
        )
        atomic_save(state, out / "checkpoint.pt")

    bar = None
    if lead and progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.model}", unit="step", dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), step
    vis_images = torch.from_numpy(train_set.float_images(slice(0, 8))).to(device)

    model.train()
    while step < cfg.steps:
        idx = sampler.integers(0, len(train_set), size=local_batch)
        batch = {"image": torch.from_numpy(train_set.float_images(idx)).to(device)}
        result = model.loss(batch, step)
        if not torch.isfinite(result.loss):
            where = f"; the last good checkpoint is kept at {out / 'checkpoint.pt'}" if (out / "checkpoint.pt").exists() else ""
            raise NonFiniteLossError(f"non-finite loss ({result.loss.item()}) at step {step}{where}")
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        sync.grads(params)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1

        if lead and (step % cfg.log_every == 0 or step == cfg.steps):
            now = time.perf_counter()
            rate = (step - step_last) / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            writer.add_scalar("train/loss", result.loss.item(), step)
            for k, v in result.metrics.items():
                writer.add_scalar(f"train/{k}", v, step)
            writer.add_scalar("train/steps_per_s", rate, step)
            if bar is not None:
                bar.set_postfix(loss=f"{result.loss.item():.2f}", img_s=f"{rate * cfg.batch_size:.0f}")
        if lead and cfg.image_every and step % cfg.image_every == 0:
            log_images(writer, model, vis_images, step)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint()
        if bar is not None:
            bar.update(1)
        if on_step is not None:
            on_step(step)

    if bar is not None:
        bar.close()
    if not lead:
        return {}
    model.eval()
    atomic_save(encoder_state(model, train_set.description), out / "encoder.pt")
    metrics = evaluate_run(cfg, model, device)
    metrics.update(steps=step)
    write_json(metrics, out / "metrics.json")
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
            writer.add_scalar(f"eval/{k}", v, step)
    writer.close()
    return metrics


def log_images(writer: Any, model: Encoder, images: torch.Tensor, step: int) -> None:
    """One grid per call: a row per visualisation the model offers (inputs, reconstructions...)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        rows = model.visualize(images)
    model.train(was_training)
    if rows:
        writer.add_image("decomposition", image_grid(list(rows.values())), step)


def evaluate_run(cfg: TrainConfig, model: Encoder, device: torch.device) -> dict[str, float]:
    """Held-out metrics for the final model: the contract metrics plus the negative ELBO."""
    from perception.metrics import evaluate_encoder

    scenes = load_data(cfg, "test", cfg.eval_size, EVAL_SEED)
    metrics = evaluate_encoder(model, scenes, device=str(device))
    metrics.update(mean_model_metrics(model, scenes, device))
    return metrics


def mean_model_metrics(model: Encoder, scenes, device: torch.device, batch_size: int = 250) -> dict[str, float]:
    """Average of the model's own loss metrics (e.g. neg_elbo) over a scene set."""
    totals: dict[str, float] = {}
    n = len(scenes)
    for start in range(0, n, batch_size):
        idx = slice(start, min(n, start + batch_size))
        images = torch.from_numpy(scenes.float_images(idx)).to(device)
        result = model.loss({"image": images}, step=10**9)
        for k, v in result.metrics.items():
            totals[k] = totals.get(k, 0.0) + v * images.shape[0]
    return {f"model_{k}" if k != "neg_elbo" else k: v / n for k, v in totals.items()}
