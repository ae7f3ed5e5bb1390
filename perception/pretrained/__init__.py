"""Checkpoints shipped inside the package, each with a model card (``NAME.md``) and ONNX file."""

from __future__ import annotations

from pathlib import Path

PRETRAINED_DIR = Path(__file__).resolve().parent


def bundled_names() -> list[str]:
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt"))


def bundled_path(name: str, suffix: str = ".pt") -> Path | None:
    path = PRETRAINED_DIR / f"{name}{suffix}"
    return path if path.is_file() else None
