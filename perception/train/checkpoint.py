"""Atomic checkpoint files and loading encoders from them.

A checkpoint is a dict saved with ``torch.save``: the model's registry name, its resolved
config, the image shape and training-data description (needed to rebuild and to export it),
the weights, and — for training checkpoints — optimiser state, step and RNG states so a
resumed run continues bit for bit. Writes go to a temporary file in the same directory and are
renamed over the target, so a run killed mid-write never leaves a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from perception.contract import Encoder
from perception.errors import CheckpointError, PerceptionError

FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encoder_state(model: Encoder, training_data: str) -> dict[str, Any]:
    """The part of a checkpoint needed to rebuild the encoder anywhere."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model.name,
        "model_config": dataclasses.asdict(model.config),
        "image_shape": list(model.image_shape),
        "training_data": training_data,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "state_dict" not in state:
        raise CheckpointError(f"{path} is not a perception checkpoint (no model name / weights)")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state.get('format_version')}, expected {FORMAT_VERSION}"
        )
    return state


def encoder_from_state(state: dict[str, Any], source: str = "checkpoint") -> Encoder:
    from perception.models import build_model

    try:
        model = build_model(state["model"], state["model_config"], tuple(state["image_shape"]))
    except PerceptionError as exc:
        raise CheckpointError(f"{source} does not match this version of the code: {exc}") from None
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{source} weights do not fit model '{state['model']}': {first}") from None
    model.training_data = state.get("training_data", "")
    return model.eval()


def load_encoder_checkpoint(path: str | Path) -> Encoder:
    return encoder_from_state(read_checkpoint(path), source=str(path))
