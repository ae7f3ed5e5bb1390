"""Multi-MNIST Gymnasium environments and the ObjectSlots observation wrappers.

``import envs`` registers ``MultiMNIST-Count-v0``, ``MultiMNIST-Collect-v0`` and
``MultiMNIST-OddOneOut-v0``. Every environment takes ``obs_mode="pixels"|"oracle"``,
``digit_split="train"|"test"`` (training or held-out digit pool) and ``data_dir``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from envs.base import ORACLE_LAYOUT, MultiMNISTEnv
from envs.collect import CollectEnv
from envs.count import CountEnv
from envs.object_slots import SLOT_BOUND, ObjectSlots, VectorObjectSlots
from envs.odd_one_out import OddOneOutEnv

ENV_IDS = ("MultiMNIST-Count-v0", "MultiMNIST-Collect-v0", "MultiMNIST-OddOneOut-v0")
_ENTRY_POINTS = dict(zip(ENV_IDS, ("envs.count:CountEnv", "envs.collect:CollectEnv", "envs.odd_one_out:OddOneOutEnv")))

for _id, _entry in _ENTRY_POINTS.items():
    if _id not in gym.registry:
        gym.register(_id, entry_point=_entry)


def make_vector_env(
    env_id: str,
    num_envs: int,
    encoder: Any = None,
    backend: Any = "onnx",
    representation: str | list[str] = "slots",
    max_objects: Any = None,
    **env_kwargs: Any,
) -> gym.vector.VectorEnv:
    """A synchronous vector env; with an ``encoder``, wrapped in :class:`VectorObjectSlots`
    so that all ``num_envs`` images are encoded in one call per step."""
    vec = gym.make_vec(
        env_id,
        num_envs=num_envs,
        vectorization_mode="sync",
        vector_kwargs={"copy": encoder is None},  # the wrapper consumes the buffer at once
        disable_env_checker=True,
        **env_kwargs,
    )
    if encoder is None:
        return vec
    return VectorObjectSlots(
        vec, encoder=encoder, backend=backend, representation=representation, max_objects=max_objects
    )


__all__ = [
    "ENV_IDS",
    "ORACLE_LAYOUT",
    "SLOT_BOUND",
    "CollectEnv",
    "CountEnv",
    "MultiMNISTEnv",
    "ObjectSlots",
    "OddOneOutEnv",
    "VectorObjectSlots",
    "make_vector_env",
]
