"""Loading datasets: digits, synthetic, IDX and CIFAR files written here in the real formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fmlray.config import DataConfig
from fmlray.data import Dataset, load_dataset
from fmlray.data import locate
from fmlray.data.readers import read_cifar_batch, read_idx
from fmlray.data.sources import PIXEL_STATS
from fmlray.errors import DataError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def load(seed: int = 0, num_clients: int = 10, **kw) -> Dataset:
    """load_dataset with a DataConfig built from keyword arguments."""
    return load_dataset(DataConfig(**kw), num_clients=num_clients, seed=seed)


def assert_one_line(exc: pytest.ExceptionInfo) -> str:
    """The error's message, checked to be a single non-empty line."""
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def expected_pixels(raw: np.ndarray, name: str) -> np.ndarray:
    """What normalisation should turn single-channel uint8 pixels into."""
    scale, (mean,), (std,) = PIXEL_STATS[name]
    return ((raw.astype(np.float32) / scale - mean) / std).astype(np.float32)


# --------------------------------------------------------------------------------------------
# digits and synthetic


def test_digits_shapes_types_and_range():
    ds = load(dataset="digits")
    assert ds.name == "digits" and ds.num_classes == 10
    assert ds.x_train.shape == (1438, 1, 8, 8) and ds.x_test.shape == (359, 1, 8, 8)
    assert ds.input_shape == (1, 8, 8)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    # Pixels are 0..16 counts: blank ones map to the lowest value, full ones to the highest.
    assert ds.x_train.min() == pytest.approx(float(expected_pixels(np.array([0]), "digits")[0]))
    assert ds.x_train.max() == pytest.approx(float(expected_pixels(np.array([16]), "digits")[0]))
    assert ds.train_owner is None and ds.test_owner is None


def test_digits_split_is_stratified():
    ds = load(dataset="digits", test_fraction=0.25)
    train, test = np.bincount(ds.y_train), np.bincount(ds.y_test)
    assert len(ds.y_test) == round(0.25 * 1797)
    assert np.all(np.abs(test - 0.25 * (train + test)) <= 1)


def test_digits_is_deterministic_in_seed():
    a, b, c = load(seed=3, dataset="digits"), load(seed=3, dataset="digits"), load(seed=4, dataset="digits")
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_test, c.x_test)


def test_max_samples_subsample_is_stratified_and_seeded():
    ds = load(dataset="digits", max_train_samples=500, max_test_samples=100)
    assert len(ds.y_train) == 500 and len(ds.y_test) == 100
    full = load(dataset="digits")
    share = np.bincount(full.y_train) / len(full.y_train)
    assert np.all(np.abs(np.bincount(ds.y_train, minlength=10) - 500 * share) <= 1)
    again = load(dataset="digits", max_train_samples=500, max_test_samples=100)
    assert np.array_equal(ds.x_train, again.x_train)
    bigger = load(dataset="digits", max_train_samples=10**6)  # more than there is: keep all
    assert len(bigger.y_train) == len(full.y_train)


def test_synthetic_shapes_owners_and_determinism():
    ds = load(seed=1, num_clients=12, dataset="synthetic", synthetic_dim=20, synthetic_classes=5)
    assert ds.x_train.shape[1:] == (20,) and ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.num_classes == 5 and ds.y_train.max() < 5
    assert set(ds.train_owner) == set(range(12)) and set(ds.test_owner) == set(range(12))
    for k in range(12):  # every client kept a test share of about test_fraction
        n_train, n_test = np.sum(ds.train_owner == k), np.sum(ds.test_owner == k)
        assert n_train + n_test >= 50 and abs(n_test - 0.2 * (n_train + n_test)) <= 1
    again = load(seed=1, num_clients=12, dataset="synthetic", synthetic_dim=20, synthetic_classes=5)
    other = load(seed=2, num_clients=12, dataset="synthetic", synthetic_dim=20, synthetic_classes=5)
    assert np.array_equal(ds.x_train, again.x_train) and np.array_equal(ds.train_owner, again.train_owner)
    assert not np.array_equal(ds.x_train[:10], other.x_train[:10])


