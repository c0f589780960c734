"""The Ray engine: client actors own clients, an aggregator actor averages their memes.

Per round the driver puts the global state in the object store once and hands the same ref to
every actor; each actor trains its sampled clients in turn and returns one weighted partial sum,
which goes from the object store straight into the aggregator (the driver only holds refs), so
traffic per round is O(actors). When one actor beside the driver holds every sampled client, it
averages them itself and the aggregator is skipped. The new global state stays in the object
store as the next round's broadcast. The dataset is put once; actors index it zero-copy.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fmlray import aggregate
from fmlray.aggregate import State
from fmlray.config import Config
from fmlray.data import Dataset, Partition
from fmlray.engine.aggregator import Aggregator
from fmlray.engine.base import EvalResult, RoundResult
from fmlray.engine.host import ClientHost, evaluate_global
from fmlray.engine.resources import ActorSpec, Capacity, plan_actors
from fmlray.errors import FmlrayError, ResourceError

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


def device_facts(device: str, modules) -> dict:
    """Where an actor really computes: its modules' tensor devices and, on a GPU, what CUDA and the
    caching allocator say (the memory cap, the peak allocated). Read by `ClientActor.info`."""
    facts = {"tensor_devices": sorted({str(t.device) for m in modules for t in (*m.parameters(), *m.buffers())}),
             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if device.startswith("cuda"):
        import torch
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # newer torch only
        facts |= {"gpu_name": torch.cuda.get_device_name(0), "cuda_device_count": torch.cuda.device_count(),
                  "memory_fraction": None if getter is None else float(getter(0)),
                  "total_memory": torch.cuda.get_device_properties(0).total_memory,
                  "max_memory_allocated": torch.cuda.max_memory_allocated(0)}
    return facts


def held_modules(host) -> list:
    """The models a client host holds right now, whatever its layout: the meme workspace, clients' own
    models, per-architecture workspaces (anything with a `.model`); for `info`, without relying on the
    host's attribute names."""
    from torch import nn
    found: list = []

    def add(x) -> None:
        m = x if isinstance(x, nn.Module) else getattr(x, "model", None)
        if isinstance(m, nn.Module) and not any(m is f for f in found):
            found.append(m)

    if host is None:
        return found
    for value in vars(host).values():
        for x in (value.values() if isinstance(value, dict) else [value]):
            add(x)
    for c in getattr(host, "clients", {}).values():
        add(getattr(c, "local", None))
    return found


def _subset(private: State, client_ids: list[int]) -> State:
    """The entries of a flat private state that belong to `client_ids`."""
    keep = {str(c) for c in client_ids}
    return {k: v for k, v in private.items() if k.split("/", 1)[0] in keep}


