"""The in-memory dataset every loader returns, and seeded stratified row selection."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np


# eq=False: arrays do not compare to one bool, so identity equality (and hashing) is the sane choice.
@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test arrays of one dataset; images are (N, C, H, W), features (N, D)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    train_owner: np.ndarray | None = None  # natural client id of each row (synthetic only)
    test_owner: np.ndarray | None = None

    def __post_init__(self):
        # Programming errors in a loader, not user errors: fail loudly right where they happen.
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError(f"{self.name}: features and labels differ in length")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: train and test rows differ in shape")
        for owner, y in ((self.train_owner, self.y_train), (self.test_owner, self.y_test)):
            if owner is not None and len(owner) != len(y):
                raise ValueError(f"{self.name}: owners and labels differ in length")

    def fingerprint(self) -> str:
        """A CRC-32 of every array, with the row counts: what a checkpoint records so that a resumed run refuses
        other data (a dataset file replaced in data.root meanwhile), and a run's partition.npz, so that it is
        not used on other rows. ~1 GB/s: ~0.2 s for Fashion-MNIST, once (kept)."""
        if "_fingerprint" in self.__dict__:
            return self.__dict__["_fingerprint"]
        crc = 0
        for a in (self.x_train, self.y_train, self.x_test, self.y_test, self.train_owner, self.test_owner):
            if a is not None:
                crc = zlib.crc32(str(a.dtype).encode(), crc)
                crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1), crc)
        object.__setattr__(self, "_fingerprint", f"{crc:08x}-{len(self.y_train)}-{len(self.y_test)}")
        return self.__dict__["_fingerprint"]

    @property
    def nbytes(self) -> int:
        """Bytes of its arrays (one copy)."""
        return sum(a.nbytes for a in (self.x_train, self.y_train, self.x_test, self.y_test) if a is not None)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input row, e.g. (1, 28, 28) or (60,)."""
        return tuple(self.x_train.shape[1:])


def largest_remainder(total: int, weights: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Split the integer `total` in proportion to `weights`; ties go to a random (seeded) side."""
    weights = np.asarray(weights, dtype=np.float64)
    if total <= 0 or weights.sum() <= 0:
        return np.zeros(len(weights), dtype=np.int64)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    remainder = exact - counts
    # Random tie-break so equal remainders do not always favour the lowest indices.
    tiebreak = rng.random(len(weights)) if rng is not None else np.zeros(len(weights))
    order = np.lexsort((tiebreak, -remainder))
    counts[order[: total - counts.sum()]] += 1
    return counts


def stratified_indices(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `n` rows of `y` keeping its class proportions (all rows if n >= len(y))."""
    if n >= len(y):
        return np.arange(len(y), dtype=np.int64)
    classes, counts = np.unique(y, return_counts=True)
    take = largest_remainder(n, counts, rng)
    picked = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def stratified_split(y: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) sorted indices; the test part holds round(test_fraction * N) rows, stratified."""
    test = stratified_indices(y, int(round(test_fraction * len(y))), rng)
    train = np.setdiff1d(np.arange(len(y), dtype=np.int64), test)
    return train, test
