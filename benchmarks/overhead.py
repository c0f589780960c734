"""Seconds per round of one workload, four ways: (a) a plain PyTorch loop on one thread — the floor,
(a') the same loop fed channels-last batches as fmlray feeds them on the CPU (`floor-1t-cl`: how much
of fmlray's lead on convolutions is that layout), (b) the same loop on every core's thread, (c) fmlray's
serial engine, (d) fmlray's Ray engine with 1..N actors; (c) and (d) each train an actor's clients one
after another (`training.batching = "sequential"`), as one batched model (`-vmap`), and as `auto` picks
(`serial-auto`). All ways live in one process tree and take turns round by round (the order rotating),
so drift in the machine's speed falls on all of them alike.

    python benchmarks/overhead.py --workload digits --quick
    python benchmarks/overhead.py --workload fmnist --quick
    python benchmarks/overhead.py --workload fmnist-full --ways floor-1t,ray-2   # all 60,000 rows, ~25 min
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, when run from anywhere

import benchlib  # noqa: E402
from fmlray.algorithms.base import cpu_layout  # noqa: E402
from fmlray.algorithms.fml import mutual_losses  # noqa: E402
from fmlray.config import Config, EngineConfig, load_config, to_dict  # noqa: E402
from fmlray.engine import make_engine  # noqa: E402
from fmlray.engine.host import initial_global_state  # noqa: E402
from fmlray.models import build_model  # noqa: E402
from fmlray.simulation import Prepared, prepare  # noqa: E402


@dataclass(frozen=True)
class Workload:
    """One of the issue's two workloads."""

    label: str
    dataset: str
    model: str  # fmlray registry name, used by every way (the floor builds it with build_model too)
    train_samples: dict[str, int]  # per variant (full, quick, smoke); 0 keeps the whole training set
    rounds: dict[str, int]  # timed rounds per variant


WORKLOADS = {
    "digits": Workload("overhead-bound", "digits", "mlp", {"full": 0, "quick": 0, "smoke": 400},
                       {"full": 100, "quick": 30, "smoke": 2}),
    # the CNN (conv 32 5x5, pool, conv 64 5x5, pool, fc 512, fc 10): fmlray's `cnn5`
    "fmnist": Workload("compute-bound", "fmnist", "cnn5", {"full": 10000, "quick": 2000, "smoke": 200},
                       {"full": 5, "quick": 4, "smoke": 1}),
    # the same on all 60,000 training rows: where a client's update dominates and the peer was measured
    "fmnist-full": Workload("compute-bound, full size", "fmnist", "cnn5", {"full": 0, "quick": 20000, "smoke": 1000},
                            {"full": 3, "quick": 2, "smoke": 1}),
}
ALGORITHMS = ("fedavg", "fml")
NUM_CLIENTS = 20


def base_config(w: Workload, algorithm: str, train_samples: int, rounds: int, seed: int) -> Config:
    """The issue's workload as an fmlray config: 20 clients, Dirichlet(0.5), 1 epoch, batch 32, no evaluation."""
    group = f"clients.groups=[{{name='all', share=1.0, local_model='{w.model}', num_cpus=1.0}}]"
    return load_config(None, [
        f"run.name='overhead-{w.dataset}-{algorithm}'", f"run.seed={seed}", f"run.rounds={rounds}",
        "run.eval_every=1000000",  # evaluation is not part of the measured work (the floor skips it too)
        f"data.dataset='{w.dataset}'", "data.partition='dirichlet'", "data.dirichlet_alpha=0.5",
        f"data.max_train_samples={train_samples}", "data.max_test_samples=2000",
        f"clients.num_clients={NUM_CLIENTS}", "clients.fraction=1.0", group, f"model.meme='{w.model}'",
        "training.epochs=1", "training.batch_size=32", f"algorithm.name='{algorithm}'",
        "engine.kind='serial'", "training.batching='sequential'",
    ])


def batching(cfg: Config, how: str) -> Config:
    """`cfg` with its clients trained `how` ("sequential", "vmap" or "auto")."""
    return cfg.replace(training=dataclasses.replace(cfg.training, batching=how))