class ClientActor:
    """A Ray actor hosting some clients: a `ClientHost` on its own CPU threads / GPU share."""

    def __init__(self, cfg: Config, dataset: Dataset, partition: Partition, spec: ActorSpec):
        import torch
        torch.set_num_threads(max(1, int(spec.num_cpus)))
        self.num_gpus = spec.num_gpus
        self.device = pick_device(spec.num_gpus)
        self.host = ClientHost(cfg, dataset, partition, list(spec.client_ids), device=self.device)

    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": self.device,
                "pid": os.getpid(), "num_gpus": self.num_gpus, **device_facts(self.device, held_modules(self.host))}

    def train(self, rnd: int, client_ids: list[int], global_state: State | None, final: bool = False):
        """The clients' partial sum and metrics; with `final` (this call holds every client of the
        round), the new global state itself, averaged here instead of in the aggregator."""
        partial, metrics = self.host.train(rnd, client_ids, global_state)
        return (aggregate.next_global(global_state, partial) if final else partial), metrics

    def evaluate(self, global_state: State | None, client_ids: list[int]) -> list[dict]:
        return self.host.evaluate(global_state, client_ids)

    def private_state(self, client_ids: list[int]) -> State:
        return self.host.private_state(client_ids)

    def load_private_state(self, private: State) -> None:
        self.host.load_private_state(private)

    def adopt(self, client_ids: list[int], private: State) -> None:
        """Take over clients of a lost actor, with their last saved private state."""
        self.host.add_clients(client_ids, private)


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
        self.cfg, self.dataset = cfg, dataset
        self.owns_ray = connect(cfg.engine.address)
        self.specs = plan_actors(cfg, capacity(), cost=[len(rows) for rows in partition.train])
        data_ref, part_ref = ray.put(dataset), ray.put(partition)  # once; actors read them zero-copy
        actor_cls, agg_cls = ray.remote(ClientActor), ray.remote(Aggregator)
        self.actors = [actor_cls.options(num_cpus=s.num_cpus, num_gpus=s.num_gpus, scheduling_strategy="SPREAD",
                                         name=None).remote(cfg, data_ref, part_ref, s) for s in self.specs]
        # The aggregator reserves no CPU (it works between rounds, while client actors wait) and
        # lives beside the driver, on the head: losing a worker node must not take the global model.
        # Hard affinity: a soft one counts a node whose CPUs are all held by client actors as
        # unavailable and spills the aggregator to any other node (seen on the three-node test).
        driver_node = ray.get_runtime_context().get_node_id()
        here = NodeAffinitySchedulingStrategy(driver_node, soft=False)
        self.aggregator = agg_cls.options(num_cpus=0, scheduling_strategy=here).remote()
        self.owner = {cid: i for i, s in enumerate(self.specs) for cid in s.client_ids}
        self.lost: set[int] = set()
        self.failures: list[dict] = []
        # the private state of the last snapshot (checkpoint): what a lost actor's clients restart from
        self.saved: State = {}
        self.saved_round = "round 0 (no checkpoint yet: their initial models)"
        self.infos = self._wait_ready()
        # Actors that may return a round's new global state themselves: only those beside the driver,
        # so that, like the aggregator's, it lives on the head and outlives any worker node.
        self.beside_driver = {a for a, info in zip(self.actors, self.infos) if info["node"] == driver_node}

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
        # A call holding every client of the round, on the driver's node, averages in the actor: one
        # object-store hop a round fewer (~3 ms, half the 1-actor overhead).
        def final(actor, ids) -> bool:
            return global_state is not None and len(ids) == len(client_ids) and actor in self.beside_driver

        done, failures = self._dispatch(client_ids, lambda a, ids: a.train.options(num_returns=2).remote(
            rnd, ids, g_ref, final(a, ids)))
        partials = [refs[0] for _, refs, _ in done]  # in client-id order; they go to the aggregator unread
        # one call done means it held every client, on the actor that owns them now (after any recovery)
        if len(done) == 1 and final(self.actors[self.owner[client_ids[0]]], client_ids):
            new_ref = partials[0]  # already the new global state
        elif global_state is not None:
            new_ref = self.aggregator.aggregate.remote(g_ref, *partials)
        else:
            new_ref = None
        clients = [m for _, _, ms in done for m in ms]
        return RoundResult(new_ref, clients, self._take_failures() + failures)

    def evaluate(self, global_state) -> EvalResult:
        # the actors' evaluations are submitted first, so the driver's own global-test pass overlaps them
        test: list = []
        done, failures = self._dispatch(sorted(self.owner), lambda a, ids: a.evaluate.remote(global_state, ids),
                                        meanwhile=lambda: test.append(
                                            evaluate_global(self.cfg, self.dataset, self.fetch(global_state))))
        self.failures += failures  # reported with the next round
        clients = sorted((r for _, _, rs in done for r in rs), key=lambda r: r["client"])
        return EvalResult(clients, test[0])

    def snapshot(self, rnd: int) -> State:
        done, failures = self._dispatch(sorted(self.owner), lambda a, ids: a.private_state.remote(ids))
        self.failures += failures
        self.saved = {k: v for _, _, part in done for k, v in part.items()}
        self.saved_round = f"round {rnd}"
        return self.saved

    def restore(self, private: State) -> None:
        self.saved, self.saved_round = dict(private), "the resumed checkpoint"
        self._dispatch(sorted(self.owner), lambda a, ids: a.load_private_state.remote(_subset(private, ids)))

    def _take_failures(self) -> list[dict]:
        out, self.failures = self.failures, []
        return out

    def _dispatch(self, client_ids: list[int], call, meanwhile=None) -> tuple[list, list[dict]]:
        """`call(actor, its client ids)` on every actor owning some of `client_ids`; when an actor is
        lost, its clients move to the survivors and the call is made again for them there.
        `meanwhile()`, if given, runs in the driver once the first calls are submitted.
        Returns [(first client id, refs, value of the last ref)] in client-id order, and the failures."""
        done, failures = [], []
        todo = self._by_owner(client_ids)
        while todo:
            calls = [(i, ids, call(self.actors[i], ids)) for i, ids in sorted(todo.items())]
            todo = {}
            if meanwhile is not None:  # only after the first submissions, not again for re-runs
                meanwhile()
                meanwhile = None
            for i, ids, refs in calls:
                try:
                    value = ray.get(refs[-1] if isinstance(refs, (list, tuple)) else refs)
                except ray.exceptions.RayTaskError as exc:  # first: it can wrap an ActorDiedError of
                    if isinstance(exc.cause, FmlrayError):  # an input, which is not this actor's death
                        raise type(exc.cause)(str(exc.cause)) from None  # one line, no remote traceback
                    raise
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                    failures.append({"clients": ids, "note": self._recover(i, exc)})
                    for j, moved in self._by_owner(ids).items():
                        todo.setdefault(j, []).extend(moved)
                    continue
                done.append((ids[0], refs, value))
        return sorted(done, key=lambda d: d[0]), failures

    def _by_owner(self, client_ids) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for cid in sorted(client_ids):
            out.setdefault(self.owner[cid], []).append(cid)
        return out

    def _recover(self, lost: int, exc: Exception) -> str:
        """Hand a lost actor's clients to the least-loaded survivors, with their last saved state."""
        self.lost.add(lost)
        alive = [j for j in range(len(self.actors)) if j not in self.lost]
        if not alive:
            raise ResourceError(f"every client actor was lost (last: {type(exc).__name__}); "
                                "the cluster cannot host this run any more") from None
        load = {j: 0 for j in alive}
        for a in self.owner.values():
            if a in load:
                load[a] += 1
        plan: dict[int, list[int]] = {}
        for cid in sorted(c for c, a in self.owner.items() if a == lost):
            j = min(alive, key=lambda j: (load[j], j))
            plan.setdefault(j, []).append(cid)
            load[j] += 1
        ray.get([self.actors[j].adopt.remote(ids, _subset(self.saved, ids)) for j, ids in plan.items()])
        for j, ids in plan.items():
            self.owner.update(dict.fromkeys(ids, j))
        moved = ", ".join(f"{len(ids)} to actor {j}" for j, ids in sorted(plan.items()))
        return (f"actor {lost} lost ({type(exc).__name__}); its clients moved ({moved}) with their private "
                f"state of {self.saved_round}; this round's update re-run")

    def fetch(self, state):
        return ray.get(state) if isinstance(state, ray.ObjectRef) else state

    def close(self) -> None:
        for a in getattr(self, "actors", []) + [getattr(self, "aggregator", None)]:
            if a is not None:
                try:
                    ray.kill(a)
                except ValueError:  # not an actor handle any more: it went down with its node
                    pass
        self.actors, self.aggregator = [], None
        if getattr(self, "owns_ray", False):
            ray.shutdown()
            self.owns_ray = False
