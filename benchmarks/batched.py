"""Client throughput of one host (an actor's clients, in-process, 1 thread): trained one after another
(`training.batching = "sequential"`), as one batched model (`"vmap"`), and as `"auto"` picks. The three
hosts take turns round by round, so drift in the machine's speed falls on all alike. Each case runs in a
fresh process, as an actor serves one workload: in one process for all, a case inherited the malloc state the
cases before it left (how much freed memory was kept), which moved its batched rounds by up to 1.4x. The cases
are the measurements behind `auto`'s rule (fmlray/engine/batched.py) and issue 14's 100-client target.

    python benchmarks/batched.py                    # every case, ~4 min on 2 cores
    python benchmarks/batched.py --cases digits-mlp-fedavg-100,digits-mlp-fml-100 --rounds 9
    python benchmarks/batched.py --tag kept-heap    # names the outputs batched-clients-kept-heap-...
    python benchmarks/batched.py --smoke            # tiny, for CI
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from fmlray.config import load_config, to_dict  # noqa: E402
from fmlray.engine.host import ClientHost, initial_global_state  # noqa: E402
from fmlray.simulation import prepare  # noqa: E402

MODES = ("sequential", "vmap", "auto")


@dataclass(frozen=True)
class Case:
    dataset: str
    model: str
    algorithm: str
    clients: int
    partition: str = "dirichlet"  # iid for 100 digits clients (Dirichlet(0.5) leaves some with 2 rows)
    train_samples: int = 0

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.model}-{self.algorithm}-{self.clients}"


CASES = {c.name: c for c in [
    *(Case("digits", "mlp", "fedavg", k) for k in (2, 4, 8, 20)),
    Case("digits", "mlp", "fml", 20),
    Case("digits", "mlp", "fedavg", 100, "iid"), Case("digits", "mlp", "fml", 100, "iid"),
    Case("digits", "lenet5", "fedavg", 20), Case("digits", "cnn", "fedavg", 20),
    *(Case("fmnist", m, "fedavg", 20, train_samples=2000) for m in ("mlp", "lenet5", "cnn", "cnn5")),
    Case("fmnist", "cnn5", "fml", 20, train_samples=2000),
]}
SMOKE = [Case("digits", "mlp", "fedavg", 8, train_samples=400)]


def case_config(case: Case, mode: str, seed: int):
    group = f"clients.groups=[{{name='all', share=1.0, local_model='{case.model}'}}]"
    return load_config(None, [
        f"run.seed={seed}", f"data.dataset='{case.dataset}'", f"data.partition='{case.partition}'",
        f"data.max_train_samples={case.train_samples}", f"clients.num_clients={case.clients}", group,
        f"model.meme='{case.model}'", "training.epochs=1", "training.batch_size=32",
        f"algorithm.name='{case.algorithm}'", f"training.batching='{mode}'", "training.max_batched_clients=1000"])


def host_for(case: Case, mode: str, seed: int) -> tuple[ClientHost, object]:
    cfg = case_config(case, mode, seed)
    prepared = prepare(cfg)
    host = ClientHost(cfg, prepared.dataset, prepared.partition, list(range(case.clients)))
    return host, initial_global_state(cfg, prepared.dataset)


def measure(case: Case, rounds: int, warmup: int, seed: int, log=print) -> list[dict]:
    """Rounds of each mode's host, taking turns (the order alternating); one row per mode and round."""
    hosts = {m: host_for(case, m, seed) for m in MODES}
    ids, rows = list(range(case.clients)), []
    for rnd in range(1, warmup + rounds + 1):
        order = list(hosts.items()) if rnd % 2 else list(hosts.items())[::-1]
        for mode, (host, g) in order:
            started = time.perf_counter()
            host.train(rnd, ids, g)
            rows.append({"case": case.name, "mode": mode, "round": rnd, "warmup": rnd <= warmup,
                         "seconds": time.perf_counter() - started, "batched": any(b for _, b in host.batcher.units(
                             ids, g is not None or host.algo.shares is None))})
    for host, _ in hosts.values():
        host.close()
    log(f"{case.name}: " + ", ".join(f"{m} {statistics.median(r['seconds'] for r in rows if r['mode'] == m and not r['warmup']) * 1e3:.1f} ms"
                                     for m in MODES))
    return rows


