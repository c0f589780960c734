"""The serial engine: every client in one in-process host. The debug backend and the reference
the Ray engine is checked against."""

from __future__ import annotations

from fmlray import aggregate
from fmlray.aggregate import State
from fmlray.config import Config
from fmlray.data import Dataset, Partition
from fmlray.engine.base import EvalResult, RoundResult
from fmlray.engine.host import ClientHost, evaluate_global


class SerialEngine:
    def start(self, cfg: Config, dataset: Dataset, partition: Partition) -> None:
        self.cfg, self.dataset = cfg, dataset
        self.host = ClientHost(cfg, dataset, partition, list(range(partition.num_clients)))

    def train_round(self, rnd: int, client_ids: list[int], global_state: State | None) -> RoundResult:
        partial, clients = self.host.train(rnd, client_ids, global_state)
        return RoundResult(aggregate.next_global(global_state, partial), clients)

    def evaluate(self, global_state: State | None) -> EvalResult:
        return EvalResult(self.host.evaluate(global_state), evaluate_global(self.cfg, self.dataset, global_state))

    def snapshot(self, rnd: int) -> State:
        return self.host.private_state()

    def restore(self, private: State) -> None:
        self.host.load_private_state(private)

    def fetch(self, state: State | None) -> State | None:
        return state

    def close(self) -> None:
        pass
