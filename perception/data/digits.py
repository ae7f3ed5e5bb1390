"""Pools of 28x28 digit images that the digit-based datasets draw from.

Where the digits come from is resolved once, in a fixed order, and logged: an explicit
``data_dir``, then ``$PERCEPTION_DATA_DIR`` (MNIST IDX files), otherwise scikit-learn's 1,797
real 8x8 digits so that everything runs on a bare machine. Fashion-MNIST is used only when
asked for. A directory that was named but is unusable is an error, never a silent fallback:
training on the wrong digits would only show up much later, in the results.

Every pool has a fixed train/test split of digit indices so that test scenes are built only
from digits a model never saw.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from perception.data.idx import read_idx
from perception.errors import DataError, PerceptionError

logger = logging.getLogger("perception.data")

ENV_DATA_DIR = "PERCEPTION_DATA_DIR"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SOURCES = ("auto", "fashion-mnist", "sklearn-digits")
SPLITS = ("train", "test")
MNIST_T10K_TRAIN = 8000  # digits 0-7999 of the 10k MNIST test file train, 8000-9999 are held out
TRAIN_FRACTION = 0.8  # other single-file pools: first 80% train, rest test
SKLEARN_DIGIT_SIZE = 20  # MNIST digits fill a 20x20 box centred in the 28x28 frame


@dataclass(frozen=True, eq=False)
class DigitPool:
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # int64 [N]
    index: np.ndarray  # int64 [N], each digit's index in the full pool (held-out checks)
    name: str  # e.g. "MNIST t10k"
    train_index: np.ndarray  # positions in this pool of the training digits
    test_index: np.ndarray
    identity: str  # content hash, part of cache keys
    spans: dict  # split -> human text of its digits, e.g. {"test": "digits 8000-9999"}
    split_name: str = "all"
    _memo: dict = field(default_factory=dict, init=False, repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def split(self, which: str) -> "DigitPool":
        """The pool restricted to the train or test digits."""
        if which not in SPLITS:
            raise PerceptionError(f"unknown split '{which}'; valid: {', '.join(SPLITS)}")
        if ("split", which) not in self._memo:
            pos = self.train_index if which == "train" else self.test_index
            if pos.size == 0:
                raise DataError(f"digit pool {self.name} has no {which} digits")
            self._memo[("split", which)] = DigitPool(
                images=self.images[pos],
                labels=self.labels[pos],
                index=self.index[pos],
                name=self.name,
                train_index=np.arange(pos.size) if which == "train" else np.arange(0),
                test_index=np.arange(pos.size) if which == "test" else np.arange(0),
                identity=f"{self.identity}:{which}",
                spans=self.spans,
                split_name=which,
            )
        return self._memo[("split", which)]

    def resized(self, size: int) -> np.ndarray:
        """uint8 [N, size, size], memoised because every generated batch reuses it."""
        if ("resized", size) not in self._memo:
            self._memo[("resized", size)] = resize_images(self.images, size)
        return self._memo[("resized", size)]

    def describe(self) -> str:
        """E.g. "MNIST t10k training pool digits 0-7999"."""
        which = {"train": "training pool", "test": "held-out pool", "all": "pool"}[self.split_name]
        return f"{self.name} {which} {self.spans.get(self.split_name, f'of {len(self)} digits')}"


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of uint8 [N, h, w] to [N, size, size]; the one resampler
    every dataset uses, so the same digit looks the same everywhere."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[:, 0].round_().clamp_(0, 255).to(torch.uint8).numpy()


def load_digit_pool(source: str = "auto", data_dir: str | os.PathLike | None = None) -> DigitPool:
    """Resolve and load a digit pool; see the module docstring for the order."""
    if source not in SOURCES:
        raise PerceptionError(f"unknown digit source '{source}'; valid: {', '.join(SOURCES)}")
    if source == "sklearn-digits":
        pool, where = _sklearn_pool(), "scikit-learn load_digits"
    elif source == "fashion-mnist":
        if data_dir is None and not FASHION_DIR.is_dir():
            raise DataError(
                f"Fashion-MNIST not found in {FASHION_DIR}; install it with "
                "'apt-get install dataset-fashion-mnist' or pass data_dir"
            )
        where = str(Path(data_dir) if data_dir is not None else FASHION_DIR)
        pool = _idx_pool(str(Path(where).resolve()), "Fashion-MNIST")
    elif data_dir is not None or os.environ.get(ENV_DATA_DIR):
        directory = Path(data_dir if data_dir is not None else os.environ[ENV_DATA_DIR])
        origin = "data_dir" if data_dir is not None else f"${ENV_DATA_DIR}"
        pool, where = _idx_pool(str(directory.resolve()), "MNIST"), f"{directory} ({origin})"
    else:
        pool, where = _sklearn_pool(), f"scikit-learn load_digits (no data_dir, ${ENV_DATA_DIR} unset)"
    logger.info("digit source: %s, %d digits from %s", pool.name, len(pool), where)
    return pool


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _read_pair(directory: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    images_path = _find(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(directory, f"{prefix}-labels-idx1-ubyte")
    if images_path is None and labels_path is None:
        return None
    if images_path is None or labels_path is None:
        missing = f"{prefix}-{'images-idx3' if images_path is None else 'labels-idx1'}-ubyte[.gz]"
        raise DataError(f"data directory {directory} lacks {missing}")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        got = f"{images.dtype} {list(images.shape)}"
        raise DataError(f"{images_path} holds {got}, expected uint8 [N, 28, 28]")
    if labels.dtype != np.uint8 or labels.shape != (images.shape[0],):
        got = f"{labels.dtype} {list(labels.shape)}"
        raise DataError(f"{labels_path} holds {got}, expected uint8 [{images.shape[0]}]")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path} holds label {int(labels.max())}, expected classes 0-9")
    return images, labels.astype(np.int64)


@functools.lru_cache(maxsize=4)
def _idx_pool(directory_str: str, kind: str) -> DigitPool:
    directory = Path(directory_str)
    if not directory.is_dir():
        raise DataError(f"data directory {directory} does not exist")
    train, test = _read_pair(directory, "train"), _read_pair(directory, "t10k")
    if train is None and test is None:
        raise DataError(
            f"data directory {directory} holds no {kind} IDX files "
            "(expected t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz])"
        )
    if train is not None and test is not None:  # official split: train file trains, t10k tests
        images = np.concatenate([train[0], test[0]])
        labels = np.concatenate([train[1], test[1]])
        spans = {
            "train": f"(train file, {len(train[1])} digits)",
            "test": f"(t10k file, {len(test[1])} digits)",
        }
        return _make_pool(images, labels, f"{kind} train+t10k", len(train[1]), spans)
    images, labels = train or test  # type: ignore[misc]
    name = f"{kind} {'t10k' if test is not None else 'train'}"
    n_train = MNIST_T10K_TRAIN if len(labels) == 10_000 else int(TRAIN_FRACTION * len(labels))
    return _make_pool(images, labels, name, n_train)


@functools.lru_cache(maxsize=1)
def _sklearn_pool() -> DigitPool:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = bunch.images.astype(np.float32) * (255.0 / 16.0)  # values 0-16 -> 0-255
    digits = resize_images(small, SKLEARN_DIGIT_SIZE)
    pad = (28 - SKLEARN_DIGIT_SIZE) // 2
    images = np.zeros((len(digits), 28, 28), np.uint8)
    images[:, pad : pad + SKLEARN_DIGIT_SIZE, pad : pad + SKLEARN_DIGIT_SIZE] = digits
    labels = bunch.target.astype(np.int64)
    return _make_pool(images, labels, "sklearn digits (8x8 upscaled)", int(TRAIN_FRACTION * len(labels)))


def _make_pool(
    images: np.ndarray, labels: np.ndarray, name: str, n_train: int, spans: dict | None = None
) -> DigitPool:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    for a in (images, labels):
        a.flags.writeable = False  # pools are shared between datasets via the lru caches
    digest = hashlib.sha1(images.tobytes())
    digest.update(labels.tobytes())
    n = len(labels)
    return DigitPool(
        images=images,
        labels=labels,
        index=np.arange(n),
        name=name,
        train_index=np.arange(n_train),
        test_index=np.arange(n_train, n),
        identity=f"{name}:{digest.hexdigest()[:16]}",
        spans=spans or {"train": f"digits 0-{n_train - 1}", "test": f"digits {n_train}-{n - 1}"},
    )
