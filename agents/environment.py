"""How an agent's observations are produced, and the env creator RLlib's env runners call.

``--encoder`` names the observation source: ``pixels`` (raw images, CNN agent), ``oracle``
(true object state, set agent), or an encoder (bundled name, checkpoint or ``.onnx`` file; set
agent on its slots). ``NAME@K`` sets the encoder's number of slots K where the model can change
it (AIR, LAVAE: Collect's agent sprite is a fourth object in scenes the bundled encoders were
trained on with 3 digits). Encoders joined by ``+`` (``lavae@4+air``) are fused by position: the
first one's slots are the objects, the others add their features (:class:`envs.encoders.FusedBackend`).
``NAME:prototypes`` (or ``:slots``) sets one encoder's representation, overriding
``representation`` (``lavae@4+dair:prototypes``: LAVAE's objects with DAIR's class one-hot).

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
from envs.encoders import BACKENDS, REPRESENTATIONS
from perception.errors import PerceptionError

RLLIB_ENV_NAME = "perception-agents-env"
SOURCES_WITHOUT_ENCODER = ("pixels", "oracle")


def parse_encoder_spec(spec: str) -> list[tuple[str, int | None, str | None]]:
    """``NAME[@K][:REPRESENTATION][+...]`` -> ``(encoder, K or None, representation or None)`` per encoder."""
    members = []
    for part in spec.split("+"):
        head, colon, rep = part.rpartition(":")
        if not colon or rep not in REPRESENTATIONS:  # a colon that is not a representation belongs to the name
            head, rep = part, ""
        name, _, k = head.partition("@")
        if not name or (k and not k.isdigit()) or k == "0":
            raise PerceptionError(
                f"encoder '{part}': expected NAME, NAME@K with K >= 1 (e.g. lavae@4) or NAME[@K]:slots|prototypes"
            )
        members.append((name, int(k) if k else None, rep or None))
    return members


def encoder_tag(spec: str) -> str:
    """A short name for run directories and plots: file stems, ``+`` between fused encoders,
    ``-prototypes`` after an encoder given that representation (a colon makes a poor path)."""
    parts = []
    for name, k, rep in parse_encoder_spec(spec):
        stem = Path(name).stem if name.endswith((".pt", ".onnx")) else Path(name).name
        parts.append(stem + (f"@{k}" if k else "") + (f"-{rep}" if rep else ""))
    return "+".join(parts)


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
        if self.uses_encoder:
            parse_encoder_spec(self.encoder)  # a bad spec is a clear error before any env is built

    @property
    def obs_mode(self) -> str:
        return "oracle" if self.encoder == "oracle" else "pixels"

    @property
    def uses_encoder(self) -> bool:
        return self.encoder not in SOURCES_WITHOUT_ENCODER

    @property
    def tag(self) -> str:
        """The observation's name in run directories: the encoder's tag, ``-prototypes`` when
        that is the representation (so slot and prototype runs never share a directory)."""
        prototypes = self.representation == "prototypes" and self.uses_encoder
        return encoder_tag(self.encoder) + ("-prototypes" if prototypes else "")

    @property
    def members(self) -> list[tuple[str, int | None, str | None]]:
        return parse_encoder_spec(self.encoder)

    def resolved_backends(self) -> list[str]:
        """Per encoder; ``auto``: ONNX for an .onnx file or a bundled name shipped with one, unless
        its K is changed (a bundled ONNX graph's K is fixed), else torch."""
        if self.backend != "auto":
            return [self.backend] * len(self.members)
        return ["onnx" if k is None and _has_onnx(name) else "torch" for name, k, _ in self.members]

    def as_config(self) -> dict[str, Any]:
        return {
            "env_id": self.env_id,
            "encoder": self.encoder,
            "backend": self.backend,
            "representation": self.representation,
            "env_kwargs": dict(self.env_kwargs),
        }


def _has_onnx(encoder: str) -> bool:
    if encoder.endswith(".onnx"):
        return True
    from perception.pretrained import bundled_path

    return not Path(encoder).exists() and bundled_path(encoder, ".onnx") is not None


def make_env(source: ObservationSource, num_envs: int | None = None) -> gym.Env | gym.vector.VectorEnv:
    kwargs = {"obs_mode": source.obs_mode, **source.env_kwargs}
    wrap: dict[str, Any] = {}
    if source.uses_encoder:
        names, ks, reps = zip(*source.members)
        wrap = {
            "encoder": list(names),  # one name is one encoder, several a fusion (envs.encoders.make_backend)
            "backend": source.resolved_backends(),
            "max_objects": list(ks),
            "representation": [rep or source.representation for rep in reps],
        }
    if num_envs is None:
        env = gym.make(source.env_id, disable_env_checker=True, **kwargs)
        return envs.ObjectSlots(env, **wrap) if wrap else env
    return envs.make_vector_env(source.env_id, num_envs, **wrap, **kwargs)


def rllib_env_creator(env_context: dict[str, Any]):
    """Entry point registered with ``ray.tune.register_env`` (see the module docstring)."""
    config = dict(env_context)
    num_envs = config.pop("num_envs", None)
    return make_env(ObservationSource(**config), num_envs)
