"""Shared by the diagnostics here: a finished bench run's model (eval mode) and its held-out scenes."""
from pathlib import Path

import torch

from perception.train.config import read_train_config
from perception.train.loop import EVAL_SEED, build_run_model, load_data


def load_run(run: Path, size: int, weights: str = "encoder.pt"):
    """``(model, scenes)``: the run's ``encoder.pt`` (or ``checkpoint.pt``) and the first ``size``
    of the bench's held-out scenes."""
    cfg = read_train_config(Path(run) / "config.json")
    state = torch.load(Path(run) / weights, map_location="cpu", weights_only=False)
    model = build_run_model(cfg, tuple(state["image_shape"]))
    model.load_state_dict(state["state_dict"])
    return model.eval(), load_data(cfg, "test", size, EVAL_SEED)
