"""load_dataset: read (or generate) a dataset, subsample it, normalise its pixels.

Images are read as uint8, subsampled, and only then converted to float32, so a small
max_train_samples on a large dataset never builds the full float array.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from fmlray.config import FIXED_CLASSES, DataConfig
from fmlray.data import locate
from fmlray.data.dataset import Dataset, stratified_indices, stratified_split
from fmlray.data.readers import read_cifar_batch, read_idx
from fmlray.data.synthetic import make_synthetic
from fmlray.errors import DataError

# (pixel scale, per-channel mean, per-channel std) after dividing by the scale: the usual published values.
PIXEL_STATS: dict[str, tuple[float, tuple[float, ...], tuple[float, ...]]] = {
    "digits": (16.0, (0.3053,), (0.3760,)),  # sklearn's 0..16 counts; mean/std of the whole set
    "mnist": (255.0, (0.1307,), (0.3081,)),
    "fmnist": (255.0, (0.2860,), (0.3530,)),
    "emnist": (255.0, (0.1751,), (0.3332,)),
    "cifar10": (255.0, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (255.0, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# Tags mixed into the run seed so each random choice has its own stream.
_SPLIT, _SUB_TRAIN, _SUB_TEST = 0xD1, 0x7A1, 0x7E5


def load_dataset(cfg: DataConfig, *, num_clients: int, seed: int) -> Dataset:
    """The dataset cfg names: train/test arrays, normalised, subsampled as cfg asks."""
    try:
        raw = _load_raw(cfg, num_clients=num_clients, seed=seed)
        raw = subsample(raw, cfg.max_train_samples, cfg.max_test_samples, seed)
        return normalise(raw)
    except MemoryError:
        keys = "data.synthetic_dim or clients.num_clients" if cfg.dataset == "synthetic" else \
            "data.max_train_samples / data.max_test_samples, or use a machine with more memory"
        raise DataError(f"{cfg.dataset} does not fit in memory; lower {keys}") from None


def _load_raw(cfg: DataConfig, *, num_clients: int, seed: int) -> Dataset:
    """The dataset before subsampling and normalisation (images still uint8)."""
    if cfg.dataset == "synthetic":
        return make_synthetic(num_clients=num_clients, alpha=cfg.synthetic_alpha, beta=cfg.synthetic_beta,
                              dim=cfg.synthetic_dim, classes=cfg.synthetic_classes,
                              test_fraction=cfg.test_fraction, seed=seed)
    if cfg.dataset == "digits":
        return _digits(cfg.test_fraction, seed)
    files = _files(cfg)
    if cfg.dataset in ("cifar10", "cifar100"):
        return _cifar(cfg.dataset, files)
    return _idx(cfg.dataset, files, cfg.emnist_split)


def _files(cfg: DataConfig) -> list[Path]:
    """Paths of the dataset's files, downloading them first if missing and cfg.download allows."""
    lay = locate.layout(cfg.dataset, cfg.emnist_split)
    roots = locate.search_roots(cfg.dataset, cfg.root)
    files = locate.find(lay, roots)
    if files is None and cfg.download:
        target = roots[0] if cfg.root else locate.DEFAULT_ROOT
        locate.download(cfg.dataset, lay, target, cfg.emnist_split)
        files = locate.find(lay, (target,))
        if files is None:
            raise DataError(f"{cfg.dataset}: the download into {target.resolve()} finished but its files "
                            f"are not where expected; remove the folder and retry, or set data.root")
    if files is None:
        raise locate.missing_error(cfg.dataset, lay, roots)
    return files


def _digits(test_fraction: float, seed: int) -> Dataset:
    """sklearn's bundled 8x8 digits, split stratified (it has no official test set)."""
    x, y = _digits_arrays()
    x = x.astype(np.uint8)[:, None]  # 0..16 counts fit a byte
    y = y.astype(np.int64)
    train, test = stratified_split(y, test_fraction, np.random.default_rng((seed, _SPLIT)))
    return Dataset("digits", x[train], y[train], x[test], y[test], num_classes=10)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8), labels) of sklearn's digits: its CSV read as `load_digits` reads it, without importing
    sklearn (~1 s and ~50 MiB of the driver for one 0.1 s read); `load_digits` itself if the file moved."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits
        bunch = load_digits()
        return bunch.images, bunch.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1]


