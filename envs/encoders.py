"""Frozen encoders behind one numpy call, for either backend.

``backend="torch"`` loads a bundled name or checkpoint with :func:`perception.load_encoder`;
``backend="onnx"`` opens a bundled name or ``.onnx`` file with :class:`export.OnnxEncoder`.
Both map float32 ``[N, C, H, W]`` images in [0, 1] to the contract's outputs as numpy arrays,
deterministically (posterior means, no sampling); ``check_range=False`` tells them the values are
known to be in [0, 1] (uint8 observations / 255), which spares the ONNX runtime its value check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from perception.errors import PerceptionError

BACKENDS = ("onnx", "torch")


class _Shared:
    """Frozen encoders are shared, never copied: Gymnasium deep-copies wrapper arguments when
    it records an env spec, and an onnxruntime session cannot be copied at all."""

    def __deepcopy__(self, memo):
        return self


class TorchBackend(_Shared):
    def __init__(self, encoder: Any) -> None:
        import torch

        from perception import load_encoder
        from perception.contract import Encoder

        if isinstance(encoder, (str, Path)):
            if str(encoder).endswith(".onnx"):
                raise PerceptionError(f"backend 'torch' cannot load the ONNX file {encoder}; use backend='onnx'")
            encoder = load_encoder(encoder)
        if not isinstance(encoder, Encoder):
            raise PerceptionError(f"expected an encoder name, checkpoint path or Encoder, got {type(encoder).__name__}")
        for p in encoder.parameters():
            p.requires_grad_(False)
        self.model = encoder.eval()
        self.image_shape = tuple(encoder.image_shape)
        self.num_slots = int(encoder.num_slots)
        self.slot_layout = list(encoder.slot_layout)
        self.has_class_probs = encoder.num_classes is not None
        self._torch = torch

    def __call__(self, images: np.ndarray, check_range: bool = True) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():  # encode() does not check values: nothing to skip
            out = self.model.encode(self._torch.from_numpy(images), deterministic=True)
        return {k: v.numpy() for k, v in out.as_dict().items() if k != "masks"}


class OnnxBackend(_Shared):
    def __init__(self, encoder: Any, device: str = "auto", threads: int | None = None) -> None:
        try:
            from export import OnnxEncoder
        except ImportError as exc:
            raise PerceptionError(f"backend 'onnx' needs the export package ({exc}); use backend='torch'") from None
        if isinstance(encoder, (str, Path)) and str(encoder).endswith(".pt"):
            raise PerceptionError(
                f"backend 'onnx' needs an .onnx file or bundled name, got the torch checkpoint {encoder}; "
                "export it with export.export_onnx or use backend='torch'"
            )
        if not isinstance(encoder, OnnxEncoder):
            encoder = OnnxEncoder(encoder, device=device, threads=threads)
        self.session = encoder
        self.image_shape = tuple(int(s) for s in self.session.image_shape)
        self.num_slots = int(self.session.num_slots)
        self.slot_layout = list(self.session.slot_layout)
        self.has_class_probs = "class_probs" in self.session.output_names

    def __call__(self, images: np.ndarray, check_range: bool = True) -> dict[str, np.ndarray]:
        return self.session(images, check_range)  # numpy already; masks, if any, are computed anyway


def make_backend(encoder: Any, backend: str = "onnx"):
    """An encoder backend; an already-built backend is passed through (shared between wrappers)."""
    if isinstance(encoder, (TorchBackend, OnnxBackend)):
        return encoder
    if backend == "torch":
        return TorchBackend(encoder)
    if backend == "onnx":
        return OnnxBackend(encoder)
    raise PerceptionError(f"unknown encoder backend '{backend}'; valid: {', '.join(BACKENDS)}")
