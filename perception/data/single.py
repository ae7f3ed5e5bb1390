"""Single-object sets: one 28x28 digit (or Fashion-MNIST item) per image, as Scenes.

These let the object-level parts of a model (what/where encoders, prototype classifiers) be
checked in isolation. Ground truth: box = bounding box of the nonzero pixels, centre = box
centre, label = class, segmentation = pixels brighter than 0.1 of full scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from perception.config import CheckedConfig
from perception.data.digits import DigitPool, resize_images
from perception.data.types import Scenes
from perception.errors import PerceptionError

SEGMENT_THRESHOLD = 25  # uint8 intensity > 25.5, i.e. > 0.1 of full scale


@dataclass(frozen=True)
class SingleConfig(CheckedConfig):
    classes: tuple[int, ...] = ()  # empty: every class
    # 0: the pool's own images. Else each is resized to render_size px and back to 28 px: a digit
    # as a scene draws it (canonical Multi-MNIST: 20 px) and an object model reads it back (DAIR's
    # 28x28 frames), so a single-digit model can train on what it will see inside scenes.
    render_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(not 0 <= c <= 9 for c in self.classes):
            raise PerceptionError(f"single-object set: classes must be in 0-9, got {list(self.classes)}")
        if not 0 <= self.render_size <= 28:
            raise PerceptionError(f"single-object set: render_size must be in 0-28, got {self.render_size}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 28, 28)

    def describe(self, pool: DigitPool) -> str:
        which = f"classes {', '.join(map(str, self.classes))} of " if self.classes else ""
        drawn = f" drawn at {self.render_size} px" if self.render_size else ""
        return f"28x28, one object per image{drawn}, {which}{pool.describe()}"


def generate_single(
    config: SingleConfig, pool: DigitPool, n: int | None, seed: int | Sequence[int]
) -> Scenes:
    """``n=None``: every eligible image of the pool in order; else ``n`` distinct ones."""
    eligible = np.arange(len(pool))
    if config.classes:
        eligible = eligible[np.isin(pool.labels, config.classes)]
    if n is not None:
        if n > eligible.size:
            raise PerceptionError(
                f"only {eligible.size} images available in {pool.describe()}, asked for {n}"
            )
        eligible = np.sort(np.random.default_rng(seed).choice(eligible, n, replace=False))
    images = pool.images[eligible]
    if config.render_size:
        images = resize_images(pool.resized(config.render_size)[eligible], images.shape[-1])
    lit = images > 0
    cols, rows = lit.any(1), lit.any(2)
    has = cols.any(1)
    w = images.shape[-1]
    boxes = np.stack(
        [cols.argmax(1), rows.argmax(1), w - cols[:, ::-1].argmax(1), w - rows[:, ::-1].argmax(1)], -1
    ).astype(np.float32) * has[:, None]
    return Scenes(
        images=images[:, None].copy(),
        counts=np.ones(eligible.size, np.int64),
        centres=(boxes[:, None, :2] + boxes[:, None, 2:]) / 2,
        boxes=boxes[:, None],
        labels=pool.labels[eligible][:, None].copy(),
        valid=np.ones((eligible.size, 1), bool),
        segmentation=(images > SEGMENT_THRESHOLD).astype(np.uint8),
        extra={"digit_index": pool.index[eligible][:, None].copy()},
    )
