"""Split a dataset's rows among clients: iid, dirichlet, shards, quantity or natural.

Every scheme is deterministic in `seed` and hands each training row to exactly one client,
except `shards` when num_clients * classes_per_client < number of classes: the classes no
client holds are then left out (train and test). Test rows are then dealt to clients class by
class in proportion to their training counts, so each client's test split mirrors its own
label distribution and (bar those unheld classes) the whole test set is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fmlray.config import DataConfig
from fmlray.data.dataset import Dataset, largest_remainder
from fmlray.errors import DataError

DIRICHLET_ATTEMPTS = 100  # redraws before giving up on meeting data.min_samples
# Tags mixed into the run seed so each scheme (and the test split) has its own random stream.
_TAGS = {"iid": 0x11D, "dirichlet": 0xD12, "shards": 0x5A2, "quantity": 0x0A7, "test": 0x7E5}


# eq=False: arrays do not compare to one bool, so identity equality (and hashing) is the sane choice.
@dataclass(frozen=True, eq=False)
class Partition:
    """Per client, sorted int64 row indices into the dataset's train and test arrays."""

    train: tuple[np.ndarray, ...]
    test: tuple[np.ndarray, ...]

    @property
    def num_clients(self) -> int:
        """How many clients the partition has."""
        return len(self.train)


def partition_dataset(dataset: Dataset, cfg: DataConfig, *, num_clients: int, seed: int) -> Partition:
    """Split `dataset` among `num_clients` clients as cfg.partition says."""
    n = len(dataset.y_train)
    if num_clients < 1:
        raise DataError(f"cannot partition among {num_clients} clients; clients.num_clients must be >= 1")
    if num_clients * cfg.min_samples > n:
        rows = n + (len(dataset.y_test) if cfg.dataset in HELD_OUT else 0)  # all a client set could ever split
        fix = "lower data.min_samples (the partition file fixes the clients and their rows)" \
            if cfg.partition == "file" else _fewer(cfg) if cfg.max_train_samples or num_clients <= rows else \
            f"lower clients.num_clients ({dataset.name} has {rows} rows in all: fewer than one a client)"
        raise DataError(f"cannot give {num_clients} clients data.min_samples = {cfg.min_samples} training "
                        f"samples each: {dataset.name} has {n} training rows{_kept(cfg)}; {fix}")
    if cfg.partition == "natural":
        return _natural(dataset, num_clients, cfg.min_samples)
    if cfg.partition == "file":
        from fmlray.data.partition_file import load_partition  # noqa: PLC0415 (it imports this module)
        loaded = load_partition(cfg.partition_file, dataset, num_clients)
        _check_sizes(list(loaded.train), cfg)
        return loaded
    train = _SCHEMES[cfg.partition](dataset.y_train, num_clients, cfg, seed)
    _check_sizes(train, cfg)
    test = split_test(dataset, train, np.random.default_rng((seed, _TAGS["test"])), cfg)
    return Partition(tuple(train), tuple(test))


def _groups(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Sorted int64 row indices per client from each row's owner (-1: nobody's)."""
    order = np.argsort(owner, kind="stable")  # stable: rows stay ascending within each client
    counts = np.bincount(owner[owner >= 0], minlength=num_clients)
    start = int(np.sum(owner < 0))
    return [chunk.astype(np.int64) for chunk in np.split(order[start:], np.cumsum(counts)[:-1])]


def _iid(y: np.ndarray, k: int, cfg: DataConfig, seed: int) -> list[np.ndarray]:
    """Shuffle, then split into k near-equal parts."""
    rng = np.random.default_rng((seed, _TAGS["iid"]))
    return [np.sort(part).astype(np.int64) for part in np.array_split(rng.permutation(len(y)), k)]


def _dirichlet(y: np.ndarray, k: int, cfg: DataConfig, seed: int) -> list[np.ndarray]:
    """Hsu et al. (2019): each class split over clients by Dir(alpha); redraw until min_samples holds."""
    smallest = 0
    for attempt in range(DIRICHLET_ATTEMPTS):
        rng = np.random.default_rng((seed, _TAGS["dirichlet"], attempt))
        parts = _dirichlet_draw(y, k, cfg.dirichlet_alpha, rng)
        smallest = min(len(p) for p in parts)
        if smallest >= cfg.min_samples:
            return parts
    raise DataError(f"dirichlet partition: after {DIRICHLET_ATTEMPTS} draws some client still gets only "
                    f"{smallest} training samples (< data.min_samples = {cfg.min_samples}); raise "
                    f"data.dirichlet_alpha (now {cfg.dirichlet_alpha}), or {_fewer(cfg)}")


def _dirichlet_draw(y: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """One draw: class c's shuffled rows cut at the cumulative Dir(alpha) proportions."""
    owner = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha)))[:-1] * len(rows)).astype(np.int64)
        for client, chunk in enumerate(np.split(rows, cuts)):
            owner[chunk] = client
    return _groups(owner, k)