def test_synthetic_alpha_changes_no_row_as_in_the_authors_generator():
    # u ~ N(0, alpha) is the mean of every entry of W and b: it shifts every class's logit by u (sum(x) + 1)
    kw = dict(num_clients=8, dataset="synthetic", synthetic_dim=20)
    base = load(synthetic_alpha=0.0, **kw)
    for alpha in (0.5, 1.0, 100.0):
        other = load(synthetic_alpha=alpha, **kw)
        assert np.array_equal(base.x_train, other.x_train) and np.array_equal(base.y_train, other.y_train), alpha
    assert not np.array_equal(base.y_train, load(synthetic_beta=0.0, **kw).y_train)  # beta does change them


def test_synthetic_clients_are_heterogeneous():
    ds = load(num_clients=10, dataset="synthetic", synthetic_alpha=1.0, synthetic_beta=1.0)
    hists = np.stack([np.bincount(ds.y_train[ds.train_owner == k], minlength=10) for k in range(10)])
    props = hists / hists.sum(axis=1, keepdims=True)
    distances = [np.abs(props[i] - props[j]).sum() / 2 for i in range(10) for j in range(i + 1, 10)]
    assert np.mean(distances) > 0.5  # total variation: clients' label mixes mostly disagree


def test_synthetic_subsample_keeps_owners_aligned():
    full = load(num_clients=8, dataset="synthetic")
    ds = load(num_clients=8, dataset="synthetic", max_train_samples=300)
    assert len(ds.y_train) == len(ds.train_owner) == 300
    owner_of = {row.tobytes(): owner for row, owner in zip(full.x_train, full.train_owner)}
    assert all(owner_of[row.tobytes()] == owner for row, owner in zip(ds.x_train, ds.train_owner))


# --------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST, EMNIST)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write `array` as an IDX file of unsigned bytes, gzipped if the name ends in .gz."""
    array = np.asarray(array, dtype=np.uint8)
    blob = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)


def tiny_images(n: int, classes: int, seed: int, h: int = 5, w: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images (n, h, w) — non-square to catch transposes — and balanced labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w), dtype=np.uint8), np.arange(n, dtype=np.uint8) % classes


def write_mnist_like(folder: Path, names: tuple[str, ...], gz: bool, classes: int = 10) -> dict:
    """Write train (40 rows) and test (20 rows) IDX files under the given names; return the arrays."""
    suffix = ".gz" if gz else ""
    xtr, ytr = tiny_images(40, classes, 0)
    xte, yte = tiny_images(20, classes, 1)
    for name, array in zip(names, (xtr, ytr, xte, yte)):
        write_idx(folder / (name + suffix), array)
    return {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte}


MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.mark.parametrize("dataset,subfolder", [("mnist", ""), ("mnist", "MNIST/raw"),
                                               ("fmnist", ""), ("fmnist", "FashionMNIST/raw")])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_datasets_load_from_flat_and_torchvision_layouts(tmp_path, dataset, subfolder, gz):
    arrays = write_mnist_like(tmp_path / subfolder, MNIST_NAMES, gz)
    ds = load(dataset=dataset, root=str(tmp_path))
    assert ds.x_train.shape == (40, 1, 5, 4) and ds.x_test.shape == (20, 1, 5, 4)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64 and ds.num_classes == 10
    np.testing.assert_allclose(ds.x_train[:, 0], expected_pixels(arrays["xtr"], dataset), rtol=1e-5, atol=1e-5)
    assert np.array_equal(ds.y_test, arrays["yte"])


def test_emnist_is_transposed_and_letters_are_shifted(tmp_path):
    names = tuple(f"emnist-letters-{part}-{kind}-ubyte" for part in ("train", "test")
                  for kind in ("images-idx3", "labels-idx1"))
    arrays = write_mnist_like(tmp_path / "EMNIST" / "raw", names, gz=True, classes=26)
    arrays_labels = {k: v + 1 for k, v in arrays.items() if k.startswith("y")}  # letters are stored 1..26
    write_idx(tmp_path / "EMNIST" / "raw" / (names[1] + ".gz"), arrays_labels["ytr"])
    write_idx(tmp_path / "EMNIST" / "raw" / (names[3] + ".gz"), arrays_labels["yte"])
    ds = load(dataset="emnist", emnist_split="letters", root=str(tmp_path))
    assert ds.x_train.shape == (40, 1, 4, 5)  # stored (5, 4), transposed on load
    np.testing.assert_allclose(ds.x_train[3, 0], expected_pixels(arrays["xtr"][3].T, "emnist"), rtol=1e-5, atol=1e-5)
    assert np.array_equal(ds.y_train, arrays["ytr"]) and ds.y_train.min() == 0 and ds.num_classes == 26


