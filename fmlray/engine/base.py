"""The seam between the round loop and the machinery that runs client updates.

An engine hosts the clients (data, private models), runs a round for some client ids against
a broadcast global state and returns the new global state, and evaluates. The serial engine
does this in-process; the Ray engine with client actors and an aggregator actor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fmlray.aggregate import State
from fmlray.config import Config
from fmlray.data import Dataset, Partition

if TYPE_CHECKING:  # the aggregator imports this package and must not import torch (fmlray.engine.state does)
    from fmlray.engine.state import RowRef


@dataclass(frozen=True)
class RoundResult:
    global_state: object  # the new global (meme) model, as the engine keeps it (see Engine.fetch)
    clients: list[dict]  # per trained client: client, samples, seconds, <model>_loss, <model>_accuracy
    # (or "excluded": why its update was left out); failures: {"clients": [...], "note": ...} per lost actor
    failures: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class EvalResult:
    clients: list[dict]  # per client: client, test_samples, local_/global_ loss and accuracy
    global_test: tuple[float, float] | None  # (loss, accuracy) of the global model on the global test set
    failures: list[dict] = field(default_factory=list)  # as RoundResult's: actors lost while evaluating


class Engine(Protocol):
    def start(self, cfg: Config, dataset: Dataset, partition: Partition) -> None: ...

    def train_round(self, rnd: int, client_ids: list[int], global_state: State | None,
                    progress: Callable[[int], None] | None = None) -> RoundResult:
        """Train the clients; `progress(done)`, if given, hears now and then how many have finished."""

    def evaluate(self, global_state: State | None, client_ids: list[int] | None = None,
                 progress: Callable[[int], None] | None = None) -> EvalResult:
        """The given clients' (None: every client's) local and global models on their test splits."""

    def check_writable(self, folder: Path) -> None:
        """Fail with one line unless every host can write checkpoint files into `folder` and the driver sees them."""

    def checkpoint(self, rnd: int, folder: Path) -> list[dict]:
        """Each host writes the rows of private state changed since the last checkpoint into `folder`;
        returns their manifest entries (and remembers them, to restore lost actors' clients from)."""

    def restore(self, folder: Path, refs: dict[int, RowRef], placement: dict | None = None) -> None:
        """Load each client's row named in `refs` from the checkpoint `folder` (when resuming a run), with the
        clients where `placement` (what `placement()` said at that checkpoint) had them, if it still fits."""

    def placement(self) -> dict | None:
        """Where each client is (JSON), kept in checkpoints: hosts' partial sums group clients by where they
        are, so a resumed run that puts them back sums exactly as the uninterrupted one (None: one host)."""

    def checkpoint_moved(self, folder: Path) -> None:
        """The last checkpoint's folder was renamed to `folder` (a new run moved into place)."""

    def take_failures(self) -> list[dict]:
        """Hosts lost since the last round's result said (while checkpointing), as RoundResult's `failures`."""

    def fetch(self, state) -> State | None:
        """The global state as numpy arrays (an engine may keep it elsewhere between rounds)."""

    def close(self) -> None: ...