def ray_config(cfg: Config, actors: int, num_cpus: float, num_gpus: float = 0.0) -> Config:
    """`cfg` on the Ray engine with `actors` client actors of the given resources."""
    group = dataclasses.replace(cfg.clients.groups[0], num_cpus=num_cpus, num_gpus=num_gpus)
    return cfg.replace(engine=EngineConfig(kind="ray", num_actors=actors),
                       clients=dataclasses.replace(cfg.clients, groups=(group,)))


class Floor:
    """A plain PyTorch loop: the same clients, rows, models, optimiser, losses and weighted mean; no framework."""

    kind = "floor"

    def __init__(self, name: str, cfg: Config, prepared: Prepared, threads: int, device: str = "cpu",
                 layout: bool = False):
        self.name, self.cfg, self.prepared, self.threads, self.layout = name, cfg, prepared, threads, layout
        self.device, self.actors, self.gpu_fraction = torch.device(device), 0, 0.0
        self.fml = cfg.algorithm.name == "fml"

    def start(self) -> None:
        """Gather each client's rows once and build the models (a plain loop would do this up front)."""
        ds, part, dev = self.prepared.dataset, self.prepared.partition, self.device
        x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
        self.data = [(x[torch.from_numpy(r)].to(dev), y[torch.from_numpy(r)].to(dev)) for r in part.train]
        torch.manual_seed(self.cfg.run.seed)
        self.meme = self._model()
        self.global_state = {k: v.detach().clone() for k, v in self.meme.state_dict().items()}
        if not all(v.is_floating_point() for v in self.global_state.values()):
            raise SystemExit(f"the floor averages float tensors only; {self.cfg.model.meme} has integer buffers")
        self.locals = [self._model() for _ in self.data] if self.fml else []
        self.local_opts = [self._sgd(m) for m in self.locals]

    def _model(self) -> torch.nn.Module:
        ds = self.prepared.dataset
        return build_model(self.cfg.model.meme, ds.input_shape, ds.num_classes).to(self.device)

    def _sgd(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        t = self.cfg.training
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def round(self, rnd: int, ids: list[int]) -> tuple[float, float]:
        """One round; (wall seconds, sum of client update seconds)."""
        torch.set_num_threads(self.threads)
        started = time.perf_counter()
        total = {k: torch.zeros_like(v) for k, v in self.global_state.items()}
        weight, compute = 0.0, 0.0
        for cid in ids:
            t0 = time.perf_counter()
            self.meme.load_state_dict(self.global_state)
            self._train(cid, rnd)
            n = float(len(self.data[cid][1]))
            for k, v in self.meme.state_dict().items():
                total[k].add_(v, alpha=n)
            weight += n
            compute += time.perf_counter() - t0
        self.global_state = {k: v / weight for k, v in total.items()}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, compute

    def _train(self, cid: int, rnd: int) -> None:
        """One local epoch of SGD on client `cid`: cross-entropy (FedAvg) or the mutual losses (FML)."""
        x, y = self.data[cid]
        bs, f = self.cfg.training.batch_size, self.cfg.algorithm.fml
        meme_opt = self._sgd(self.meme)  # fresh every round, as in fmlray
        gen = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + rnd * 10_007 + cid)
        order = torch.randperm(len(y), generator=gen).to(self.device)
        for start in range(0, len(y), bs):
            idx = order[start:start + bs]
            xb, yb = cpu_layout(x[idx]) if self.layout else x[idx], y[idx]
            if self.fml:
                local, local_opt = self.locals[cid], self.local_opts[cid]
                l_local, l_meme = mutual_losses(local(xb), self.meme(xb), yb, alpha=f.alpha, beta=f.beta,
                                                temperature=f.temperature)
                loss = l_local + l_meme
                local_opt.zero_grad(set_to_none=True)
            else:
                loss = F.cross_entropy(self.meme(xb), yb)
            meme_opt.zero_grad(set_to_none=True)
            loss.backward()
            meme_opt.step()
            if self.fml:
                local_opt.step()

    def close(self) -> None:
        self.data, self.locals, self.local_opts = [], [], []


