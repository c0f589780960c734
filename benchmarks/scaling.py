"""How fmlray's Ray engine scales: rounds of 10 to 1,000 clients, 1 to N actors, and partial
participation, with per-round wall time, client compute, engine overhead, aggregation time,
object-store traffic and peak memory; start-up (Ray up, actors ready, data stored) apart.

    python benchmarks/scaling.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, when run from anywhere

import benchlib  # noqa: E402
from fmlray.config import Config, load_config, to_dict  # noqa: E402
from fmlray.engine.host import initial_global_state  # noqa: E402
from fmlray.engine.ray_engine import RayEngine  # noqa: E402
from fmlray.errors import FmlrayError  # noqa: E402
from fmlray.simulation import prepare, sample_clients  # noqa: E402

DATASETS = ("synthetic", "digits")
DIGITS_MIN_SAMPLES = 2  # digits has only 1,438 training rows (and 359 test rows to deal out)
SIZES = {  # per variant: clients sweep, actors sweep, fractions sweep, timed rounds
    "full": {"clients": [10, 50, 100, 200, 500, 1000], "actors": [1, 2, 4, 8], "fractions": [0.1, 0.25, 0.5, 1.0],
             "rounds": 5},
    "quick": {"clients": [10, 50, 100, 200, 500, 1000], "actors": [1, 2, 4], "fractions": [0.1, 0.5, 1.0],
              "rounds": 2},
    "smoke": {"clients": [10, 20], "actors": [2], "fractions": [1.0], "rounds": 1},
}


def point_config(dataset: str, clients: int, actors: int, fraction: float, args) -> Config:
    """One measured configuration: an MLP per client (and as the meme), 1 epoch, no evaluation."""
    cores = os.cpu_count() or 1
    data = (["data.partition='natural'"] if dataset == "synthetic"
            else ["data.partition='iid'", f"data.min_samples={DIGITS_MIN_SAMPLES}"])
    # At most 1 CPU per actor: fmlray gives an actor int(num_cpus) torch threads, and two intra-op threads on a
    # tiny MLP stall at every barrier once another process holds a core (seen: 30 s a round instead of ~1 s).
    group = f"clients.groups=[{{name='all', share=1.0, local_model='mlp', num_cpus={min(1.0, cores / actors)}}}]"
    return load_config(None, [
        f"run.name='scaling-{dataset}-{clients}'", f"run.seed={args.seed}", f"run.rounds={args.warmup + args.rounds}",
        "run.eval_every=1000000", f"data.dataset='{dataset}'", *data, f"clients.num_clients={clients}",
        f"clients.fraction={fraction}", group, "model.meme='mlp'", "training.epochs=1",
        f"training.batch_size={args.batch_size}", f"algorithm.name='{args.algorithm}'", "engine.kind='ray'",
        f"engine.num_actors={actors}",
    ])


def refusal(dataset: str, clients: int, args) -> str | None:
    """Why fmlray cannot split `dataset` among `clients` clients (None when it can).

    Digits is the one that runs out: past ~120 clients some client's share of the 359 test rows rounds to 0.
    """
    if dataset == "synthetic":
        return None  # natural clients: the generator makes as many as asked
    try:
        prepare(point_config(dataset, clients, 1, 1.0, args))
    except FmlrayError as exc:
        return str(exc)
    return None


def points(args) -> list[dict]:
    """The configurations to measure: one sweep per factor around a base point (or the full grid)."""
    refused = {(d, c): refusal(d, c, args) for d in args.datasets for c in args.clients}
    args.skipped = [f"{d} × {c} clients ({why.split(';')[0]})" for (d, c), why in refused.items() if why]
    fits = lambda d, c: refused[(d, c)] is None  # noqa: E731
    base_actors = args.base_actors
    if args.grid:
        out = [dict(dataset=d, clients=c, actors=a, fraction=f, sweep="grid") for d in args.datasets
               for c in args.clients for a in args.actors for f in args.fractions if fits(d, c)]
    else:
        out = [dict(dataset=d, clients=c, actors=base_actors, fraction=1.0, sweep="clients")
               for d in args.datasets for c in args.clients if fits(d, c)]
        d0 = args.datasets[0]
        hosted = [c for c in args.clients if fits(d0, c)]
        if hosted:  # the actors sweep at a middling count, the fraction sweep at the largest
            mid = max((c for c in hosted if c <= 200), default=min(hosted))
            out += [dict(dataset=d0, clients=mid, actors=a, fraction=1.0, sweep="actors") for a in args.actors]
            out += [dict(dataset=d0, clients=max(hosted), actors=base_actors, fraction=f, sweep="fraction")
                    for f in args.fractions]
    return merge_duplicates(out)


def point_name(p: dict) -> str:
    return f"{p['dataset']} × {p['clients']} clients, {p['actors']} actors, fraction {p['fraction']:g}"


def merge_duplicates(pts: list[dict]) -> list[dict]:
    """One entry per distinct configuration, naming every sweep it belongs to."""
    seen: dict[tuple, dict] = {}
    for p in pts:
        key = (p["dataset"], p["clients"], p["actors"], p["fraction"])
        if key in seen:
            seen[key]["sweep"] += "," + p["sweep"]
        else:
            seen[key] = dict(p)
    return list(seen.values())


def state_bytes(state: dict) -> tuple[int, int]:
    """(bytes of a global state, bytes of one actor's float64 partial sum of it)."""
    plain = sum(v.nbytes for v in state.values())
    partial = sum(v.size * 8 if np.issubdtype(v.dtype, np.floating) else v.nbytes for v in state.values())
    return plain, partial


def dataset_bytes(prepared) -> int:
    """Bytes the driver puts in the object store once at start-up: the dataset and the partition."""
    ds, part = prepared.dataset, prepared.partition
    arrays = [ds.x_train, ds.y_train, ds.x_test, ds.y_test, ds.train_owner, ds.test_owner, *part.train, *part.test]
    return sum(a.nbytes for a in arrays if a is not None)


def start_engine(cfg: Config, prepared) -> tuple[RayEngine, dict]:
    """A started Ray engine and its start-up times: data put (measured apart) and actors ready."""
    import ray
    t0 = time.perf_counter()
    refs = [ray.put(prepared.dataset), ray.put(prepared.partition)]  # what engine.start puts, timed on its own
    put_s = time.perf_counter() - t0
    del refs
    engine = RayEngine()
    t0 = time.perf_counter()
    engine.start(cfg, prepared.dataset, prepared.partition)
    start_s = time.perf_counter() - t0
    return engine, {"data_put_s": put_s, "engine_start_s": start_s, "actors_ready_s": max(0.0, start_s - put_s)}


def private_bytes(engine: RayEngine) -> int:
    """Bytes the client actors hold in memory for their clients' private state: the rows of a memory store
    (a disk store's rows are in files), and each workspace's private models with their gradients and
    optimiser state (read from the actors, between rounds)."""
    import ray

    def count(actor) -> int:
        import torch
        host = actor.host
        total = sum(len(s) * s.layout.nbytes for s in host.stores.values() if s.kind == "memory")
        for ws in host.workspaces.values():
            tensors = ws.tensors + [p.grad for p, _ in ws.params if p.grad is not None]
            tensors += [v for part in ws.layout.parts for st in ws.opts[part.name].state.values()
                        for v in st.values() if torch.is_tensor(v)]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total
    return sum(ray.get([a.__ray_call__.remote(count) for a in engine.actors]))


def measure_round(engine: RayEngine, cfg: Config, rnd: int, state, sampler: benchlib.MemorySampler):
    """Run round `rnd` on a started engine; (new state, the round's measurements)."""
    import ray
    ids = sample_clients(cfg, rnd)
    before = len(ray.get(engine.aggregator.aggregate_seconds.remote()))
    sampler.reset()
    t0 = time.perf_counter()
    result = engine.train_round(rnd, ids, state)
    benchlib.wait_state(result.global_state)  # the aggregation is part of the round
    wall = time.perf_counter() - t0
    peak = sampler.peak()
    agg = ray.get(engine.aggregator.aggregate_seconds.remote())[before:]  # none when one actor averaged itself
    per_actor: dict[int, float] = {}
    for c in result.clients:
        per_actor[engine.owner[c["client"]]] = per_actor.get(engine.owner[c["client"]], 0.0) + c["seconds"]
    compute = sum(per_actor.values())
    used = len(per_actor)
    return result.global_state, {
        "sampled": len(ids), "actors_used": used, "wall_s": wall, "compute_s": compute,
        "overhead_s": wall - compute / used, "critical_s": max(per_actor.values()),
        "overhead_crit_s": wall - max(per_actor.values()), "aggregate_s": sum(agg),
        **{f"pss_{k}_mib": v / benchlib.MIB for k, v in peak.items()},
        "private_mib": private_bytes(engine) / benchlib.MIB,
    }


def run_point(p: dict, args, sampler: benchlib.MemorySampler, log=print) -> tuple[list[dict], dict, Config]:
    """Measure one configuration: start-up, then warm-up and timed rounds; (round rows, start-up row, config)."""
    cfg = point_config(p["dataset"], p["clients"], p["actors"], p["fraction"], args)
    t0 = time.perf_counter()
    prepared = prepare(cfg)
    startup = {**p, "prepare_s": time.perf_counter() - t0, "dataset_bytes": dataset_bytes(prepared)}
    engine, times = start_engine(cfg, prepared)
    startup.update(times)
    rows = []
    try:
        pids = benchlib.actor_pids(engine)
        sampler.actor_pids = lambda: pids
        state = initial_global_state(cfg, prepared.dataset)
        plain, partial = state_bytes(state)
        for rnd in range(1, args.warmup + args.rounds + 1):
            state, m = measure_round(engine, cfg, rnd, state, sampler)
            partials = m["actors_used"] * partial if m["actors_used"] > 1 else 0  # one actor returns the average
            moved = {"bytes_broadcast": plain, "bytes_partials": partials, "bytes_new_global": plain}
            rows.append({**p, "round": rnd, "warmup": rnd <= args.warmup, **m, **moved,
                         "bytes_round": sum(moved.values()),
                         "overhead_ms_per_client": 1000 * m["overhead_s"] / m["sampled"],
                         "overhead_crit_ms_per_client": 1000 * m["overhead_crit_s"] / m["sampled"]})
        median = statistics.median(r["wall_s"] for r in rows[args.warmup:])
        log(f"{p['dataset']:>9} {p['clients']:>5} clients {p['actors']} actors fraction {p['fraction']:g}: "
            f"start {times['engine_start_s']:.1f}s, round {median:.3f}s")
    finally:
        engine.close()
    return rows, startup, cfg


def startup_probe(args, ray_up_s: float) -> dict:
    """Cold start-up of the issue's overhead-bound workload (digits, 20 clients, one actor per core)."""
    cores = os.cpu_count() or 1
    cfg = load_config(None, ["data.dataset='digits'", "clients.num_clients=20", "training.epochs=1",
                             "clients.groups=[{name='all', share=1.0, local_model='mlp', num_cpus=1.0}]",
                             f"engine.num_actors={cores}", f"run.seed={args.seed}"])
    prepared = prepare(cfg)
    engine, times = start_engine(cfg, prepared)
    engine.close()
    return {"what": f"digits, 20 clients, {cores} actors (first actors of the session)", "ray_up_s": ray_up_s,
            **times, "total_s": ray_up_s + times["engine_start_s"]}


def summarise(rows: list[dict]) -> list[dict]:
    """Per configuration, the median of each measurement over the timed rounds (memory: the max)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r["warmup"]:
            groups.setdefault((r["dataset"], r["clients"], r["actors"], r["fraction"]), []).append(r)
    out = []
    for rs in groups.values():
        s = {k: rs[0][k] for k in ("dataset", "clients", "actors", "fraction", "sweep", "sampled", "actors_used")}
        for k in ("wall_s", "compute_s", "overhead_s", "overhead_ms_per_client", "overhead_crit_ms_per_client",
                  "aggregate_s", "bytes_round"):
            s[k] = statistics.median(r[k] for r in rs)
        s.update({k: max(r[k] for r in rs) for k in rs[0] if k.startswith("pss_") or k == "private_mib"})
        s["actors_less_private_mib"] = s["pss_actors_mib"] - s["private_mib"]
        s["mib_round"] = s["bytes_round"] / benchlib.MIB
        s["aggregate_ms"] = 1000 * s["aggregate_s"]
        out.append(s)
    return out


def plot(summary: list[dict], path_stem: Path) -> list[Path]:
    """Three PNGs over the clients sweep: time per round, overhead per client, memory."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [s for s in summary if "clients" in s["sweep"] or s["sweep"] == "grid"]
    datasets = list(dict.fromkeys(s["dataset"] for s in sweep))
    series = {d: sorted((s for s in sweep if s["dataset"] == d), key=lambda s: s["sampled"]) for d in datasets}
    color = {d: f"C{i}" for i, d in enumerate(datasets)}  # one colour per dataset, one line style per series
    paths = []

    def figure(name: str, ylabel: str, lines, hline: float | None = None):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label, style, d, xs, ys in lines:
            ax.plot(xs, ys, style, color=color[d], label=label)
        if hline is not None:
            ax.axhline(hline, color="grey", linestyle=":", label=f"target {hline:g}")
        ax.set_xscale("log")
        ax.set_xlabel("clients per round")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = path_stem.with_name(f"{path_stem.name}-{name}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        paths.append(out)

    def xy(d: str, key: str, scale: float = 1.0):
        return [s["sampled"] for s in series[d]], [s[key] * scale for s in series[d]]

    figure("time", "seconds per round (median)",
           [(f"{d}: wall", "o-", d, *xy(d, "wall_s")) for d in datasets]
           + [(f"{d}: client compute / actors", "x--", d, [s["sampled"] for s in series[d]],
               [s["compute_s"] / s["actors_used"] for s in series[d]]) for d in datasets])
    figure("overhead", "engine overhead, ms per client",
           [(f"{d}", "o-", d, *xy(d, "overhead_ms_per_client")) for d in datasets]
           + [(f"{d}: excl. load imbalance", "x--", d, *xy(d, "overhead_crit_ms_per_client")) for d in datasets],
           hline=1.0)
    figure("memory", "peak PSS, MiB", [(f"{d}: {k}", st, d, *xy(d, f"pss_{k}_mib")) for d in datasets
                                      for k, st in (("total", "o-"), ("actors", "x--"), ("driver", "s:"))]
           + [(f"{d}: actors − private models", "^-.", d, *xy(d, "actors_less_private_mib")) for d in datasets])
    return paths


POINT_COLUMNS = [("dataset", "dataset", ""), ("clients", "clients", ""), ("actors", "actors", ""),
                 ("fraction", "fraction", "g"), ("sampled", "sampled", ""), ("sweep", "sweep", ""),
                 ("wall_s", "wall s", ".3f"), ("compute_s", "compute s", ".3f"), ("overhead_s", "overhead s", ".3f"),
                 ("overhead_ms_per_client", "overhead ms/client", ".3f"),
                 ("overhead_crit_ms_per_client", "excl. imbalance ms/client", ".3f"),
                 ("aggregate_ms", "aggregate ms", ".2f"), ("mib_round", "MiB moved/round", ".2f"),
                 ("pss_driver_mib", "PSS driver MiB", ".0f"), ("pss_actors_mib", "PSS actors MiB", ".0f"),
                 ("pss_ray_system_mib", "PSS Ray MiB", ".0f"), ("pss_total_mib", "PSS total MiB", ".0f"),
                 ("private_mib", "private models MiB", ".0f"), ("actors_less_private_mib", "actors − private MiB", ".0f")]
STARTUP_COLUMNS = [("dataset", "dataset", ""), ("clients", "clients", ""), ("actors", "actors", ""),
                   ("prepare_s", "data prepare s", ".2f"), ("data_put_s", "data put s", ".3f"),
                   ("actors_ready_s", "actors ready s", ".2f"), ("engine_start_s", "engine start s", ".2f"),
                   ("dataset_mib", "dataset MiB", ".2f")]


def targets(summary: list[dict], probe: dict) -> list[dict]:
    """The issue's scaling targets this run speaks to."""
    checks = [(f"start-up: Ray up + engine start, {probe['what']}, s", probe["total_s"], 8.0)]
    checks += [(f"{s['dataset']}, {s['sampled']} clients/round, {s['actors']} actors: overhead ms/client",
                s["overhead_ms_per_client"], 1.0) for s in summary if s["sampled"] >= 1000]
    return [{"check": c, "value": v, "target": f"<= {t:g}", "met": "yes" if v <= t else "no"} for c, v, t in checks]


def markdown(meta: dict, summary: list[dict], startup: list[dict], probe: dict, plots: list[Path],
             example_cfg: Config, args) -> str:
    """The run's Markdown report."""
    import tomli_w
    checks = targets(summary, probe)
    for s in startup:
        s["dataset_mib"] = s["dataset_bytes"] / benchlib.MIB
    return "\n".join([
        f"# scaling: {', '.join(args.datasets)}, {args.algorithm}, {args.variant}", "",
        benchlib.environment_markdown(meta), "",
        f"{args.algorithm.upper()} with an MLP (local and meme), 1 epoch, batch {args.batch_size}; synthetic: "
        f"natural partition; digits: iid, data.min_samples = {DIGITS_MIN_SAMPLES}. Each actor gets min(1, "
        f"{os.cpu_count()}/actors) CPUs, so one torch thread. {args.warmup} warm-up + "
        f"{args.rounds} timed rounds per configuration; medians over the timed rounds, memory the peak.", "",
        "overhead s = wall − compute ÷ actors_used (compute = Σ clients' update seconds); the ms/client columns "
        "divide by the clients sampled; 'excl. imbalance' uses wall − the busiest actor's compute instead. "
        "MiB moved/round = one global state broadcast + one float64 partial sum per actor that trained (none "
        "when one actor trained them all: it returns the average, and aggregate ms is 0) + the new global state "
        "(analytic, from the state dict sizes).", "",
        benchlib.markdown_table(summary, POINT_COLUMNS), "",
        *([f"Skipped (fmlray refused them): {'; '.join(args.skipped)}", ""] if args.skipped else []),
        "## Start-up", "",
        f"Ray up (ray.init, private, loopback): {probe['ray_up_s']:.2f} s. Cold start of {probe['what']}: data put "
        f"{probe['data_put_s']:.3f} s, actors ready {probe['actors_ready_s']:.2f} s, engine start "
        f"{probe['engine_start_s']:.2f} s; total {probe['total_s']:.2f} s. Per configuration (Ray already up; "
        "'data put' is a separate ray.put of the same dataset and partition, and 'actors ready' is engine start "
        "minus it):", "",
        benchlib.markdown_table(startup, STARTUP_COLUMNS), "",
        "## Targets", "",
        benchlib.markdown_table(checks, [("check", "check", ""), ("value", "value", ".3f"), ("target", "target", ""),
                                         ("met", "met", "")]), "",
        "## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], "",
        "## Config (the first configuration measured; others change data.dataset/partition/min_samples, "
        "clients.num_clients, clients.fraction, engine.num_actors and the group's num_cpus)", "",
        "```toml", tomli_w.dumps(to_dict(example_cfg)).strip(), "```", "",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="sized to finish in under 5 minutes on 2 cores")
    size.add_argument("--smoke", action="store_true", help="tiny, for CI: checks the script runs, not its numbers")
    p.add_argument("--datasets", type=benchlib.comma_list(str), default=None, help="synthetic,digits")
    p.add_argument("--clients", type=benchlib.comma_list(int), default=None, help="clients sweep, e.g. 10,100,1000")
    p.add_argument("--actors", type=benchlib.comma_list(int), default=None, help="actors sweep, e.g. 1,2,4")
    p.add_argument("--fractions", type=benchlib.comma_list(float), default=None, help="fraction sweep, e.g. 0.1,1")
    p.add_argument("--base-actors", type=int, default=None, help="actors in the clients and fraction sweeps "
                                                                   "(default: one per core)")
    p.add_argument("--grid", action="store_true", help="every combination instead of one sweep per factor")
    p.add_argument("--algorithm", choices=["fml", "fedavg"], default="fml")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=benchlib.DEFAULT_OUT, help="folder for the results")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill size-dependent defaults; refuse values that cannot work, naming the flag."""
    args.variant = "smoke" if args.smoke else "quick" if args.quick else "full"
    size = SIZES[args.variant]
    args.datasets = args.datasets or (["synthetic"] if args.smoke else list(DATASETS))
    args.clients = args.clients or size["clients"]
    args.actors = args.actors or size["actors"]
    args.fractions = args.fractions or size["fractions"]
    args.rounds = size["rounds"] if args.rounds is None else args.rounds
    args.base_actors = (os.cpu_count() or 1) if args.base_actors is None else args.base_actors  # 0: refused below
    if unknown := [d for d in args.datasets if d not in DATASETS]:
        p.error(f"--datasets: unknown {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    if min(args.clients) < 1 or min(args.actors + [args.base_actors]) < 1:
        p.error("--clients, --actors and --base-actors must be >= 1")
    if any(not 0 < f <= 1 for f in args.fractions):
        p.error("--fractions: each must be in (0, 1]")
    if args.rounds < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--rounds and --batch-size must be >= 1, --warmup >= 0")
    benchlib.check_at_least(p, "--seed", args.seed, 0)
    benchlib.check_out(p, args.out)


def main(argv: list[str] | None = None) -> int:
    """Measure every configuration; write Parquet, Markdown and plots."""
    args = parse_args(argv)
    pts = points(args)
    if not pts:
        print("no configuration can be partitioned: " + "; ".join(args.skipped), file=sys.stderr)
        return 2
    meta = benchlib.run_meta(args) | {"load_before": os.getloadavg(), "points": pts}
    print(f"{len(pts)} configurations" + "".join(f"\nskipped {s}" for s in args.skipped), flush=True)
    ray_up = benchlib.start_ray(os.cpu_count() or 1)
    probe = startup_probe(args, ray_up)
    print(f"start-up: Ray up {ray_up:.1f}s, engine start {probe['engine_start_s']:.1f}s", flush=True)
    rows, startup, configs = [], [], []
    with benchlib.MemorySampler() as sampler:
        for p in pts:
            # A configuration fmlray refuses only once it starts (e.g. more actors than the cluster can place)
            # is skipped and listed, as one it cannot partition is: the rows measured so far are kept.
            try:
                got, start, cfg = run_point(p, args, sampler, log=lambda m: print(m, flush=True))
            except FmlrayError as exc:
                args.skipped.append(f"{point_name(p)} ({str(exc).split(';')[0]})")
                print(f"skipped {args.skipped[-1]}", flush=True)
                continue
            rows += got
            startup.append(start)
            configs.append(cfg)
    if not rows:
        print("no configuration could be measured: " + "; ".join(args.skipped), file=sys.stderr)
        return 2
    meta |= {"load_after": os.getloadavg(), "startup_probe": probe, "configs": [to_dict(c) for c in configs],
             "skipped": args.skipped}
    summary = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    variant = "" if args.variant == "full" else args.variant
    stem = args.out / benchlib.result_stem("scaling", "-".join(args.datasets), variant, args.out)
    benchlib.write_parquet(rows, stem.with_suffix(".parquet"), meta)
    benchlib.write_parquet(startup, stem.with_name(stem.name + "-startup.parquet"), meta)
    plots = plot(summary, stem)
    report = markdown(meta, summary, startup, probe, plots, configs[0], args)
    stem.with_suffix(".md").write_text(report)
    print(report)
    print(f"wrote {stem}.parquet, -startup.parquet, .md and {len(plots)} PNGs")
    return 0


if __name__ == "__main__":
    benchlib.exit_with(main)