def test_emnist_balanced_keeps_labels(tmp_path):
    names = tuple(f"emnist-balanced-{part}-{kind}-ubyte" for part in ("train", "test")
                  for kind in ("images-idx3", "labels-idx1"))
    arrays = write_mnist_like(tmp_path / "EMNIST" / "raw", names, gz=False, classes=20)
    ds = load(dataset="emnist", root=str(tmp_path))
    assert np.array_equal(ds.y_train, arrays["ytr"]) and ds.num_classes == 20


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    labels = tmp_path / "labels-idx1-ubyte"
    write_idx(labels, np.arange(10))
    with pytest.raises(DataError, match="labels-idx1-ubyte") as exc:
        read_idx(labels, 3)  # a labels file where images are expected: wrong magic
    assert_one_line(exc)
    images = tmp_path / "images-idx3-ubyte"
    write_idx(images, np.zeros((4, 3, 3)))
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated") as exc:
        read_idx(images, 3)
    assert_one_line(exc)
    garbage = tmp_path / "x-idx3-ubyte.gz"
    garbage.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="x-idx3-ubyte.gz"):
        read_idx(garbage, 3)


def test_corrupt_dataset_file_raises_data_error(tmp_path):
    write_mnist_like(tmp_path, MNIST_NAMES, gz=False)
    path = tmp_path / MNIST_NAMES[2]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=MNIST_NAMES[2]) as exc:
        load(dataset="mnist", root=str(tmp_path))
    assert_one_line(exc)


def test_images_and_labels_must_match_in_count(tmp_path):
    write_mnist_like(tmp_path, MNIST_NAMES, gz=False)
    write_idx(tmp_path / MNIST_NAMES[1], np.zeros(39))
    with pytest.raises(DataError, match="40 images but"):
        load(dataset="mnist", root=str(tmp_path))


# --------------------------------------------------------------------------------------------
# CIFAR pickled batches


