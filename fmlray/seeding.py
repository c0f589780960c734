"""Every random draw derives from (seed, purpose, round, client), never from global RNG state,
so results do not depend on which actor ran which client, or in what order."""

from __future__ import annotations

import numpy as np

# purposes; PARTITION is unused (partitions seed with their own tags, fmlray.data.partition) but keeps its
# number: removing it would renumber EVAL_SAMPLE and change every run's sampled evaluation clients
LOCAL_INIT, BATCH_ORDER, SAMPLING, GLOBAL_INIT, PARTITION, EVAL_SAMPLE = range(6)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32).astype(np.uint64)
               .dot([1 << 31, 1]))
