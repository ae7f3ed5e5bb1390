"""Multi-MNIST: several digits pasted on a blank canvas, with exact ground truth.

Placement is sequential rejection sampling, vectorised over the batch: digit ``k`` of every
scene is drawn uniformly at integer positions and redrawn, for the scenes where its box hits
an earlier box, until it fits; scenes that get stuck (possible when digits are crowded) start
over. Rendering scatters each digit slot of the whole batch with one flat-index write.

Segmentation: a pixel belongs to the object with the largest intensity there, among objects
whose intensity exceeds ``SEGMENT_THRESHOLD`` (0.1 * 255); ties go to the earlier object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from perception.config import CheckedConfig
from perception.data.digits import DigitPool
from perception.data.types import Scenes
from perception.errors import PerceptionError

SEGMENT_THRESHOLD = 25  # uint8 intensity must be > 25.5, i.e. > 0.1 of full scale
BINARIZE_THRESHOLD = 128  # >= 128 means > 0.5 of full scale
TRIES_PER_SLOT = 100
MAX_RESTARTS = 100
CHUNK = 8192  # scenes rendered at once, bounds the uint16 scratch canvas


@dataclass(frozen=True)
class MultiMNISTConfig(CheckedConfig):
    canvas: int = 64
    digit_size: int = 20
    min_digits: int = 0
    max_digits: int = 3  # also the number of ground-truth object rows
    overlap: bool = False
    binarize: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.digit_size <= self.canvas:
            raise PerceptionError(
                f"multi-mnist: digit_size must be in [1, canvas={self.canvas}], got {self.digit_size}"
            )
        if not 0 <= self.min_digits <= self.max_digits or self.max_digits < 1:
            raise PerceptionError(
                f"multi-mnist: need 0 <= min_digits <= max_digits and max_digits >= 1, "
                f"got {self.min_digits}-{self.max_digits}"
            )
        fit = (self.canvas // self.digit_size) ** 2
        if not self.overlap and self.max_digits > fit:
            raise PerceptionError(
                f"multi-mnist: at most {fit} non-overlapping {self.digit_size}x{self.digit_size} digits "
                f"fit a {self.canvas}x{self.canvas} canvas, asked for {self.max_digits}; use overlap=True"
            )
        if self.max_digits > 254:
            raise PerceptionError("multi-mnist: max_digits must be <= 254 (uint8 segmentation ids)")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, self.canvas, self.canvas)

    def describe(self, pool: DigitPool) -> str:
        extras = "".join(
            [", overlapping" if self.overlap else "", ", binarised" if self.binarize else ""]
        )
        return (
            f"{self.canvas}x{self.canvas}, {self.min_digits}-{self.max_digits} digits of "
            f"{self.digit_size}x{self.digit_size}{extras}, {pool.describe()}"
        )


PRESETS = {
    "canonical": MultiMNISTConfig(),
    "thesis": MultiMNISTConfig(digit_size=28, min_digits=0, max_digits=2),
    "lavae": MultiMNISTConfig(digit_size=15, min_digits=0, max_digits=3, binarize=True),
}


def place_boxes(
    rng: np.random.Generator, counts: np.ndarray, slots: int, size: int, canvas: int, overlap: bool
) -> np.ndarray:
    """int64 [n, slots, 2] top-left (x, y) of size x size boxes inside the canvas; rows
    ``k >= counts`` are left at 0. Boxes of one scene do not overlap unless ``overlap``."""
    n = counts.shape[0]
    xy = np.zeros((n, slots, 2), np.int64)
    pending = np.arange(n)
    for _ in range(MAX_RESTARTS):
        pending = _place_rows(rng, xy, counts, pending, size, canvas - size + 1, overlap)
        if pending.size == 0:
            return xy
    raise PerceptionError(
        f"could not place {int(counts.max())} non-overlapping {size}x{size} boxes on a "
        f"{canvas}x{canvas} canvas; use fewer or smaller digits or overlap=True"
    )


def _place_rows(rng, xy, counts, rows, size, span, overlap) -> np.ndarray:
    """Place all slots of ``rows``; returns the rows that got stuck (to be redone)."""
    stuck = []
    for k in range(xy.shape[1]):
        todo = rows[counts[rows] > k]
        for _ in range(TRIES_PER_SLOT):
            if todo.size == 0:
                break
            xy[todo, k] = rng.integers(0, span, (todo.size, 2))
            if overlap or k == 0:
                todo = todo[:0]
                break
            gap = np.abs(xy[todo, :k] - xy[todo, k : k + 1])  # [m, k, 2]
            todo = todo[(gap < size).all(-1).any(-1)]
        if todo.size:
            stuck.append(todo)
            rows = np.setdiff1d(rows, todo, assume_unique=True)
    return np.concatenate(stuck) if stuck else rows[:0]


def generate_multi_mnist(
    config: MultiMNISTConfig, pool: DigitPool, n: int, seed: int | Sequence[int]
) -> Scenes:
    rng = np.random.default_rng(seed)
    c, s, k_max = config.canvas, config.digit_size, config.max_digits
    counts = rng.integers(config.min_digits, config.max_digits + 1, n)
    valid = np.arange(k_max)[None, :] < counts[:, None]
    choice = rng.integers(0, len(pool), (n, k_max))
    xy = place_boxes(rng, counts, k_max, s, c, config.overlap)

    images = np.empty((n, 1, c, c), np.uint8)
    segmentation = np.empty((n, c, c), np.uint8)
    digits = pool.resized(s).reshape(len(pool), s * s)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        _render(images[lo:hi, 0], segmentation[lo:hi], digits, choice[lo:hi], xy[lo:hi], valid[lo:hi], s)
    if config.binarize:
        images = np.where(images >= BINARIZE_THRESHOLD, np.uint8(255), np.uint8(0))
        segmentation[images[:, 0] == 0] = 0  # objects own only visible pixels

    xy_f = xy.astype(np.float32)
    boxes = np.concatenate([xy_f, xy_f + s], axis=-1) * valid[..., None]
    return Scenes(
        images=images,
        counts=counts.astype(np.int64),
        centres=(xy_f + s / 2) * valid[..., None],
        boxes=boxes.astype(np.float32),
        labels=np.where(valid, pool.labels[choice], -1),
        valid=valid,
        segmentation=segmentation,
        extra={"digit_index": np.where(valid, pool.index[choice], -1)},
    )


def _render(images, segmentation, digits, choice, xy, valid, s) -> None:
    m, c = images.shape[0], images.shape[-1]
    canvas = np.zeros(m * c * c, np.uint16)
    best = np.full(m * c * c, SEGMENT_THRESHOLD, np.uint8)
    seg = np.zeros(m * c * c, np.uint8)
    offsets = (np.arange(s)[:, None] * c + np.arange(s)[None, :]).ravel()
    for k in range(choice.shape[1]):
        rows = np.flatnonzero(valid[:, k])
        if rows.size == 0:
            continue
        base = rows * (c * c) + xy[rows, k, 1] * c + xy[rows, k, 0]
        idx = base[:, None] + offsets[None, :]  # no repeats within one slot
        pix = digits[choice[rows, k]]
        canvas[idx] += pix
        wins = pix > best[idx]
        owned = idx[wins]
        best[owned] = pix[wins]
        seg[owned] = k + 1
    np.minimum(canvas, 255, out=canvas)
    images[:] = canvas.reshape(m, c, c)
    segmentation[:] = seg.reshape(m, c, c)
