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
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

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
        # exactly the model's Config (a Config checks its own options, perception/config.py): a
        # subclass's config would build but be saved with options the model cannot load back
        if type(config) is not self.Config:
            raise PerceptionError(f"model '{self.name}' needs a {self.Config.__name__}, got {type(config).__name__}")
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
