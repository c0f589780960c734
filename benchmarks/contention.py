"""Per-client update time alone and beside another actor: where issue 12's summed-update gap comes from.

The same round's clients are trained by fmlray's serial engine (one process, one thread) and by the Ray
engine with two actors of one CPU each, working at once. Each client's update seconds are put side by
side, with the actor that trained it: a ratio above 1 is what working beside the other actor cost that
client. 2 rounds per way; the second is the one recorded (the first warms up). Workload: overhead.py's
fmnist-full (20 clients, Dirichlet(0.5), `cnn5`, 1 epoch, batch 32).

    python benchmarks/contention.py                  # all 60,000 rows, FedAvg, ~4 min on 2 cores
    python benchmarks/contention.py --algorithm fml  # ~8 min
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, overhead

import benchlib  # noqa: E402
import overhead  # noqa: E402
from fmlray.config import to_dict  # noqa: E402
from fmlray.engine.host import initial_global_state  # noqa: E402
from fmlray.engine.ray_engine import RayEngine  # noqa: E402
from fmlray.engine.serial import SerialEngine  # noqa: E402
from fmlray.simulation import prepare  # noqa: E402

ROWS = {"full": 0, "smoke": 1000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithm", choices=overhead.ALGORITHMS, default="fedavg")
    p.add_argument("--smoke", action="store_true", help="tiny, for CI: checks the script runs, not its numbers")
    p.add_argument("--out", type=Path, default=benchlib.DEFAULT_OUT, help="folder for the results")
    args = p.parse_args(argv)
    benchlib.check_out(p, args.out)
    return args


def second_round(engine, cfg, prepared) -> tuple[dict[int, float], dict[int, int]]:
    """Each client's update seconds in the engine's second round (all clients, the initial global model), and
    which actor trained it (the Ray engine)."""
    g = initial_global_state(cfg, prepared.dataset)
    ids = list(range(prepared.partition.num_clients))
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        for rnd in (1, 2):
            result = engine.train_round(rnd, ids, g)
        return {r["client"]: r["seconds"] for r in result.clients}, dict(getattr(engine, "owner", {}))
    finally:
        engine.close()


def plot(rows: list[dict], title: str, path: Path) -> Path:
    """Each client's update seconds alone and beside another actor, side by side; the actor under the client."""
    fig, (ax,) = benchlib.figure(width=max(6.4, 0.35 * len(rows)))
    benchlib.bars(ax, [f"{r['client']}\na{r['actor']}" for r in rows],
                  {"alone (serial engine)": [r["alone_s"] for r in rows],
                   "beside another actor (Ray, 2 actors)": [r["beside_s"] for r in rows]}, "update seconds (round 2)",
                  slant=False)
    ax.set_xlabel("client / actor that trained it")
    ax.set_title(title, fontsize=10)
    return benchlib.save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = "smoke" if args.smoke else "full"
    meta = benchlib.run_meta(args) | {"load_before": os.getloadavg()}
    cfg = overhead.base_config(overhead.WORKLOADS["fmnist-full"], args.algorithm, ROWS[size], 2, 0)
    prepared = prepare(cfg)
    benchlib.start_ray(os.cpu_count() or 1)
    alone, _ = second_round(SerialEngine(), cfg, prepared)
    ray_cfg = cfg.replace(engine=dataclasses.replace(cfg.engine, kind="ray", num_actors=2))
    meta["configs"] = {"alone (serial engine)": to_dict(cfg), "beside (Ray engine)": to_dict(ray_cfg)}
    started = time.perf_counter()
    beside, owner = second_round(RayEngine(), ray_cfg, prepared)
    meta |= {"load_after": os.getloadavg(), "ray_seconds": time.perf_counter() - started}
    rows = [{"client": c, "rows": len(prepared.partition.train[c]), "actor": owner[c], "alone_s": alone[c],
             "beside_s": beside[c], "ratio": beside[c] / alone[c]} for c in sorted(alone)]
    sums = [{"actor": a, "clients": sum(1 for r in rows if r["actor"] == a),
             "rows": sum(r["rows"] for r in rows if r["actor"] == a),
             "alone_s": sum(r["alone_s"] for r in rows if r["actor"] == a),
             "beside_s": sum(r["beside_s"] for r in rows if r["actor"] == a)} for a in sorted(set(owner.values()))]
    for s in sums:
        s["ratio"] = s["beside_s"] / s["alone_s"]
    ratios = [r["ratio"] for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = benchlib.result_stem("contention", f"fmnist-{args.algorithm}", "smoke" if args.smoke else "", args.out)
    benchlib.write_parquet(rows, args.out / f"{stem}.parquet", meta)
    total = sum(r["beside_s"] for r in rows) / sum(r["alone_s"] for r in rows)
    report = [
        f"# contention: one client's update alone and beside another actor ({args.algorithm}, {size})", "",
        benchlib.environment_markdown(meta), "",
        f"20 clients, Dirichlet(0.5), `cnn5`, {len(prepared.dataset.y_train)} training rows, 1 epoch, batch 32. "
        "alone = fmlray's serial engine (one process, one thread); beside = the Ray engine, 2 actors of 1 CPU "
        "working at once. Second round of each.", "",
        f"Summed update beside ÷ alone: **{total:.3f}**; per client: median {statistics.median(ratios):.3f}, "
        f"min {min(ratios):.3f}, max {max(ratios):.3f}.", "",
        benchlib.png_link("each client's update alone and beside another actor", args.out / f"{stem}.png"), "",
        benchlib.markdown_table(sums, [("actor", "actor", "d"), ("clients", "clients", "d"), ("rows", "rows", "d"),
                                       ("alone_s", "alone s", ".2f"), ("beside_s", "beside s", ".2f"),
                                       ("ratio", "beside ÷ alone", ".3f")]), "",
        benchlib.markdown_table(rows, [("client", "client", "d"), ("rows", "rows", "d"), ("actor", "actor", "d"),
                                       ("alone_s", "alone s", ".3f"), ("beside_s", "beside s", ".3f"),
                                       ("ratio", "beside ÷ alone", ".3f")]), "",
        benchlib.configs_markdown(meta["configs"]), ""]
    (args.out / f"{stem}.md").write_text("\n".join(report))
    plot(rows, f"contention: {args.algorithm}, {size}; summed beside ÷ alone {total:.3f}", args.out / f"{stem}.png")
    print(f"summed update beside ÷ alone {total:.3f}; wrote {args.out / stem}.parquet, .md and .png")
    return 0


if __name__ == "__main__":
    benchlib.exit_with(main)
