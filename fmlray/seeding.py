"""Every random draw derives from (seed, purpose, round, client), never from global RNG state,
so results do not depend on which actor ran which client, or in what order."""

from __future__ import annotations

import numpy as np

# purposes; PARTITION is unused (partitions seed with their own tags, fmlray.data.partition) but keeps its
# number: removing it would renumber EVAL_SAMPLE and change every run's sampled evaluation clients
LOCAL_INIT, BATCH_ORDER, SAMPLING, GLOBAL_INIT, PARTITION, EVAL_SAMPLE = range(6)


def derive_seed(*keys: int) -> int:
    """A seed below 2**63 from a tuple of non-negative ints. numpy computes the dot below in float64 (uint64 with
    int64), so a seed has 53 significant bits, not 63: plenty to keep draws apart, and left as it is, since exact
    integer arithmetic would change every run's draws (recorded curves, and a resumed older run's next rounds)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32).astype(np.uint64)
               .dot([1 << 31, 1]))
