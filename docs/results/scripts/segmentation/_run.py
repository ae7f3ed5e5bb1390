"""Shared by the diagnostics here: a finished bench run's model (eval mode) and its held-out scenes."""
import dataclasses
from pathlib import Path

import torch

from perception.train.config import read_train_config
from perception.train.loop import EVAL_SEED, build_run_model, load_data


def load_run(run: Path, size: int, weights: str = "encoder.pt", options: dict | None = None):
    """``(model, scenes)``: the run's ``encoder.pt`` (or ``checkpoint.pt``) and ``size`` held-out
    scenes from the bench's evaluation seed (the bench's own scenes when ``size`` is its
    ``--eval-size``: a procedural generator draws the set at once, so a smaller set need not be a
    prefix of a larger one); ``options`` change inference-only model options (as the bench's ``--eval-option``)."""
    cfg = read_train_config(Path(run) / "config.json")
    cfg = dataclasses.replace(cfg, model_options={**cfg.model_options, **(options or {})})
    state = torch.load(Path(run) / weights, map_location="cpu", weights_only=False)
    model = build_run_model(cfg, tuple(state["image_shape"]))
    model.load_state_dict(state["state_dict"])
    return model.eval(), load_data(cfg, "test", size, EVAL_SEED)
