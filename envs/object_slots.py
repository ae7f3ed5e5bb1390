"""Observation wrappers that replace images by a frozen encoder's object slots.

Observation: ``Dict(slots=Box(-bound, bound, (K, D)), mask=Box(0, 1, (K,)))``, float32.

* ``representation="slots"``: each row is the encoder's slot vector followed by its position
  (x, y in [-1, 1]), so every model exposes where its objects are, whatever its slot layout;
  ``D = len(slot_layout) + 2``. Values are clipped to ``[-bound, bound]`` (``SLOT_BOUND = 10``:
  latent means of the bundled models are well inside it; the clip only keeps the Box finite).
* ``representation="prototypes"`` (prototype models, which output ``class_probs``): each row is
  the one-hot of the argmax class followed by the position, ``D = num_classes + 2`` — the
  same layout as the oracle's first columns.
* ``mask`` is 1 where the encoder's presence > 0.5, else 0 (the count rule used by the
  perception metrics); rows with mask 0 are kept (agents mask them) so the shape is fixed.

:class:`ObjectSlots` encodes one image per step; :class:`VectorObjectSlots` encodes all
sub-environments of a vector env in one batched encoder call per step. ``max_objects`` sets K
for models that can change it; a list of encoders is fused by position, with ``backend``,
``max_objects`` and ``representation`` then one value or one per encoder (each member's rows
hold its slot vector or its class one-hot; see :mod:`envs.encoders`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import batch_space

from envs.encoders import make_backend
from perception.metrics import PRESENCE_THRESHOLD
from perception.errors import InputError

SLOT_BOUND = 10.0


class SlotConverter:
    """uint8 (or float [0, 1]) image batches -> slot dicts, for one encoder and representation."""

    def __init__(
        self,
        image_space: gym.Space,
        encoder: Any,
        backend: Any,
        representation: str | list[str],
        bound: float = SLOT_BOUND,
        max_objects: Any = None,
    ) -> None:
        self.encoder = make_backend(encoder, backend, max_objects, representation)  # slots in the representation
        if not isinstance(image_space, spaces.Box) or tuple(image_space.shape) != self.encoder.image_shape:
            got = list(image_space.shape) if isinstance(image_space, spaces.Box) else type(image_space).__name__
            raise InputError(
                f"the encoder expects images of shape {list(self.encoder.image_shape)} (C, H, W), "
                f"the environment observes {got}"
            )
        self.from_uint8 = image_space.dtype == np.uint8  # then values are in [0, 1] by construction
        self.scale = np.float32(1.0 / 255.0 if self.from_uint8 else 1.0)
        self.bound = float(bound)
        self._batch = np.empty((0, *self.encoder.image_shape), np.float32)
        probe = self.encoder(self._float_batch(np.zeros((1, *self.encoder.image_shape), image_space.dtype)))
        k, d = probe["slots"].shape[1], probe["slots"].shape[-1] + 2
        self.space = spaces.Dict(
            {
                "slots": spaces.Box(-self.bound, self.bound, (k, d), np.float32),
                "mask": spaces.Box(0.0, 1.0, (k,), np.float32),
            }
        )

    def _float_batch(self, images: np.ndarray) -> np.ndarray:
        """The encoder's float32 input, written in one pass into a buffer reused from step to step
        (the encoder consumes it within the call; the outputs are fresh arrays)."""
        if self._batch.shape != images.shape:
            self._batch = np.empty(images.shape, np.float32)
        return np.multiply(images, self.scale, out=self._batch, dtype=np.float32)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self.encoder(self._float_batch(np.asarray(images)), check_range=not self.from_uint8)
        slots = np.concatenate([out["slots"], out["position"]], axis=-1, dtype=np.float32)
        np.minimum(slots, self.bound, out=slots)  # two ufunc calls: np.clip costs more per call
        np.maximum(slots, -self.bound, out=slots)
        return {"slots": slots, "mask": np.greater(out["presence"], PRESENCE_THRESHOLD).astype(np.float32)}


class ObjectSlots(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """One environment's image observation -> the frozen encoder's slots (see module doc).

    Records its constructor arguments so that ``env.spec.make()`` (and ``check_env``) can
    rebuild the wrapped environment."""

    def __init__(
        self,
        env: gym.Env,
        encoder: Any = "vae",
        backend: Any = "onnx",
        representation: str | list[str] = "slots",
        bound: float = SLOT_BOUND,
        max_objects: Any = None,
    ) -> None:
        gym.utils.RecordConstructorArgs.__init__(
            self, encoder=encoder, backend=backend, representation=representation, bound=bound, max_objects=max_objects
        )
        gym.ObservationWrapper.__init__(self, env)
        self.converter = SlotConverter(env.observation_space, encoder, backend, representation, bound, max_objects)
        self.observation_space = self.converter.space

    def observation(self, observation: np.ndarray) -> dict[str, np.ndarray]:
        out = self.converter(observation[None])
        return {k: v[0] for k, v in out.items()}


class VectorObjectSlots(gym.vector.VectorObservationWrapper):
    """All sub-environments' images -> slots with ONE batched encoder call per reset/step."""

    def __init__(
        self,
        env: gym.vector.VectorEnv,
        encoder: Any = "vae",
        backend: Any = "onnx",
        representation: str | list[str] = "slots",
        bound: float = SLOT_BOUND,
        max_objects: Any = None,
    ) -> None:
        super().__init__(env)
        self.converter = SlotConverter(
            env.single_observation_space, encoder, backend, representation, bound, max_objects
        )
        self.single_observation_space = self.converter.space
        self.observation_space = batch_space(self.converter.space, env.num_envs)

    def observations(self, observations: np.ndarray) -> dict[str, np.ndarray]:
        return self.converter(observations)
