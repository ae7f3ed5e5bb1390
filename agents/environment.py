"""How an agent's observations are produced, and the env creator RLlib's env runners call.

``--encoder`` names the observation source: ``pixels`` (raw images, CNN agent), ``oracle``
(true object state, set agent), or an encoder (bundled name, checkpoint or ``.onnx`` file; set
agent on its slots).

Batched encoding inside RLlib: the creator is registered with ``ray.tune.register_env`` and
the algorithm is configured with ``gym_env_vectorize_mode="vector_entry_point"``. RLlib's
``SingleAgentEnvRunner`` then calls the creator once with ``num_envs`` in the env context, and
the creator returns a synchronous gymnasium vector env of ``num_envs`` sub-environments
wrapped in :class:`envs.VectorObjectSlots`: each runner step encodes all its sub-envs' images
in one encoder call. Called without ``num_envs`` (a single env), it returns the env wrapped
in :class:`envs.ObjectSlots`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym

import envs
from envs.encoders import BACKENDS
from perception.errors import PerceptionError

RLLIB_ENV_NAME = "perception-agents-env"
SOURCES_WITHOUT_ENCODER = ("pixels", "oracle")


@dataclass
class ObservationSource:
    env_id: str
    encoder: str  # pixels | oracle | encoder name / path
    backend: str = "auto"  # auto | onnx | torch
    representation: str = "slots"
    env_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.env_id not in envs.ENV_IDS:
            raise PerceptionError(f"unknown environment '{self.env_id}'; valid: {', '.join(envs.ENV_IDS)}")
        if self.backend not in ("auto", *BACKENDS):
            raise PerceptionError(f"unknown backend '{self.backend}'; valid: auto, {', '.join(BACKENDS)}")

    @property
    def obs_mode(self) -> str:
        return "oracle" if self.encoder == "oracle" else "pixels"

    @property
    def uses_encoder(self) -> bool:
        return self.encoder not in SOURCES_WITHOUT_ENCODER

    def resolved_backend(self) -> str:
        """``auto``: ONNX for an .onnx file or a bundled name shipped with one, else torch."""
        if self.backend != "auto":
            return self.backend
        if self.encoder.endswith(".onnx"):
            return "onnx"
        from perception.pretrained import bundled_path

        if not Path(self.encoder).exists() and bundled_path(self.encoder, ".onnx") is not None:
            return "onnx"
        return "torch"

    def as_config(self) -> dict[str, Any]:
        return {
            "env_id": self.env_id,
            "encoder": self.encoder,
            "backend": self.backend,
            "representation": self.representation,
            "env_kwargs": dict(self.env_kwargs),
        }


def make_env(source: ObservationSource, num_envs: int | None = None) -> gym.Env | gym.vector.VectorEnv:
    kwargs = {"obs_mode": source.obs_mode, **source.env_kwargs}
    encoder = source.encoder if source.uses_encoder else None
    if num_envs is None:
        env = gym.make(source.env_id, disable_env_checker=True, **kwargs)
        if encoder is None:
            return env
        return envs.ObjectSlots(env, encoder, source.resolved_backend(), source.representation)
    return envs.make_vector_env(
        source.env_id,
        num_envs,
        encoder=encoder,
        backend=source.resolved_backend(),
        representation=source.representation,
        **kwargs,
    )


def rllib_env_creator(env_context: dict[str, Any]):
    """Entry point registered with ``ray.tune.register_env`` (see the module docstring)."""
    config = dict(env_context)
    num_envs = config.pop("num_envs", None)
    return make_env(ObservationSource(**config), num_envs)
