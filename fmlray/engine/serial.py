"""The serial engine: every client in one in-process host. The debug backend and the reference
the Ray engine is checked against."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import psutil

from fmlray.aggregate import State
from fmlray.config import Config
from fmlray.data import Dataset, Partition
from fmlray.engine.base import EvalResult, RoundResult
from fmlray.engine.host import ClientHost, evaluate_global
from fmlray.engine.resources import check_memory, plan_store
from fmlray.engine.state import state_folder


class SerialEngine:
    def start(self, cfg: Config, dataset: Dataset, partition: Partition) -> None:
        self.cfg, self.dataset = cfg, dataset
        memory = psutil.virtual_memory().total
        self.plan = plan_store(cfg, dataset, memory)
        check_memory(cfg, self.plan, dataset.nbytes, 0, memory)
        self.notes = [self.plan.line]
        folder, self.scratch = state_folder(cfg.engine.state_dir, uuid.uuid4().hex[:8], "serial")
        self.host = ClientHost(cfg, dataset, partition, list(range(partition.num_clients)), store=self.plan.kind,
                               state_dir=folder if self.plan.kind == "disk" else None)

    def train_round(self, rnd: int, client_ids: list[int], global_state: State | None) -> RoundResult:
        partial, clients = self.host.train(rnd, client_ids, global_state)
        return RoundResult(self.host.algo.server.next_global(global_state, partial), clients)

    def evaluate(self, global_state: State | None, client_ids: list[int] | None = None) -> EvalResult:
        return EvalResult(self.host.evaluate(global_state, client_ids),
                          evaluate_global(self.cfg, self.dataset, global_state))

    def check_writable(self, folder: Path) -> None:
        pass  # the driver itself writes here, and made the folder

    def checkpoint(self, rnd: int, folder: Path) -> list[dict]:
        return self.host.write_checkpoint(folder, f"rows-r{rnd:06d}-serial")

    def restore(self, folder: Path, refs: dict) -> None:
        self.host.restore_rows(folder, refs)

    def checkpoint_moved(self, folder: Path) -> None:
        pass  # nothing here remembers where the checkpoint is

    def fetch(self, state: State | None) -> State | None:
        return state

    def close(self) -> None:
        host = getattr(self, "host", None)
        if host is not None:
            host.close()
        if getattr(self, "scratch", None) is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
