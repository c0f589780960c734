"""Partitioners, test splits that follow each client's labels, and the partition report."""

from __future__ import annotations

import numpy as np
import pytest

from fmlray.config import DataConfig
from fmlray.data import Dataset, Partition, format_partition, load_dataset, partition_counts, partition_dataset
from fmlray.errors import ConfigError, DataError

SCHEMES = ("iid", "dirichlet", "shards", "quantity")


@pytest.fixture(scope="module")
def digits() -> Dataset:
    """sklearn digits: 1438 train and 359 test rows, 10 classes."""
    return load_dataset(DataConfig(dataset="digits"), num_clients=10, seed=0)


@pytest.fixture(scope="module")
def synthetic() -> Dataset:
    """Synthetic(1, 1) with 15 natural clients."""
    return load_dataset(DataConfig(dataset="synthetic", partition="natural"), num_clients=15, seed=0)


def split(ds: Dataset, scheme: str, k: int = 10, seed: int = 0, **kw) -> Partition:
    """partition_dataset with a DataConfig built from keyword arguments."""
    cfg = DataConfig(dataset=ds.name, partition=scheme, **kw)
    return partition_dataset(ds, cfg, num_clients=k, seed=seed)


def label_counts(y: np.ndarray, parts: tuple[np.ndarray, ...], num_classes: int) -> np.ndarray:
    """(clients, classes) label histogram."""
    return np.stack([np.bincount(y[p], minlength=num_classes) for p in parts])


