"""Shared trainer: one loop for every model, with atomic checkpoints and exact resume."""

from perception.train.config import TrainConfig
from perception.train.loop import train

__all__ = ["TrainConfig", "train"]
