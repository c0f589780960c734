"""The Ray engine: client actors own clients, an aggregator actor averages their memes.

Per round the driver puts the global state in the object store once and hands the same ref to
every actor; each actor trains its sampled clients in turn and returns one weighted partial sum,
which goes from the object store straight into the aggregator (the driver only holds refs), so
traffic per round is O(actors). When one actor beside the driver holds every sampled client, it
averages them itself and the aggregator is skipped. The new global state stays in the object
store as the next round's broadcast. The dataset is put once; actors index it zero-copy.

Clients are dealt to a group's actors largest first, so each holds about the same training rows. Each
round the sampled ones are evened out again: stateless clients (FedAvg's) are dealt anew, and a client
with private state moves, row and all, to a less busy actor while that evens the round out (`_deal`,
`_rebalance`, `_migrate`). Both plans follow from the round's clients and where clients are, never from
timings, and checkpoints keep where clients are: results are the same run after run and after a resume.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from fmlray import signals
from fmlray.aggregate import State
from fmlray.algorithms import build_algorithm
from fmlray.config import Config
from fmlray.data import Dataset, Partition
from fmlray.engine.aggregator import Aggregator
from fmlray.engine.base import EvalResult, RoundResult
from fmlray.engine.connect import _timeout, connect, own_ray_gone, shut_down
from fmlray.engine.host import ClientHost, evaluate_global
from fmlray.engine.resources import (ActorSpec, Capacity, bundle_capacity, check_memory, deal, match_bundles,
                                     plan_actors, plan_store)
from fmlray.engine.state import MANIFEST, RowRef, latest_rows, state_folder, tidy_rows
from fmlray.errors import RESUMABLE, FmlrayError, ResourceError
from fmlray.progress import plain_warnings

# A client with private state moves to another actor only if it trains at least this many rows a round:
# its row crosses memory ~5 times on the way (read, copy, pickle, unpickle, write), ~50 rows' worth of
# training for an MLP, fewer for a CNN, so moving a smaller client would cost more than it evens out.
MOVE_MIN_ROWS = 64
# How often, inside a call, the driver reads how many clients are done (the progress bar), and at most how
# often each actor tells the aggregator; the driver sends it with each call.
PROGRESS_EVERY_S = 1.0


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
    """The models a client host holds: its workspaces' (none before its first round)."""
    return [] if host is None else host.modules()


