"""Count: say how many digits the scene holds (a one-step perception probe).

Each episode is one canonical Multi-MNIST scene with 0-3 digits at free, non-overlapping
positions; the action is the count (Discrete(4)); reward 1 if right, else 0, and the episode
terminates. The mean return is therefore the counting accuracy.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from envs.base import MultiMNISTEnv
from envs.scene import CANVAS, DIGIT_SIZE
from perception.data.multimnist import place_boxes


class CountEnv(MultiMNISTEnv):
    num_digits = 3

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.action_space = spaces.Discrete(self.num_digits + 1)

    def _new_scene(self, options) -> None:
        rng = self.np_random
        n = int(rng.integers(0, self.num_digits + 1))
        xy = place_boxes(rng, np.array([n]), self.num_digits, DIGIT_SIZE, CANVAS, overlap=False)[0]
        self._place(rng.integers(0, len(self.bank.labels), n), xy[:n])

    def step(self, action):
        reward = float(int(action) == int(self.present.sum()))
        return self._observation(), reward, True, False, self._info()
