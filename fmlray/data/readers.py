"""Readers for the on-disk formats: IDX (MNIST family) and CIFAR's pickled batches.

Both raise DataError with one line naming the file when it is malformed. CIFAR batches are
unpickled by a restricted Unpickler: a pickle can run arbitrary code, so only the handful of
globals a numpy array inside a dict needs is allowed.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from pathlib import Path

import numpy as np

from fmlray.errors import DataError

_IDX_UBYTE = 0x08  # the only element type the MNIST-family files use


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, gunzipped when the name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {_one_line(exc)}") from None


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """uint8 array from an IDX file (plain or .gz) that must have `ndim` dimensions."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        magic = raw[:4].hex() if len(raw) >= 4 else "too short"
        raise DataError(f"{path} is not an IDX file of {ndim}-d unsigned bytes "
                        f"(magic {magic}, expected 0x000008{ndim:02x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: its IDX header is incomplete")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(f"{path} is truncated or corrupt: {len(raw)} bytes, expected {expected} for shape {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for _codecs.encode, which protocol-2 pickles use for bytes; latin-1 only."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    """(module, name) → object for every global a CIFAR batch may reference."""
    reconstruct = np.empty(0).__reduce__()[0]  # numpy's array rebuilder, wherever numpy keeps it
    scalar = np.int64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], object] = {("_codecs", "encode"): _latin1_encode}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and 2 names
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    for module in ("builtins", "__builtin__"):  # Python 3 and Python 2 spellings
        for name, obj in (("bytes", bytes), ("bytearray", bytearray), ("list", list), ("dict", dict),
                          ("tuple", tuple), ("set", set), ("frozenset", frozenset)):
            allowed[(module, name)] = obj
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only plain containers, bytes and numpy arrays."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> object:
        """The allowed object for (module, name); anything else is refused."""
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None


def restricted_load(path: str | Path) -> object:
    """Unpickle `path` with RestrictedUnpickler; bytes=True matches the Python 2 originals."""
    path = Path(path)
    raw = _read_bytes(path)
    try:
        return RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # any unpickling failure is a bad file, whatever its type
        raise DataError(f"{path} is not a readable CIFAR batch: {_one_line(exc)}") from None


def read_cifar_batch(path: str | Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 3, 32, 32), int64 labels) from one CIFAR python batch file."""
    batch = restricted_load(path)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataError(f"{path} is not a CIFAR batch: it needs the keys b'data' and {label_key!r}")
    data, labels = batch[b"data"], np.asarray(batch[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: b'data' must be a uint8 array of shape (N, 3072)")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {label_key!r} must hold one integer label per row of b'data'")
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each 32x32 row-major.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _one_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line."""
    return " ".join(str(exc).split()) or type(exc).__name__