class ClientActor:
    """A Ray actor hosting some clients: a `ClientHost` on its own CPU threads / GPU share, its clients'
    private state in a store on its node."""

    def __init__(self, cfg: Config, dataset: Dataset, partition: Partition, spec: ActorSpec, index: int,
                 store: str, run_token: str, board=None, hosted: list[int] | None = None):
        import torch
        signals.redeliver_lost_sigterm()
        self._plain = plain_warnings()  # fmlray's warnings as one line in the driver's log, for the actor's life
        self._plain.__enter__()
        torch.set_num_threads(max(1, int(spec.num_cpus)))
        self.num_gpus = spec.num_gpus  # its resources: the same for every run it serves (see `serve`)
        self.device = pick_device(spec.num_gpus)
        self.serve(cfg, dataset, partition, spec, index, store, run_token, board, hosted)

    def serve(self, cfg: Config, dataset: Dataset, partition: Partition, spec: ActorSpec, index: int,
              store: str, run_token: str, board=None, hosted: list[int] | None = None) -> None:
        """Take on a run's clients: at creation, and again for each later run that reuses this actor
        (`reusing_actors`), after `close` dropped the last run's."""
        self.index, self.board = index, board  # board: the aggregator, which counts clients done
        self.folder, self.scratch = state_folder(cfg.engine.state_dir, run_token, f"actor-{index}")
        # the clients it may be asked to train: its own, or (stateless clients, dealt anew each round) its group's
        self.args = (cfg, dataset, partition, list(spec.client_ids if hosted is None else hosted), store)
        self.host = None

    def ready(self) -> dict:
        """Build the host (its errors, e.g. an unwritable state_dir, reach the driver as one line) and say where."""
        cfg, dataset, partition, ids, store = self.args
        self.host = ClientHost(cfg, dataset, partition, ids, device=self.device, store=store,
                               state_dir=self.folder if store == "disk" else None)
        return self.info()

    def info(self) -> dict:
        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": self.device,
                "pid": os.getpid(), "num_gpus": self.num_gpus, **device_facts(self.device, held_modules(self.host))}

    def train(self, rnd: int, client_ids: list[int], global_state: State | None, final: bool = False,
              tag: str | None = None, every_s: float = PROGRESS_EVERY_S):
        """The clients' partial sum and metrics; with `final` (this call holds every client of the
        round), the new global state itself, averaged here instead of in the aggregator."""
        partial, metrics = self.host.train(rnd, client_ids, global_state, tick=self._ticker(tag, every_s))
        return (self.host.algo.server.next_global(global_state, partial) if final else partial), metrics

    def evaluate(self, global_state: State | None, client_ids: list[int], tag: str | None = None,
                 every_s: float = PROGRESS_EVERY_S) -> list[dict]:
        return self.host.evaluate(global_state, client_ids, tick=self._ticker(tag, every_s))

    def _ticker(self, tag: str | None, every_s: float):
        """Tell the board how many clients of call `tag` are done, at most once every `every_s` (the driver's
        `PROGRESS_EVERY_S`; a call costs ~0.1 ms: per client it would tax runs of tiny clients)."""
        if tag is None or self.board is None:
            return None
        last = time.monotonic()

        def tick(done: int) -> None:
            nonlocal last
            if time.monotonic() - last >= every_s:
                last = time.monotonic()
                self.board.tick.remote(tag, self.index, done)
        return tick

    def probe(self, folder: str, name: str) -> str:
        """Write a small file into `folder` (is the run folder writable, and shared, from this node?)."""
        path = Path(folder) / name
        path.write_text(ray.get_runtime_context().get_node_id())
        return str(path)

    def checkpoint(self, folder: str, tag: str) -> list[dict]:
        return self.host.write_checkpoint(Path(folder), tag)

    def restore(self, folder: str, refs: dict) -> None:
        self.host.restore_rows(Path(folder), refs)

    def adopt(self, client_ids: list[int], folder: str | None, refs: dict) -> None:
        """Take over clients of a lost actor, with their rows of the last checkpoint."""
        self.host.add_clients(client_ids, None if folder is None else Path(folder), refs)

    def give(self, client_ids: list[int]) -> tuple[dict, int]:
        """These clients' rows, handed to another actor (see `ClientHost.give`), and how many there are: the
        driver waits for that small second return alone, so the rows go from actor to actor, never via it."""
        rows = self.host.give(client_ids)
        return rows, len(rows)

    def take(self, client_ids: list[int], *given: dict) -> None:
        """Host these clients from now on, with the rows other actors gave."""
        wanted = set(client_ids)
        self.host.take(client_ids, {cid: row for rows in given for cid, row in rows.items() if cid in wanted})

    def stored(self) -> int:
        return self.host.stored()

    def close(self) -> None:
        """Drop the clients' private state (a scratch disk store is deleted)."""
        if self.host is not None:
            self.host.close()
            self.host = None
        # a lost actor's rows of this run on this node (its lock dies with its process; its store never closed):
        # the run's actors here are all started, so none is still to lock its file, and the others close now
        tidy_rows(self.folder.parent, min_age_s=0, wait_s=10)
        if self.scratch is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            try:
                self.scratch.rmdir()  # the run's scratch folder on this node, once no actor uses it
            except OSError:
                pass


_OUT_OF_MEMORY = ("a node ran out of memory and Ray's memory monitor killed a client actor; set "
                  "engine.state_store = \"disk\", lower engine.num_actors, or sample fewer clients a round "
                  f"(clients.fraction); {RESUMABLE}")


# how Ray says a call's actor died (RayTaskError, an error of the call itself, is not among them)
_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def _lost(exc: Exception, what: str) -> ResourceError:
    """One line for an actor lost where no recovery follows: Ray's memory monitor's advice if it killed it, else
    `what`."""
    return ResourceError(_OUT_OF_MEMORY if "low on memory" in str(exc) else what)


def _lost_before_round_1(exc: Exception, then: str) -> ResourceError:
    return _lost(exc, f"a client actor was lost before round 1 ({type(exc).__name__}: a node went away or its "
                      f"process was killed); {then}")


def _second_loss(exc: Exception) -> ResourceError:
    return _lost(exc, f"a second client actor was lost ({type(exc).__name__}: a node went away, or the cluster) "
                      f"while a lost one's clients moved to it; {RESUMABLE}")


def _wait_all(refs: list, timeout: float) -> list:
    """Wait for `refs` up to `timeout` seconds; the ones still pending. In slices, so that a signal's handler runs
    between them (one ray.wait held it off), and no longer than this process's own Ray lives: a SIGTERM to the whole
    process group ends its GCS and raylet too, and a wait on them waited out Ray's 60 s GCS timeout, which then
    ended the driver with exit 1."""
    pending, deadline = list(refs), time.monotonic() + timeout
    while pending and time.monotonic() < deadline and not own_ray_gone():
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(0.5, max(0.0, deadline - time.monotonic())))
    return pending


def _last(refs):
    """The ref a call is done with: its last return (a call may return several)."""
    return refs[-1] if isinstance(refs, (list, tuple)) else refs


def _span(rounds: list[int]) -> str:
    return f"{rounds[0]}" if len(rounds) == 1 else f"{rounds[0]}-{rounds[-1]}" if rounds == list(
        range(rounds[0], rounds[-1] + 1)) else ", ".join(map(str, rounds))


def _count(items) -> list[tuple[str, int]]:
    return list(Counter(items).items())


