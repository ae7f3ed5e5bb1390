"""Datasets: scene generators with exact ground truth, behind one entry point.

``make_dataset(name, split, size, seed, **options)`` returns :class:`Scenes`. Options override
the named preset's config fields (``make_dataset("multi-mnist", min_digits=4, max_digits=5)``
is the count-generalisation set). Test splits never share data with training: digit-based sets
draw only from the pool's held-out digits, procedural sets from a disjoint random stream.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from perception.config import config_from_dict
from perception.data.cache import load_or_build
from perception.data.digits import SPLITS, DigitPool, load_digit_pool
from perception.data.dsprites import DSpritesConfig, generate_multi_dsprites
from perception.data.multimnist import PRESETS, generate_multi_mnist
from perception.data.single import SingleConfig, generate_single
from perception.data.tetris import TetrisConfig, generate_tetris
from perception.data.types import Scenes
from perception.errors import PerceptionError
from perception.registry import Registry

DEFAULT_SIZES = {"train": 20_000, "test": 2_000}  # procedural and multi-digit sets
_SPLIT_STREAM = {"train": 0, "test": 1}  # seed = (seed, stream): train and test never share draws


@dataclass(frozen=True)
class DatasetSpec:
    """How to build one registered dataset.

    ``digit_source`` is the digit pool source for digit-based sets and None for procedural
    ones; ``generate(config, pool, size, seed)`` ignores ``pool`` when it is None.
    """

    config: Any
    generate: Callable[[Any, DigitPool | None, int | None, tuple[int, int]], Scenes]
    digit_source: str | None = None
    label: str = ""  # preset name the dataset's name does not already say, e.g. "canonical"
    whole_split: bool = False  # size=None means every image of the split (single-object sets)


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def _procedural(fn):
    return lambda config, pool, n, seed: fn(config, n, seed)


DATASETS.register("multi-mnist")(DatasetSpec(PRESETS["canonical"], generate_multi_mnist, "auto", "canonical"))
DATASETS.register("multi-mnist-thesis")(DatasetSpec(PRESETS["thesis"], generate_multi_mnist, "auto"))
DATASETS.register("multi-mnist-lavae")(DatasetSpec(PRESETS["lavae"], generate_multi_mnist, "auto"))
DATASETS.register("multi-dsprites")(DatasetSpec(DSpritesConfig(), _procedural(generate_multi_dsprites)))
DATASETS.register("multi-dsprites-binary")(
    DatasetSpec(DSpritesConfig(binary_colours=True), _procedural(generate_multi_dsprites))
)
DATASETS.register("tetris")(DatasetSpec(TetrisConfig(), _procedural(generate_tetris)))
DATASETS.register("mnist")(DatasetSpec(SingleConfig(), generate_single, "auto", whole_split=True))
DATASETS.register("mnist-20px")(  # MNIST digits as canonical Multi-MNIST scenes draw them (DAIR's object model)
    DatasetSpec(SingleConfig(render_size=PRESETS["canonical"].digit_size), generate_single, "auto", whole_split=True)
)
DATASETS.register("simplified-mnist")(
    DatasetSpec(SingleConfig(classes=(2, 6, 9)), generate_single, "auto", whole_split=True)
)
DATASETS.register("fashion-mnist")(
    DatasetSpec(SingleConfig(), generate_single, "fashion-mnist", whole_split=True)
)


def _config(name: str, options: dict[str, Any]) -> tuple[DatasetSpec, Any]:
    spec = DATASETS.get(name)
    preset = {f.name: getattr(spec.config, f.name) for f in dataclasses.fields(spec.config)}
    return spec, config_from_dict(type(spec.config), {**preset, **options}, name)


def _pool(spec: DatasetSpec, split: str, data_dir: str | os.PathLike | None) -> DigitPool | None:
    if split not in SPLITS:
        raise PerceptionError(f"unknown split '{split}'; valid: {', '.join(SPLITS)}")
    return load_digit_pool(spec.digit_source, data_dir).split(split) if spec.digit_source else None


def _describe(name: str, spec: DatasetSpec, config: Any, pool: DigitPool | None) -> str:
    head = f"{name} {spec.label}".rstrip()
    return f"{head}: {config.describe(pool) if pool is not None else config.describe()}"


def make_dataset(
    name: str,
    split: str = "train",
    size: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    cache: bool = False,
    **options: Any,
) -> Scenes:
    """Scenes of a registered dataset; ``size=None`` is ``DEFAULT_SIZES[split]`` for generated
    sets and the whole split for single-object sets."""
    spec, config = _config(name, options)
    pool = _pool(spec, split, data_dir)
    if size is None and not spec.whole_split:
        size = DEFAULT_SIZES[split]
    if size is not None and (not isinstance(size, (int, np.integer)) or size < 1):
        raise PerceptionError(f"size must be a positive integer, got {size!r}")
    size = None if size is None else int(size)
    description = _describe(name, spec, config, pool)

    def build() -> Scenes:
        scenes = spec.generate(config, pool, size, (int(seed), _SPLIT_STREAM[split]))
        return dataclasses.replace(scenes, description=description)

    if not cache:
        return build()
    key = {
        "dataset": name,
        "options": dataclasses.asdict(config),
        "split": split,
        "size": size,
        "seed": int(seed),
        "digits": pool.identity if pool is not None else None,
    }
    return load_or_build(key, build)


def dataset_description(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None, **options: Any
) -> str:
    """Short human text for model metadata, e.g. "multi-mnist canonical: 64x64, 0-3 digits of
    20x20, MNIST t10k training pool digits 0-7999"."""
    spec, config = _config(name, options)
    return _describe(name, spec, config, _pool(spec, split, data_dir))


def default_image_shape(name: str, **options: Any) -> tuple[int, int, int]:
    """(C, H, W) of the dataset's images, without generating or loading anything."""
    return _config(name, options)[1].image_shape


__all__ = [
    "DATASETS",
    "DEFAULT_SIZES",
    "DatasetSpec",
    "DigitPool",
    "Scenes",
    "dataset_description",
    "default_image_shape",
    "load_digit_pool",
    "make_dataset",
]
