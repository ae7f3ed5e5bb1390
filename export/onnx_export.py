"""Export an encoder's deterministic inference path to one self-contained, verified ONNX file.

The graph is ``Encoder.forward`` (= ``encode(images, deterministic=True)``) with a dynamic batch
dimension and the weights inside the file. It is traced with the dynamo exporter
(``torch.export``): unlike the legacy TorchScript tracer it refuses data-dependent Python control
flow instead of silently baking in the branch taken by the example input, and it decomposes
``affine_grid`` (spatial transformers), which the legacy exporter only supports from opset 20.

Nothing reaches ``out_path`` unless the ONNX checker passes and onnxruntime matches PyTorch at
several batch sizes: the file is written under a temporary name next to it, verified, then
renamed over the target.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import onnx
import torch
from torch import Tensor, nn

import perception
from export.metadata import INPUT_NAME, OnnxMetadata
from export.verify import TOLERANCE, VERIFY_BATCH_SIZES, example_images, verify_onnx
from perception.contract import Encoder
from perception.errors import OutputExistsError, PerceptionError

OPSET = 18  # the dynamo exporter's native opset; GridSample exists from 16
UNKNOWN_TRAINING_DATA = "unknown: encoder not loaded from a checkpoint"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    model: str
    output_shapes: dict[str, list[int]]  # at batch size 1, in the contract's order
    max_abs_diff: dict[str, float]  # |onnxruntime - torch| over every verified batch size
    batch_sizes: tuple[int, ...]

    def summary(self) -> str:
        outputs = ", ".join(f"{k} {v}" for k, v in self.output_shapes.items())
        worst = max(self.max_abs_diff.values())
        sizes = ", ".join(map(str, self.batch_sizes))
        return (
            f"wrote {self.path} ({self.model}: {outputs}); onnxruntime matches torch at batch sizes "
            f"{sizes} (max |diff| {worst:.2e})"
        )


class _Forward(nn.Module):
    """``Encoder.forward`` without the input checks (the runtime does them) and with a tuple
    output, which is what the exporters take."""

    def __init__(self, encoder: Encoder, names: list[str]) -> None:
        super().__init__()
        self.encoder = encoder
        self.names = names

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        out = self.encoder.encode(image, deterministic=True).as_dict()
        return tuple(out[name] for name in self.names)


def export_onnx(
    encoder_or_path: Encoder | str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    overwrite: bool = False,
    training_data: str | None = None,
    batch_sizes: tuple[int, ...] = VERIFY_BATCH_SIZES,
    tolerance: float = TOLERANCE,
) -> ExportResult:
    """Export and verify; ``encoder_or_path`` is an Encoder, a checkpoint file, a run directory
    or a bundled name. ``training_data`` defaults to the checkpoint's description."""
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    encoder = _inference_copy(encoder_or_path)
    meta = OnnxMetadata(
        model=encoder.name,
        version=perception.__version__,
        image_shape=tuple(encoder.image_shape),  # type: ignore[arg-type]
        num_slots=int(encoder.num_slots),
        slot_layout=list(encoder.slot_layout),
        training_data=training_data or getattr(encoder, "training_data", "") or UNKNOWN_TRAINING_DATA,
    )
    with torch.inference_mode():
        probe = encoder(example_images(1, meta.image_shape)).as_dict()
    proto = _trace(encoder, list(probe))
    for key, value in meta.to_props().items():
        proto.metadata_props.add(key=key, value=value)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"  # same directory: the rename is atomic
    try:
        onnx.save_model(proto, tmp)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise PerceptionError(f"the ONNX checker rejects the export of '{meta.model}': {_first_line(exc)}") from exc
        diffs = verify_onnx(tmp, encoder, batch_sizes, tolerance)
        if out.exists() and not overwrite:  # appeared while we were exporting
            raise OutputExistsError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    shapes = {k: [1, *v.shape[1:]] for k, v in probe.items()}
    return ExportResult(out, meta.model, shapes, diffs, tuple(batch_sizes))


def _inference_copy(encoder_or_path: Encoder | str | os.PathLike) -> Encoder:
    """A frozen CPU copy in eval mode, so exporting never changes the caller's model."""
    if isinstance(encoder_or_path, Encoder):
        encoder = copy.deepcopy(encoder_or_path).cpu().eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
        return encoder
    if isinstance(encoder_or_path, (str, os.PathLike)):
        return perception.load_encoder(encoder_or_path)
    raise PerceptionError(
        f"expected an Encoder, a checkpoint path or a bundled name, got {type(encoder_or_path).__name__}"
    )


def _trace(encoder: Encoder, names: list[str]) -> onnx.ModelProto:
    """torch.export, then ONNX. Calling torch.export ourselves (rather than through
    torch.onnx.export) matters: when it fails, torch.onnx.export falls back to other strategies
    that may silently fix the batch size to the example's."""
    example = example_images(2, encoder.image_shape)  # 2, not 1: sizes 0 and 1 are specialised
    try:
        with _quiet_exporter():
            program = torch.export.export(
                _Forward(encoder, names).eval(),
                (example,),
                dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
                strict=False,
            )
            if any(node.target in DECOMPOSITIONS for node in program.graph.nodes):
                program = program.run_decompositions(DECOMPOSITIONS)
    except Exception as exc:  # torch.export raises many types; the innermost says what went wrong
        cause = _root_cause(exc)
        if "specialized it to be a constant" in str(_innermost(exc)):
            cause = (
                "the code fixes the batch size while tracing (e.g. `len(x)` or `int(x.shape[0])` "
                "where `x.shape[0]` would stay symbolic)"
            )
        raise PerceptionError(f"torch.export cannot trace model '{encoder.name}': {cause}") from exc
    try:
        with _quiet_exporter():
            onnx_program = torch.onnx.export(
                program,
                (example,),
                input_names=[INPUT_NAME],
                output_names=names,
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:
        raise PerceptionError(f"cannot convert model '{encoder.name}' to ONNX: {_root_cause(exc)}") from exc
    assert onnx_program is not None
    proto = onnx_program.model_proto
    for value in [*proto.graph.input, *proto.graph.output]:  # name the dynamic dimension for other runtimes
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


def _inverse_2x2(a: Tensor) -> tuple[Tensor, Tensor]:
    """``aten.linalg_inv_ex`` in closed form: ONNX has no matrix inverse, spatial transformers
    invert 2x2 affine parts."""
    if a.shape[-2:] != (2, 2):
        raise PerceptionError(f"only 2x2 matrix inverses can be exported, got {list(a.shape[-2:])}")
    p, q, r, s = a[..., 0, 0], a[..., 0, 1], a[..., 1, 0], a[..., 1, 1]
    det = p * s - q * r
    inverse = torch.stack([torch.stack([s, -q], -1), torch.stack([-r, p], -1)], -2) / det[..., None, None]
    return inverse, torch.zeros(a.shape[:-2], dtype=torch.int32, device=a.device)


DECOMPOSITIONS = {torch.ops.aten.linalg_inv_ex.default: _inverse_2x2}


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter and its graph optimiser log progress and warnings (e.g. about torchvision)
    that users cannot act on."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _innermost(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _root_cause(exc: BaseException) -> str:
    inner = _innermost(exc)
    return f"{type(inner).__name__}: {_first_line(inner)}"


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
