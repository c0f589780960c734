"""How many client actors fit, and which clients each one hosts. All resource maths is here.

Each client group asks for `num_cpus` / `num_gpus` per actor. A group gets actors in proportion
to its share of the clients, as many as the cluster holds, never more than it has clients; a
group that cannot fit even one actor is an error naming what to lower — never a silent hang.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from fmlray.config import Config, apportion
from fmlray.errors import ResourceError


@dataclass(frozen=True)
class ActorSpec:
    group: str
    num_cpus: float
    num_gpus: float
    client_ids: tuple[int, ...]


@dataclass(frozen=True)
class Capacity:
    cpus: float  # in the whole cluster
    gpus: float
    node_cpus: float  # on the largest node: one actor cannot span nodes
    node_gpus: float


def _fits(n: float, per: float) -> int:
    return math.inf if per == 0 else int(math.floor(n / per + 1e-9))


def deal(ids, parts: int, cost=None) -> list[tuple[int, ...]]:
    """Clients `ids` split among `parts` actors, each non-empty, each's ids sorted. With `cost[cid]` (e.g.
    training rows): largest first, each to the actor with the least cost so far (LPT; ties to the one with
    fewer clients, then the first), so the actors' costs differ by at most one client's.
    Without: contiguous blocks of equal counts. Deterministic: a function of its arguments only."""
    ids = sorted(ids)
    if cost is None:
        n = len(ids)
        return [tuple(ids[(n * i) // parts:(n * (i + 1)) // parts]) for i in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    least = [(0.0, 0, j) for j in range(parts)]  # (cost so far, clients, actor): a heap, least first
    for cid in sorted(ids, key=lambda c: (-float(cost[c]), c)):
        load, count, j = heapq.heappop(least)
        out[j].append(cid)
        heapq.heappush(least, (load + float(cost[cid]), count + 1, j))
    return [tuple(sorted(o)) for o in out]


def plan_actors(cfg: Config, cap: Capacity, cost=None, actors: int | None = None) -> list[ActorSpec]:
    """Actors per group and their clients. `cost[cid]` (e.g. training rows) balances a group's actors
    (see `deal`): an actor that gets the big clients would otherwise hold every round up. (Contiguous
    blocks, the best cut, still left 4 % imbalance on 20 Dirichlet(0.5) FMNIST clients: 31,213 vs 28,787
    rows; dealt, 30,004 vs 29,996.) `actors` stands for engine.num_actors (a trial's placement group fixes
    how many it holds)."""
    num_actors = cfg.engine.num_actors if actors is None else actors
    sizes = cfg.clients.group_sizes()
    groups = [(g, n) for g, n in zip(cfg.clients.groups, sizes) if n > 0]
    for g, _ in groups:
        key = f"clients.groups[{g.name}]"
        if g.num_cpus > cap.node_cpus:
            raise ResourceError(f"{key}.num_cpus = {g.num_cpus} but the largest node has {cap.node_cpus:g} CPUs; "
                                f"lower it to at most {cap.node_cpus:g}")
        if g.num_gpus > cap.node_gpus:
            raise ResourceError(f"{key}.num_gpus = {g.num_gpus} but the largest node has {cap.node_gpus:g} GPUs; "
                                f"lower it (0 runs on CPUs)")
    total = sum(n for _, n in groups)
    # engine.num_actors (or one per client) split over groups by their clients, at least one each
    desired = apportion(max(num_actors or total, len(groups)), [n for _, n in groups])
    gpu_clients = sum(n for g, n in groups if g.num_gpus > 0) or 1  # GPUs are split among groups that use them
    counts = []
    for (g, n), d in zip(groups, desired):
        fit = min(_fits(cap.cpus * n / total, g.num_cpus), _fits(cap.gpus * n / gpu_clients, g.num_gpus))
        # an explicit engine.num_actors is honoured or refused below, never silently shrunk
        counts.append(max(1, min(n, d) if num_actors else min(n, d, fit)))
    cpus = sum(c * g.num_cpus for c, (g, _) in zip(counts, groups))
    gpus = sum(c * g.num_gpus for c, (g, _) in zip(counts, groups))
    if cpus > cap.cpus + 1e-9 or gpus > cap.gpus + 1e-9:
        asked = ", ".join(f"{c}×{g.name} ({g.num_cpus:g} CPU, {g.num_gpus:g} GPU)" for c, (g, _) in zip(counts, groups))
        raise ResourceError(f"the actors ({asked}) need {cpus:g} CPUs and {gpus:g} GPUs but the cluster has "
                            f"{cap.cpus:g} and {cap.gpus:g}; lower engine.num_actors or the groups' num_cpus/num_gpus")
    specs, first = [], 0
    for c, (g, n) in zip(counts, groups):
        specs += [ActorSpec(g.name, g.num_cpus, g.num_gpus, ids) for ids in deal(range(first, first + n), c, cost)]
        first += n
    return specs


# -- trials: a run of a sweep as a Ray Tune trial in a placement group of its own --------------------

DRIVER_MEMORY = int(0.6 * 2**30)  # a trial's driver: the interpreter with torch, as ACTOR_BASE below


def trial_actors(cfg: Config, cap: Capacity, share: int | None) -> list[ActorSpec]:
    """A trial's client actors when `share` trials run at once on cluster `cap`: engine.num_actors if set,
    else as many as 1/share of the cluster holds; with share None ("auto": as many trials as fit) or a
    share too small, one per group (then Tune runs fewer trials at once). A trial that the whole cluster
    cannot hold is the ResourceError of plan_actors."""
    if cfg.engine.num_actors:  # planned again with its own count, as the trial plans from its bundles
        return plan_actors(cfg, cap, actors=len(plan_actors(cfg, cap)))
    smallest = sum(1 for n in cfg.clients.group_sizes() if n)
    if share is not None:
        part = Capacity(cap.cpus / share, cap.gpus / share, cap.node_cpus, cap.node_gpus)
        try:
            return plan_actors(cfg, part, actors=len(plan_actors(cfg, part)))
        except ResourceError:
            pass
    return plan_actors(cfg, cap, actors=smallest)


def trial_bundles(cfg: Config, specs: list[ActorSpec]) -> list[dict[str, float]]:
    """A trial's placement group: its driver's bundle first, then one bundle per client actor. The serial
    engine trains in the driver (one CPU); the Ray engine's driver only averages and tests the global
    model between rounds, so its bundle holds memory alone and single-CPU trials pack one per core."""
    if cfg.engine.kind == "serial":
        return [{"CPU": 1.0, "memory": DRIVER_MEMORY}]
    return [{"memory": DRIVER_MEMORY}] + [{k: v for k, v in (("CPU", s.num_cpus), ("GPU", s.num_gpus)) if v}
                                          for s in specs]


def match_bundles(specs: list[ActorSpec], bundles: list[dict[str, float]]) -> list[int]:
    """The bundle index (1, 2, ...: 0 is the driver's) each actor goes into, one actor per bundle of the same
    CPUs and GPUs; a ResourceError when the placement group was sized for another plan."""
    free = list(range(1, len(bundles)))
    out = []
    for s in specs:
        same = next((i for i in free if bundles[i].get("CPU", 0.0) == s.num_cpus
                     and bundles[i].get("GPU", 0.0) == s.num_gpus), None)
        if same is None:
            raise ResourceError(f"the trial's placement group ({len(bundles) - 1} actor bundles) holds no bundle of "
                                f"{s.num_cpus:g} CPU / {s.num_gpus:g} GPU for a {s.group} actor; size it with "
                                "fmlray.engine.resources.trial_bundles for this config")
        free.remove(same)
        out.append(same)
    return out


def bundle_capacity(bundles: list[dict[str, float]]) -> Capacity:
    """What the actor bundles of a trial's placement group (all but the driver's) hold: an actor cannot
    span bundles, so the largest bundle is its "node"."""
    actors = bundles[1:]
    return Capacity(cpus=sum(b.get("CPU", 0.0) for b in actors), gpus=sum(b.get("GPU", 0.0) for b in actors),
                    node_cpus=max((b.get("CPU", 0.0) for b in actors), default=0.0),
                    node_gpus=max((b.get("GPU", 0.0) for b in actors), default=0.0))


def pack(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """Whether `bundles` fit the `nodes`' total resources, largest bundle first into the first node with
    room (first-fit decreasing: it may miss a packing that exists, never claims one that does not)."""
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (-b.get("GPU", 0.0), -b.get("CPU", 0.0), -b.get("memory", 0.0))):
        node = next((n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in b.items())), None)
        if node is None:
            return False
        for k, v in b.items():
            node[k] -= v
    return True


def check_trial_fits(name: str, bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> None:
    """A one-line ResourceError, before anything starts, for a trial the cluster could never place."""
    if pack(bundles, nodes):
        return
    need = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU", "memory")}
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
    raise ResourceError(
        f"run {name} needs a placement group of {len(bundles)} bundles ({need['CPU']:g} CPUs, {need['GPU']:g} GPUs, "
        f"{size(need['memory'])} in all: its driver and {len(bundles) - 1} client actors) that the cluster's "
        f"{len(nodes)} node(s) ({have['CPU']:g} CPUs, {have['GPU']:g} GPUs, {size(have['memory'])}) cannot hold; "
        "lower engine.num_actors or the groups' num_cpus/num_gpus")


# -- memory: where private state lives, and whether a run fits ------------------------------------

GiB = 2**30
# What one client actor costs before it holds any client: the interpreter with torch and Ray's worker
# (~0.5-0.6 GiB measured on this project's torch wheel), the dataset's rows it gathers, its workspaces.
ACTOR_BASE = 0.6 * GiB
STORE_SHARE = 0.25  # `auto` keeps private state in memory while it fits in this share of a node's memory


def size(nbytes: float) -> str:
    """'1.25 GiB' or '340.0 MiB'."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 2**20:.1f} MiB"


