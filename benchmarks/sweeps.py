"""How much faster is a sweep as Ray Tune trials than one run after another, and what does Tune cost a trial?

    python benchmarks/sweeps.py [--out DIR] [--rounds 2] [--epochs 1] [--seeds 1] [--skip-digits]

Two measurements, each the same grid run both ways on one private Ray (2 CPUs on a 2-core machine):

1. `experiment1`: experiment 1's grid (experiments/fmnist-heterogeneity.toml: 4 algorithms × 4
   partitions, serial engine) reduced to `--seeds` seeds and `--rounds` rounds of `--epochs` local epochs
   (the full grid: 3 seeds, 20 rounds of 5 epochs; the less work a run does, the more Tune's fixed cost
   per trial weighs), as the
   sequential loop (`fmlray sweep --sequential`) and as trials (`--parallel auto`: one CPU each, two at once).
2. `digits-overhead`: the digits default (Ray engine, two client actors) with seeds 0..2, three ways: the
   loop with new actors for every run, as trials one at a time (`--parallel 1`), and the loop as
   `fmlray sweep` runs it, each run taking the actors of the run before (`reusing_actors`). The first two
   differ, per run, by what Tune adds to a trial (placement group, trial actor, reporting), the run itself
   and its actor starts being the same; the first and third by what reusing actors saves.

Writes benchmarks/results/sweeps-<workload>-<N>cpu-<date>.{parquet,md,png}, with the hardware, versions,
load average and the sweep files beside the numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import benchlib

EXPERIMENT1 = benchlib.REPO / "experiments" / "fmnist-heterogeneity.toml"


def reduced(text: str, out: Path, seeds: int, rounds: int, epochs: int) -> str:
    """Experiment 1's sweep file with fewer seeds, rounds and epochs, writing under `out`."""
    text = text.replace('base = "../fmlray/presets/', f'base = "{benchlib.REPO}/fmlray/presets/')
    text = text.replace('output_dir = "runs/sweeps"', f'output_dir = "{out}"')
    text = text.replace("seeds = [0, 1, 2]", f"seeds = {list(range(seeds))}")
    text = text.replace('"run.rounds=20"', f'"run.rounds={rounds}"')
    text = text.replace('"training.epochs=5"', f'"training.epochs={epochs}"')
    return text


DIGITS = """
[sweep]
name = "digits-default"
base = "{repo}/fmlray/presets/digits.toml"
output_dir = "{out}"
seeds = [0, 1, 2]
"""


def timed(sweep_file: Path, reusing: bool = False, **how) -> float:
    """Wall seconds of the sweep; `reusing`: inside `reusing_actors`, as `fmlray sweep` runs a loop."""
    import contextlib

    from fmlray.engine.ray_engine import reusing_actors
    from fmlray.sweep import run_sweep
    started = time.perf_counter()
    with reusing_actors() if reusing else contextlib.nullcontext():
        run_sweep(sweep_file, echo=lambda line: print("   ", line, flush=True), **how)
    return time.perf_counter() - started


