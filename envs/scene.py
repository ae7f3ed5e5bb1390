"""Digit banks and single-scene rendering shared by the Multi-MNIST environments.

The environments draw the same scene family the encoders are trained on (64x64 canvas,
20x20 digits resized by :func:`perception.data.digits.resize_images`, summed and clipped to
255), but render one scene per step, so rendering is a few numpy slice-adds on a cached pool
of already-resized digits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from perception.data.digits import load_digit_pool

CANVAS = 64
DIGIT_SIZE = 20
NUM_CLASSES = 10


@dataclass(frozen=True, eq=False)
class DigitBank:
    """The digits of one split, already resized, indexed by class."""

    images: np.ndarray  # uint8 [N, DIGIT_SIZE, DIGIT_SIZE]
    labels: np.ndarray  # int64 [N]
    by_class: tuple[np.ndarray, ...]  # indices of each class 0-9
    description: str

    def sample(self, rng: np.random.Generator, classes: np.ndarray) -> np.ndarray:
        """One random digit index per requested class."""
        return np.array([rng.choice(self.by_class[int(c)]) for c in classes], np.int64)


@functools.lru_cache(maxsize=8)
def digit_bank(split: str = "train", data_dir: str | None = None) -> DigitBank:
    """Cached per process: every environment instance of a vector env shares one bank."""
    pool = load_digit_pool(data_dir=data_dir).split(split)
    labels = np.asarray(pool.labels, np.int64)
    by_class = tuple(np.flatnonzero(labels == c) for c in range(NUM_CLASSES))
    return DigitBank(pool.resized(DIGIT_SIZE), labels, by_class, pool.describe())


def render(
    digits: np.ndarray, top_left: np.ndarray, present: np.ndarray, sprite: tuple[int, int, int] | None = None
) -> np.ndarray:
    """uint8 [1, CANVAS, CANVAS]: present digits summed and clipped, then an optional
    ``(x, y, size)`` filled square drawn at full intensity on top."""
    canvas = np.zeros((CANVAS, CANVAS), np.uint16)
    s = digits.shape[-1]
    for k in np.flatnonzero(present):
        x, y = int(top_left[k, 0]), int(top_left[k, 1])
        canvas[y : y + s, x : x + s] += digits[k]
    np.minimum(canvas, 255, out=canvas)
    image = canvas.astype(np.uint8)
    if sprite is not None:
        x, y, size = sprite
        image[y : y + size, x : x + size] = 255
    return image[None]


def to_unit(centres: np.ndarray) -> np.ndarray:
    """Pixel-unit centres -> the contract's [-1, 1] positions (edges at +-1)."""
    return (centres * (2.0 / CANVAS) - 1.0).astype(np.float32)
