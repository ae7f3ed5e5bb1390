"""Does an ONNX file compute what the torch encoder computes? onnxruntime vs PyTorch, output by output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export.runtime import make_session
from export.metadata import INPUT_NAME
from perception.contract import Encoder
from perception.errors import PerceptionError

# 1 catches a batch size baked in by the tracer, 3 an odd one, 64 a training-sized batch.
VERIFY_BATCH_SIZES = (1, 3, 64)
TOLERANCE = 1e-4
SEED = 0


def example_images(n: int, image_shape: tuple[int, ...]) -> torch.Tensor:
    """Seeded uniform images in [0, 1]; from 3 images on, the last one is blank (an empty scene)."""
    g = torch.Generator().manual_seed(SEED + n)
    images = torch.rand(n, *image_shape, generator=g)
    if n >= 3:
        images[-1] = 0.0
    return images


def max_abs_diff(expected: np.ndarray, got: np.ndarray) -> float:
    """Max |got - expected|; inf when either holds NaN or inf (that never counts as a match)."""
    if not (np.isfinite(expected).all() and np.isfinite(got).all()):
        return float("inf")
    return float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max(initial=0.0))


def verify_onnx(
    path: str | Path, encoder: Encoder, batch_sizes: tuple[int, ...] = VERIFY_BATCH_SIZES, tolerance: float = TOLERANCE
) -> dict[str, float]:
    """Per output, the max |onnxruntime - torch| over ``batch_sizes``; raises when one exceeds ``tolerance``."""
    session = make_session(path, device="cpu")
    onnx_names = [o.name for o in session.get_outputs()]
    worst: dict[str, float] = {}
    for n in batch_sizes:
        images = example_images(n, encoder.image_shape)
        with torch.inference_mode():
            expected = {k: v.numpy() for k, v in encoder(images).as_dict().items()}
        if onnx_names != list(expected):
            raise PerceptionError(f"ONNX outputs {onnx_names} differ from the encoder's {list(expected)}")
        try:
            got = session.run(None, {INPUT_NAME: images.numpy()})
        except Exception as exc:  # onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0]
            raise PerceptionError(f"onnxruntime fails on the export of '{encoder.name}' at batch size {n}: {first}") from exc
        for name, value in zip(onnx_names, got):
            if value.shape != expected[name].shape:
                raise PerceptionError(
                    f"export of '{encoder.name}': output '{name}' has shape {list(value.shape)} in onnxruntime, "
                    f"{list(expected[name].shape)} in torch (batch size {n})"
                )
            diff = max_abs_diff(expected[name], value)
            if diff == float("inf"):
                raise PerceptionError(
                    f"export of '{encoder.name}': output '{name}' holds NaN or inf at batch size {n}; nothing written"
                )
            if not diff <= tolerance:
                raise PerceptionError(
                    f"export of '{encoder.name}' does not match torch: output '{name}' differs by {diff:.3g} "
                    f"at batch size {n} (tolerance {tolerance:g}); nothing written"
                )
            worst[name] = max(worst.get(name, 0.0), diff)
    return worst