def plot(rows: list[dict], path: Path) -> Path:
    """Wall seconds of each workload's sweep per executor: the loop, Tune trials, the loop reusing actors."""
    fig, (ax,) = benchlib.figure()
    benchlib.bars(ax, [f"{r['workload']}\n{r['runs']} runs; Tune --parallel {r['tune_how']}" for r in rows],
                  {"loop (new actors each run)": [r["loop_s"] for r in rows],
                   "Ray Tune trials": [r["tune_s"] for r in rows],
                   "loop reusing actors": [r.get("loop_reusing_s") for r in rows]}, "sweep wall, seconds",
                  slant=False)
    ax.set_title("sweeps: the loop against Ray Tune trials", fontsize=10)
    return benchlib.save_png(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before Ray starts."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=benchlib.DEFAULT_OUT)
    p.add_argument("--rounds", type=int, default=2, help="rounds per run of experiment 1's reduced grid")
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round of experiment 1's reduced grid")
    p.add_argument("--seeds", type=int, default=1, help="seeds of experiment 1's reduced grid (the full one: 3)")
    p.add_argument("--skip-digits", action="store_true", help="only experiment 1's grid (not Tune's cost per trial)")
    args = p.parse_args(argv)
    for flag, value in (("--rounds", args.rounds), ("--epochs", args.epochs), ("--seeds", args.seeds)):
        benchlib.check_at_least(p, flag, value, 1)
    benchlib.check_out(p, args.out)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    meta = benchlib.run_meta(args)
    meta["load_before"] = os.getloadavg()
    meta["ray_start_s"] = benchlib.start_ray(num_cpus=os.cpu_count())
    work = Path(tempfile.mkdtemp(prefix="fmlray-sweeps-"))
    rows = []
    try:
        files = {}
        for way in ("loop", "tune", "reuse"):
            files["experiment1", way] = work / f"e1-{way}.toml"
            files["experiment1", way].write_text(reduced(EXPERIMENT1.read_text(), work / way, args.seeds, args.rounds,
                                                                 args.epochs))
            files["digits", way] = work / f"d-{way}.toml"
            files["digits", way].write_text(DIGITS.format(repo=benchlib.REPO, out=work / f"d-{way}"))
        meta["sweep_files"] = {f"{w}-{k}": f.read_text() for (w, k), f in files.items()}
        runs = {"experiment1": 16 * args.seeds, "digits": 3}
        measured = [("experiment1", {"parallel": "auto"})] + ([] if args.skip_digits else [("digits", {"parallel": 1})])
        for workload, tune_how in measured:
            print(f"{workload}: loop", flush=True)
            loop = timed(files[workload, "loop"], sequential=True)
            print(f"{workload}: tune {tune_how}", flush=True)
            tune = timed(files[workload, "tune"], **tune_how)
            reuse = None
            if workload == "digits":  # experiment 1's runs are serial: no actors to reuse
                print(f"{workload}: loop reusing actors", flush=True)
                reuse = timed(files[workload, "reuse"], reusing=True, sequential=True)
            rows.append({"workload": workload, "runs": runs[workload], "loop_s": loop, "tune_s": tune,
                         "tune_how": str(tune_how["parallel"]), "ratio": tune / loop,
                         "tune_overhead_per_run_s": (tune - loop) / runs[workload], "loop_reusing_s": reuse,
                         "reuse_saves_per_run_s": None if reuse is None else (loop - reuse) / runs[workload]})
    finally:
        import ray
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    meta["load_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = benchlib.result_stem("sweeps", "experiment1-digits", f"r{args.rounds}-e{args.epochs}-s{args.seeds}", args.out)
    benchlib.write_parquet(rows, args.out / f"{stem}.parquet", meta)
    table = benchlib.markdown_table(rows, [
        ("workload", "workload", ""), ("runs", "runs", ""), ("loop_s", "loop (s)", ".1f"),
        ("tune_how", "--parallel", ""), ("tune_s", "Tune trials (s)", ".1f"), ("ratio", "Tune ÷ loop", ".2f"),
        ("tune_overhead_per_run_s", "(Tune − loop) per run (s)", ".2f"),
        ("loop_reusing_s", "loop reusing actors (s)", ".1f"), ("reuse_saves_per_run_s", "(loop − reusing) per run (s)", ".2f")])
    files_md = "\n\n".join(f"`{k}`:\n```toml\n{v.strip()}\n```" for k, v in meta["sweep_files"].items()
                           if k.endswith("tune"))
    png = benchlib.png_link("sweep wall per executor", args.out / f"{stem}.png")
    (args.out / f"{stem}.md").write_text(
        f"# Sweeps: the loop against Ray Tune trials\n\n{table}\n\n{png}\n\n{benchlib.environment_markdown(meta)}\n"
        f"- private Ray started in {meta['ray_start_s']:.1f} s (not in the times above)\n\n"
        f"The loop's sweep files are the same with another output_dir.\n\n{files_md}\n")
    plot(rows, args.out / f"{stem}.png")
    print(table)


if __name__ == "__main__":
    benchlib.exit_with(main)
