"""The ONNX side of the encoder contract: tensor names and the ``perception.*`` metadata.

Other runtimes (onnxruntime in C++, Node, C#...) rely on these names, so they are fixed here
once and read by both the exporter and :class:`export.OnnxEncoder`. No torch import: RL
workers that only run ONNX files load this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

from perception.errors import CheckpointError

INPUT_NAME = "image"
# The contract's outputs, in order; a model has only those it produces.
OUTPUT_NAMES: tuple[str, ...] = ("slots", "presence", "position", "class_probs", "masks")

KEY_MODEL = "perception.model"
KEY_VERSION = "perception.version"
KEY_IMAGE_SHAPE = "perception.image_shape"
KEY_NUM_SLOTS = "perception.num_slots"
KEY_SLOT_LAYOUT = "perception.slot_layout"
KEY_TRAINING_DATA = "perception.training_data"
REQUIRED_KEYS = (KEY_MODEL, KEY_VERSION, KEY_IMAGE_SHAPE, KEY_NUM_SLOTS, KEY_SLOT_LAYOUT, KEY_TRAINING_DATA)


@dataclass(frozen=True)
class OnnxMetadata:
    model: str
    version: str
    image_shape: tuple[int, int, int]
    num_slots: int
    slot_layout: list[str]
    training_data: str

    def to_props(self) -> dict[str, str]:
        """String key/value pairs for the ONNX file's ``metadata_props``."""
        return {
            KEY_MODEL: self.model,
            KEY_VERSION: self.version,
            KEY_IMAGE_SHAPE: json.dumps(list(self.image_shape)),
            KEY_NUM_SLOTS: str(self.num_slots),
            KEY_SLOT_LAYOUT: json.dumps(list(self.slot_layout)),
            KEY_TRAINING_DATA: self.training_data,
        }

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str) -> "OnnxMetadata":
        missing = [k for k in REQUIRED_KEYS if k not in props]
        if missing:
            raise CheckpointError(
                f"{source} has no perception metadata ({', '.join(missing)} missing); "
                "export encoders with `python -m export`"
            )
        try:
            shape = tuple(int(s) for s in json.loads(props[KEY_IMAGE_SHAPE]))
            layout = [str(s) for s in json.loads(props[KEY_SLOT_LAYOUT])]
            num_slots = int(props[KEY_NUM_SLOTS])
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{source} has malformed perception metadata ({exc})") from None
        if len(shape) != 3:
            raise CheckpointError(f"{source}: {KEY_IMAGE_SHAPE} must be [C, H, W], got {list(shape)}")
        return cls(props[KEY_MODEL], props[KEY_VERSION], shape, num_slots, layout, props[KEY_TRAINING_DATA])
