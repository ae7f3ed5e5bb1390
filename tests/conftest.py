"""Shared fixtures: tests run on a bare machine (embedded digits) or with real MNIST when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

MNIST_DIR = Path(os.environ.get("PERCEPTION_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist")


@pytest.fixture
def mnist_dir() -> Path:
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found at {MNIST_DIR} (set PERCEPTION_DATA_DIR)")
    return MNIST_DIR


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Generated-data caches never leak between tests or into the user's home."""
    monkeypatch.setenv("PERCEPTION_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
