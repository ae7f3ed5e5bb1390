"""Tetris (the "Tetrominoes" set of IODINE's appendix), drawn procedurally.

35x35 RGB: a 7x7 grid of 5x5-pixel blocks, black background, non-overlapping tetrominoes in
six colours. Pieces of one scene get distinct colours, so two touching pieces never merge into
one blob and the segmentation can be recovered from the pixels.

Shape ids index the 19 fixed tetrominoes (the rotations of I, O, T, S, Z, J, L; S/Z and J/L
are each other's reflections). DeepMind's release says "17 unique shapes/orientations" without
saying which two it leaves out, so all 19 are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from perception.config import CheckedConfig
from perception.data.types import Scenes
from perception.errors import PerceptionError

BLOCK = 5
GRID = 7
COLOURS = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]], np.uint8
)  # red, green, blue, yellow, magenta, cyan
_PIECES = {  # (row, col) cells of one orientation of each piece
    "I": [(0, 0), (0, 1), (0, 2), (0, 3)],
    "O": [(0, 0), (0, 1), (1, 0), (1, 1)],
    "T": [(0, 0), (0, 1), (0, 2), (1, 1)],
    "S": [(0, 1), (0, 2), (1, 0), (1, 1)],
    "Z": [(0, 0), (0, 1), (1, 1), (1, 2)],
    "J": [(0, 0), (1, 0), (1, 1), (1, 2)],
    "L": [(0, 2), (1, 0), (1, 1), (1, 2)],
}
TRIES = 1000


def _orientations() -> np.ndarray:
    """int64 [19, 4, 2]: every distinct rotation of every piece, cells shifted to (0, 0)."""
    seen: list[tuple] = []
    for cells in _PIECES.values():
        a = np.array(cells)
        for _ in range(4):
            a = np.stack([a[:, 1], -a[:, 0]], 1)  # rotate 90 degrees
            key = tuple(sorted(map(tuple, (a - a.min(0)).tolist())))
            if key not in seen:
                seen.append(key)
    return np.array(seen, np.int64)


SHAPES = _orientations()


@dataclass(frozen=True)
class TetrisConfig(CheckedConfig):
    pieces: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.pieces <= len(COLOURS):  # one distinct colour per piece
            raise PerceptionError(f"tetris: pieces must be in [1, 6], got {self.pieces}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, GRID * BLOCK, GRID * BLOCK)

    def describe(self) -> str:
        return f"35x35 RGB, {self.pieces} non-overlapping tetrominoes (19 orientations, 6 colours) on black"


def generate_tetris(config: TetrisConfig, n: int, seed: int | Sequence[int]) -> Scenes:
    rng = np.random.default_rng(seed)
    k_max = config.pieces
    grid = np.zeros((n, GRID, GRID), np.uint8)  # 0 = empty, k + 1 = piece k
    shape = np.zeros((n, k_max), np.int64)
    origin = np.zeros((n, k_max, 2), np.int64)  # (row, col) of the piece's top-left cell
    scene = np.arange(n)
    for k in range(k_max):
        todo = scene
        for _ in range(TRIES):  # redraw shape and position together until the piece fits
            shape[todo, k] = rng.integers(0, len(SHAPES), todo.size)
            cells = SHAPES[shape[todo, k]]  # [m, 4, 2]
            room = GRID - cells.max(1)  # [m, 2] number of valid origins per axis
            origin[todo, k] = (rng.random((todo.size, 2)) * room).astype(np.int64)
            at = cells + origin[todo, k, None, :]
            clash = (grid[todo[:, None], at[..., 0], at[..., 1]] != 0).any(1)
            placed = todo[~clash]
            grid[placed[:, None], at[~clash, :, 0], at[~clash, :, 1]] = k + 1
            todo = todo[clash]
            if todo.size == 0:
                break
        else:
            raise PerceptionError(f"tetris: could not place {k_max} pieces on the {GRID}x{GRID} grid")
    colour = np.argsort(rng.random((n, len(COLOURS))), axis=1)[:, :k_max]

    palette = np.concatenate([np.zeros((n, 1, 3), np.uint8), COLOURS[colour]], axis=1)
    segmentation = grid.repeat(BLOCK, 1).repeat(BLOCK, 2)
    images = palette[np.arange(n)[:, None, None], grid].transpose(0, 3, 1, 2)  # per block, cheap
    images = images.repeat(BLOCK, 2).repeat(BLOCK, 3)
    lo = origin[..., ::-1]  # (col, row) = (x, y)
    hi = lo + SHAPES[shape].max(2)[..., ::-1] + 1
    boxes = (np.concatenate([lo, hi], -1) * BLOCK).astype(np.float32)
    return Scenes(
        images=np.ascontiguousarray(images),
        counts=np.full(n, k_max, np.int64),
        centres=(boxes[..., :2] + boxes[..., 2:]) / 2,
        boxes=boxes,
        labels=shape,
        valid=np.ones((n, k_max), bool),
        segmentation=segmentation,
        extra={"colour_id": colour.astype(np.int64)},
    )