class EngineWay:
    """fmlray's serial or Ray engine, driven round by round through `train_round`."""

    def __init__(self, name: str, cfg: Config, prepared: Prepared, threads: int):
        self.name, self.cfg, self.prepared, self.threads = name, cfg, prepared, threads
        self.kind = cfg.engine.kind
        self.actors = cfg.engine.num_actors if self.kind == "ray" else 0
        self.gpu_fraction = cfg.clients.groups[0].num_gpus if self.kind == "ray" else 0.0
        self.device = "cuda" if self.gpu_fraction > 0 else "cpu"

    def start(self) -> None:
        self.engine = make_engine(self.cfg)
        self.engine.start(self.cfg, self.prepared.dataset, self.prepared.partition)
        self.state = initial_global_state(self.cfg, self.prepared.dataset)

    def round(self, rnd: int, ids: list[int]) -> tuple[float, float]:
        """One round, aggregation included; (wall seconds, sum of client update seconds)."""
        torch.set_num_threads(self.threads)  # the serial engine trains in this process
        started = time.perf_counter()
        result = self.engine.train_round(rnd, ids, self.state)
        self.state = result.global_state
        benchlib.wait_state(self.state)  # train_round returns before the aggregator has finished
        return time.perf_counter() - started, sum(c["seconds"] for c in result.clients)

    def close(self) -> None:
        self.engine.close()


def cpu_phase(w: Workload, args, prepared: dict[str, Prepared], configs: dict[str, Config]) -> list:
    """Ways (a)-(d) for every algorithm, to run side by side."""
    cores = os.cpu_count() or 1
    ways = []
    for algo in args.algorithms:
        cfg, prep = configs[algo], prepared[algo]
        ways += [Floor(f"floor-1t/{algo}", cfg, prep, 1), Floor(f"floor-1t-cl/{algo}", cfg, prep, 1, layout=True),
                 Floor(f"floor-{cores}t/{algo}", cfg, prep, cores),
                 EngineWay(f"serial/{algo}", cfg, prep, 1),
                 EngineWay(f"serial-vmap/{algo}", batching(cfg, "vmap"), prep, 1),
                 EngineWay(f"serial-auto/{algo}", batching(cfg, "auto"), prep, 1)]
        ways += [EngineWay(f"ray-{k}/{algo}", ray_config(cfg, k, 1.0), prep, 1) for k in args.actors]
        ways += [EngineWay(f"ray-{k}-vmap/{algo}", ray_config(batching(cfg, "vmap"), k, 1.0), prep, 1)
                 for k in args.actors]
    if args.ways:  # floor-1t stays: every ratio is taken against it
        ways = [w for w in ways if w.name.split("/")[0] in {*args.ways, "floor-1t"}]
    return ways


def gpu_phase(fraction: float, args, prepared: dict[str, Prepared], configs: dict[str, Config]) -> list:
    """The floor on CPU and on the GPU, and the Ray engine with actors of `fraction` GPU each."""
    gpus, cores = torch.cuda.device_count(), os.cpu_count() or 1
    actors = max(1, round(gpus / fraction))
    ways = []
    for algo in args.algorithms:
        cfg, prep = configs[algo], prepared[algo]
        ways += [Floor(f"floor-1t/{algo}", cfg, prep, 1), Floor(f"floor-cuda/{algo}", cfg, prep, 1, "cuda"),
                 EngineWay(f"ray-gpu{fraction:g}x{actors}/{algo}",
                           ray_config(cfg, min(actors, NUM_CLIENTS), min(1.0, cores / actors), fraction), prep, 1)]
    return ways


def ray_cpus(ways: list) -> float:
    """Logical CPUs for Ray: every Ray way's actors at once (idle ways' actors only wait, using no CPU)."""
    return sum(w.cfg.clients.groups[0].num_cpus * w.actors for w in ways if w.kind == "ray")


def run_phase(phase: str, ways: list, warmup: int, rounds: int, sampler: benchlib.MemorySampler,
              log=print) -> tuple[list[dict], dict]:
    """Start every way, run warm-up then timed rounds taking turns, close; (round rows, peak memory)."""
    ids = list(range(NUM_CLIENTS))
    started = time.perf_counter()
    try:
        for w in ways:
            w.start()
        log(f"[{phase}] {len(ways)} ways started in {time.perf_counter() - started:.1f}s")
        pids = set().union(*(benchlib.actor_pids(w.engine) for w in ways if w.kind == "ray"))
        sampler.actor_pids = lambda: pids
        sampler.reset()
        rows = []
        for rnd in range(1, warmup + rounds + 1):
            k = rnd % len(ways)
            order = ways[k:] + ways[:k]  # rotate, so no way always runs right after the same one
            for pos, w in enumerate(order):
                seconds, compute = w.round(rnd, ids)
                rows.append(way_row(phase, w, rnd, rnd <= warmup, pos, seconds, compute))
            sampler.sample()  # between rounds, so the readings never slow a timed round
            log(f"[{phase}] round {rnd}/{warmup + rounds}" + (" (warm-up)" if rnd <= warmup else ""))
        return rows, sampler.peak()
    finally:
        for w in ways:
            if hasattr(w, "engine") or w.kind == "floor":
                w.close()