def write_cifar_batch(path: Path, n: int, label_key: bytes, classes: int, seed: int) -> dict:
    """Write one batch dict like the official files (protocol 2, bytes keys); return it."""
    rng = np.random.default_rng(seed)
    batch = {b"batch_label": b"testing batch", label_key: [int(v) for v in np.arange(n) % classes],
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [v % 20 for v in batch[label_key]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return batch


def test_cifar10_batches_load(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    train = [write_cifar_batch(folder / f"data_batch_{i}", 6, b"labels", 10, i) for i in range(1, 6)]
    test = write_cifar_batch(folder / "test_batch", 10, b"labels", 10, 9)
    ds = load(dataset="cifar10", root=str(tmp_path))
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (10, 3, 32, 32) and ds.num_classes == 10
    assert ds.x_train.dtype == np.float32
    assert np.array_equal(ds.y_test, test[b"labels"])
    _, mean, std = PIXEL_STATS["cifar10"]
    # Row layout: 1024 red values, then green, then blue; pixel (channel 1, row 2, col 3) of image 0.
    raw = train[0][b"data"][0, 1024 + 2 * 32 + 3]
    assert ds.x_train[0, 1, 2, 3] == pytest.approx((raw / 255 - mean[1]) / std[1], abs=1e-5)


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    train = write_cifar_batch(folder / "train", 12, b"fine_labels", 100, 0)
    write_cifar_batch(folder / "test", 5, b"fine_labels", 100, 1)
    ds = load(dataset="cifar100", root=str(tmp_path))
    assert ds.num_classes == 100 and ds.x_train.shape == (12, 3, 32, 32)
    assert np.array_equal(ds.y_train, train[b"fine_labels"])


class _Evil:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_pickle_with_disallowed_global_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="not allowed") as exc:
        read_cifar_batch(path, b"labels")
    assert_one_line(exc)
    assert not (tmp_path / "pwned").exists()


def test_cifar_batch_pickled_by_old_numpy_loads(tmp_path):
    # Pickles made with numpy 1 (like the official files) name numpy.core, not numpy._core.
    blob = pickle.dumps({b"data": np.full((2, 3072), 7, np.uint8), b"labels": [3, 4]}, protocol=2)
    old = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != blob or b"numpy.core.multiarray" in blob
    (tmp_path / "test_batch").write_bytes(old)
    x, y = read_cifar_batch(tmp_path / "test_batch", b"labels")
    assert x.shape == (2, 3, 32, 32) and np.all(x == 7) and y.tolist() == [3, 4]


def test_cifar_batch_with_wrong_content_is_refused(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(DataError, match="3072"):
        read_cifar_batch(path, b"labels")
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="data_batch_1"):
        read_cifar_batch(path, b"labels")


# --------------------------------------------------------------------------------------------
# missing files and downloading


@pytest.mark.parametrize("dataset", ["mnist", "fmnist", "emnist", "cifar10", "cifar100"])
def test_missing_files_give_one_line_with_the_fix(tmp_path, dataset):
    with pytest.raises(DataError) as exc:
        load(dataset=dataset, root=str(tmp_path))
    message = assert_one_line(exc)
    assert "data.root" in message and "data.download" in message and str(tmp_path) in message
    if dataset == "fmnist":
        assert "apt-get install dataset-fashion-mnist" in message


def test_default_root_is_debian_then_local_data_for_fmnist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(locate, "DEBIAN_FMNIST", tmp_path / "nowhere")
    with pytest.raises(DataError, match="nowhere") as exc:
        load(dataset="fmnist")
    assert str(tmp_path / "data") in str(exc.value)
    write_mnist_like(tmp_path / "data" / "FashionMNIST" / "raw", MNIST_NAMES, gz=True)
    assert load(dataset="fmnist").x_train.shape == (40, 1, 5, 4)


def fake_torchvision(monkeypatch, cls_name: str, init) -> list:
    """Install a stand-in torchvision whose datasets.<cls_name> runs `init`; return its call log."""
    calls: list = []

    class Fake:
        def __init__(self, root, train=True, download=False, **kw):
            calls.append((root, train, download, kw))
            init(Path(root))

    datasets = types.ModuleType("torchvision.datasets")
    setattr(datasets, cls_name, Fake)
    package = types.ModuleType("torchvision")
    package.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    return calls


def test_download_fetches_with_torchvision_then_reads_the_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = fake_torchvision(monkeypatch, "MNIST",
                             lambda root: write_mnist_like(root / "MNIST" / "raw", MNIST_NAMES, gz=True))
    ds = load(dataset="mnist", download=True)
    assert ds.x_train.shape == (40, 1, 5, 4)
    assert [c[1:3] for c in calls] == [(True, True), (False, True)] and calls[0][0] == "data"


def test_download_passes_the_emnist_split(tmp_path, monkeypatch):
    names = tuple(f"emnist-digits-{part}-{kind}-ubyte" for part in ("train", "test")
                  for kind in ("images-idx3", "labels-idx1"))
    calls = fake_torchvision(monkeypatch, "EMNIST",
                             lambda root: write_mnist_like(root / "EMNIST" / "raw", names, gz=False))
    ds = load(dataset="emnist", emnist_split="digits", download=True, root=str(tmp_path))
    assert ds.num_classes == 10 and calls[0][3] == {"split": "digits"}


def test_download_failure_is_one_line_data_error_and_leaves_no_empty_folders(tmp_path, monkeypatch):
    def fail(root):
        (root / "cifar-10-batches-py" / "raw").mkdir(parents=True)  # as torchvision makes its folders first
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://..., got:\n<urlopen error>")

    (tmp_path / "mine").mkdir()
    fake_torchvision(monkeypatch, "CIFAR10", fail)
    with pytest.raises(DataError, match="could not download cifar10") as exc:
        load(dataset="cifar10", download=True, root=str(tmp_path / "data"))
    assert_one_line(exc)
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # data/ and below made by the attempt: gone


def test_files_already_present_are_not_downloaded(tmp_path, monkeypatch):
    write_mnist_like(tmp_path, MNIST_NAMES, gz=False)
    calls = fake_torchvision(monkeypatch, "MNIST", lambda root: None)
    load(dataset="mnist", download=True, root=str(tmp_path))
    assert calls == []


# --------------------------------------------------------------------------------------------
# the real Fashion-MNIST from Debian's dataset-fashion-mnist package


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_loads():
    ds = load(dataset="fmnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and abs(float(ds.x_train[:5000].mean())) < 0.1
    small = load(dataset="fmnist", max_train_samples=2000)
    assert small.x_train.shape == (2000, 1, 28, 28) and len(small.y_test) == 10000
    assert np.array_equal(np.bincount(small.y_train), np.full(10, 200))
