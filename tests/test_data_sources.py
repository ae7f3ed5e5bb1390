"""Digit sources, splits, the dataset registry, options, descriptions and the cache."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
import pytest

import perception.data.digits as digits
from perception.data import (
    DATASETS,
    dataset_description,
    default_image_shape,
    load_digit_pool,
    make_dataset,
)
from perception.data.cache import ENV_CACHE_DIR
from perception.errors import DataError, PerceptionError, UnknownNameError


@pytest.fixture(autouse=True)
def no_env(monkeypatch, tmp_path):
    """Tests start from a bare machine: no data dir, a private cache dir."""
    monkeypatch.delenv(digits.ENV_DATA_DIR, raising=False)
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "cache"))


def write_idx_dir(directory: Path, n: int, prefix: str = "t10k", seed: int = 0):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 4:24, 4:24] = rng.integers(0, 256, (n, 20, 20), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    for kind, array, dims in (("images-idx3", images, 3), ("labels-idx1", labels, 1)):
        head = bytes([0, 0, 8, dims]) + struct.pack(f">{dims}I", *array.shape)
        (directory / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(head + array.tobytes()))
    return images, labels


# --- digit pools ------------------------------------------------------------------------------


def test_sklearn_default_pool_is_mnist_like():
    pool = load_digit_pool()
    assert len(pool) == 1797 and pool.images.shape == (1797, 28, 28) and pool.images.dtype == np.uint8
    assert pool.images.max() == 255 and set(np.unique(pool.labels)) == set(range(10))
    border = pool.images.copy()
    border[:, 4:24, 4:24] = 0
    assert border.max() == 0  # digits fill the central 20x20 box, like MNIST
    train, test = pool.split("train"), pool.split("test")
    assert len(train) == 1437 and len(test) == 360
    assert train.index.max() < test.index.min()


def test_data_dir_pool_and_split(tmp_path):
    images, labels = write_idx_dir(tmp_path / "d", 50)
    pool = load_digit_pool(data_dir=tmp_path / "d")
    np.testing.assert_array_equal(pool.images, images)
    np.testing.assert_array_equal(pool.labels, labels)
    assert pool.split("train").index.tolist() == list(range(40))  # first 80%
    assert pool.split("test").index.tolist() == list(range(40, 50))


def test_env_var_is_used_and_logged(tmp_path, monkeypatch, caplog):
    write_idx_dir(tmp_path / "env", 30, seed=1)
    monkeypatch.setenv(digits.ENV_DATA_DIR, str(tmp_path / "env"))
    with caplog.at_level(logging.INFO, logger="perception.data"):
        pool = load_digit_pool()
    assert len(pool) == 30
    lines = [r.getMessage() for r in caplog.records if r.name == "perception.data"]
    assert len(lines) == 1 and "PERCEPTION_DATA_DIR" in lines[0] and str(tmp_path / "env") in lines[0]


def test_train_and_t10k_files_give_official_split(tmp_path):
    write_idx_dir(tmp_path / "both", 30, prefix="train")
    write_idx_dir(tmp_path / "both", 12, prefix="t10k", seed=2)
    pool = load_digit_pool(data_dir=tmp_path / "both")
    assert len(pool.split("train")) == 30 and len(pool.split("test")) == 12
    assert "t10k file" in pool.split("test").describe()


def test_bad_data_dirs_raise_never_fall_back(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_digit_pool(data_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no MNIST IDX files"):
        load_digit_pool(data_dir=tmp_path / "empty")
    write_idx_dir(tmp_path / "half", 10)
    (tmp_path / "half" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels"):
        load_digit_pool(data_dir=tmp_path / "half")
    monkeypatch.setenv(digits.ENV_DATA_DIR, str(tmp_path / "empty"))
    with pytest.raises(DataError):  # a bad env dir is an error too, not the sklearn fallback
        make_dataset("multi-mnist", size=4)


def test_wrong_content_in_data_dir(tmp_path):
    d = tmp_path / "bad"
    write_idx_dir(d, 10)
    head = bytes([0, 0, 8, 1]) + struct.pack(">I", 9)  # 9 labels for 10 images
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(head + bytes(9)))
    with pytest.raises(DataError, match="expected uint8 \\[10\\]"):
        load_digit_pool(data_dir=d)


def test_fashion_absent_tells_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(digits, "FASHION_DIR", tmp_path / "no-fashion")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        make_dataset("fashion-mnist")


def test_fashion_when_installed():
    if not digits.FASHION_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST not installed in {digits.FASHION_DIR}")
    scenes = make_dataset("fashion-mnist", split="test")
    assert len(scenes) == 10000 and scenes.extra["digit_index"].min() == 60000


def test_real_mnist_pool_split(mnist_dir):
    pool = load_digit_pool(data_dir=mnist_dir)
    assert len(pool) == 10000 and pool.labels[0] == 7
    assert pool.split("train").index.max() == 7999 and pool.split("test").index.min() == 8000


# --- held-out digits ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["multi-mnist", "multi-mnist-thesis", "mnist"])
def test_test_split_never_uses_training_digits(name):
    first_test = len(load_digit_pool().split("train"))
    for split in ("train", "test"):
        used = make_dataset(name, split=split, size=300, seed=1).extra["digit_index"]
        used = used[used >= 0]
        assert used.size > 0
        assert (used >= first_test).all() if split == "test" else (used < first_test).all()


def test_real_mnist_held_out_digits(mnist_dir):
    test = make_dataset("multi-mnist", split="test", size=2000, data_dir=mnist_dir).extra["digit_index"]
    train = make_dataset("multi-mnist", split="train", size=2000, data_dir=mnist_dir).extra["digit_index"]
    assert test[test >= 0].min() >= 8000 and train.max() <= 7999
    assert np.unique(test[test >= 0]).size > 1000  # draws from the whole held-out pool


def test_procedural_test_split_is_a_different_stream():
    for name in ("multi-dsprites", "tetris"):
        train = make_dataset(name, split="train", size=20, seed=0)
        test = make_dataset(name, split="test", size=20, seed=0)
        assert not np.array_equal(train.images, test.images)


# --- registry, options, descriptions -----------------------------------------------------------


def test_registered_names():
    assert set(DATASETS.names()) == {
        "multi-mnist", "multi-mnist-thesis", "multi-mnist-lavae", "multi-dsprites",
        "multi-dsprites-binary", "tetris", "mnist", "mnist-20px", "simplified-mnist", "fashion-mnist",
    }  # fmt: skip


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError, match="multi-mnist-thesis.*tetris|tetris"):
        make_dataset("multi-nmist")
    with pytest.raises(UnknownNameError) as info:
        default_image_shape("nope")
    assert "multi-dsprites" in str(info.value)


def test_unknown_option_lists_valid_ones():
    expected = "unknown multi-mnist option\\(s\\) max_digit; valid: .*max_digits"
    with pytest.raises(PerceptionError, match=expected):
        make_dataset("multi-mnist", max_digit=5)


@pytest.mark.parametrize("value,message", [
    (2.0, "max_digits must be an integer, got 2.0"), (np.bool_(True), "max_digits must be an integer"), (True, "max_digits must be an integer, got True"),
    ("3", "max_digits must be an integer, got '3'"),
])
def test_options_of_the_wrong_type_are_refused(value, message):
    with pytest.raises(PerceptionError, match=message):
        make_dataset("multi-mnist", max_digits=value)


def test_json_values_are_read_as_the_declared_types():
    """Options arrive as JSON: an int where a float is declared and a list where a tuple is are fine."""
    from dataclasses import dataclass

    from perception.config import CheckedConfig, config_from_dict

    @dataclass
    class Config(CheckedConfig):
        rate: float = 0.5
        sizes: tuple[int, ...] = (1,)
        scale: float | None = None

    config = config_from_dict(Config, {"rate": 1, "sizes": [2, 3], "scale": 4}, "test")
    assert config == Config(1.0, (2, 3), 4.0) and type(config.rate) is float and type(config.scale) is float
    assert config_from_dict(Config, {"scale": None}, "test").scale is None
    sweep = config_from_dict(Config, {"rate": np.float32(0.25), "sizes": np.arange(2)}, "test")  # numpy sweeps
    assert sweep == Config(0.25, (0, 1)) and all(type(s) is int for s in sweep.sizes)
    with pytest.raises(PerceptionError, match="sizes must be a list, each item an integer, got \\[2.5\\]"):
        config_from_dict(Config, {"sizes": [2.5]}, "test")
    with pytest.raises(PerceptionError, match="scale must be a number or null, got 'big'"):
        config_from_dict(Config, {"scale": "big"}, "test")


def test_options_override_the_preset():
    scenes = make_dataset("multi-mnist", size=200, min_digits=4, max_digits=5)
    assert scenes.max_objects == 5 and set(np.unique(scenes.counts)) == {4, 5}
    lavae = make_dataset("multi-mnist-lavae", size=50, binarize=False)
    assert len(np.unique(lavae.images)) > 2  # preset's binarisation switched off


def test_bad_arguments():
    with pytest.raises(PerceptionError, match="split"):
        make_dataset("tetris", split="validation")
    with pytest.raises(PerceptionError, match="size"):
        make_dataset("tetris", size=0)
    with pytest.raises(PerceptionError, match="fit"):
        make_dataset("multi-mnist-thesis", max_digits=5)  # 28x28 digits: at most 4 fit on 64x64
    with pytest.raises(PerceptionError, match="available"):
        make_dataset("simplified-mnist", split="test", size=10_000)


def test_image_shapes_and_descriptions():
    assert default_image_shape("multi-mnist") == (1, 64, 64)
    assert default_image_shape("multi-dsprites") == (3, 64, 64)
    assert default_image_shape("tetris") == (3, 35, 35)
    assert default_image_shape("mnist") == (1, 28, 28)
    assert default_image_shape("multi-mnist", canvas=50) == (1, 50, 50)
    text = dataset_description("multi-mnist")
    assert text.startswith("multi-mnist canonical: 64x64, 0-3 digits of 20x20")
    assert "sklearn digits" in text and "training pool digits 0-1436" in text
    assert "held-out" in dataset_description("multi-mnist", split="test")
    assert "4-5 digits" in dataset_description("multi-mnist", min_digits=4, max_digits=5)
    assert make_dataset("multi-mnist", size=3).description == text


def test_description_names_mnist_pool(mnist_dir):
    text = dataset_description("multi-mnist", data_dir=mnist_dir)
    assert text == "multi-mnist canonical: 64x64, 0-3 digits of 20x20, MNIST t10k training pool digits 0-7999"


# --- single-object sets ------------------------------------------------------------------------


def test_single_sets_ground_truth():
    scenes = make_dataset("simplified-mnist", split="test")
    assert set(np.unique(scenes.labels)) == {2, 6, 9} and (scenes.counts == 1).all()
    pool = load_digit_pool()
    np.testing.assert_array_equal(scenes.images[:, 0], pool.images[scenes.extra["digit_index"][:, 0]])
    for i in range(0, len(scenes), 17):
        ys, xs = np.nonzero(scenes.images[i, 0])
        assert scenes.boxes[i, 0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        centre = [(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2]
        np.testing.assert_allclose(scenes.centres[i, 0], centre)
        np.testing.assert_array_equal(scenes.segmentation[i], scenes.images[i, 0] > 0.1 * 255)
    full = make_dataset("mnist", split="test")
    assert len(full) == 360  # size=None: the whole held-out split
    some = make_dataset("mnist", split="test", size=50, seed=3)
    assert np.unique(some.extra["digit_index"]).size == 50


def test_mnist_20px_digits_are_what_canonical_scenes_draw():
    """Each mnist-20px image is the 20x20 patch a canonical scene pastes for that digit, read back
    at 28x28 with the library's one resampler (what DAIR's object model sees)."""
    from perception.data.digits import resize_images

    scenes = make_dataset("multi-mnist", split="test", size=40, seed=2, min_digits=1, max_digits=1)
    single = make_dataset("mnist-20px", split="test")
    row_of = {int(d): i for i, d in enumerate(single.extra["digit_index"][:, 0])}
    for i in range(len(scenes)):
        x0, y0, x1, y1 = scenes.boxes[i, 0].astype(int)
        patch = scenes.images[i, 0, y0:y1, x0:x1]
        j = row_of[int(scenes.extra["digit_index"][i, 0])]
        np.testing.assert_array_equal(single.images[j, 0], resize_images(patch[None], 28)[0])
        assert single.labels[j, 0] == scenes.labels[i, 0]
    plain = make_dataset("mnist", split="test")
    assert not np.array_equal(plain.images, single.images)
    assert "drawn at 20 px" in single.description
    with pytest.raises(PerceptionError, match="render_size"):
        make_dataset("mnist", render_size=40)


# --- cache -------------------------------------------------------------------------------------


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache").glob("*.npz"))


def assert_same(a, b):
    for field in ("images", "counts", "centres", "boxes", "labels", "valid", "segmentation"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.description == b.description and a.extra.keys() == b.extra.keys()


def test_cache_roundtrip_and_keying(tmp_path):
    first = make_dataset("multi-mnist", size=30, seed=5, cache=True)
    (path,) = cache_files(tmp_path)
    with np.load(path) as data:
        arrays = dict(data)
    np.savez(path, **{**arrays, "description": np.array("served from disk")})
    second = make_dataset("multi-mnist", size=30, seed=5, cache=True)
    assert second.description == "served from disk"
    second.description = first.description
    assert_same(first, second)
    make_dataset("multi-mnist", size=30, seed=6, cache=True)
    make_dataset("multi-mnist", size=30, seed=5, cache=True, max_digits=2)
    make_dataset("multi-mnist", split="test", size=30, seed=5, cache=True)
    write_idx_dir(tmp_path / "digits", 40)
    make_dataset("multi-mnist", size=30, seed=5, cache=True, data_dir=tmp_path / "digits")
    assert len(cache_files(tmp_path)) == 5  # seed, options, split and digit source are all keyed


def test_corrupt_cache_is_regenerated(tmp_path, caplog):
    first = make_dataset("tetris", size=20, cache=True)
    (path,) = cache_files(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="perception.data"):
        again = make_dataset("tetris", size=20, cache=True)
    assert_same(first, again)
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert_same(first, make_dataset("tetris", size=20, cache=True))  # rewritten cleanly
    assert not list((tmp_path / "cache").glob("*.tmp"))
