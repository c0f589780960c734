"""Weighted averaging by hand, partial sums in any grouping, and BatchNorm buffers."""

import numpy as np
import torch
from torch import nn

from fmlray import aggregate
from fmlray.engine.host import state_of


def average(states, weights):
    """The weighted mean of whole states, as the aggregator computes it from one partial sum per client."""
    return aggregate.finalize(aggregate.combine(aggregate.weighted(s, w) for s, w in zip(states, weights)), states[0])


def test_weighted_average_by_hand():
    a = {"w": np.array([1.0, 2.0], np.float32)}
    b = {"w": np.array([3.0, 6.0], np.float32)}
    out = average([a, b], [1, 3])
    np.testing.assert_array_equal(out["w"], [2.5, 5.0])
    assert out["w"].dtype == np.float32


def test_uniform_weights_are_the_plain_mean():
    states = [{"w": np.full(3, v, np.float32)} for v in (1.0, 2.0, 6.0)]
    np.testing.assert_allclose(average(states, [1, 1, 1])["w"], 3.0)


def test_partial_sums_in_any_grouping_give_the_same_mean():
    rng = np.random.default_rng(0)
    states = [{"w": rng.normal(size=(4, 3)).astype(np.float32)} for _ in range(5)]
    weights = [3.0, 1.0, 7.0, 2.0, 5.0]
    parts = [aggregate.weighted(s, w) for s, w in zip(states, weights)]
    whole = aggregate.finalize(aggregate.combine(parts), states[0])
    grouped = aggregate.combine([aggregate.combine(parts[:2]), aggregate.combine(parts[2:3]), aggregate.combine(parts[3:])])
    assert grouped.count == 5 and grouped.weight == sum(weights)
    np.testing.assert_allclose(aggregate.finalize(grouped, states[0])["w"], whole["w"], rtol=0, atol=1e-7)
    expected = sum(w * s["w"].astype(np.float64) for s, w in zip(states, weights)) / sum(weights)
    np.testing.assert_allclose(whole["w"], expected, atol=1e-6)


def test_next_global_is_the_mean_or_the_previous_state_when_no_update_came():
    previous = {"w": np.array([9.0], np.float32)}
    part = aggregate.weighted({"w": np.array([1.0], np.float32)}, 2.0)
    assert aggregate.Server().next_global(previous, None) is previous
    np.testing.assert_array_equal(aggregate.Server().next_global(previous, part)["w"], [1.0])


def test_batchnorm_float_buffers_average_and_counters_stay_integers():
    def bn(mean, count):
        m = nn.BatchNorm1d(2)
        m.running_mean.copy_(torch.tensor(mean))
        m.num_batches_tracked.fill_(count)
        return state_of(m)

    out = average([bn([0.0, 2.0], 3), bn([4.0, 6.0], 10)], [1, 1])
    np.testing.assert_array_equal(out["running_mean"], [2.0, 4.0])
    assert out["num_batches_tracked"].dtype == np.int64
    assert int(out["num_batches_tracked"]) == 10  # max, never a float mean such as 6.5
    m = nn.BatchNorm1d(2)
    m.load_state_dict({k: torch.from_numpy(v) for k, v in out.items()})  # loads back into a real module


def test_single_client_average_is_that_client():
    s = {"w": np.array([0.1, 0.2], np.float32), "n": np.array(4, np.int64)}
    out = average([s], [42])
    np.testing.assert_array_equal(out["w"], s["w"])
    assert int(out["n"]) == 4
