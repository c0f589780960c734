"""Weighted averaging of state dicts (numpy), built from partial sums.

A host of several clients sends one `PartialSum` per round instead of one state per client, so
traffic is O(hosts). Floating entries are summed in float64 and divided once at the end;
integer buffers (BatchNorm's `num_batches_tracked`) take the max and stay integers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

State = dict[str, np.ndarray]


@dataclass(frozen=True)
class PartialSum:
    """Σ wᵢ·stateᵢ over some clients (max for integer entries), with Σ wᵢ and the client count."""

    sums: State
    weight: float
    count: int


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def weighted(state: Mapping[str, np.ndarray], weight: float) -> PartialSum:
    """The partial sum of one client's state."""
    sums = {k: v.astype(np.float64) * weight if _is_float(v) else v.copy() for k, v in state.items()}
    return PartialSum(sums, float(weight), 1)


def add(a: PartialSum, b: PartialSum) -> PartialSum:
    """Merge two partial sums."""
    sums = {k: a.sums[k] + b.sums[k] if _is_float(a.sums[k]) else np.maximum(a.sums[k], b.sums[k]) for k in a.sums}
    return PartialSum(sums, a.weight + b.weight, a.count + b.count)


def combine(partials: Iterable[PartialSum]) -> PartialSum | None:
    """Merge partial sums in the order given (callers pass them in client-id order)."""
    total = None
    for p in partials:
        total = p if total is None else add(total, p)
    return total


def finalize(total: PartialSum, like: Mapping[str, np.ndarray]) -> State:
    """The weighted mean, cast back to the dtypes of `like`."""
    if total.weight <= 0:
        raise ValueError("cannot average with a total weight of 0")
    # np.asarray: 0-d entries (BatchNorm's counter) must stay arrays, not become numpy scalars
    return {k: np.asarray(v / total.weight if _is_float(v) else v, dtype=like[k].dtype) for k, v in total.sums.items()}


@dataclass(frozen=True)
class Server:
    """An algorithm's server half: how clients' shares are weighted, and the new global state from the
    weighted mean. Plain numbers, no torch: the aggregator actor calls it.

    `lr` is a server learning rate (FedAvgM without momentum; Hsu et al., arXiv 1909.06335): the new global
    state is previous + lr·(mean − previous). At 1 it is the mean itself (returned as is, not recomputed)."""

    weighting: str = "samples"  # "samples": by the client's training samples; "uniform": 1 each
    lr: float = 1.0

    def weight(self, samples: int) -> float:
        return float(samples) if self.weighting == "samples" else 1.0

    def next_global(self, previous: State, total: PartialSum | None) -> State:
        """The round's new global state; `previous` unchanged when no update came."""
        if total is None:
            return previous
        mean = finalize(total, previous)
        if self.lr == 1.0:
            return mean
        # integer buffers (BatchNorm's counters) take the mean's value: a step between counts means nothing
        return {k: np.asarray(previous[k] + self.lr * (mean[k].astype(np.float64) - previous[k]), dtype=mean[k].dtype)
                if _is_float(mean[k]) else mean[k] for k in mean}

