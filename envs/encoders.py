"""Frozen encoders behind one numpy call, for either backend.

``backend="torch"`` loads a bundled name or checkpoint with :func:`perception.load_encoder`;
``backend="onnx"`` opens a bundled name or ``.onnx`` file with :class:`export.OnnxEncoder`.
Both map float32 ``[N, C, H, W]`` images in [0, 1] to the contract's outputs as numpy arrays,
deterministically (posterior means, no sampling); ``check_range=False`` tells them the values are
known to be in [0, 1] (uint8 observations / 255), which spares the ONNX runtime its value check.

``max_objects`` raises (or lowers) the number of slots K of models that offer the contract's
optional hook ``with_max_objects(k)`` (AIR, LAVAE): a scene can hold more objects than the model
was trained with (Collect's agent sprite is a fourth object). An ONNX graph's K is fixed when it
is exported, so there it must already match.

``representation="prototypes"`` (models with ``class_probs``) wraps a backend in
:class:`ClassOneHot`, whose ``slots`` are the one-hot of each slot's argmax class; every backend
:func:`make_backend` returns thus has its rows' features as ``slots``.

A list of encoders is one :class:`FusedBackend`: the first encoder's slots are the objects, and
each later encoder adds to every object the features (slot vector or class one-hot) of its own
slot at the same place. It lets one model supply what another lacks (LAVAE finds Collect's agent
sprite, which AIR ignores; DAIR's classes separate digits, which LAVAE's appearance code does not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from perception.errors import PerceptionError
from perception.metrics import PRESENCE_THRESHOLD

BACKENDS = ("onnx", "torch")
REPRESENTATIONS = ("slots", "prototypes")


class _Shared:
    """Frozen encoders are shared, never copied: Gymnasium deep-copies wrapper arguments when
    it records an env spec, and an onnxruntime session cannot be copied at all."""

    def __deepcopy__(self, memo):
        return self


class TorchBackend(_Shared):
    def __init__(self, encoder: Any, max_objects: int | None = None) -> None:
        import torch

        from perception import load_encoder
        from perception.contract import Encoder

        if isinstance(encoder, (str, Path)):
            if str(encoder).endswith(".onnx"):
                raise PerceptionError(f"backend 'torch' cannot load the ONNX file {encoder}; use backend='onnx'")
            encoder = load_encoder(encoder)
        if not isinstance(encoder, Encoder):
            raise PerceptionError(f"expected an encoder name, checkpoint path or Encoder, got {type(encoder).__name__}")
        if max_objects is not None and max_objects != encoder.num_slots:
            if not hasattr(encoder, "with_max_objects"):
                raise PerceptionError(
                    f"max_objects={max_objects}: model '{encoder.name}' has a fixed number of slots "
                    f"({encoder.num_slots}); only models with with_max_objects(k) (air, lavae) can change it"
                )
            encoder = encoder.with_max_objects(max_objects)
        for p in encoder.parameters():
            p.requires_grad_(False)
        self.model = encoder.eval()
        self.image_shape = tuple(encoder.image_shape)
        self.num_slots = int(encoder.num_slots)
        self.slot_layout = list(encoder.slot_layout)
        self.num_classes = encoder.num_classes
        self._torch = torch

    def __call__(self, images: np.ndarray, check_range: bool = True) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():  # encode() does not check values: nothing to skip
            out = self.model.encode(self._torch.from_numpy(images), deterministic=True)
        return {k: v.numpy() for k, v in out.as_dict().items() if k != "masks"}


class OnnxBackend(_Shared):
    def __init__(
        self, encoder: Any, device: str = "auto", threads: int | None = None, max_objects: int | None = None
    ) -> None:
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
        self.num_classes = self.session.num_classes
        _check_max_objects(self, max_objects)

    def __call__(self, images: np.ndarray, check_range: bool = True) -> dict[str, np.ndarray]:
        return self.session(images, check_range)  # numpy already; masks, if any, are computed anyway


def _check_max_objects(backend: TorchBackend | OnnxBackend, max_objects: int | None) -> None:
    if max_objects is not None and max_objects != backend.num_slots:
        hint = (
            "export a copy with that K (export.export_onnx(perception.load_encoder(NAME).with_max_objects(K), PATH)) "
            "or use backend='torch'"
            if isinstance(backend, OnnxBackend)
            else "build the backend with max_objects"
        )
        raise PerceptionError(f"max_objects={max_objects}, but this encoder has {backend.num_slots} slots; {hint}")


MATCH_RADIUS = 0.25  # contract units: 8 px on a 64 px canvas, well under the 20 px between digit centres


def nearest_present(points: np.ndarray, slot_xy: np.ndarray, presence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For points ``[N, Q, 2]``, the nearest slot of ``slot_xy`` ``[N, K, 2]`` whose presence
    ``[N, K]`` exceeds ``PRESENCE_THRESHOLD``: its index ``[N, Q]`` and distance ``[N, Q]`` (inf
    where no slot is present)."""
    dist = np.linalg.norm(points[:, :, None] - slot_xy[:, None], axis=-1)  # [N, Q, K]
    dist[np.broadcast_to(presence[:, None] <= PRESENCE_THRESHOLD, dist.shape)] = np.inf
    index = dist.argmin(-1)
    return index, np.take_along_axis(dist, index[..., None], -1)[..., 0]


