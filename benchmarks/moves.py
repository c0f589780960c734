"""Does moving clients with private state between actors pay? Round time with and without it.

FML, a sampled fraction of the clients a round, 2 Ray actors of 1 CPU, on scaling.py's workload (an MLP per
client and as the meme, 1 epoch, batch 32; synthetic or digits) or on overhead.py's compute-bound one (fmnist:
`cnn5` local models and meme, Dirichlet(0.5), 20,000 training rows, 1 epoch, batch 32): the Ray engine as it is (clients of at least
`MOVE_MIN_ROWS` rows move, rows and all, to even each round out) against the same with moving switched
off (`MOVE_MIN_ROWS` above every client), taking turns, twice each. Reports the median s/round of the
timed rounds and how many clients ended the run away from the actor they were dealt to.

    python benchmarks/moves.py     # synthetic 1,000 clients at 0.1, digits 20 at 0.5, fmnist 20 at 0.5 (~10 min)
    python benchmarks/moves.py --points synthetic:1000:0.1       # one point
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, scaling

import benchlib  # noqa: E402
import overhead  # noqa: E402
import scaling  # noqa: E402
import fmlray.engine.ray_engine as ray_engine  # noqa: E402
from fmlray.config import to_dict  # noqa: E402
from fmlray.engine.host import initial_global_state  # noqa: E402
from fmlray.simulation import prepare, sample_clients  # noqa: E402

NEVER = 10**12  # MOVE_MIN_ROWS above every client: nothing moves


DATASETS = (*scaling.DATASETS, "fmnist")


def point(text: str) -> tuple[str, int, float]:
    """'dataset:clients:fraction', checked (an argparse type: a bad point is refused naming it)."""
    dataset, clients, fraction = text.split(":")  # a ValueError: comma_list's "not a ... list of points"
    clients, fraction = int(clients), float(fraction)
    if dataset not in DATASETS:
        raise argparse.ArgumentTypeError(f"{text!r}: dataset must be one of {', '.join(DATASETS)}")
    if clients < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: clients must be >= 1")
    if not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: fraction must be in (0, 1]")
    return dataset, clients, fraction


def config(dataset: str, clients: int, fraction: float, rounds: int):
    """FML on 2 actors of 1 CPU: scaling.py's MLP workload, or (fmnist) overhead.py's `cnn5` one."""
    if dataset != "fmnist":
        ns = argparse.Namespace(seed=0, warmup=1, rounds=rounds, batch_size=32, algorithm="fml")
        return scaling.point_config(dataset, clients, 2, fraction, ns)
    cfg = overhead.base_config(overhead.WORKLOADS["fmnist-full"], "fml", 20000, 1 + rounds, 0)
    group = dataclasses.replace(cfg.clients.groups[0], num_cpus=1.0)
    return cfg.replace(clients=dataclasses.replace(cfg.clients, num_clients=clients, fraction=fraction,
                                                   groups=(group,)),
                       engine=dataclasses.replace(cfg.engine, kind="ray", num_actors=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=benchlib.comma_list(point), default=None,
                   help="dataset:clients:fraction,... (default: synthetic:1000:0.1,digits:20:0.5,fmnist:20:0.5)")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds per run (1 warm-up round first)")
    p.add_argument("--smoke", action="store_true", help="tiny, for CI: checks the script runs, not its numbers")
    p.add_argument("--out", type=Path, default=benchlib.DEFAULT_OUT, help="folder for the results")
    args = p.parse_args(argv)
    benchlib.check_at_least(p, "--rounds", args.rounds, 1)
    benchlib.check_out(p, args.out)
    if args.points is None:
        args.points = [("synthetic", 40, 0.5)] if args.smoke else [("synthetic", 1000, 0.1), ("digits", 20, 0.5),
                                                                  ("fmnist", 20, 0.5)]
    if args.smoke:
        args.rounds = 2
    return args


def run(cfg, prepared, rounds: int, min_rows: int) -> dict:
    """One run of 1 + `rounds` rounds with clients moving from `min_rows` rows up."""
    ray_engine.MOVE_MIN_ROWS = min_rows  # read by the driver's RayEngine._rebalance, each round
    engine = ray_engine.RayEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        state, seconds = initial_global_state(cfg, prepared.dataset), []
        for rnd in range(1, rounds + 2):
            started = time.perf_counter()
            state = engine.fetch(engine.train_round(rnd, sample_clients(cfg, rnd), state).global_state)
            if rnd > 1:
                seconds.append(time.perf_counter() - started)
        dealt = {c: i for i, spec in enumerate(engine.specs) for c in spec.client_ids}
        away = sum(1 for c, a in engine.owner.items() if a != dealt[c])
    finally:
        engine.close()
    return {"s_per_round": statistics.median(seconds), "away": away}


def plot(summary: list[dict], path: Path) -> Path:
    """Median ms per round of each point with clients moving and not; on ÷ off above the pair."""
    fig, (ax,) = benchlib.figure()
    benchlib.bars(ax, [f"{s['dataset']}, {s['clients']} at {s['fraction']:g}" for s in summary],
                  {"moves on": [s["on_ms"] for s in summary], "moves off": [s["off_ms"] for s in summary]},
                  "ms per round (median)")
    for i, s in enumerate(summary):
        ax.annotate(f"{s['ratio']:.3f}", (i, max(s["on_ms"], s["off_ms"])), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("dataset, clients at fraction (annotated: on ÷ off)")
    ax.set_title("moves: FML, 2 Ray actors, clients moving between actors or not", fontsize=10)
    return benchlib.save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = benchlib.run_meta(args) | {"load_before": os.getloadavg(), "move_min_rows": ray_engine.MOVE_MIN_ROWS}
    benchlib.start_ray(2)
    setting, rows = ray_engine.MOVE_MIN_ROWS, []
    for dataset, clients, fraction in args.points:
        cfg = config(dataset, clients, fraction, args.rounds)
        meta.setdefault("configs", {})[f"{dataset}:{clients}:{fraction:g}"] = to_dict(cfg)
        prepared = prepare(cfg)
        sizes = [len(r) for r in prepared.partition.train]
        for turn in range(1 if args.smoke else 2):  # the smoke run checks the script, not a drift-fair figure
            for moving in (True, False):
                r = run(cfg, prepared, args.rounds, setting if moving else NEVER)
                rows.append({"dataset": dataset, "clients": clients, "fraction": fraction, "turn": turn,
                             "moving": moving, "rows_min": min(sizes), "rows_median": statistics.median(sizes),
                             "rows_max": max(sizes), **r})
                print(f"{dataset} {clients} clients at {fraction:g}, moving {moving}: "
                      f"{r['s_per_round'] * 1000:.0f} ms/round, {r['away']} away", flush=True)
    ray_engine.MOVE_MIN_ROWS = setting
    meta["load_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = benchlib.result_stem("moves", "fml", "smoke" if args.smoke else "", args.out)
    benchlib.write_parquet(rows, args.out / f"{stem}.parquet", meta)
    summary = []
    for dataset, clients, fraction in args.points:
        mine = [r for r in rows if (r["dataset"], r["clients"], r["fraction"]) == (dataset, clients, fraction)]
        on = statistics.median(r["s_per_round"] for r in mine if r["moving"])
        off = statistics.median(r["s_per_round"] for r in mine if not r["moving"])
        summary.append({**{k: mine[0][k] for k in ("dataset", "clients", "fraction", "rows_min", "rows_median",
                                                      "rows_max")},
                        "on_ms": on * 1000, "off_ms": off * 1000, "ratio": on / off,
                        "away": max(r["away"] for r in mine if r["moving"])})
    report = [
        "# moves: clients with private state moving between actors, on and off", "",
        benchlib.environment_markdown(meta), "",
        "FML, 2 Ray actors × 1 CPU, 1 epoch, batch 32; synthetic and digits: an MLP per client and as the meme; "
        "fmnist: `cnn5` local models and meme, Dirichlet(0.5), 20,000 training rows; 1 warm-up + "
        f"{args.rounds} timed rounds per run, runs taking turns (on, off, on, off). on = clients of at least "
        f"{setting} rows move (`MOVE_MIN_ROWS`), off = none does; away = clients not on the actor they were "
        "dealt to at the end.", "",
        benchlib.markdown_table(summary, [
            ("dataset", "dataset", ""), ("clients", "clients", "d"), ("fraction", "fraction", "g"),
            ("rows_min", "rows min", "d"), ("rows_median", "median", "g"), ("rows_max", "max", "d"),
            ("on_ms", "on ms/round", ".1f"), ("off_ms", "off ms/round", ".1f"), ("ratio", "on ÷ off", ".3f"),
            ("away", "away", "d")]), "",
        benchlib.png_link("ms per round with moves on and off", args.out / f"{stem}.png"), "",
        benchlib.configs_markdown(meta["configs"]), ""]
    (args.out / f"{stem}.md").write_text("\n".join(report))
    plot(summary, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.parquet, .md and .png")
    return 0


if __name__ == "__main__":
    benchlib.exit_with(main)