def capacity() -> Capacity:
    """What the live nodes hold in all. (Totals, not what is free this instant: actors of a run that
    just ended free theirs a moment later; resources held for long are caught by the ready timeout.)"""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    return Capacity(cpus=total.get("CPU", 0.0), gpus=total.get("GPU", 0.0),
                    node_cpus=max((n.get("CPU", 0.0) for n in nodes), default=0.0),
                    node_gpus=max((n.get("GPU", 0.0) for n in nodes), default=0.0))


# Actors parked between the runs of a `reusing_actors` scope: {"key": the connection they belong to,
# "clients": [(num_cpus, num_gpus, handle)], "aggregators": [handle]}; None outside such a scope.
_parked: dict | None = None


@contextlib.contextmanager
def reusing_actors():
    """Runs started one after another in this scope (a sequential sweep, `fmlray compare`, one Ray for all)
    reuse the client actors and the aggregator of the run before where their CPUs and GPUs match, instead
    of starting new ones: a new client actor imports torch, ~3 s of CPU on two cores, for each run. A
    parked actor holds its resources until the next run takes it or kills it as unneeded, or the scope
    ends and kills it. Outside this scope, and in a Tune trial's placement group, an engine's actors end
    with it. Results do not depend on it: each run hands a reused actor its clients afresh, and every
    random draw comes from (seed, purpose, round, client), never from an actor's past."""
    global _parked
    if _parked is not None:  # already inside one
        yield
        return
    _parked = {"key": None, "clients": [], "aggregators": []}
    try:
        yield
    finally:
        drain()
        _parked = None


def drain() -> None:
    """Kill what the scope keeps parked (freeing its resources); the scope goes on. Handles of another
    connection are only forgotten: their actors went with it."""
    if _parked is None:
        return
    if ray.is_initialized() and _parked["key"] == _connection():
        _kill([h for _, _, h in _parked["clients"]] + _parked["aggregators"])
    _parked.update(clients=[], aggregators=[])


def _connection() -> tuple[str, str]:
    """This process's Ray connection: parked handles are good for it alone."""
    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), ctx.get_job_id()


def _kill(handles) -> None:
    for a in handles:
        try:
            ray.kill(a)
        except ValueError:  # not an actor handle any more: it went down with its node
            pass


def _unpark(specs: list[ActorSpec]) -> tuple[list, object | None]:
    """Parked actors for a new run: per spec, a live client actor of the same CPUs and GPUs (or None), and
    an aggregator (or None). Parked client actors left over are killed, freeing their resources."""
    if _parked is None:
        return [None] * len(specs), None
    clients, aggregators = _parked["clients"], _parked["aggregators"]
    _parked["clients"], _parked["aggregators"] = [], []
    if _parked["key"] != _connection() or not clients + aggregators:
        return [None] * len(specs), None
    handles = [h for _, _, h in clients] + aggregators
    pings = [h.__ray_ready__.remote() for h in handles]
    ready, _ = ray.wait(pings, num_returns=len(pings), timeout=10)
    alive = set()
    for h, ref in zip(handles, pings):
        if ref in ready:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(ref)
                alive.add(h._actor_id)
    free = [(c, g, h) for c, g, h in clients if h._actor_id in alive]
    taken = []
    for s in specs:
        match = next((i for i, (c, g, _) in enumerate(free) if (c, g) == (s.num_cpus, s.num_gpus)), None)
        taken.append(None if match is None else free.pop(match)[2])
    live_aggs = [h for h in aggregators if h._actor_id in alive]
    _kill([h for _, _, h in free] + live_aggs[1:])
    return taken, (live_aggs[0] if live_aggs else None)


