"""The resolved configuration of one training run (saved as ``config.json`` beside it)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perception.config import CheckedConfig, config_from_dict
from perception.errors import PerceptionError


@dataclass
class TrainConfig(CheckedConfig):
    # Defaults: the bundled AIR's recipe (perception/pretrained/air.md), so that
    # `python -m perception.pretrain` alone reproduces the default encoder.
    model: str = "air"
    dataset: str = "multi-mnist"
    estimator: str | None = None  # None: the model's default
    steps: int = 10000
    batch_size: int = 32
    lr: float = 5e-4
    grad_clip: float | None = 10.0
    seed: int = 0
    device: str = "auto"
    train_size: int = 20000
    eval_size: int = 1000
    data_dir: str | None = None
    checkpoint_every: int = 500
    log_every: int = 50
    image_every: int = 1000
    num_workers: int = 1
    model_options: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Fields that may change when a run is resumed: extending it or moving it to other hardware.
    RESUMABLE_CHANGES = ("steps", "device", "checkpoint_every", "log_every", "image_every", "num_workers")

    def mismatches(self, other: "TrainConfig") -> list[str]:
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in self.RESUMABLE_CHANGES and a[k] != b[k]]


def read_train_config(path: str | Path) -> TrainConfig:
    """A run's saved ``config.json``; a damaged or hand-edited file is one error line naming it."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise PerceptionError(f"cannot read the run configuration {path}: {err}") from None
    if not isinstance(values, dict):
        raise PerceptionError(f"the run configuration {path} is not a JSON object")
    return config_from_dict(TrainConfig, values, str(path))
