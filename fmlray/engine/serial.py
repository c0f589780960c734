"""The serial engine: every client in one in-process host. The debug backend and the reference
the Ray engine is checked against."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

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
        # The threads an actor of the groups would use (1 by default), not torch's default of every core:
        # the reference computes as the actors do, and two threads on a busy 2-core machine ran 12x slower.
        # Capped at the cores this process may use: more threads than cores only fight (num_cpus = 1000 made a
        # round 500x slower); the Ray engine refuses such a group instead, as no actor could be placed.
        self.threads = torch.get_num_threads()
        asked, cores = max(1, int(max(g.num_cpus for g in cfg.clients.groups))), len(os.sched_getaffinity(0))
        torch.set_num_threads(min(asked, cores))
        memory = psutil.virtual_memory().total
        self.plan = plan_store(cfg, dataset, memory)
        check_memory(cfg, self.plan, dataset.nbytes, 0, memory)
        self.notes = [self.plan.line] + ([f"{cores} torch thread(s): the groups' num_cpus ({asked}) capped at the "
                                          f"{cores} core(s) this process may use"] if asked > cores else [])
        unused = [*(["engine.address"] if cfg.engine.address else []),  # what only the Ray engine reads
                  *(["engine.num_actors"] if cfg.engine.num_actors else []),
                  *(f"clients.groups[{g.name}].num_gpus" for g in cfg.clients.groups if g.num_gpus > 0)]
        if unused:
            self.notes.append(f"the serial engine trains in this process on the CPU: {', '.join(unused)} unused")
        folder, self.scratch = state_folder(cfg.engine.state_dir, uuid.uuid4().hex[:8], "serial")
        self.host = ClientHost(cfg, dataset, partition, list(range(partition.num_clients)), store=self.plan.kind,
                               state_dir=folder if self.plan.kind == "disk" else None)

    def train_round(self, rnd: int, client_ids: list[int], global_state: State | None,
                    progress: Callable[[int], None] | None = None) -> RoundResult:
        partial, clients = self.host.train(rnd, client_ids, global_state, tick=progress)
        return RoundResult(self.host.algo.server.next_global(global_state, partial), clients)

    def evaluate(self, global_state: State | None, client_ids: list[int] | None = None,
                 progress: Callable[[int], None] | None = None) -> EvalResult:
        return EvalResult(self.host.evaluate(global_state, client_ids, tick=progress),
                          evaluate_global(self.cfg, self.dataset, global_state))

    def check_writable(self, folder: Path) -> None:
        pass  # the driver itself writes here, and made the folder

    def checkpoint(self, rnd: int, folder: Path) -> list[dict]:
        return self.host.write_checkpoint(folder, f"rows-r{rnd:06d}-serial")

    def restore(self, folder: Path, refs: dict, placement: dict | None = None) -> None:
        self.host.restore_rows(folder, refs)

    def placement(self) -> None:
        return None  # one host holds every client

    def checkpoint_moved(self, folder: Path) -> None:
        pass  # nothing here remembers where the checkpoint is

    def take_failures(self) -> list[dict]:
        return []  # one process: nothing to lose

    def fetch(self, state: State | None) -> State | None:
        return state

    def close(self) -> None:
        if getattr(self, "threads", None):
            torch.set_num_threads(self.threads)
            self.threads = None
        host = getattr(self, "host", None)
        if host is not None:
            host.close()
        if getattr(self, "scratch", None) is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
