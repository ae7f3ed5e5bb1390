"""Run an exported encoder with onnxruntime: the same contract as the torch encoders, no torch needed.

``OnnxEncoder(path_or_name)(images)`` maps float32 ``[N, C, H, W]`` numpy images in [0, 1] to a
dict of numpy arrays named as in the contract (``slots``, ``presence``, ``position``, and
``class_probs`` / ``masks`` when the model has them). ``encode(images)`` returns a
:class:`perception.contract.EncoderOutput` of torch tensors instead, so code written for a torch
encoder (``encoder.encode(x).as_dict()``) runs unchanged on an ONNX one.

Sessions are sized for small machines that also run environments: at most 4 intra-op threads, no
inter-op parallelism, threads that sleep instead of spinning when idle, and no memory kept
between calls.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.metadata import INPUT_NAME, OUTPUT_NAMES, OnnxMetadata
from perception.errors import CheckpointError, InputError, PerceptionError
from perception import pretrained

log = logging.getLogger(__name__)

MAX_THREADS = 4
_ORT_DEFAULT_LOG_SEVERITY = 2  # warnings: onnxruntime's own default
_CUDA_DRIVER = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"


def bundled_onnx_names() -> list[str]:
    return sorted(p.stem for p in pretrained.PRETRAINED_DIR.glob("*.onnx"))


def resolve_onnx_path(path_or_name: str | os.PathLike) -> Path:
    """An ``.onnx`` file, a run directory (its ``encoder.onnx``) or a bundled name -> file path."""
    path = Path(path_or_name)
    if path.is_dir():
        path = path / "encoder.onnx"
    if path.is_file():
        return path
    name = str(path_or_name)
    if path.suffix or os.sep in name or "/" in name:
        raise CheckpointError(f"ONNX file not found: {path}")
    bundled = pretrained.bundled_path(name, ".onnx")
    if bundled is not None:
        return bundled
    if pretrained.bundled_path(name, ".pt") is not None:
        raise CheckpointError(f"bundled encoder '{name}' has no ONNX file yet; run `python -m export.bundle`")
    names = ", ".join(bundled_onnx_names()) or "(none bundled)"
    raise CheckpointError(f"'{name}' is neither an .onnx file nor a bundled encoder; bundled ONNX encoders: {names}")


def _cuda_driver_present() -> bool:
    try:
        ctypes.CDLL(_CUDA_DRIVER)
    except OSError:
        return False
    return True


def _providers(device: str) -> list[Any]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto":
        usable = "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_driver_present()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"] if usable else ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise PerceptionError(f"unknown device '{device}'; valid: auto, cpu, cuda, cuda:N")
        return [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
    raise PerceptionError(f"unknown device '{device}'; valid: auto, cpu, cuda, cuda:N")


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or min(os.cpu_count() or 1, MAX_THREADS)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Give memory back after each call: with onnxruntime's arena and memory patterns a batch-16
    # IODINE call peaked at 1.6 GB (0.9 GB without) and the arena keeps the peak reserved per
    # process; the latency cost measured at batch 1 and 64 was within noise.
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.log_severity_level = 3  # errors only: provider-placement notes are not for users
    return options


def make_session(path: str | os.PathLike, device: str = "auto", threads: int | None = None) -> ort.InferenceSession:
    """An inference session on CUDA when onnxruntime really runs there, else on CPU.

    ``get_available_providers()`` lists CUDA for any onnxruntime-gpu install, even on machines
    without a GPU or CUDA libraries; what counts is ``get_providers()`` of the created session.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX file not found: {path}")
    providers = _providers(device)
    wants_cuda = providers[0] != "CPUExecutionProvider"
    if wants_cuda:  # a missing CUDA library is logged by onnxruntime's global logger, not the session's
        ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as exc:  # InvalidProtobuf, Fail, ...: onnxruntime has no common base class
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is corrupt or not an ONNX model ({first})") from None
    finally:
        if wants_cuda:
            ort.set_default_logger_severity(_ORT_DEFAULT_LOG_SEVERITY)
    if wants_cuda and "CUDAExecutionProvider" not in session.get_providers():
        if device != "auto":
            raise PerceptionError(
                f"device '{device}' requested but onnxruntime cannot use CUDA here (GPU, CUDA or cuDNN "
                "libraries missing); use device='cpu' or 'auto'"
            )
        log.info("onnxruntime cannot load its CUDA provider here; running %s on CPU", path.name)
    return session