class ClassOneHot(_Shared):
    """A prototype model's slots replaced by the one-hot of their argmax class: the only place
    ``representation="prototypes"`` is applied, for a lone encoder and a fused member alike."""

    def __init__(self, member: TorchBackend | OnnxBackend) -> None:
        self.member = member
        self.image_shape = member.image_shape
        self.num_slots = member.num_slots
        self.slot_layout = [f"class_{c}" for c in range(member.num_classes)]
        self.num_classes = None  # its outputs hold no class_probs
        self._one_hot = np.eye(member.num_classes, dtype=np.float32)

    def __call__(self, images: np.ndarray, check_range: bool = True) -> dict[str, np.ndarray]:
        out = self.member(images, check_range)
        return {
            "slots": self._one_hot[out["class_probs"].argmax(-1)],
            "presence": out["presence"],
            "position": out["position"],
        }


class FusedBackend(_Shared):
    """Several frozen encoders as one set of objects: the first encoder's slots are the rows
    (its presence and position are the objects'); every later encoder appends to each row the
    features of its nearest present slot within ``MATCH_RADIUS`` of the row's position and a
    flag saying whether there was one (else zeros and 0), so an object only the first encoder
    sees (Collect's agent: LAVAE finds it, AIR does not) is marked as such. A member's features
    are its ``slots``: its slot vector, or its class one-hot (:class:`ClassOneHot`), a smaller
    input than a whole slot vector when the class is what the first encoder lacks."""

    def __init__(self, members: list[Any]) -> None:
        shapes = {m.image_shape for m in members}
        if len(shapes) != 1:
            raise PerceptionError(f"fused encoders must take one image shape, got {sorted(shapes)}")
        self.members = members
        self.image_shape = members[0].image_shape
        self.num_slots = members[0].num_slots
        self.slot_layout = list(members[0].slot_layout)
        for i, m in enumerate(members[1:], 1):
            self.slot_layout += [f"{i}:{name}" for name in m.slot_layout] + [f"{i}:matched"]
        self.num_classes = None

    def __call__(self, images: np.ndarray, check_range: bool = True) -> dict[str, np.ndarray]:
        first, *others = (m(images, check_range) for m in self.members)
        parts = [first["slots"]]
        for out in others:
            nearest, dist = nearest_present(first["position"], out["position"], out["presence"])
            matched = (dist < MATCH_RADIUS)[..., None]  # [N, K, 1]
            parts += [np.take_along_axis(out["slots"], nearest[..., None], 1) * matched, matched]
        return {
            "slots": np.concatenate(parts, -1, dtype=np.float32),
            "presence": first["presence"],
            "position": first["position"],
        }


def _check_representation(backend: Any, representation: str) -> None:
    if representation not in REPRESENTATIONS:
        raise PerceptionError(f"unknown representation '{representation}'; valid: {', '.join(REPRESENTATIONS)}")
    if representation == "prototypes" and backend.num_classes is None:
        raise PerceptionError(
            "representation='prototypes' needs a prototype model (one that outputs class_probs); "
            "this encoder has none, use representation='slots'"
        )


def _per_member(value: Any, n: int) -> list[Any]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise PerceptionError(f"{n} fused encoders need {n} values per setting, got {len(values)}")
    return values


def make_backend(encoder: Any, backend: Any = "onnx", max_objects: Any = None, representation: Any = "slots"):
    """An encoder backend whose ``slots`` are the rows' features in ``representation``; an
    already-built backend is passed through (shared between wrappers), a :class:`ClassOneHot` or
    :class:`FusedBackend` as it is. A list or tuple of encoders gives their :class:`FusedBackend`
    (a list of one, that encoder's backend); ``backend``, ``max_objects`` and ``representation``
    are then one value for all or a sequence with one per encoder."""
    if isinstance(encoder, (list, tuple)):
        n = len(encoder)
        settings = zip(encoder, _per_member(backend, n), _per_member(max_objects, n), _per_member(representation, n))
        members = [make_backend(*m) for m in settings]
        return members[0] if n == 1 else FusedBackend(members)
    if isinstance(encoder, (ClassOneHot, FusedBackend)):
        return encoder
    if isinstance(encoder, (TorchBackend, OnnxBackend)):
        _check_max_objects(encoder, max_objects)
    elif backend == "torch":
        encoder = TorchBackend(encoder, max_objects)
    elif backend == "onnx":
        encoder = OnnxBackend(encoder, max_objects=max_objects)
    else:
        raise PerceptionError(f"unknown encoder backend '{backend}'; valid: {', '.join(BACKENDS)}")
    _check_representation(encoder, representation)
    return ClassOneHot(encoder) if representation == "prototypes" else encoder