class RayEngine:
    """Client actors on the whole cluster, or, when the driver runs inside a placement group (a Ray Tune
    trial of a parallel sweep), in that group's bundles: then the pool is sized from the bundles alone,
    never from the cluster, and the aggregator shares the driver's bundle."""

    def start(self, cfg: Config, dataset: Dataset, partition: Partition) -> None:
        self.cfg, self.dataset = cfg, dataset
        self.ready_timeout = _timeout("FMLRAY_READY_TIMEOUT_S", 180)  # read first: a bad value starts nothing
        algo = build_algorithm(cfg.algorithm, cfg.run.rounds)
        self.server = algo.server  # plain numbers: the aggregator's half
        # Clients that keep nothing between rounds are dealt to their group's actors anew each round, so a
        # sampled fraction of them is balanced too; the others stay with the actor whose store holds their rows.
        self.stateless = algo.stateless
        began = time.perf_counter()
        self.owns_ray = connect(cfg.engine.address)
        # where start-up went, said once in the run's "ready" line
        self.startup = {"Ray up" if self.owns_ray else "Ray joined": time.perf_counter() - began}
        self.cost = cost = [len(rows) for rows in partition.train]
        group = ray.util.get_current_placement_group()
        driver_node = ray.get_runtime_context().get_node_id()
        alive = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n.get("Alive")}
        if group is None:
            self.specs = plan_actors(cfg, capacity(), cost=cost)
            # SPREAD: the run owns the cluster. The aggregator reserves no CPU (it works between rounds, while
            # client actors wait) and lives beside the driver, on the head: losing a worker node must not take
            # the global model. Hard affinity: a soft one counts a node whose CPUs are all held by client actors
            # as unavailable and spills the aggregator to any other node (seen on the three-node test).
            places = ["SPREAD"] * len(self.specs)
            beside = NodeAffinitySchedulingStrategy(driver_node, soft=False)
            nodes = list(alive.values())
        else:
            bundles = group.bundle_specs
            self.specs = plan_actors(cfg, bundle_capacity(bundles), cost=cost, actors=len(bundles) - 1)
            places = [PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
                      for i in match_bundles(self.specs, bundles)]
            beside = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)  # the driver's bundle
            held = set(ray.util.placement_group_table(group)["bundles_to_node_id"].values())
            nodes = [r for node, r in alive.items() if node in held] or list(alive.values())
        # Ray's schedulable memory plus its object store: what a node offers this run
        node_memory = min(n.get("memory", 0.0) + n.get("object_store_memory", 0.0) for n in nodes)
        self.plan = plan_store(cfg, dataset, node_memory, len(nodes))
        check_memory(cfg, self.plan, dataset.nbytes, -(-len(self.specs) // len(nodes)), node_memory, len(nodes))
        self.notes = [f"{len(self.specs)} client actors on {len(nodes)} node(s)"
                      + (" in the trial's placement group" if group is not None else "") + ": "
                      + ", ".join(f"{n} × {g}" for g, n in _count(s.group for s in self.specs))
                      + (f" (engine.num_actors = {cfg.engine.num_actors} raised: each group needs an actor of its own)"
                         if group is None and 0 < cfg.engine.num_actors < len(self.specs) else ""), self.plan.line]
        began = time.perf_counter()
        data_ref, part_ref = ray.put(dataset), ray.put(partition)  # once; actors read them zero-copy
        actor_cls, agg_cls = ray.remote(ClientActor), ray.remote(Aggregator)
        token = uuid.uuid4().hex[:8]
        names = [g.name for g in cfg.clients.groups]
        self.group_of = {cid: names[g] for cid, g in enumerate(cfg.clients.group_of_clients())}
        members: dict[str, list[int]] = {}  # by group, the clients each of its actors hosts when dealt anew
        if self.stateless:
            for cid, g in self.group_of.items():  # in id order
                members.setdefault(g, []).append(cid)
        self.group = group
        reused, self.aggregator = _unpark(self.specs) if group is None else ([None] * len(self.specs), None)
        if self.aggregator is None:  # first: actors tick it
            self.aggregator = agg_cls.options(num_cpus=0, scheduling_strategy=beside).remote()
        else:
            self.aggregator.serve.remote()
        self.actors = []
        for i, (s, place, old) in enumerate(zip(self.specs, places, reused)):
            args = (cfg, data_ref, part_ref, s, i, self.plan.kind, token, self.aggregator, members.get(s.group))
            if old is None:
                self.actors.append(actor_cls.options(num_cpus=s.num_cpus, num_gpus=s.num_gpus,
                                                     scheduling_strategy=place, name=None).remote(*args))
            else:  # its calls run in order: `ready` below comes after it took this run's clients
                old.serve.remote(*args)
                self.actors.append(old)
        if any(reused):
            self.notes[0] += f" ({sum(a is not None for a in reused)} reused from the run before)"
        self.owner = {cid: i for i, s in enumerate(self.specs) for cid in s.client_ids}
        self.lost: set[int] = set()
        self.failures: list[dict] = []
        # where each client's latest checkpointed row is: what a lost actor's clients restart from
        self.folder: Path | None = None
        self.refs: dict[int, RowRef] = {}
        self.saved_round = "round 0 (no checkpoint yet: their initial models)"
        # the rounds trained since the last checkpoint: (round, its clients, its global state's ref), or (round,
        # None, None) where none is kept (see train_round); a lost actor's clients replay theirs to be where the run is
        self.since_saved: list[tuple[int, list[int] | None, ray.ObjectRef | None]] = []
        self.trained_upto = 0
        self.infos = self._wait_ready()
        self.startup["actors ready"] = time.perf_counter() - began
        # Actors that may return a round's new global state themselves: only those beside the driver,
        # so that, like the aggregator's, it lives on the head and outlives any worker node.
        self.beside_driver = {a for a, info in zip(self.actors, self.infos) if info["node"] == driver_node}

    def _wait_ready(self) -> list[dict]:
        refs = [a.ready.remote() for a in self.actors] + [self.aggregator.__ray_ready__.remote()]
        pending = _wait_all(refs, self.ready_timeout)
        if pending and own_ray_gone():
            self.close()
            raise ResourceError("this run's own Ray stopped (its GCS or raylet process ended) before round 1; start "
                                "the run again")
        if pending:
            self.close()
            raise ResourceError(f"{len(pending)} of {len(refs)} actors did not start within {self.ready_timeout:g}s "
                                "(the cluster is busy or too small); lower engine.num_actors or the groups' "
                                "num_cpus/num_gpus")
        try:
            return ray.get(refs[:-1])
        except _LOST as exc:
            self.close()
            raise _lost_before_round_1(exc, "run the same command again") from None
        except ray.exceptions.RayTaskError as exc:
            self.close()
            if isinstance(exc.cause, FmlrayError):
                raise type(exc.cause)(str(exc.cause)) from None
            raise

    def train_round(self, rnd: int, client_ids: list[int], global_state, progress=None) -> RoundResult:
        g_ref = global_state if isinstance(global_state, ray.ObjectRef) else ray.put(global_state)
        # A call holding every client of the round, on the driver's node, averages in the actor: one
        # object-store hop a round fewer (~3 ms, half the 1-actor overhead).
        def final(actor, ids) -> bool:
            return global_state is not None and len(ids) == len(client_ids) and actor in self.beside_driver

        finals: dict[int, bool] = {}  # by a call's first client: whether it was asked for the new global state

        def call(a, ids):
            finals[ids[0]] = final(a, ids)
            return a.train.options(num_returns=2).remote(rnd, ids, g_ref, finals[ids[0]], tag if progress else None,
                                                         PROGRESS_EVERY_S)

        tag = f"train {rnd} {uuid.uuid4().hex[:8]}"
        if not self.stateless:
            every = self.cfg.run.checkpoint_every
            self.since_saved.append((rnd, list(client_ids), g_ref) if every else (rnd, None, None))
            if every and len(self.since_saved) > every:  # no checkpoint where one was due (a benchmark driving
                self.since_saved = [(t, None, None) for t, _, _ in self.since_saved]  # rounds): kept no longer
        moved = [] if self.stateless else self._migrate(self._rebalance(client_ids))
        done, failures = self._dispatch(client_ids, call, progress=progress, tag=tag,
                                        plan=self._deal(client_ids) if self.stateless else None)
        failures = moved + failures
        partials = [refs[0] for _, refs, _ in done]  # by first client id; they go to the aggregator unread
        if len(done) == 1 and finals[done[0][0]]:
            new_ref = partials[0]  # already the new global state
        elif global_state is not None:
            new_ref = self.aggregator.aggregate.remote(self.server, g_ref, *partials)
        else:
            new_ref = None
        clients = [m for _, _, ms in done for m in ms]
        self.trained_upto = rnd
        return RoundResult(new_ref, clients, self.take_failures() + failures)

    def evaluate(self, global_state, client_ids: list[int] | None = None, progress=None) -> EvalResult:
        # the actors' evaluations are submitted first, so the driver's own global-test pass overlaps them
        test: list = []
        ids = sorted(self.owner) if client_ids is None else sorted(client_ids)
        tag = f"eval {uuid.uuid4().hex[:8]}"
        done, failures = self._dispatch(ids, lambda a, ids: a.evaluate.remote(global_state, ids,
                                                                              tag if progress else None,
                                                                              PROGRESS_EVERY_S),
                                        meanwhile=lambda: test.append(
                                            evaluate_global(self.cfg, self.dataset, self.fetch(global_state))),
                                        progress=progress, tag=tag)
        clients = sorted((r for _, _, rs in done for r in rs), key=lambda r: r["client"])
        return EvalResult(clients, test[0], failures)

    def check_writable(self, folder: Path) -> None:
        """Every actor writes a file into the run's `folder`, and the driver must see it: on a cluster the
        run folder has to be storage every node shares, since actors write their checkpoints there."""
        names = [f".probe-{i}" for i in range(len(self.actors))]
        # a resumed run goes on in its folder (--resume cannot move it): the remedy is there, not run.output_dir
        resumed = f"fmlray run --resume {folder.parent}" if (folder / MANIFEST).is_file() else None
        probes = [a.probe.remote(str(folder), n) for a, n in zip(self.actors, names)]
        try:
            paths = ray.get(probes)
        except _LOST as exc:
            ray.wait(probes, num_returns=len(probes), timeout=10)
            for n in names:  # what the others wrote
                (folder / n).unlink(missing_ok=True)
            raise _lost_before_round_1(exc, f"continue with: {resumed}" if resumed else "start the run again") from None
        except ray.exceptions.RayTaskError as exc:
            first = str(exc.cause).strip().splitlines()[0] if exc.cause else type(exc).__name__
            fix = (f"make it writable from every node (shared storage on a cluster), then continue with: {resumed}"
                   if resumed else "set run.output_dir to a folder every node can write (shared storage on a cluster)")
            raise ResourceError(f"a client actor cannot write into {folder} ({first}); {fix}") from None
        try:
            missing = [p for p in paths if not Path(p).is_file()]
            if missing:
                fix = (f"put the run on storage every node shares (e.g. an NFS or cloud-storage mount), then "
                       f"continue with: {resumed}" if resumed else "set run.output_dir to storage every node shares "
                       "(e.g. an NFS or cloud-storage mount)")
                raise ResourceError(f"{len(missing)} of {len(paths)} client actors write {folder} somewhere this "
                                    f"driver cannot see; {fix}")
        finally:
            for p in paths:
                Path(p).unlink(missing_ok=True)

    def checkpoint(self, rnd: int, folder: Path) -> list[dict]:
        """Every actor writes its clients' rows changed since the last checkpoint into `folder`."""
        index = {a: i for i, a in enumerate(self.actors)}
        calls: Counter = Counter()

        def call(a, ids):
            # an actor's second call (a lost actor's clients, done again by it) writes files of their own: under
            # the first call's names it replaced that call's rows, which the manifest still named (damaged)
            calls[a] += 1
            return a.checkpoint.remote(str(folder), f"rows-r{rnd:06d}-a{index[a]}"
                                       + (f"-{calls[a]}" if calls[a] > 1 else ""))
        done, failures = self._dispatch(sorted(self.owner), call)
        self.failures += failures  # reported with the next round, or with this one if it is the last (simulate)
        shards = [s for _, _, part in done for s in part]
        self.folder, self.saved_round = Path(folder), f"round {rnd}"
        self.refs.update(latest_rows(shards))
        self.since_saved = [r for r in self.since_saved if r[0] > rnd]
        return shards

    def placement(self) -> dict:
        return {"actors": len(self.actors), "owner": [self.owner[c] for c in sorted(self.owner)]}

    def restore(self, folder: Path, refs: dict[int, RowRef], placement: dict | None = None) -> None:
        self.folder, self.refs, self.saved_round = Path(folder), dict(refs), "the resumed checkpoint"
        self.since_saved = []
        self._place(placement)
        self._dispatch(sorted(self.owner), lambda a, ids: a.restore.remote(
            str(folder), {c: refs[c] for c in ids if c in refs}))

    def _place(self, placement: dict | None) -> None:
        """Put the clients back where a checkpoint's `placement` had them (moved to even sampled rounds out),
        so the resumed run sums as the uninterrupted one did; not if the actors are others now (engine.*
        may change on resume, or an actor had been lost) or a client would leave its group."""
        owner = placement.get("owner") if placement else None
        if (not isinstance(owner, list) or placement.get("actors") != len(self.actors) or self.lost
                or len(owner) != len(self.owner) or not all(isinstance(a, int) and 0 <= a < len(self.specs)
                                                            and self.specs[a].group == self.group_of[c]
                                                            for c, a in zip(sorted(self.owner), owner))):
            return
        moves: dict[int, list[int]] = {}
        for cid, a in zip(sorted(self.owner), owner):
            if self.owner[cid] != a:
                moves.setdefault(a, []).append(cid)
        ray.get([self.actors[a].take.remote(ids) for a, ids in moves.items()])  # no rows yet: restored next
        for a, ids in moves.items():
            self.owner.update(dict.fromkeys(ids, a))

    def checkpoint_moved(self, folder: Path) -> None:
        """A lost actor's clients are restored from here from now on."""
        self.folder = Path(folder)

    def take_failures(self) -> list[dict]:
        out, self.failures = self.failures, []
        return out

    def _deal(self, client_ids: list[int]) -> dict[int, list[int]]:
        """Stateless clients of a round dealt to the live actors of their group, largest first (see `deal`):
        no actor idles while another still has a block of big clients. A function of the round's clients
        and the live actors only, so the sums, and the result, are the same run after run."""
        out: dict[int, list[int]] = {}
        by_group: dict[str, list[int]] = {}
        for cid in client_ids:
            by_group.setdefault(self.group_of[cid], []).append(cid)
        live = self._live_groups()
        for group, ids in by_group.items():
            actors = live.get(group)
            if not actors:  # the group's actors are all lost: its clients are with the survivors that adopted them
                for i, moved in self._by_owner(ids).items():
                    out.setdefault(i, []).extend(moved)
                continue
            for i, part in zip(actors, deal(ids, min(len(actors), len(ids)), self.cost)):
                out.setdefault(i, []).extend(part)
        return {i: sorted(ids) for i, ids in out.items()}

    def _live_groups(self) -> dict[str, list[int]]:
        """Each group's live actors."""
        out: dict[str, list[int]] = {}
        for i, spec in enumerate(self.specs):
            if i not in self.lost:
                out.setdefault(spec.group, []).append(i)
        return out

    def _rebalance(self, client_ids: list[int]) -> dict[int, list[int]]:
        """Where a round's clients with private state train: with their actor, except that while moving one
        of the busiest actor's clients to the idlest of its group makes the busier of the two less busy, the
        one that evens them out most moves (with its row, see `_migrate`; none of under MOVE_MIN_ROWS rows).
        With every client sampled the dealt plan is already even and nothing moves; with a fraction, only
        what evens the round out does. A function of the round's clients and where clients are, not of
        timings, so the sums are the same run after run."""
        out = self._by_owner(client_ids)
        epochs = self.cfg.training.epochs
        for actors in self._live_groups().values():
            load = {i: sum(self.cost[c] for c in out.get(i, [])) for i in actors}
            for _ in range(len(client_ids)):
                busy = max(actors, key=lambda i: (load[i], -i))
                idle = min(actors, key=lambda i: (load[i], i))
                gap = load[busy] - load[idle]
                fits = [c for c in out.get(busy, [])
                        if self.cost[c] < gap and self.cost[c] * epochs >= MOVE_MIN_ROWS]
                if not fits:
                    break
                c = min(fits, key=lambda c: (abs(gap - 2 * self.cost[c]), c))
                out[busy].remove(c)
                out.setdefault(idle, []).append(c)
                load[busy] -= self.cost[c]
                load[idle] += self.cost[c]
        return {i: sorted(ids) for i, ids in out.items() if ids}

    def _migrate(self, plan: dict[int, list[int]]) -> list[dict]:
        """Move the clients `plan` puts on another actor than theirs there, rows and all, through the object
        store; returns the failures (an actor lost on the way: its clients recovered as in `_dispatch`)."""
        moves = {cid: (self.owner[cid], dst) for dst, ids in plan.items() for cid in ids if self.owner[cid] != dst}
        if not moves:
            return []
        failures = []
        given = {}
        for src in sorted({s for s, _ in moves.values()}):
            ids = sorted(c for c, (s, _) in moves.items() if s == src)
            given[src] = (ids, *self.actors[src].give.options(num_returns=2).remote(ids))
        for src, (ids, _, count) in list(given.items()):
            if (lost := self._settled(count)[1]) is not None:  # its clients stay with it, and are recovered with it
                failures.append(self._lose(src, lost))
                del given[src]
        takes = {}
        for src, (ids, _, _) in given.items():
            for cid in ids:
                self.owner[cid] = moves[cid][1]  # from here on, losing the taker recovers them from the checkpoint
        for dst in sorted({d for c, (s, d) in moves.items() if s in given}):
            ids = sorted(c for c, (s, d) in moves.items() if d == dst and s in given)
            sources = sorted({moves[c][0] for c in ids})
            takes[dst] = self.actors[dst].take.remote(ids, *[given[s][1] for s in sources])
        for dst, ref in takes.items():
            if (lost := self._settled(ref)[1]) is not None:
                failures.append(self._lose(dst, lost))
        return failures

    def _lose(self, actor: int, exc: Exception) -> dict:
        """The failure entry of an actor lost between calls: every client it held, recovered elsewhere."""
        clients = sorted(c for c, a in self.owner.items() if a == actor)
        return {"clients": clients, "note": self._recover(actor, exc)}

    @staticmethod
    def _settled(ref) -> tuple[object, Exception | None]:
        """`ref`'s value, or (None, the error) if its actor was lost. An error of the call itself is raised:
        an input's (FmlrayError) as one line, Ray's memory monitor's as the out-of-memory advice."""
        try:
            return ray.get(ref), None
        except ray.exceptions.RayTaskError as exc:  # first: it can wrap an ActorDiedError of
            if isinstance(exc.cause, FmlrayError):  # an input, which is not this actor's death
                raise type(exc.cause)(str(exc.cause)) from None  # one line, no remote traceback
            raise
        except ray.exceptions.OutOfMemoryError:
            raise ResourceError(_OUT_OF_MEMORY) from None
        except _LOST as exc:
            if "low on memory" in str(exc):  # Ray's memory monitor killed it: a survivor would be next
                raise ResourceError(_OUT_OF_MEMORY) from None
            return None, exc

    def _dispatch(self, client_ids: list[int], call, meanwhile=None, progress=None,
                  tag: str = "", plan: dict[int, list[int]] | None = None) -> tuple[list, list[dict]]:
        """`call(actor, its client ids)` on every actor owning some of `client_ids` (or as `plan` says:
        actor → client ids); when an actor is lost, its clients move to the survivors and the call is
        made again for them there.
        `meanwhile()`, if given, runs in the driver once the first calls are submitted; `progress(done)`
        hears about once a second how many clients are done (the calls named `tag` count them).
        Returns [(first client id, refs, value of the last ref)] in client-id order, and the failures."""
        done, failures, finished = [], [], 0
        todo = self._by_owner(client_ids) if plan is None else plan
        while todo:
            calls = [(i, ids, call(self.actors[i], ids)) for i, ids in sorted(todo.items())]
            todo = {}
            if meanwhile is not None:  # only after the first submissions, not again for re-runs
                meanwhile()
                meanwhile = None
            if progress is not None:
                self._watch(calls, tag, progress, finished)
            for i, ids, refs in calls:
                value, lost = self._settled(_last(refs))
                if lost is not None:
                    failures.append({"clients": ids, "note": self._recover(i, lost)})
                    for j, moved in self._by_owner(ids).items():
                        todo.setdefault(j, []).extend(moved)
                    continue
                done.append((ids[0], refs, value))
                finished += len(ids)
        return sorted(done, key=lambda d: d[0]), failures

    def _watch(self, calls, tag: str, progress, finished: int) -> None:
        """Until every call is done, tell `progress` every `PROGRESS_EVERY_S` how many clients are: those of the
        calls already done (`finished` from earlier waves) and those the others' actors reported."""
        last = [(i, ids, _last(refs)) for i, ids, refs in calls]
        while True:
            ready, pending = ray.wait([r for _, _, r in last], num_returns=len(last), timeout=PROGRESS_EVERY_S)
            if not pending:
                return
            ready = set(ready)
            reported = ray.get(self.aggregator.progress.remote(tag))
            progress(finished + sum(len(ids) if r in ready else reported.get(i, 0) for i, ids, r in last))

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
        folder = None if self.folder is None else str(self.folder)
        try:
            ray.get([self.actors[j].adopt.remote(ids, folder, {c: self.refs[c] for c in ids if c in self.refs})
                     for j, ids in plan.items()])
        except _LOST as exc:
            raise _second_loss(exc) from None
        for j, ids in plan.items():
            self.owner.update(dict.fromkeys(ids, j))
        moved = ", ".join(f"{len(ids)} to actor {j}" for j, ids in sorted(plan.items()))
        return (f"actor {lost} lost ({type(exc).__name__}); its clients moved ({moved}) with their private "
                f"state of {self.saved_round}{self._replay(plan)}; what it was doing for them re-run")

    def _replay(self, plan: dict[int, list[int]]) -> str:
        """Bring clients restored from the last checkpoint up to where the run is: each round trained since, in
        order, for those of them it sampled, with that round's global state (their updates are dropped: the
        round's average already holds them). Each client's draws come from (seed, round, client), so its private
        state ends as it was on the lost actor, bit for bit. What the recovery note adds about it."""
        done = [r for r in self.since_saved if r[0] <= self.trained_upto]
        if any(ids is None for _, ids, _ in done):
            why = ("run.checkpoint_every = 0 keeps" if not self.cfg.run.checkpoint_every else
                   "without the checkpoints run.checkpoint_every asks for, the run keeps")
            return (f"; their updates since then are lost ({why} no global model to replay them from), so the "
                    "result differs from an uninterrupted run's")
        moving = {c for moved in plan.values() for c in moved}
        rounds = [t for t, ids, _ in done if moving.intersection(ids)]
        if not rounds:
            return ""
        for t, ids, g_ref in done:
            sampled = set(ids)
            calls = [self.actors[j].train.options(num_returns=2).remote(t, [c for c in moved if c in sampled], g_ref)
                     for j, moved in sorted(plan.items()) if sampled.intersection(moved)]
            try:
                ray.get([metrics for _, metrics in calls])
            except _LOST as exc:
                raise _second_loss(exc) from None
        return f", brought up to date by replaying round(s) {_span(rounds)}"

    def fetch(self, state):
        return ray.get(state) if isinstance(state, ray.ObjectRef) else state

    def close(self) -> None:
        actors, aggregator = getattr(self, "actors", []), getattr(self, "aggregator", None)
        closed = []  # the actors that dropped their clients: parked for the next run in a `reusing_actors` scope
        if actors:  # let each actor drop its store (a scratch disk store is deleted); a lost one cannot
            closing = {i: a.close.remote() for i, a in enumerate(actors) if i not in self.lost}
            pending = _wait_all(list(closing.values()), 30)
            for i, ref in closing.items():
                if ref not in pending:
                    with contextlib.suppress(ray.exceptions.RayError):
                        ray.get(ref)
                        closed.append(i)
        if _parked is not None and getattr(self, "group", None) is None and not getattr(self, "owns_ray", False):
            if _parked["key"] != _connection():  # what was parked came from another connection: gone with it
                _parked.update(key=_connection(), clients=[], aggregators=[])
            _parked["clients"] += [(self.specs[i].num_cpus, self.specs[i].num_gpus, actors[i]) for i in closed]
            _parked["aggregators"] += [aggregator] if aggregator is not None else []
            actors, aggregator = [a for i, a in enumerate(actors) if i not in closed], None
        _kill(actors + ([aggregator] if aggregator is not None else []))
        self.actors, self.aggregator = [], None
        if getattr(self, "owns_ray", False):
            shut_down()  # and releases the thread that started it, if it started early
            self.owns_ray = False