def _shards(y: np.ndarray, k: int, cfg: DataConfig, seed: int) -> list[np.ndarray]:
    """Each client holds classes_per_client classes, dealt round-robin; a class's rows split evenly."""
    rng = np.random.default_rng((seed, _TAGS["shards"]))
    classes, per = np.unique(y), cfg.classes_per_client
    if per > len(classes):
        raise DataError(f"data.classes_per_client = {per} exceeds the {len(classes)} classes in the "
                        f"training set; lower data.classes_per_client")
    order = rng.permutation(classes)
    # Consecutive slots of the cycled order: per <= #classes makes each client's classes distinct.
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for slot in range(k * per):
        holders[int(order[slot % len(classes)])].append(slot // per)
    owner = np.full(len(y), -1, dtype=np.int64)
    for c, clients in holders.items():
        if clients:  # an unheld class (k * per < #classes) is left out
            rows = rng.permutation(np.flatnonzero(y == c))
            for client, chunk in zip(clients, np.array_split(rows, len(clients))):
                owner[chunk] = client
    return _groups(owner, k)


def _quantity(y: np.ndarray, k: int, cfg: DataConfig, seed: int) -> list[np.ndarray]:
    """IID labels, sizes min_samples + a Dir(quantity_alpha) share of the rest."""
    rng = np.random.default_rng((seed, _TAGS["quantity"]))
    spare = len(y) - k * cfg.min_samples  # >= 0: partition_dataset checked it
    sizes = cfg.min_samples + largest_remainder(spare, rng.dirichlet(np.full(k, cfg.quantity_alpha)), rng)
    parts = np.split(rng.permutation(len(y)), np.cumsum(sizes)[:-1])
    return [np.sort(part).astype(np.int64) for part in parts]


_SCHEMES: dict[str, Callable[[np.ndarray, int, DataConfig, int], list[np.ndarray]]] = {
    "iid": _iid, "dirichlet": _dirichlet, "shards": _shards, "quantity": _quantity,
}


HELD_OUT = ("digits", "synthetic")  # the datasets without an official test split: data.test_fraction holds theirs out


def _kept(cfg: DataConfig) -> str:
    return f" (data.max_train_samples = {cfg.max_train_samples} kept)" if cfg.max_train_samples else ""


def _fewer(cfg: DataConfig) -> str:
    """What gives each client more training rows, of the keys this config can still change."""
    ways = ["lower clients.num_clients"]
    if cfg.max_train_samples:
        ways.append(f"raise data.max_train_samples (now {cfg.max_train_samples}; 0 keeps every row)")
    if cfg.dataset in HELD_OUT and cfg.test_fraction > 0 and not cfg.max_train_samples:  # held out of its rows
        ways.append(f"lower data.test_fraction (now {cfg.test_fraction:g})")
    if cfg.min_samples > 1:
        ways.append("lower data.min_samples")
    return ", ".join(ways[:-1]) + (" or " if len(ways) > 1 else "") + ways[-1]


def _check_sizes(train: list[np.ndarray], cfg: DataConfig) -> None:
    """DataError if some client has fewer than data.min_samples training rows."""
    sizes = [len(t) for t in train]
    client = int(np.argmin(sizes))
    if sizes[client] < cfg.min_samples:  # a partition file fixes the clients: only the floor can move
        what, fix = ((f"partition file {cfg.partition_file}", "lower data.min_samples to use it as it is")
                     if cfg.partition == "file" else (f"{cfg.partition} partition", _fewer(cfg)))
        raise DataError(f"{what} gives client {client} only {sizes[client]} training samples "
                        f"(< data.min_samples = {cfg.min_samples}); {fix}")


def split_test(dataset: Dataset, train: list[np.ndarray], rng: np.random.Generator,
               cfg: DataConfig | None = None) -> list[np.ndarray]:
    """Deal each class's test rows to clients in proportion to their train counts of that class."""
    k = len(train)
    counts = np.stack([np.bincount(dataset.y_train[t], minlength=dataset.num_classes) for t in train])
    owner = np.full(len(dataset.y_test), -1, dtype=np.int64)
    for c in np.unique(dataset.y_test):
        take = largest_remainder(int(np.sum(dataset.y_test == c)), counts[:, c], rng)
        if take.sum():  # no client trains on c: nobody is tested on it
            rows = rng.permutation(np.flatnonzero(dataset.y_test == c))
            owner[rows] = np.repeat(np.arange(k), take)
    test = _groups(owner, k)
    for client, rows in enumerate(test):
        if len(rows) == 0:
            larger = [*(["data.test_fraction"] if cfg is None or cfg.dataset in HELD_OUT else []),
                      *(["data.max_test_samples"] if cfg is None or cfg.max_test_samples else [])]
            raise DataError(f"client {client} gets no test samples ({len(train[client])} training samples "
                            f"earn no share of the {len(dataset.y_test)} test rows); use fewer clients "
                            f"(clients.num_clients), " + (f"a larger test set ({', '.join(larger)}), " if larger else "")
                            + "or a larger data.min_samples")
    return test


def _natural(dataset: Dataset, k: int, min_samples: int) -> Partition:
    """Client k gets the rows the synthetic generator made for natural client k."""
    if dataset.train_owner is None or dataset.test_owner is None:
        raise DataError(f"data.partition = 'natural' needs a dataset with natural clients (synthetic), "
                        f"not {dataset.name}")
    found = int(max(dataset.train_owner.max(initial=-1), dataset.test_owner.max(initial=-1))) + 1
    if found != k:
        raise DataError(f"{dataset.name} was made for {found} natural clients but clients.num_clients = {k}; "
                        f"load it with the same number of clients")
    train, test = _groups(dataset.train_owner, k), _groups(dataset.test_owner, k)
    for client, (tr, te) in enumerate(zip(train, test)):
        if len(tr) < min_samples or len(te) == 0:
            raise DataError(f"natural client {client} has {len(tr)} training and {len(te)} test samples "
                            f"(needs >= data.min_samples = {min_samples} and >= 1); lower data.min_samples "
                            f"or raise data.max_train_samples / data.max_test_samples")
    return Partition(tuple(train), tuple(test))