class OnnxEncoder:
    """A frozen encoder backed by an onnxruntime session; see the module docstring."""

    def __init__(self, path_or_name: str | os.PathLike, device: str = "auto", threads: int | None = None) -> None:
        self.path = resolve_onnx_path(path_or_name)
        self._settings = (device, threads)
        self.session = make_session(self.path, device, threads)
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = OnnxMetadata.from_props(props, str(self.path))
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or outputs[:3] != list(OUTPUT_NAMES[:3]) or not set(outputs) <= set(OUTPUT_NAMES):
            raise CheckpointError(
                f"{self.path} does not follow the encoder contract: inputs {inputs}, outputs {outputs} "
                f"(expected input '{INPUT_NAME}' and outputs among {', '.join(OUTPUT_NAMES)})"
            )
        self._outputs = outputs
        shapes = {o.name: o.shape for o in self.session.get_outputs()}  # only the batch is dynamic
        self._num_classes = int(shapes["class_probs"][-1]) if "class_probs" in shapes else None

    # --- metadata -------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.metadata.model

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.metadata.image_shape

    @property
    def num_slots(self) -> int:
        return self.metadata.num_slots

    @property
    def slot_layout(self) -> list[str]:
        return list(self.metadata.slot_layout)

    @property
    def num_classes(self) -> int | None:
        """Width of ``class_probs``; None when the encoder has no classes."""
        return self._num_classes

    @property
    def training_data(self) -> str:
        return self.metadata.training_data

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    # --- inference ------------------------------------------------------------------------
    def __call__(self, images: Any, check_range: bool = True) -> dict[str, np.ndarray]:
        """float32 ``[N, C, H, W]`` in [0, 1] (numpy, or a torch tensor) -> dict of numpy arrays.

        ``check_range=False`` skips the value check (two passes over the batch) for callers that
        guarantee [0, 1], e.g. uint8 images divided by 255; dtype and shape are still checked."""
        batch = self._check(images, check_range)
        if batch.shape[0] == 0:
            raise InputError(f"expected {self._expected()}, got an empty batch")
        return dict(zip(self._outputs, self.session.run(None, {INPUT_NAME: batch})))

    def encode(self, images: Any, deterministic: bool = True):
        """The torch encoders' call: an ``EncoderOutput`` of torch tensors (on the input's device)."""
        import torch

        from perception.contract import EncoderOutput

        if not deterministic:
            raise PerceptionError("an ONNX encoder holds only the deterministic path; use the torch encoder to sample")
        device = images.device if isinstance(images, torch.Tensor) else torch.device("cpu")
        return EncoderOutput(**{k: torch.from_numpy(v).to(device) for k, v in self(images).items()})

    def _expected(self) -> str:
        c, h, w = self.image_shape
        return f"float32 [N, {c}, {h}, {w}] in [0, 1]"

    def _check(self, images: Any, check_range: bool = True) -> np.ndarray:
        if type(images).__module__.startswith("torch"):
            images = images.detach().cpu().numpy()
        if not isinstance(images, np.ndarray):
            raise InputError(f"expected a numpy array of {self._expected()}, got {type(images).__name__}")
        if images.dtype != np.float32:
            hint = " (divide uint8 images by 255)" if images.dtype == np.uint8 else " (cast with .astype(np.float32))"
            raise InputError(f"expected {self._expected()}, got dtype {images.dtype}{hint}")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise InputError(f"expected {self._expected()}, got shape {list(images.shape)}")
        if check_range and images.size:
            lo, hi = float(images.min()), float(images.max())
            if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
                raise InputError(f"expected {self._expected()}, got values in [{lo:.3g}, {hi:.3g}]")
        return np.ascontiguousarray(images)

    def __reduce__(self):
        """Pickles as (path, device, threads), e.g. into Ray workers: sessions cannot be pickled."""
        return (type(self), (self.path, *self._settings))

    def __repr__(self) -> str:
        return f"OnnxEncoder({str(self.path)!r}, model={self.model_name!r}, providers={self.providers})"
