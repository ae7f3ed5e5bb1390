"""ONNX export of perception encoders, and an onnxruntime encoder with the same contract.

* ``export_onnx(encoder_or_path, out_path)`` / ``python -m export NAME_OR_PATH --out FILE.onnx``:
  write one self-contained ONNX file, verified against PyTorch before it is written;
* ``OnnxEncoder(path_or_name)``: run it with onnxruntime (CUDA when it really works, else CPU);
* ``python -m export.bundle``: (re)export every bundled checkpoint to ``perception/pretrained``;
* ``python -m export.bench``: torch eager vs onnxruntime latency and parity.

Names are imported lazily: RL workers that only run ONNX files never import torch through here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from export.onnx_export import ExportResult, export_onnx
    from export.runtime import OnnxEncoder

_LAZY = {
    "export_onnx": "export.onnx_export",
    "ExportResult": "export.onnx_export",
    "OnnxEncoder": "export.runtime",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