def isolated_memory(way: "EngineWay", rounds: int = 3) -> dict:
    """Peak PSS of a whole `fmlray run` of this way's config (`rounds` rounds, evaluated at the end),
    started as a child process: its driver, its actors and its own private Ray, nothing of this script."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(tomli_w.dumps(to_dict(way.cfg)))
        cmd = [sys.executable, "-m", "fmlray", "run", "--config", str(path), "--set", f"run.rounds={rounds}",
               "--set", f"run.output_dir='{tmp}'"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        with benchlib.MemorySampler(benchlib.actors_by_title(proc.pid), interval_s=0.1,
                                    root=proc.pid) as sampler:
            _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"the memory run of {way.name} failed: {err.strip().splitlines()[-1:]}")
        return sampler.peak()


def memory_rows(phases: list, log=print, runs: int | None = None) -> list[dict]:
    """Whole-tree peak PSS of each algorithm's Ray way with the most actors, run alone after the timing
    (the first `runs` of them per phase, if given: --smoke makes one, each is a whole `fmlray run`)."""
    rows = []
    for phase, ways in phases:
        ray_ways = [w for w in ways if w.kind == "ray"]
        for algo in list(dict.fromkeys(w.name.rsplit("/", 1)[1] for w in ray_ways))[:runs]:
            way = max((w for w in ray_ways if w.name.endswith(f"/{algo}")), key=lambda w: w.actors)
            try:
                peak = isolated_memory(way)
            except SystemExit as failed:  # the timings are kept: the record says which memory run failed
                log(str(failed))
                rows.append({"phase": phase, "way": way.name, "failed": str(failed)})
                continue
            log(f"[memory] {way.name} alone: {peak['total'] / 2**30:.2f} GiB")
            rows.append({"phase": phase, "way": way.name, **{f"{k}_mib": v / benchlib.MIB for k, v in peak.items()}})
    return rows


def way_row(phase: str, w, rnd: int, warm: bool, pos: int, seconds: float, compute: float) -> dict:
    """One Parquet row: a way's round."""
    name, algo = w.name.rsplit("/", 1)
    return {"phase": phase, "algorithm": algo, "way": name, "kind": w.kind, "actors": w.actors,
            "threads": w.threads, "gpu_fraction": w.gpu_fraction, "device": str(w.device), "round": rnd,
            "warmup": warm, "position": pos, "seconds": seconds, "client_seconds": compute}


