"""The encoder contract shared by every model, the ONNX export and the RL side.

Conventions (the same in torch and ONNX):

* input ``image``: float32 ``[N, C, H, W]`` with values in ``[0, 1]``;
* ``slots`` ``[N, K, D]``: per-object features, columns named by ``Encoder.slot_layout``;
* ``presence`` ``[N, K]`` in ``[0, 1]``;
* ``position`` ``[N, K, 2]``: object centre (x, y), x to the right, y downward, -1 / +1 at
  the image *edges* (a pixel column ``i`` covers ``[i, i + 1)`` in pixel units ``u`` and
  ``u -> 2 u / W - 1``; see :func:`pixels_to_unit` and :func:`unit_to_pixels`);
* ``class_probs`` ``[N, K, C]``: prototype models only;
* ``masks`` ``[N, K, H, W]``: mixture models only.

``Encoder.encode(images, deterministic=True)`` uses posterior means and argmax, never samples,
so that the same image always gives the same representation.
"""

from __future__ import annotations

import abc
import dataclasses
import numbers
from dataclasses import dataclass
import types
import typing
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from perception.errors import InputError, PerceptionError

OUTPUT_NAMES: tuple[str, ...] = ("slots", "presence", "position", "class_probs", "masks")


@dataclass
class EncoderOutput:
    slots: Tensor
    presence: Tensor
    position: Tensor
    class_probs: Tensor | None = None
    masks: Tensor | None = None

    def as_dict(self) -> dict[str, Tensor]:
        """The present outputs, in the contract's order."""
        return {name: getattr(self, name) for name in OUTPUT_NAMES if getattr(self, name) is not None}


@dataclass
class ModelLoss:
    """What a model's training step returns.

    ``loss`` is the scalar the optimiser minimises (estimator surrogates included); it is not
    necessarily the negative ELBO, which models report in ``metrics['neg_elbo']`` (nats per image).
    """

    loss: Tensor
    metrics: dict[str, float]


def pixels_to_unit(u: Tensor, size: int) -> Tensor:
    return u * (2.0 / size) - 1.0


def unit_to_pixels(x: Tensor, size: int) -> Tensor:
    return (x + 1.0) * (size / 2.0)


def check_images(images: Any, image_shape: tuple[int, int, int]) -> Tensor:
    """Validate a batch against the contract; one clear error naming what was expected."""
    expected = f"float32 [N, {image_shape[0]}, {image_shape[1]}, {image_shape[2]}] in [0, 1]"
    if not isinstance(images, Tensor):
        raise InputError(f"expected a torch.Tensor of {expected}, got {type(images).__name__}")
    if images.dtype != torch.float32:
        raise InputError(f"expected {expected}, got dtype {images.dtype}")
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise InputError(f"expected {expected}, got shape {list(images.shape)}")
    if images.numel() and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
        lo, hi = float(images.min()), float(images.max())
        if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
            raise InputError(f"expected {expected}, got values in [{lo:.3g}, {hi:.3g}]")
    return images


def config_from_dict(config_cls: type, values: Mapping[str, Any] | None, what: str) -> Any:
    """Build a dataclass config, rejecting unknown keys and values of the wrong type.

    Values come from JSON (command lines, saved configs) or Python sweeps, so any integer
    (numpy's too) is accepted where a ``float`` is declared and a list where a tuple is; a
    float or a bool where an ``int`` is declared is refused (``num_slots=2.5`` must not
    silently become 2 somewhere later).
    """
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise PerceptionError(
            f"unknown {what} option(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(config_cls)
    for key, value in values.items():
        try:
            values[key] = _coerce(value, hints[key])
        except (TypeError, OverflowError):
            raise PerceptionError(
                f"{what} option {key} must be {_type_name(hints[key])}, got {value!r}"
            ) from None
    return config_cls(**values)


def _field_values(config: Any) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (the scalar, optional and tuple hints configs use), else TypeError."""
    if hint is Any:
        return value
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for arg in args:
            try:
                return _coerce(value, arg)
            except TypeError:
                pass
        raise TypeError(hint)
    if hint is type(None):
        if value is None:
            return None
        raise TypeError(hint)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple, np.ndarray)):
            raise TypeError(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(args) != len(value):
            raise TypeError(hint)
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if typing.get_origin(hint) is typing.Literal:
        if value in args:
            return value
        raise TypeError(hint)
    if hint is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise TypeError(hint)
    is_bool = isinstance(value, (bool, np.bool_))
    if hint is int:
        if isinstance(value, numbers.Integral) and not is_bool:
            return int(value)
        raise TypeError(hint)
    if hint is float:
        if isinstance(value, numbers.Real) and not is_bool:
            return float(value)
        raise TypeError(hint)
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise TypeError(hint)
    raise NotImplementedError(f"config fields of type {hint} are not supported by config_from_dict")


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list, each item {_type_name(args[0])}"
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(a) for a in args)
    return f"of type {hint}"


class Encoder(nn.Module, abc.ABC):
    """Base of every object-centric model.

    A subclass sets ``Config`` (a dataclass of its hyper-parameters) and implements
    :meth:`encode` (the contract) and :meth:`loss` (one training objective). Models know nothing
    about optimisers, loops or estimators' internals: a discrete latent is handed to the estimator
    object the model was built with.
    """

    Config: ClassVar[type]
    name: ClassVar[str] = ""
    # The dataset the model is meant for: tests and export build untrained models of every
    # registered name at this dataset's image shape.
    default_dataset: ClassVar[str] = "multi-mnist"

    def __init__(self, config: Any, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        # models built directly from their Config (not through build_model) get the same checks
        if dataclasses.is_dataclass(config):
            config = config_from_dict(type(config), _field_values(config), f"model '{self.name}'")
        self.config = config
        self.image_shape = tuple(int(s) for s in image_shape)

    # --- contract -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def num_slots(self) -> int: ...

    @property
    @abc.abstractmethod
    def slot_layout(self) -> list[str]:
        """One name per column of ``slots`` (e.g. ``["where_x", "where_y", "what_0", ...]``)."""

    @property
    def num_classes(self) -> int | None:
        """Number of prototype classes for prototype models, else None."""
        return None

    @property
    def has_masks(self) -> bool:
        return False

    @abc.abstractmethod
    def encode(self, images: Tensor, deterministic: bool = True) -> EncoderOutput: ...

    # --- training -------------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, batch: Mapping[str, Tensor], step: int) -> ModelLoss: ...

    def visualize(self, images: Tensor) -> dict[str, Tensor]:
        """Images for TensorBoard, each ``[N, C, H, W]`` in [0, 1] (e.g. reconstructions)."""
        return {}

    def forward(self, images: Tensor) -> EncoderOutput:
        return self.encode(check_images(images, self.image_shape), deterministic=True)
