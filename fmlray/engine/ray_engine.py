"""The Ray engine: client actors own clients, an aggregator actor averages their memes.

Per round the driver puts the global state in the object store once and hands the same ref to
every actor; each actor trains its sampled clients in turn and returns one weighted partial sum,
which goes from the object store straight into the aggregator (the driver only holds refs), so
traffic per round is O(actors). The new global state stays in the object store as the next
round's broadcast. The dataset is put once; actors index it zero-copy.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings

import ray

from fmlray import aggregate
from fmlray.aggregate import State
from fmlray.config import Config
from fmlray.data import Dataset, Partition
from fmlray.engine.base import EvalResult, RoundResult
from fmlray.engine.host import ClientHost, evaluate_global
from fmlray.engine.resources import ActorSpec, Capacity, plan_actors
from fmlray.errors import ResourceError

READY_TIMEOUT_S = float(os.environ.get("FMLRAY_READY_TIMEOUT_S", "180"))


def pick_device(num_gpus: float) -> str:
    """The GPU Ray assigned to this actor, capped to its fraction; CPU (with a warning) when unusable."""
    if num_gpus <= 0:
        return "cpu"
    import torch
    if not torch.cuda.is_available():
        warnings.warn(f"actor asked for {num_gpus} GPU but CUDA is not usable here; training on the CPU")
        return "cpu"
    # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU(s), which torch then numbers from 0.
    if num_gpus < 1:
        torch.cuda.set_per_process_memory_fraction(num_gpus, 0)
    return "cuda:0"


class ClientActor:
    """A Ray actor hosting some clients: a `ClientHost` on its own CPU threads / GPU share."""

    def __init__(self, cfg: Config, dataset: Dataset, partition: Partition, spec: ActorSpec):
        import torch
        torch.set_num_threads(max(1, int(spec.num_cpus)))
        self.device = pick_device(spec.num_gpus)
        self.host = ClientHost(cfg, dataset, partition, list(spec.client_ids), device=self.device)

    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": self.device,
                "pid": os.getpid()}

    def train(self, rnd: int, client_ids: list[int], global_state: State | None):
        return self.host.train(rnd, client_ids, global_state)

    def evaluate(self, global_state: State | None) -> list[dict]:
        return self.host.evaluate(global_state)


class Aggregator:
    """Receives partial sums straight from the object store; owns the global test evaluation."""

    def __init__(self, cfg: Config, dataset: Dataset):
        import torch
        torch.set_num_threads(1)
        self.cfg, self.dataset = cfg, dataset
        self.seconds: list[float] = []

    def aggregate(self, previous: State, *partials: aggregate.PartialSum | None) -> State:
        started = time.perf_counter()
        total = aggregate.combine(p for p in partials if p is not None)  # in actor = client-id order
        new = previous if total is None else aggregate.finalize(total, previous)
        self.seconds.append(time.perf_counter() - started)
        return new

    def aggregate_seconds(self) -> list[float]:
        """Time spent averaging, per call (for benchmarks)."""
        return self.seconds

    def evaluate(self, state: State | None):
        return evaluate_global(self.cfg, self.dataset, state)


def _reachable(address: str) -> bool:
    """A quick TCP check of a "host:port" address, so a wrong one fails now instead of after minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return True  # "auto", "ray://...", or a form Ray itself will judge
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        return True
    except OSError:
        return False


def connect(address: str) -> bool:
    """Join `address` (or RAY_ADDRESS), else start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    hint = "check engine.address / RAY_ADDRESS, or leave both empty for a local Ray"
    if address and not _reachable(address):
        raise ResourceError(f"no Ray cluster answers at {address}; {hint}")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:  # a private single-node Ray: keep it on loopback
            # "local": a new instance, never one a `ray start` left behind on this machine
            ray.init(address="local", logging_level=logging.WARNING, include_dashboard=False,
                     _node_ip_address="127.0.0.1")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ResourceError(f"cannot reach a Ray cluster at {address or 'a new local instance'} ({first}); {hint}") from None
    return True


def capacity() -> Capacity:
    """What the live nodes hold in all. (Totals, not what is free this instant: actors of a run that
    just ended free theirs a moment later; resources held for long are caught by the ready timeout.)"""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    return Capacity(cpus=total.get("CPU", 0.0), gpus=total.get("GPU", 0.0),
                    node_cpus=max((n.get("CPU", 0.0) for n in nodes), default=0.0),
                    node_gpus=max((n.get("GPU", 0.0) for n in nodes), default=0.0))


class RayEngine:
    def start(self, cfg: Config, dataset: Dataset, partition: Partition) -> None:
        self.cfg = cfg
        self.owns_ray = connect(cfg.engine.address)
        self.specs = plan_actors(cfg, capacity())
        data_ref, part_ref = ray.put(dataset), ray.put(partition)  # once; actors read them zero-copy
        actor_cls, agg_cls = ray.remote(ClientActor), ray.remote(Aggregator)
        self.actors = [actor_cls.options(num_cpus=s.num_cpus, num_gpus=s.num_gpus, scheduling_strategy="SPREAD",
                                         name=None).remote(cfg, data_ref, part_ref, s) for s in self.specs]
        # The aggregator reserves no CPU: it works between rounds, while client actors wait.
        self.aggregator = agg_cls.options(num_cpus=0).remote(cfg, data_ref)
        self.owner = {cid: i for i, s in enumerate(self.specs) for cid in s.client_ids}
        self.infos = self._wait_ready()

    def _wait_ready(self) -> list[dict]:
        refs = [a.info.remote() for a in self.actors] + [self.aggregator.__ray_ready__.remote()]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=READY_TIMEOUT_S)
        if pending:
            self.close()
            raise ResourceError(f"{len(pending)} of {len(refs)} actors did not start within {READY_TIMEOUT_S:g}s "
                                "(the cluster is busy or too small); lower engine.num_actors or the groups' "
                                "num_cpus/num_gpus")
        return ray.get(refs[:-1])

    def train_round(self, rnd: int, client_ids: list[int], global_state) -> RoundResult:
        g_ref = global_state if isinstance(global_state, ray.ObjectRef) else ray.put(global_state)
        per_actor: dict[int, list[int]] = {}
        for cid in client_ids:
            per_actor.setdefault(self.owner[cid], []).append(cid)
        partials, metric_refs = [], []
        for i in sorted(per_actor):
            partial_ref, metrics_ref = self.actors[i].train.options(num_returns=2).remote(rnd, per_actor[i], g_ref)
            partials.append(partial_ref)
            metric_refs.append(metrics_ref)
        new_ref = self.aggregator.aggregate.remote(g_ref, *partials) if global_state is not None else None
        clients = [m for ms in ray.get(metric_refs) for m in ms]
        return RoundResult(new_ref, clients)

    def evaluate(self, global_state) -> EvalResult:
        refs = [a.evaluate.remote(global_state) for a in self.actors]
        test_ref = self.aggregator.evaluate.remote(global_state)
        clients = sorted((r for rs in ray.get(refs) for r in rs), key=lambda r: r["client"])
        return EvalResult(clients, ray.get(test_ref))

    def fetch(self, state):
        return ray.get(state) if isinstance(state, ray.ObjectRef) else state

    def close(self) -> None:
        for a in getattr(self, "actors", []) + [getattr(self, "aggregator", None)]:
            if a is not None:
                ray.kill(a)
        self.actors, self.aggregator = [], None
        if getattr(self, "owns_ray", False):
            ray.shutdown()
            self.owns_ray = False