@dataclass(frozen=True)
class StorePlan:
    kind: str  # "memory" | "disk"
    row_bytes: dict[str, int]  # a client's private state, by client group
    estimate: int  # private state if every client trained (the most a store can hold)
    line: str  # said once at start


def local_arch(cfg: Config, group) -> str:
    """A group's local architecture as workspaces name it: with its task's outputs when they are not the
    dataset's classes (e.g. "lenet5-4way")."""
    from fmlray.engine.tasks import arch_name
    from fmlray.tasks import of_group

    outputs = of_group(cfg, group).num_labels
    return group.local_model if outputs == cfg.data.num_classes else arch_name(group.local_model, outputs)


def row_bytes(cfg: Config, dataset) -> dict[str, int]:
    """Bytes of one client's private state (what its algorithm keeps: models or parts, optimisers, scalars)
    per client group (by name: what a group keeps depends on the algorithm, e.g. Ditto's personal model has the
    global architecture whatever the group's local one); {} when the algorithm keeps nothing on the clients."""
    from fmlray.algorithms import build_algorithm
    from fmlray.engine.host import client_archs, client_models, private_layout

    algo = build_algorithm(cfg.algorithm, cfg.run.rounds)
    out = {}
    for g in cfg.clients.groups:
        archs = client_archs(cfg, algo, local_arch(cfg, g))
        models = client_models(algo, archs, dataset)
        layout = private_layout(cfg, algo, models, archs)
        if layout.slots:
            out[g.name] = layout.nbytes
    return out