def summarise(rows: list[dict], cases: list[Case]) -> list[dict]:
    out = []
    for case in cases:
        med = {m: statistics.median(r["seconds"] for r in rows if r["case"] == case.name and r["mode"] == m
                                    and not r["warmup"]) for m in MODES}
        auto = next(r["batched"] for r in rows if r["case"] == case.name and r["mode"] == "auto")
        out.append({"case": case.name, "dataset": case.dataset, "model": case.model, "algorithm": case.algorithm,
                    "clients": case.clients, "partition": case.partition,
                    **{f"{m}_ms": med[m] * 1e3 for m in MODES}, "speedup": med["sequential"] / med["vmap"],
                    "auto_picks": "vmap" if auto else "sequential", "auto_vs_sequential": med["auto"] / med["sequential"]})
    return out


COLUMNS = [("case", "case", ""), ("partition", "partition", ""), ("sequential_ms", "sequential ms/round", ".1f"),
           ("vmap_ms", "vmap ms/round", ".1f"), ("speedup", "vmap speed-up", ".2f"), ("auto_picks", "auto picks", ""),
           ("auto_vs_sequential", "auto ÷ sequential", ".2f")]


def plot(summary: list[dict], path: Path) -> Path:
    """Speed-up over the sequential loop of vmap and of auto's pick, case by case; 1 = the loop."""
    fig, (ax,) = benchlib.figure(width=max(6.4, 0.45 * len(summary)))
    benchlib.bars(ax, [s["case"] + ("" if s["partition"] == "dirichlet" else f" ({s['partition']})") for s in summary],
                  {"vmap": [s["speedup"] for s in summary],
                   "auto (its pick)": [1 / s["auto_vs_sequential"] for s in summary]},
                  "speed-up over sequential (× throughput)", slant=True)
    ax.axhline(1.0, color="grey", linestyle=":", label="sequential")
    ax.legend(fontsize=7)
    ax.set_xlabel("dataset-model-algorithm-clients")
    ax.set_title("batched: one host's clients as one vmapped model", fontsize=10)
    return benchlib.save_png(fig, path)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked before anything is loaded or timed."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=benchlib.comma_list(str), default=list(CASES), help=", ".join(CASES))
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per mode")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="one tiny case, 1 round: checks the script runs")
    p.add_argument("--tag", default="", help="a word in the output names, e.g. before")
    p.add_argument("--out", type=Path, default=benchlib.DEFAULT_OUT)
    args = p.parse_args(argv)
    if unknown := [c for c in args.cases if c not in CASES]:
        p.error(f"--cases: unknown {', '.join(unknown)}")
    benchlib.check_at_least(p, "--rounds", args.rounds, 1)
    benchlib.check_at_least(p, "--warmup", args.warmup, 0)
    benchlib.check_tag(p, args.tag)
    benchlib.check_at_least(p, "--seed", args.seed, 0)
    benchlib.check_out(p, args.out)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = SMOKE if args.smoke else [CASES[c] for c in args.cases]
    rounds = 1 if args.smoke else args.rounds
    meta = benchlib.run_meta(args) | {"load_before": os.getloadavg(), "configs": {
        f"{c.name} {m}": to_dict(case_config(c, m, args.seed)) for c in cases for m in MODES}}
    rows = []
    spawn = multiprocessing.get_context("spawn")  # nothing of this process's heap or imports carried over
    for case in cases:
        with spawn.Pool(1, initializer=torch.set_num_threads, initargs=(1,)) as child:  # as a 1-CPU actor computes
            rows += child.apply(measure, (case, rounds, args.warmup, args.seed, functools.partial(print, flush=True)))
    meta["load_after"] = os.getloadavg()
    summary = summarise(rows, cases)
    stem = benchlib.result_stem("batched", "clients", "smoke" if args.smoke else args.tag, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    benchlib.write_parquet(rows, args.out / f"{stem}.parquet", meta)
    report = "\n".join([
        "# batched: one host's clients, sequential vs vmap vs auto", "", benchlib.environment_markdown(meta), "",
        f"One host (an actor's clients, in-process), each case in a fresh process, torch on 1 thread; 1 epoch, "
        f"batch 32, SGD momentum 0.9, weight decay 5e-4; {args.warmup} warm-up + {rounds} timed rounds per mode, "
        "modes taking turns; median ms per round of `host.train` (load, train, store, partial sum). Dirichlet(0.5) unless iid.", "",
        benchlib.markdown_table(summary, COLUMNS), "",
        benchlib.png_link("speed-up of vmap and auto over sequential", args.out / f"{stem}.png"), "",
        benchlib.configs_markdown(meta["configs"]), ""])
    (args.out / f"{stem}.md").write_text(report)
    plot(summary, args.out / f"{stem}.png")
    print(report)
    return 0


if __name__ == "__main__":
    benchlib.exit_with(main)
