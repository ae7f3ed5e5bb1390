"""Optional on-disk cache of generated Scenes.

The key hashes everything the scenes depend on (dataset, resolved options, split, size, seed,
the digit pool's content hash and a format version), so a stale entry is never returned. The
cache is only an optimisation: a corrupt or unreadable entry is regenerated and an unwritable
directory only logs a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from perception.data.types import Scenes

logger = logging.getLogger("perception.data")

ENV_CACHE_DIR = "PERCEPTION_CACHE_DIR"
CACHE_VERSION = 1  # bump when generators change what a given key produces
_FIELDS = ("images", "counts", "centres", "boxes", "labels", "valid", "segmentation")


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "perception")


def cache_path(key: dict[str, Any]) -> Path:
    blob = json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True, default=str)
    return cache_dir() / f"scenes-{hashlib.sha256(blob.encode()).hexdigest()[:32]}.npz"


def load_or_build(key: dict[str, Any], build: Callable[[], Scenes]) -> Scenes:
    path = cache_path(key)
    if path.exists():
        try:
            return _load(path)
        except Exception as exc:  # any unreadable entry: regenerate instead of failing
            logger.warning("regenerating corrupt cache entry %s (%s)", path, exc)
    scenes = build()
    try:
        _save(path, scenes)
    except OSError as exc:
        logger.warning("could not write cache entry %s (%s)", path, exc)
    return scenes


def _save(path: Path, scenes: Scenes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(scenes, name) for name in _FIELDS}
    arrays.update({f"extra.{k}": v for k, v in scenes.extra.items()})
    arrays["description"] = np.array(scenes.description)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)  # readers see the old entry or the complete new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> Scenes:
    with np.load(path, allow_pickle=False) as data:
        fields = {name: data[name] for name in _FIELDS}
        extra = {k[len("extra.") :]: data[k] for k in data.files if k.startswith("extra.")}
        return Scenes(**fields, description=str(data["description"]), extra=extra)