def _idx(dataset: str, files: list[Path], emnist_split: str) -> Dataset:
    """An MNIST-family dataset from its four IDX files."""
    x_train, y_train = _idx_pair(files[0], files[1])
    x_test, y_test = _idx_pair(files[2], files[3])
    if dataset == "emnist":
        # EMNIST stores each image transposed relative to MNIST.
        x_train, x_test = x_train.transpose(0, 2, 1), x_test.transpose(0, 2, 1)
        if emnist_split == "letters":  # labels 1..26; make them 0-based
            if min(y_train.min(initial=1), y_test.min(initial=1)) < 1:
                raise DataError(f"{files[1]}: emnist letters labels must be 1..26")
            y_train, y_test = y_train - 1, y_test - 1
        num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    else:
        num_classes = FIXED_CLASSES[dataset]
        _check_labels(files[1], y_train, num_classes)
        _check_labels(files[3], y_test, num_classes)
    return Dataset(dataset, x_train[:, None], y_train, x_test[:, None], y_test, num_classes=num_classes)


def _idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, H, W), int64 labels) from an images file and its labels file."""
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels.astype(np.int64)


def _cifar(dataset: str, files: list[Path]) -> Dataset:
    """CIFAR-10 (five train batches + test) or CIFAR-100 (train + test) from the python pickles."""
    key = b"labels" if dataset == "cifar10" else b"fine_labels"
    *train_files, test_file = files
    train = [read_cifar_batch(f, key) for f in train_files]
    x_test, y_test = read_cifar_batch(test_file, key)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    num_classes = FIXED_CLASSES[dataset]
    _check_labels(train_files[0], y_train, num_classes)
    _check_labels(test_file, y_test, num_classes)
    return Dataset(dataset, x_train, y_train, x_test, y_test, num_classes=num_classes)


def _check_labels(path: Path, y: np.ndarray, num_classes: int) -> None:
    """DataError unless every label is in 0..num_classes-1."""
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{path}: labels must be in 0..{num_classes - 1}, found {y.min()}..{y.max()}")


def subsample(ds: Dataset, max_train: int, max_test: int, seed: int) -> Dataset:
    """Seeded stratified subsample of train and test (0 or more than there is keeps all)."""
    train = np.arange(len(ds.y_train)) if max_train == 0 else \
        stratified_indices(ds.y_train, max_train, np.random.default_rng((seed, _SUB_TRAIN)))
    test = np.arange(len(ds.y_test)) if max_test == 0 else \
        stratified_indices(ds.y_test, max_test, np.random.default_rng((seed, _SUB_TEST)))
    if len(train) == len(ds.y_train) and len(test) == len(ds.y_test):
        return ds

    def rows(a: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
        """The selected rows of an optional array."""
        return None if a is None else a[idx]

    return dataclasses.replace(ds, x_train=ds.x_train[train], y_train=ds.y_train[train],
                               x_test=ds.x_test[test], y_test=ds.y_test[test],
                               train_owner=rows(ds.train_owner, train), test_owner=rows(ds.test_owner, test))


def normalise(ds: Dataset) -> Dataset:
    """Images → float32 (x / scale - mean) / std per channel; feature datasets pass through."""
    if ds.name not in PIXEL_STATS:
        return ds
    scale, mean, std = PIXEL_STATS[ds.name]
    shape = (1, -1, 1, 1)  # broadcast over (N, C, H, W)
    mean_a, std_a = np.asarray(mean, np.float32).reshape(shape), np.asarray(std, np.float32).reshape(shape)

    def convert(x: np.ndarray) -> np.ndarray:
        """Scaled, centred and standardised float32 copy of `x`."""
        out = x.astype(np.float32)
        out /= np.float32(scale)  # in place: full CIFAR is 600 MB as float32, avoid copies
        out -= mean_a
        out /= std_a
        return out

    return dataclasses.replace(ds, x_train=convert(ds.x_train), x_test=convert(ds.x_test))
