"""Every option dataclass checks its own types, however it is built (perception/config.py)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest

from perception.config import CheckedConfig, OptionTypeError, config_from_dict
from perception.data import DATASETS
from perception.errors import PerceptionError
from perception.estimators import ESTIMATORS
from perception.models import MODELS, model_class
from perception.train.config import TrainConfig


def all_config_classes() -> list[type]:
    classes = [model_class(n).Config for n in MODELS.names()]
    classes += [type(DATASETS.get(n).config) for n in DATASETS.names()]
    classes += [ESTIMATORS.get(n).Config for n in ESTIMATORS.names()]
    return list(dict.fromkeys(classes + [TrainConfig]))


def wrong_value(config_cls: type) -> tuple[str, object] | None:
    """A field of ``config_cls`` and a value of the wrong type for it (None: no options)."""
    hints = typing.get_type_hints(config_cls)
    fields = [f.name for f in dataclasses.fields(config_cls) if f.init]
    for name in fields:
        if hints[name] is int:  # a string: a range check run before the type check would raise TypeError
            return name, "2"
    for name in fields:
        if hints[name] is float:
            return name, "big"
    assert not fields, f"{config_cls.__name__}: no int or float field to test"
    return None


@pytest.mark.parametrize("config_cls", all_config_classes(), ids=lambda c: c.__name__)
def test_every_config_checks_its_types_when_built_directly(config_cls):
    """A subclass that forgets ``super().__post_init__()`` (or a config outside CheckedConfig)
    would build here, or fail in its range check with a TypeError instead of this error."""
    assert issubclass(config_cls, CheckedConfig)
    config_cls()  # the defaults are of the declared types
    if (wrong := wrong_value(config_cls)) is None:
        return  # an estimator without options
    name, value = wrong
    with pytest.raises(OptionTypeError, match=f"{config_cls.__name__} option {name} must be"):
        config_cls(**{name: value})


def test_range_checks_see_checked_values():
    from perception.data.tetris import TetrisConfig

    with pytest.raises(OptionTypeError, match="pieces must be an integer, got '3'"):
        TetrisConfig(pieces="3")  # not "'<=' not supported between int and str"
    assert type(TetrisConfig(pieces=np.int64(3)).pieces) is int


def test_replace_and_numpy_sweeps_are_checked():
    from perception.models.monet import MONetConfig

    config = dataclasses.replace(MONetConfig(), num_slots=np.int64(4), beta=np.float32(0.25))
    assert type(config.num_slots) is int and type(config.beta) is float and config.beta == 0.25
    with pytest.raises(OptionTypeError, match="num_slots must be an integer, got True"):
        dataclasses.replace(config, num_slots=True)


def test_errors_name_the_owner_the_user_knows():
    from perception.models import build_model

    with pytest.raises(PerceptionError, match="^model 'monet' option num_slots must be an integer, got 2.5$"):
        build_model("monet", {"num_slots": 2.5}, (3, 35, 35))
    with pytest.raises(PerceptionError, match="unknown model 'monet' option"):
        build_model("monet", {"slots": 2}, (3, 35, 35))


def test_literal_matches_type_and_value_and_numpy_strings_become_str():
    @dataclass
    class Config(CheckedConfig):
        mode: Literal[1, "a"] = 1
        name: str = "x"

    assert Config(mode=np.int64(1)).mode == 1
    assert type(Config(name=np.str_("y")).name) is str
    for bad in (1.0, True, "b"):
        with pytest.raises(OptionTypeError, match="mode must be one of 1, 'a'"):
            Config(mode=bad)


def test_train_config_checks_json_values():
    assert TrainConfig(lr=1, grad_clip=None).lr == 1.0
    with pytest.raises(OptionTypeError, match="steps must be an integer, got '100'"):
        TrainConfig(steps="100")
    with pytest.raises(OptionTypeError, match="model_options must be a mapping"):
        TrainConfig(model_options=["num_slots=4"])


def test_a_model_refuses_a_config_of_another_model():
    from perception.models.dvae import DVAE
    from perception.models.dvaest import DVAESTConfig
    from perception.models.monet import MONet
    from perception.models.vae import VAEConfig

    with pytest.raises(PerceptionError, match="model 'monet' needs a MONetConfig, got VAEConfig"):
        MONet(VAEConfig(), (3, 35, 35))
    # a subclass's config too: the model would save options it cannot load back
    with pytest.raises(PerceptionError, match="model 'dvae' needs a DVAEConfig, got DVAESTConfig"):
        DVAE(DVAESTConfig(), (1, 28, 28))


def test_type_errors_survive_worker_processes():
    """The cost and clustering benches build models in worker processes: the error must unpickle."""
    import pickle

    from perception.data.tetris import TetrisConfig

    with pytest.raises(OptionTypeError) as caught:
        TetrisConfig(pieces=2.5)
    again = pickle.loads(pickle.dumps(caught.value))
    assert type(again) is OptionTypeError and str(again) == str(caught.value) and again.field == "pieces"


def test_numpy_values_inside_option_mappings_become_python_values():
    import json

    config = TrainConfig(model_options={"num_slots": np.int64(4), "beta": np.float32(0.5)})
    assert json.loads(json.dumps(config.to_dict()))["model_options"] == {"num_slots": 4, "beta": 0.5}


def test_saved_run_configurations_are_read_with_one_clear_error(tmp_path):
    import json

    from perception.train.config import read_train_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TrainConfig(steps=7).to_dict()}))
    assert read_train_config(path) == TrainConfig(steps=7)
    for content, message in [
        ('{"steps": "7"}', "config.json option steps must be an integer, got '7'"),
        ('{"stepz": 7}', "unknown .*config.json option\\(s\\) stepz"),
        ("[1]", "is not a JSON object"),
        ("{", "cannot read the run configuration"),
    ]:
        path.write_text(content)
        with pytest.raises(PerceptionError, match=message):
            read_train_config(path)


def test_config_from_dict_needs_a_checked_config():
    @dataclass
    class Plain:
        rate: float = 0.5

    with pytest.raises(TypeError, match="not a CheckedConfig"):
        config_from_dict(Plain, {"rate": 1}, "test")
