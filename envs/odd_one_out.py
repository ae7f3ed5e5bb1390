"""Odd-one-out: point at the digit whose class differs from the other two.

Three digits: two of one class, one of another, each in a different quadrant of the canvas
(a 2x2 grid of 32x32 cells; a 20x20 digit is placed uniformly inside its cell, so scenes stay
in the canonical non-overlapping family). The action is a quadrant, ``0 1 / 2 3`` row-major
(Discrete(4)); reward 1 if it holds the odd digit, else 0; one step per episode. No single
object reveals the answer: only comparing classes across objects does, and the answer must be
expressed through the odd object's position, which every slot carries.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from envs.base import MultiMNISTEnv
from envs.scene import CANVAS, DIGIT_SIZE, NUM_CLASSES

CELL = CANVAS // 2


class OddOneOutEnv(MultiMNISTEnv):
    num_digits = 3

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.action_space = spaces.Discrete(4)
        self.odd_quadrant = 0

    def _new_scene(self, options) -> None:
        rng = self.np_random
        common = int(rng.integers(NUM_CLASSES))
        odd = (common + int(rng.integers(1, NUM_CLASSES))) % NUM_CLASSES
        quadrants = rng.permutation(4)[:3]  # the first gets the odd digit
        corners = np.stack([quadrants % 2, quadrants // 2], axis=1) * CELL
        xy = corners + rng.integers(0, CELL - DIGIT_SIZE + 1, (3, 2))
        self._place(self.bank.sample(rng, np.array([odd, common, common])), xy)
        self.odd_quadrant = int(quadrants[0])

    def step(self, action):
        reward = float(int(action) == self.odd_quadrant)
        return self._observation(), reward, True, False, self._info()
