"""Common machinery of the Multi-MNIST environments: spaces, true state, oracle observations.

A subclass samples a scene in ``_new_scene`` (digit images, top-left corners, labels) and
implements ``step``; the base class renders, builds the oracle observation and the ``info``
dict, so the pixels, the oracle and ``info`` always describe the same state.

Oracle observations have the same structure as :class:`envs.ObjectSlots` output,
``Dict(slots=Box(K, D), mask=Box(K,))``, with one row per object and columns
``ORACLE_LAYOUT``: class one-hot (10), centre (x, y) in the contract's [-1, 1] units, and an
``agent`` flag (the agent sprite of Collect is an object too). Absent rows are all zero.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.scene import CANVAS, DIGIT_SIZE, NUM_CLASSES, digit_bank, render, to_unit
from perception.errors import PerceptionError

OBS_MODES = ("pixels", "oracle")
DIGIT_SPLITS = ("train", "test")
ORACLE_LAYOUT = [f"class_{c}" for c in range(NUM_CLASSES)] + ["x", "y", "agent"]


def oracle_space(num_rows: int) -> spaces.Dict:
    return spaces.Dict(
        {
            "slots": spaces.Box(-1.0, 1.0, (num_rows, len(ORACLE_LAYOUT)), np.float32),
            "mask": spaces.Box(0.0, 1.0, (num_rows,), np.float32),
        }
    )


class MultiMNISTEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    num_digits: int  # rows of true digit state (the maximum number of digits in a scene)
    has_agent = False

    def __init__(
        self,
        obs_mode: str = "pixels",
        digit_split: str = "train",
        data_dir: str | None = None,
        render_mode: str | None = None,
    ) -> None:
        if obs_mode not in OBS_MODES:
            raise PerceptionError(f"unknown obs_mode '{obs_mode}'; valid: {', '.join(OBS_MODES)}")
        if digit_split not in DIGIT_SPLITS:
            raise PerceptionError(f"unknown digit_split '{digit_split}'; valid: {', '.join(DIGIT_SPLITS)}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise PerceptionError(f"unknown render_mode '{render_mode}'; valid: rgb_array")
        self.obs_mode = obs_mode
        self.render_mode = render_mode
        self.bank = digit_bank(digit_split, None if data_dir is None else str(data_dir))
        rows = self.num_digits + int(self.has_agent)
        if obs_mode == "pixels":
            self.observation_space = spaces.Box(0, 255, (1, CANVAS, CANVAS), np.uint8)
        else:
            self.observation_space = oracle_space(rows)
        # scene state, set by _new_scene
        self.digits = np.zeros((self.num_digits, DIGIT_SIZE, DIGIT_SIZE), np.uint8)
        self.top_left = np.zeros((self.num_digits, 2), np.int64)
        self.labels = np.full(self.num_digits, -1, np.int64)
        self.present = np.zeros(self.num_digits, bool)
        self.agent_xy: np.ndarray | None = None

    # --- subclass hooks -------------------------------------------------------------------
    def _new_scene(self, options: dict[str, Any] | None) -> None:
        raise NotImplementedError

    def _sprite(self) -> tuple[int, int, int] | None:
        return None

    # --- shared -----------------------------------------------------------------------------
    def _place(self, indices: np.ndarray, top_left: np.ndarray) -> None:
        """Fill the first ``len(indices)`` digit rows; the rest are absent."""
        n = len(indices)
        self.digits[:] = 0
        self.digits[:n] = self.bank.images[indices]
        self.top_left[:] = 0
        self.top_left[:n] = top_left
        self.labels[:] = -1
        self.labels[:n] = self.bank.labels[indices]
        self.present[:] = False
        self.present[:n] = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self._new_scene(options)
        return self._observation(), self._info()

    def centres(self) -> np.ndarray:
        """float32 [num_digits, 2] digit centres in pixel units; 0 where absent."""
        return ((self.top_left + DIGIT_SIZE / 2.0) * self.present[:, None]).astype(np.float32)

    def image(self) -> np.ndarray:
        return render(self.digits, self.top_left, self.present, self._sprite())

    def _observation(self):
        if self.obs_mode == "pixels":
            return self.image()
        return self.oracle()

    def oracle(self) -> dict[str, np.ndarray]:
        rows = self.num_digits + int(self.has_agent)
        slots = np.zeros((rows, len(ORACLE_LAYOUT)), np.float32)
        mask = np.zeros(rows, np.float32)
        k = np.flatnonzero(self.present)
        slots[k, self.labels[k]] = 1.0
        slots[k, NUM_CLASSES : NUM_CLASSES + 2] = to_unit(self.centres()[k])
        mask[k] = 1.0
        sprite = self._sprite()
        if sprite is not None:
            x, y, size = sprite
            slots[-1, NUM_CLASSES : NUM_CLASSES + 2] = to_unit(np.array([x + size / 2, y + size / 2], np.float32))
            slots[-1, -1] = 1.0
            mask[-1] = 1.0
        return {"slots": slots, "mask": mask}

    def _info(self) -> dict[str, Any]:
        """The true object state (pixel units, see :mod:`perception.data.types`)."""
        info: dict[str, Any] = {
            "positions": self.centres(),
            "labels": np.where(self.present, self.labels, -1),
            "present": self.present.copy(),
        }
        sprite = self._sprite()
        if sprite is not None:
            x, y, size = sprite
            info["agent_position"] = np.array([x + size / 2, y + size / 2], np.float32)
        return info

    def render(self):
        if self.render_mode == "rgb_array":
            return np.repeat(self.image()[0][:, :, None], 3, axis=2)
        return None
