"""Collect: steer a sprite onto the target digits (even classes by default), avoiding the rest.

Three digits at free, non-overlapping positions and a 4x4 full-intensity square (the agent),
placed where it touches no digit. Actions (Discrete(4)): up, down, left, right by 4 pixels,
clipped at the canvas edges. When the agent's square overlaps a digit's 20x20 box, the digit
is removed and gives +1 if its class is a target, -1 otherwise. Every scene holds at least one
target. The episode terminates when no target is left and is truncated after ``max_steps``.
The best return is the number of targets in the scene (1-3).
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from envs.base import MultiMNISTEnv
from envs.scene import CANVAS, DIGIT_SIZE, NUM_CLASSES
from perception.data.multimnist import place_boxes
from perception.errors import PerceptionError

AGENT_SIZE = 4
STEP = 4
MOVES = np.array([[0, -STEP], [0, STEP], [-STEP, 0], [STEP, 0]])  # up, down, left, right
EVEN = (0, 2, 4, 6, 8)


class CollectEnv(MultiMNISTEnv):
    num_digits = 3
    has_agent = True

    def __init__(self, targets: tuple[int, ...] = EVEN, max_steps: int = 50, **kwargs) -> None:
        targets = tuple(sorted({int(t) for t in targets}))
        if not targets or not all(0 <= t < NUM_CLASSES for t in targets) or len(targets) == NUM_CLASSES:
            raise PerceptionError(f"collect: targets must be a proper, non-empty subset of 0-9, got {targets}")
        if max_steps < 1:
            raise PerceptionError(f"collect: max_steps must be >= 1, got {max_steps}")
        self.targets = np.array(targets)
        self.max_steps = int(max_steps)
        super().__init__(**kwargs)
        self.action_space = spaces.Discrete(len(MOVES))
        self.agent_xy = np.zeros(2, np.int64)
        self.steps = 0

    def _sprite(self):
        return int(self.agent_xy[0]), int(self.agent_xy[1]), AGENT_SIZE

    def _touching(self) -> np.ndarray:
        gap = self.top_left - self.agent_xy[None, :]  # digit corner relative to the agent
        overlap = ((gap < AGENT_SIZE) & (gap > -DIGIT_SIZE)).all(axis=1)
        return overlap & self.present

    def _new_scene(self, options) -> None:
        rng = self.np_random
        n = self.num_digits
        classes = rng.integers(0, NUM_CLASSES, n)
        classes[0] = rng.choice(self.targets)
        classes = rng.permutation(classes)
        xy = place_boxes(rng, np.array([n]), n, DIGIT_SIZE, CANVAS, overlap=False)[0]
        self._place(self.bank.sample(rng, classes), xy)
        while True:  # three 20x20 boxes leave most of the canvas free
            self.agent_xy = rng.integers(0, CANVAS - AGENT_SIZE + 1, 2)
            if not self._touching().any():
                break
        self.steps = 0

    def _targets_left(self) -> int:
        return int((self.present & np.isin(self.labels, self.targets)).sum())

    def step(self, action):
        self.agent_xy = np.clip(self.agent_xy + MOVES[int(action)], 0, CANVAS - AGENT_SIZE)
        self.steps += 1
        hit = self._touching()
        good = int((hit & np.isin(self.labels, self.targets)).sum())
        reward = float(good - (int(hit.sum()) - good))
        self.present &= ~hit
        terminated = self._targets_left() == 0
        truncated = not terminated and self.steps >= self.max_steps
        return self._observation(), reward, terminated, truncated, self._info()
