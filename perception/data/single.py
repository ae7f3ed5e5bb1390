"""Single-object sets: one 28x28 digit (or Fashion-MNIST item) per image, as Scenes.

These let the object-level parts of a model (what/where encoders, prototype classifiers) be
checked in isolation. Ground truth: box = bounding box of the nonzero pixels, centre = box
centre, label = class, segmentation = pixels brighter than 0.1 of full scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from perception.data.digits import DigitPool
from perception.data.types import Scenes
from perception.errors import PerceptionError

SEGMENT_THRESHOLD = 25  # uint8 intensity > 25.5, i.e. > 0.1 of full scale


@dataclass(frozen=True)
class SingleConfig:
    classes: tuple[int, ...] = ()  # empty: every class

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        if any(not 0 <= c <= 9 for c in self.classes):
            raise PerceptionError(f"single-object set: classes must be in 0-9, got {list(self.classes)}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 28, 28)

    def describe(self, pool: DigitPool) -> str:
        which = f"classes {', '.join(map(str, self.classes))} of " if self.classes else ""
        return f"28x28, one object per image, {which}{pool.describe()}"


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
