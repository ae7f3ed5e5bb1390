"""IDX parsing: the format details that matter and every way a file can be broken."""

from __future__ import annotations

import gzip
import struct
import numpy as np
import pytest

from perception.data.idx import read_idx
from perception.errors import DataError


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_raw_uint8_images(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(idx_bytes(images, 0x08))
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (5, 4, 3)
    np.testing.assert_array_equal(out, images)


def test_big_endian_int32_and_float(tmp_path):
    ints = np.array([1, -2, 70000, 2**31 - 1], np.int32)
    floats = np.array([[0.5, -1.25], [3.0, 1e-3]], np.float32)
    (tmp_path / "i").write_bytes(idx_bytes(ints, 0x0C))
    (tmp_path / "f").write_bytes(idx_bytes(floats, 0x0D))
    out_i, out_f = read_idx(tmp_path / "i"), read_idx(tmp_path / "f")
    np.testing.assert_array_equal(out_i, ints)
    np.testing.assert_array_equal(out_f, floats)
    assert out_i.dtype.isnative and out_f.dtype.isnative


def test_gzip_detected_by_magic_not_name(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    misleading = tmp_path / "labels-idx1-ubyte"  # gzip content without .gz suffix
    misleading.write_bytes(gzip.compress(idx_bytes(labels, 0x08)))
    raw_named_gz = tmp_path / "labels-idx1-ubyte.gz"  # raw content with .gz suffix
    raw_named_gz.write_bytes(idx_bytes(labels, 0x08))
    np.testing.assert_array_equal(read_idx(misleading), labels)
    np.testing.assert_array_equal(read_idx(raw_named_gz), labels)


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda b: b[:-7], "payload"),  # truncated payload
        (lambda b: b + b"\x00", "payload"),  # trailing garbage
        (lambda b: b"\x01\x02" + b[2:], "magic"),
        (lambda b: b[:2] + b"\x42" + b[3:], "type code"),
        (lambda b: b[:6], "header"),  # cut inside the dims
        (lambda b: b"", "short"),
    ],
)
def test_broken_files_raise_one_line_dataerror(tmp_path, mutate, problem):
    good = idx_bytes(np.zeros((3, 4, 4), np.uint8), 0x08)
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(mutate(good))
    with pytest.raises(DataError, match=problem) as info:
        read_idx(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_gzip_and_missing_file(tmp_path):
    packed = gzip.compress(idx_bytes(np.zeros((20, 28, 28), np.uint8), 0x08))
    path = tmp_path / "t.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nope-idx1-ubyte")


def test_real_mnist_test_set(mnist_dir):
    images_path = mnist_dir / "t10k-images-idx3-ubyte.gz"
    labels_path = mnist_dir / "t10k-labels-idx1-ubyte.gz"
    images, labels = read_idx(images_path), read_idx(labels_path)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels[0] == 7
    assert set(np.unique(labels)) == set(range(10))
    assert images.max() == 255 and images[:, 0, :].max() == 0  # MNIST keeps a blank border
