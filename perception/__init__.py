"""Unsupervised object-centric image encoders for reinforcement learning.

``perception.load_encoder(name_or_path)`` returns a ready, frozen torch encoder that follows
the contract in :mod:`perception.contract`.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def load_encoder(name_or_path: str | Path, device: str = "cpu"):
    """A bundled encoder by short name (``"air"``, ``"lavae"``...) or a checkpoint path: frozen, in eval mode."""
    from perception.train.checkpoint import load_encoder_checkpoint

    encoder = load_encoder_checkpoint(resolve_encoder_path(name_or_path))
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.to(device).eval()


def resolve_encoder_path(name_or_path: str | Path) -> Path:
    """A checkpoint file, a run directory (its ``encoder.pt``) or a bundled name -> file path."""
    from perception.errors import CheckpointError
    from perception.pretrained import bundled_names, bundled_path

    path = Path(name_or_path)
    if not path.exists():
        bundled = bundled_path(str(name_or_path))
        if bundled is None:
            names = ", ".join(bundled_names()) or "(none bundled)"
            raise CheckpointError(f"'{name_or_path}' is neither a checkpoint file nor a bundled encoder; bundled: {names}")
        path = bundled
    if path.is_dir():
        path = path / "encoder.pt"
    return path


__all__ = ["load_encoder", "resolve_encoder_path", "__version__"]
