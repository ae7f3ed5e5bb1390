"""Reader for the IDX format of the MNIST distribution files.

Gzip is detected from the magic bytes rather than the file name, because mirrors and users
unpack or rename the files inconsistently. Every way a file can be broken becomes a
:class:`DataError` naming the file, so a bad download never surfaces as a numpy traceback.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from perception.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
# IDX type code -> big-endian numpy dtype
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist") from None
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc.strerror or exc}") from None
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"IDX file {path} is a corrupt or truncated gzip stream ({exc})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (raw or gzip), in native byte order."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"IDX file {path} is too short to hold a header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataError(f"IDX file {path} has bad magic bytes {data[:4].hex()} (expected 0000TTDD)")
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise DataError(f"IDX file {path} has unknown data type code 0x{code:02x}")
    if ndim == 0:
        raise DataError(f"IDX file {path} declares zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"IDX file {path} is truncated inside its header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        raise DataError(
            f"IDX file {path} holds {actual} payload bytes but its header {list(shape)} "
            f"needs {expected} (truncated or corrupt)"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))