def summarise(rows: list[dict], order: list[tuple[str, str]]) -> list[dict]:
    """Median seconds per round of each (phase, algorithm, way) over timed rounds, and the ratios;
    in `order` ((phase, 'way/algorithm') as the phases list them), grouped by algorithm."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r["warmup"]:
            groups.setdefault((r["phase"], r["algorithm"], r["way"]), []).append(r)
    out = []
    for (phase, algo, way), rs in groups.items():
        secs = [r["seconds"] for r in rs]
        out.append({"phase": phase, "algorithm": algo, "way": way, "kind": rs[0]["kind"], "actors": rs[0]["actors"],
                    "threads": rs[0]["threads"], "rounds": len(rs), "median_s": statistics.median(secs),
                    "min_s": min(secs), "max_s": max(secs),
                    "client_s": statistics.median(r["client_seconds"] for r in rs)})
    median = {(s["phase"], s["algorithm"], s["way"]): s["median_s"] for s in out}
    for s in out:
        s["ratio_vs_floor"] = s["median_s"] / median[(s["phase"], s["algorithm"], "floor-1t")]
        fedavg = median.get((s["phase"], "fedavg", s["way"]))
        s["fml_vs_fedavg"] = s["median_s"] / fedavg if s["algorithm"] == "fml" and fedavg else None
    rank = {key: i for i, key in enumerate(order)}
    return sorted(out, key=lambda s: rank[(s["phase"], f"{s['way']}/{s['algorithm']}")])


def targets(workload: str, summary: list[dict], alone: list[dict]) -> list[dict]:
    """The issue's targets that this workload's numbers speak to, each with its value and verdict."""
    cpu = [s for s in summary if s["phase"] == "cpu"]
    checks = []
    if workload == "fmnist-full":  # issue 12's targets
        floor_client = {s["algorithm"]: s["client_s"] for s in cpu if s["way"] == "floor-1t"}
        for s in cpu:
            if s["way"] == "ray-2":
                checks.append((f"{s['algorithm']}: Ray 2 actors / floor(a)", s["ratio_vs_floor"], 0.55))
                checks.append((f"{s['algorithm']}: clients' summed update time, Ray 2 actors / floor(a)",
                               s["client_s"] / floor_client[s["algorithm"]], 1.10))
                if s["fml_vs_fedavg"] is not None:
                    checks.append(("FML / FedAvg, Ray 2 actors", s["fml_vs_fedavg"], 1.9))
    serial = {s["algorithm"]: s["median_s"] for s in cpu if s["way"] == "serial"}
    if workload in ("fmnist", "fmnist-full"):  # issue 14: auto picks the sequential loop for cnn5 on the CPU
        checks += [(f"{s['algorithm']}: serial auto / serial sequential", s["median_s"] / serial[s["algorithm"]], 1.05)
                   for s in cpu if s["way"] == "serial-auto"]
    if workload == "fmnist":
        for s in cpu:
            if s["way"] == "ray-2":
                checks.append((f"{s['algorithm']}: Ray 2 actors / floor(a)", s["ratio_vs_floor"], 0.525))
                if s["fml_vs_fedavg"] is not None:
                    checks.append(("FML / FedAvg, Ray 2 actors", s["fml_vs_fedavg"], 2.1))
    if workload == "digits":
        checks += [(f"{s['algorithm']}: Ray {s['actors']} actor(s) / floor(a)", s["ratio_vs_floor"], 1.5)
                   for s in cpu if s["kind"] == "ray" and not s["way"].endswith("-vmap")]
        # issue 14: batched, on one thread (serial engine, Ray with 1 actor); FedAvg <= 0.5, FML <= 1.0 x floor(a)
        checks += [(f"{s['algorithm']}: {s['way']} (batched, 1 thread) / floor(a)", s["ratio_vs_floor"],
                    0.5 if s["algorithm"] == "fedavg" else 1.0)
                   for s in cpu if s["way"] in ("serial-vmap", "ray-1-vmap")]
        checks += [(f"whole-tree PSS, GiB, {m['way']} alone", m["total_mib"] / 1024, 2.0) for m in alone
                   if "failed" not in m]
    return [{"check": c, "value": v, "target": f"<= {t:g}", "met": "yes" if v <= t else "no"} for c, v, t in checks]


def plot(summary: list[dict], title: str, path: Path) -> Path:
    """Median seconds per round of each way, one bar per algorithm, each algorithm's floor(a) a dotted line;
    one panel per phase."""
    phases = list(dict.fromkeys(s["phase"] for s in summary))
    fig, axes = benchlib.figure(len(phases))
    for ax, phase in zip(axes, phases):
        mine = [s for s in summary if s["phase"] == phase]
        ways, algos = list(dict.fromkeys(s["way"] for s in mine)), list(dict.fromkeys(s["algorithm"] for s in mine))
        median = {(s["way"], s["algorithm"]): s["median_s"] for s in mine}
        benchlib.bars(ax, ways, {a: [median.get((w, a)) for w in ways] for a in algos}, "seconds per round (median)")
        for i, a in enumerate(algos):
            if (floor := median.get(("floor-1t", a))) is not None:
                ax.axhline(floor, color=f"C{i}", linestyle=":", label=f"{a}: floor(a) {floor:.3g} s")
        ax.legend(fontsize=7)
        ax.set_title(f"{title}, {phase}", fontsize=10)
    return benchlib.save_png(fig, path)


SUMMARY_COLUMNS = [("phase", "phase", ""), ("algorithm", "algorithm", ""), ("way", "way", ""),
                   ("rounds", "rounds", ""), ("median_s", "s/round (median)", ".4f"), ("min_s", "min", ".4f"),
                   ("max_s", "max", ".4f"), ("client_s", "client s (sum)", ".4f"),
                   ("ratio_vs_floor", "× floor(a)", ".2f"), ("fml_vs_fedavg", "FML ÷ FedAvg", ".2f")]


def markdown(w: Workload, args, meta: dict, summary: list[dict], memory: dict, alone: list[dict],
             configs: dict, png: Path) -> str:
    """The run's Markdown report: environment, table, targets, memory, config."""
    import tomli_w
    mem = ", ".join(f"{k} {v / benchlib.MIB:.0f} MiB" for k, v in memory.items())
    parts = [f"# overhead: {args.workload} ({w.label}), {args.variant}", "", benchlib.environment_markdown(meta), "",
             f"{NUM_CLIENTS} clients, Dirichlet(0.5), model `{w.model}`, 1 epoch, batch 32; "
             f"{meta['train_rows']} training rows; {args.warmup} warm-up + {args.rounds} timed rounds per way, "
             "taking turns round by round. Ways: floor-1t = plain PyTorch loop, 1 thread (a); "
             "floor-1t-cl = same, fed channels-last batches as fmlray feeds them on the CPU (a'); "
             f"floor-{os.cpu_count()}t = same, all threads (b); serial = fmlray serial engine, 1 thread (c); "
             "ray-k = fmlray Ray engine, k actors of 1 CPU (1 thread) each (d); these train an actor's clients "
             "one after another (`training.batching = \"sequential\"`); `-vmap`: as one batched model; "
             "serial-auto: as `auto` picks.", "",
             benchlib.markdown_table(summary, SUMMARY_COLUMNS), "",
             benchlib.png_link("seconds per round by way and algorithm", png), ""]
    checks = targets(args.workload, summary, alone)
    if checks:
        parts += ["## Targets", "", benchlib.markdown_table(checks, [("check", "check", ""), ("value", "value", ".3f"),
                                                                     ("target", "target", ""), ("met", "met", "")]), ""]
    first = args.algorithms[0]
    mem_cols = [("way", "Ray way, run alone", "")] + [(f"{k}_mib", f"{k} MiB", ".0f")
                                                        for k in ("driver", "actors", "ray_system", "total")]
    if any("failed" in m for m in alone):
        mem_cols.append(("failed", "failed", ""))
    parts += ["## Memory", "", f"Peak PSS of the process tree with every way alive, sampled between rounds: {mem}.",
              "", "Each algorithm's Ray way with the most actors, run alone after the timing as a whole `fmlray run` "
              "of 3 rounds, evaluated at the end, in a child process with its own private Ray (PSS sampled every 0.1 s; "
              "driver = that `fmlray` process; actors = client actors + aggregator; ray_system = the rest of its tree):",
              "", benchlib.markdown_table(alone, mem_cols), "",
              f"## Config ({first}; other algorithms differ only in algorithm.name; Ray ways set "
              "engine.kind/num_actors and the group's num_cpus/num_gpus)", "",
              "```toml", tomli_w.dumps(to_dict(configs[first])).strip(), "```", ""]
    return "\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="digits",
                   help="digits: overhead-bound (MLP); fmnist: compute-bound (CNN) on 10,000 rows; "
                        "fmnist-full: the same on all 60,000")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="sized to finish in under 3 minutes on 2 cores")
    size.add_argument("--smoke", action="store_true", help="tiny, for CI: checks the script runs, not its numbers")
    p.add_argument("--algorithms", type=benchlib.comma_list(str), default=list(ALGORITHMS), help="fedavg,fml")
    p.add_argument("--actors", type=benchlib.comma_list(int), default=None,
                   help="Ray engine actor counts (default: 1, 2, 4, ... up to the number of cores)")
    p.add_argument("--ways", type=benchlib.comma_list(str), default=[],
                   help="only these CPU ways besides floor-1t, e.g. ray-2,serial (default: all)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per way (default: by workload and size)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per way first (default 1)")
    p.add_argument("--max-train-samples", type=int, default=None, help="training rows (0: all; default by size)")
    p.add_argument("--gpu-fractions", type=benchlib.comma_list(float), default=[],
                   help="also run the Ray engine with client actors of these GPU shares, e.g. 1,0.5,0.25,0.125")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=benchlib.DEFAULT_OUT, help="folder for the results")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill size-dependent defaults; refuse values that cannot work, naming the flag."""
    w = WORKLOADS[args.workload]
    args.variant = "smoke" if args.smoke else "quick" if args.quick else "full"
    cores = os.cpu_count() or 1
    args.actors = args.actors or ([1] if args.smoke else [2**i for i in range(cores.bit_length()) if 2**i <= cores])
    args.rounds = w.rounds[args.variant] if args.rounds is None else args.rounds
    if args.max_train_samples is None:
        args.max_train_samples = w.train_samples[args.variant]
    if unknown := [a for a in args.algorithms if a not in ALGORITHMS]:
        p.error(f"--algorithms: unknown {', '.join(unknown)}; choose from {', '.join(ALGORITHMS)}")
    known = {"floor-1t", "floor-1t-cl", f"floor-{cores}t", "serial", "serial-vmap", "serial-auto",
             *(f"ray-{k}{b}" for k in args.actors for b in ("", "-vmap"))}
    if unknown := [w for w in args.ways if w not in known]:
        p.error(f"--ways: unknown {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    if any(k < 1 or k > NUM_CLIENTS for k in args.actors):
        p.error(f"--actors: each count must be between 1 and {NUM_CLIENTS} (the number of clients)")
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    if args.max_train_samples < 0:
        p.error("--max-train-samples must be >= 0")
    if any(not 0 < f <= 1 for f in args.gpu_fractions):
        p.error("--gpu-fractions: each share must be in (0, 1]")
    if args.gpu_fractions and not torch.cuda.is_available():
        p.error("--gpu-fractions needs a CUDA GPU, and torch sees none here")
    benchlib.check_at_least(p, "--seed", args.seed, 0)
    benchlib.check_out(p, args.out)


def main(argv: list[str] | None = None) -> int:
    """Time every way; write Parquet, Markdown and a PNG."""
    args = parse_args(argv)
    w = WORKLOADS[args.workload]
    total_rounds = args.warmup + args.rounds
    configs = {a: base_config(w, a, args.max_train_samples, total_rounds, args.seed) for a in args.algorithms}
    first = prepare(configs[args.algorithms[0]])  # every algorithm trains on the same data and partition
    prepared = {a: first for a in args.algorithms}
    phases = [("cpu", cpu_phase(w, args, prepared, configs))]
    phases += [(f"gpu{f:g}", gpu_phase(f, args, prepared, configs)) for f in args.gpu_fractions]
    meta = benchlib.run_meta(args) | {"load_before": os.getloadavg(), "train_rows": len(first.dataset.y_train),
                                      "configs": {a: to_dict(c) for a, c in configs.items()}}
    ray_up = benchlib.start_ray(max([os.cpu_count() or 1] + [ray_cpus(ways) for _, ways in phases]))
    print(f"Ray up in {ray_up:.1f}s; {len(first.dataset.y_train)} training rows", flush=True)
    rows, memory = [], {}
    with benchlib.MemorySampler(interval_s=None) as sampler:
        for phase, ways in phases:
            got, peak = run_phase(phase, ways, args.warmup, args.rounds, sampler,
                                  log=lambda m: print(m, flush=True))
            rows += [r | {"workload": args.workload} for r in got]
            memory = {k: max(v, memory.get(k, 0)) for k, v in peak.items()}
    alone = memory_rows(phases, log=lambda m: print(m, flush=True), runs=1 if args.smoke else None)
    meta["load_after"] = os.getloadavg()
    summary = summarise(rows, [(phase, w.name) for phase, ways in phases for w in ways])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = benchlib.result_stem("overhead", args.workload, "" if args.variant == "full" else args.variant, args.out)
    benchlib.write_parquet(rows, args.out / f"{stem}.parquet", meta | {"memory_peak_bytes": memory, "alone": alone})
    report = markdown(w, args, meta, summary, memory, alone, configs, args.out / f"{stem}.png")
    (args.out / f"{stem}.md").write_text(report)
    plot(summary, f"overhead: {args.workload}, {args.variant}", args.out / f"{stem}.png")
    print(report)
    print(f"wrote {args.out / stem}.parquet, .md and .png")
    return 1 if any("failed" in m for m in alone) else 0


if __name__ == "__main__":
    benchlib.exit_with(main)