def plan_store(cfg: Config, dataset, node_memory: float, nodes: int = 1) -> StorePlan:
    """Memory or disk for clients' private state: `auto` takes memory while the most it could hold, spread
    over `nodes`, fits in a quarter of a node's memory."""
    rows = row_bytes(cfg, dataset)
    sizes = cfg.clients.group_sizes()
    names = [g.name for g in cfg.clients.groups]
    estimate = sum(n * rows[g] for g, n in zip(names, sizes) if g in rows)
    kind = cfg.engine.state_store
    if kind == "auto":
        kind = "memory" if estimate / max(nodes, 1) <= STORE_SHARE * node_memory else "disk"
    per = ", ".join(f"{g}: {n:,} × {rows[g] / 2**20:.2f} MiB" for g, n in zip(names, sizes) if n and g in rows)
    where = "in memory" if kind == "memory" else \
        f"on disk under {cfg.engine.state_dir or 'a scratch folder of each node'}"
    line = (f"private state: up to {size(estimate)} ({per or 'none'}), kept {where}"
            + (" (engine.state_store = auto)" if cfg.engine.state_store == "auto" else "")
            + (" (engine.state_dir unused: the disk store's)" if kind == "memory" and cfg.engine.state_dir else ""))
    return StorePlan(kind, rows, estimate, line)


def check_memory(cfg: Config, plan: StorePlan, data_bytes: int, actors_per_node: int, node_memory: float,
                 nodes: int = 1) -> None:
    """Refuse, with the setting to change, a run whose estimated memory a node cannot hold."""
    state = plan.estimate / max(nodes, 1) if plan.kind == "memory" else 0
    need = data_bytes * 2 + actors_per_node * ACTOR_BASE + state  # the dataset: object store + the driver
    if need <= node_memory:
        return
    parts = [f"{actors_per_node} actors × ~{ACTOR_BASE / GiB:.1f} GiB", f"{data_bytes * 2 / GiB:.1f} GiB of data"]
    if state:
        parts.append(f"{state / GiB:.1f} GiB of private state in memory")
    fix = ("set engine.state_store = \"disk\" (or auto)" if state > need / 2
           else "lower engine.num_actors or the groups' num_cpus share, or use a smaller dataset")
    raise ResourceError(f"this run needs about {need / GiB:.1f} GiB on a node ({', '.join(parts)}) but a node has "
                        f"{node_memory / GiB:.1f} GiB; {fix}")
