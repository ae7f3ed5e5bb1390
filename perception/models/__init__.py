"""Model registry: adding a model is one module plus one line here.

Models are imported lazily (name -> "module:Class") so that importing the package stays fast
and a model with heavy dependencies costs nothing until it is used.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from perception.config import config_from_dict
from perception.contract import Encoder
from perception.registry import Registry

MODELS: Registry[str] = Registry("model")
MODELS.register("vae")("perception.models.vae:ConvVAE")
MODELS.register("monet")("perception.models.monet:MONet")
MODELS.register("iodine")("perception.models.iodine:IODINE")
MODELS.register("dvae")("perception.models.dvae:DVAE")
MODELS.register("dvaest")("perception.models.dvaest:DVAEST")
MODELS.register("air")("perception.models.air:AIR")
MODELS.register("dair")("perception.models.dair:DAIR")
MODELS.register("lavae")("perception.models.lavae:LAVAE")



def model_class(name: str) -> type[Encoder]:
    module, _, cls = MODELS.get(name).partition(":")
    return getattr(importlib.import_module(module), cls)


def build_model(name: str, options: Mapping[str, Any] | None, image_shape: tuple[int, int, int]) -> Encoder:
    cls = model_class(name)
    config = config_from_dict(cls.Config, options, f"model '{name}'")
    return cls(config, tuple(image_shape))