def assert_exact_cover(parts: tuple[np.ndarray, ...], n: int) -> None:
    """Every index in 0..n-1 appears in exactly one part; parts are sorted int64."""
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def mean_entropy(counts: np.ndarray) -> float:
    """Mean over clients of the entropy (nats) of their label distribution."""
    p = counts / counts.sum(axis=1, keepdims=True)
    logs = np.log(np.where(p > 0, p, 1.0))
    return float(np.mean(-(p * logs).sum(axis=1)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_row_is_used_once_and_clients_meet_min_samples(digits, scheme):
    part = split(digits, scheme, k=10, min_samples=20)
    assert part.num_clients == 10 and len(part.test) == 10
    assert_exact_cover(part.train, len(digits.y_train))
    assert_exact_cover(part.test, len(digits.y_test))
    assert min(len(t) for t in part.train) >= 20 and min(len(t) for t in part.test) >= 1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partitions_are_deterministic_in_seed(digits, scheme):
    a, b, c = split(digits, scheme, seed=5), split(digits, scheme, seed=5), split(digits, scheme, seed=6)
    for x, y in zip(a.train + a.test, b.train + b.test):
        assert np.array_equal(x, y)
    assert any(len(x) != len(y) or not np.array_equal(x, y) for x, y in zip(a.train, c.train))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_test_split_follows_each_clients_train_labels(digits, scheme):
    part = split(digits, scheme, k=8)
    train = label_counts(digits.y_train, part.train, 10)
    test = label_counts(digits.y_test, part.test, 10)
    assert np.all(test[train == 0] == 0)  # never tested on a class it does not train on
    # Largest-remainder shares: each count is within one row of the exact proportional share.
    exact = train / train.sum(axis=0) * np.bincount(digits.y_test, minlength=10)
    assert np.all(np.abs(test - exact) < 1)


def test_iid_sizes_are_even(digits):
    sizes = [len(t) for t in split(digits, "iid", k=7).train]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_is_more_skewed(digits):
    skewed = split(digits, "dirichlet", dirichlet_alpha=0.1, min_samples=5)
    even = split(digits, "dirichlet", dirichlet_alpha=100.0, min_samples=5)
    h_skewed = mean_entropy(label_counts(digits.y_train, skewed.train, 10))
    h_even = mean_entropy(label_counts(digits.y_train, even.train, 10))
    assert h_skewed < 1.5 < h_even and h_even > 0.95 * np.log(10)


@pytest.mark.parametrize("per", [1, 2, 3])
def test_shards_give_exactly_k_classes_used_evenly(digits, per):
    part = split(digits, "shards", k=10, classes_per_client=per)
    counts = label_counts(digits.y_train, part.train, 10)
    assert np.all((counts > 0).sum(axis=1) == per)
    holders = (counts > 0).sum(axis=0)
    assert holders.max() - holders.min() <= 1
    assert_exact_cover(part.train, len(digits.y_train))


def test_shards_with_fewer_slots_than_classes_leave_unheld_classes_out(digits):
    part = split(digits, "shards", k=3, classes_per_client=2)  # 6 slots for 10 classes
    held = np.flatnonzero(label_counts(digits.y_train, part.train, 10).sum(axis=0))
    assert len(held) == 6
    assert sum(len(t) for t in part.train) == np.isin(digits.y_train, held).sum()
    assert sum(len(t) for t in part.test) == np.isin(digits.y_test, held).sum()


def test_quantity_sizes_differ_but_labels_look_alike(digits):
    part = split(digits, "quantity", k=10, quantity_alpha=0.5, min_samples=30)
    sizes = np.array([len(t) for t in part.train])
    assert sizes.min() >= 30 and sizes.max() > 3 * sizes.min()
    counts = label_counts(digits.y_train, part.train, 10)
    overall = np.bincount(digits.y_train) / len(digits.y_train)
    big = counts[sizes >= 100]
    tv = np.abs(big / big.sum(axis=1, keepdims=True) - overall).sum(axis=1) / 2
    assert len(big) and tv.max() < 0.25


def test_natural_uses_the_generators_clients(synthetic):
    part = split(synthetic, "natural", k=15)
    assert_exact_cover(part.train, len(synthetic.y_train))
    assert_exact_cover(part.test, len(synthetic.y_test))
    for k in range(15):
        assert np.all(synthetic.train_owner[part.train[k]] == k)
        assert np.all(synthetic.test_owner[part.test[k]] == k)


def test_non_natural_schemes_work_on_synthetic(synthetic):
    part = split(synthetic, "dirichlet", k=15)
    assert_exact_cover(part.train, len(synthetic.y_train))


# --------------------------------------------------------------------------------------------
# impossible partitions


def one_line(exc: pytest.ExceptionInfo) -> str:
    """The error's message, checked to be one non-empty line."""
    message = str(exc.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("scheme", SCHEMES)
def test_too_many_clients_for_min_samples(digits, scheme):
    with pytest.raises(DataError) as exc:
        split(digits, scheme, k=200, min_samples=10)
    message = one_line(exc)
    assert "200 clients" in message and "1438" in message and "data.min_samples = 10" in message


def test_shards_with_more_classes_than_exist(digits):
    with pytest.raises(ConfigError, match=r"data.classes_per_client must be <= 10 \(the digits classes\), got 11"):
        split(digits, "shards", classes_per_client=11)
    keep, keep_test = digits.y_train < 5, digits.y_test < 5  # a training set that lacks some classes
    few = Dataset("digits", digits.x_train[keep], digits.y_train[keep], digits.x_test[keep_test],
                  digits.y_test[keep_test], num_classes=10)
    with pytest.raises(DataError, match="classes_per_client = 6 exceeds the 5 classes") as exc:
        split(few, "shards", classes_per_client=6)
    one_line(exc)


def test_dirichlet_that_cannot_meet_min_samples(digits):
    with pytest.raises(DataError, match="data.dirichlet_alpha") as exc:
        split(digits, "dirichlet", k=50, dirichlet_alpha=0.01, min_samples=25)
    assert "clients.num_clients" in one_line(exc)


def test_shards_that_leave_a_client_too_small(digits):
    # 40 clients of 1 class: each class's ~144 rows shared by 4 clients, ~36 each.
    with pytest.raises(DataError, match="shards partition gives client .* data.min_samples = 35") as exc:
        split(digits, "shards", k=40, classes_per_client=1, min_samples=35)
    one_line(exc)


def test_client_without_test_rows_is_an_error():
    ds = load_dataset(DataConfig(dataset="digits", max_test_samples=10), num_clients=20, seed=0)
    with pytest.raises(DataError, match="no test samples") as exc:
        split(ds, "iid", k=20)
    assert "clients.num_clients" in one_line(exc)


def test_natural_needs_synthetic_and_the_same_client_count(digits, synthetic):
    cfg = DataConfig(dataset="synthetic", partition="natural")
    with pytest.raises(DataError, match="natural clients") as exc:
        partition_dataset(digits, cfg, num_clients=10, seed=0)
    one_line(exc)
    with pytest.raises(DataError, match="15 natural clients") as exc:
        partition_dataset(synthetic, cfg, num_clients=12, seed=0)
    one_line(exc)


def test_natural_client_below_min_samples(synthetic):
    smallest = min(np.sum(synthetic.train_owner == k) for k in range(15))
    with pytest.raises(DataError, match="natural client") as exc:
        split(synthetic, "natural", k=15, min_samples=int(smallest) + 1)
    one_line(exc)


# --------------------------------------------------------------------------------------------
# the report


def test_partition_counts_table(digits):
    part = split(digits, "dirichlet", k=6)
    table = partition_counts(digits, part)
    assert table.column_names == ["client", "train_samples", "test_samples"] + [f"class_{c}" for c in range(10)]
    assert table.num_rows == 6 and table.column("client").to_pylist() == list(range(6))
    assert sum(table.column("train_samples").to_pylist()) == len(digits.y_train)
    assert sum(table.column("test_samples").to_pylist()) == len(digits.y_test)
    per_class = np.array([table.column(f"class_{c}").to_pylist() for c in range(10)]).T
    assert np.array_equal(per_class.sum(axis=1), table.column("train_samples").to_numpy())
    assert np.array_equal(per_class.sum(axis=0), np.bincount(digits.y_train))


def test_format_partition_is_aligned_text(digits):
    text = format_partition(partition_counts(digits, split(digits, "iid", k=4)))
    lines = text.splitlines()
    assert len(lines) == 1 + 1 + 4 + 1 + 1  # header, rule, clients, rule, total
    assert lines[0].split()[:3] == ["client", "train_samples", "test_samples"]
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width
    assert lines[-1].split()[:3] == ["total", str(len(digits.y_train)), str(len(digits.y_test))]
