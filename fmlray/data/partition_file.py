"""Partitions as files: `.npz` with `train_<client>` / `test_<client>` index arrays.

Every run saves its partition this way, and `data.partition = "file"` loads one, so results can
be compared with other frameworks on identical splits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fmlray.data.dataset import Dataset
from fmlray.data.partition import Partition
from fmlray.errors import DAMAGED_NPZ, DataError


DATA = "data"  # the fingerprint of the dataset the indices are rows of (Dataset.fingerprint), when known


def save_partition(path, partition: Partition, data: str | None = None) -> None:
    arrays = {f"train_{c}": t for c, t in enumerate(partition.train)}
    arrays.update({f"test_{c}": t for c, t in enumerate(partition.test)})
    np.savez(path, **arrays, **({DATA: np.array(data)} if data else {}))


def load_partition(path: str | Path, dataset: Dataset, num_clients: int) -> Partition:
    """Read and check a partition file against the dataset; any misfit is a one-line DataError."""
    path = Path(path)
    arrays = _read_npz(path)
    made_on = arrays.pop(DATA, None)
    if made_on is not None and (made_on.ndim or made_on.dtype.kind != "U"):
        raise DataError(f"data.partition_file {path}: its {DATA!r} member must be a dataset fingerprint (a string)")
    if made_on is not None and str(made_on) != dataset.fingerprint():
        raise DataError(f"data.partition_file {path} holds row indices of other {dataset.name} data than this config "
                        f"loads (made on {made_on}, this is {dataset.fingerprint()}): the rows a seed or "
                        "data.max_train_samples / max_test_samples / test_fraction select differ; use the settings "
                        "it was made with, or make a new one")
    expected = {f"{s}_{c}" for s in ("train", "test") for c in range(num_clients)}
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays))[:3], sorted(set(arrays) - expected)[:3]
        raise DataError(f"data.partition_file {path} does not hold train_<c>/test_<c> for clients 0..{num_clients - 1} "
                        f"(missing {missing}, unexpected {extra}); set clients.num_clients to match the file")
    train = tuple(_indices(arrays[f"train_{c}"], len(dataset.y_train), f"train_{c}", path) for c in range(num_clients))
    test = tuple(_indices(arrays[f"test_{c}"], len(dataset.y_test), f"test_{c}", path) for c in range(num_clients))
    for name, parts in (("train", train), ("test", test)):
        all_rows = np.concatenate(parts)
        if len(np.unique(all_rows)) != len(all_rows):
            raise DataError(f"data.partition_file {path}: some {name} rows are given to two clients (or twice)")
    return Partition(train, test)


def _indices(a: np.ndarray, n: int, key: str, path: Path) -> np.ndarray:
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or len(a) == 0:
        raise DataError(f"data.partition_file {path}: {key} must be a non-empty 1-D integer array")
    if a.min() < 0 or a.max() >= n:
        raise DataError(f"data.partition_file {path}: {key} has indices outside 0..{n - 1} of this dataset")
    return np.sort(a.astype(np.int64))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz; DataError for a missing file, another format, or a member that is no array."""
    if path.exists() and not (path.is_file() or path.is_dir()):  # a FIFO would block the read
        raise DataError(f"data.partition_file {path} is a special file (a FIFO or a device), not an .npz; give the "
                        "partition.npz a run wrote, or one saved with numpy.savez")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
        if head.startswith(b"PK") and not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            raise DataError(f"data.partition_file {path} is a damaged or cut-short zip, not a readable .npz; save one "
                            "with numpy.savez, or give the partition.npz a run wrote")
        if not head.startswith((b"PK", b"\x93NUMPY")):  # else numpy's answer is about pickles, which are refused anyway
            raise DataError(f"data.partition_file {path} is not an .npz (a zip of .npy arrays; this one starts with "
                            f"{head!r}: a CSV or text file?); save one with numpy.savez, or give the partition.npz a run "
                            "wrote (fmlray partition --save writes a CSV table, for reading)")
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a lone .npy array
            raise ValueError("a single .npy array")
        with loaded as z:
            arrays = {k: z[k] for k in z.files}  # a member that is not .npy reads as raw bytes
    except FileNotFoundError:
        raise DataError(f"data.partition_file {path} does not exist") from None
    except DAMAGED_NPZ as exc:
        raise DataError(f"data.partition_file {path} is not a readable .npz ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})") from None
    odd = sorted(k for k, a in arrays.items() if not isinstance(a, np.ndarray))
    if odd:
        raise DataError(f"data.partition_file {path} is a zip but not an .npz of arrays (member {odd[0]!r} is no .npy); "
                        "save it with numpy.savez")
    return arrays
