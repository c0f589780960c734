"""The aggregator actor's class, in a module that imports numpy but not torch.

Ray imports an actor's class by its module in the new worker process, so keeping torch out of
this module keeps it out of the aggregator: ~450 MiB of PSS and ~1.5 s of start-up per run on
this project's torch wheel. (The global test evaluation, which needs torch, runs in the driver.)
"""

from __future__ import annotations

import time

from fmlray import aggregate, signals
from fmlray.aggregate import PartialSum, Server, State


class Aggregator:
    """Receives client actors' partial sums straight from the object store and applies the algorithm's
    server half (`fmlray.aggregate.Server`, plain numbers) to their combined sum; between rounds it is
    idle, so it also keeps the count of clients done in the current call (progress)."""

    def __init__(self) -> None:
        signals.redeliver_lost_sigterm()
        self.serve()

    def serve(self) -> None:
        """Start afresh for a run: at creation, and for each later run that reuses this actor."""
        self.seconds: list[float] = []
        self.tag, self.done = "", {}

    def tick(self, tag: str, actor: int, done: int) -> None:
        """Client actor `actor` has finished `done` of its clients in the call named `tag` (progress)."""
        if tag != self.tag:
            self.tag, self.done = tag, {}
        self.done[actor] = done

    def progress(self, tag: str) -> dict[int, int]:
        return dict(self.done) if tag == self.tag else {}

    def aggregate(self, server: Server, previous: State, *partials: PartialSum | None) -> State:
        started = time.perf_counter()
        total = aggregate.combine(p for p in partials if p is not None)  # by each call's first client id
        new = server.next_global(previous, total)
        self.seconds.append(time.perf_counter() - started)
        return new

    def aggregate_seconds(self) -> list[float]:
        """Time spent averaging, per call (for benchmarks)."""
        return self.seconds
