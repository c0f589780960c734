"""A whole `fmlray run` of the digits default, process start to exit, against a plain single-process PyTorch
script doing the same rounds (`plain_fml.py`, one thread): wall time, where fmlray's fixed costs go, and
the peak PSS of its process tree by driver / actors / Ray daemons.

The two take turns (`--reps` each, the order rotating), each a fresh process timed from spawn to exit,
so drift in the machine's speed falls on both alike. Each line a process prints is timestamped as it
arrives (both flush every line); fmlray's lines split its time into phases. Memory is measured after
the timing, in one more run of each alone, sampled every 0.1 s (sampling slows what it samples).

    python benchmarks/wholerun.py               # 3 repetitions each + the memory runs, ~4 min on 2 cores
    python benchmarks/wholerun.py --tag before  # names the outputs wholerun-digits-before-...
    python benchmarks/wholerun.py --smoke       # 1 round, 1 run of each, timed and sampled at once: checks the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, when run from anywhere

import benchlib  # noqa: E402
from fmlray.config import load_config, to_dict  # noqa: E402

WAYS = ("fmlray", "plain")
# fmlray's lines that end a phase (see fmlray/simulation.py and fmlray/metrics.py)
DATA = re.compile(r"^data: .*\((\d+\.\d+)s\)$")
STARTING = re.compile(r"^starting the \w+ engine$")
READY = re.compile(r"^ready in (\d+\.\d+)s \((\d+\.\d+)s since the process started(.*)\)$")
SPLIT = re.compile(r"; ([A-Za-z ]+?) (\d+\.\d+)s")
ROUND = re.compile(r"^round +(\d+)/(\d+) .*? (\d+\.\d+)s(  checkpoint .*)?$")  # not the checkpoint's seconds
WROTE = re.compile(r"^wrote ")


def command(way: str, rounds: int, name: str, out: str) -> list[str]:
    """The process a way runs: `fmlray run` of the embedded default, or the plain script."""
    if way == "fmlray":
        return [sys.executable, "-m", "fmlray", "run", "--set", f"run.name='{name}'", "--set",
                f"run.rounds={rounds}", "--set", f"run.output_dir='{out}'"]
    return [sys.executable, str(Path(__file__).resolve().parent / "plain_fml.py"), "--rounds", str(rounds)]


def environment() -> dict:
    """The children's environment: fmlray importable from any folder, never an outside Ray's address."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(benchlib.REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def spawn(way: str, rounds: int, name: str, sample: bool = False) -> dict:
    """Run one way in a temporary folder; its wall seconds from spawn to exit, its lines as (seconds, text),
    and with `sample` the peak PSS of its process tree."""
    with tempfile.TemporaryDirectory(prefix="wholerun-") as tmp:
        started = time.perf_counter()
        proc = subprocess.Popen(command(way, rounds, name, tmp), cwd=tmp, env=environment(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        sampler = benchlib.MemorySampler(benchlib.actors_by_title(proc.pid), interval_s=0.1, root=proc.pid) \
            if sample else None
        lines, cpu = [], {}
        with sampler or contextlib.nullcontext():
            for line in proc.stdout:
                lines.append((time.perf_counter() - started, line.rstrip("\n")))
                if not cpu and lines[-1][1].startswith("ready in "):
                    cpu = cpu_by_part(proc.pid)
            code = proc.wait()
            wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{way} exited with {code}: " + " | ".join(text for _, text in lines[-5:]))
    return {"wall_s": wall, "lines": lines, "cpu": cpu, "peak": sampler.peak() if sampler is not None else None}


CPU_PARTS = ("driver", "client_actors", "aggregator", "ray_system")


def cpu_by_part(root: int) -> dict:
    """CPU seconds (user + system) the tree under `root` has spent so far, by part: the spawned process, the
    client actors, the aggregator and the rest (Ray's gcs/raylet/agents, monitors, idle workers); with the
    total divided by the logical cores, the least wall time that much work takes here however it overlaps."""
    parts = dict.fromkeys(CPU_PARTS, 0.0)
    try:
        tree = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.Error:
        return {}
    for proc in tree:
        try:
            title, used = benchlib.actor_title(proc.cmdline()), proc.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        part = ("driver" if proc.pid == root else "client_actors" if title == "ray::ClientActor"
                else "aggregator" if title == "ray::Aggregator" else "ray_system")
        parts[part] += used.user + used.system
    total = sum(parts.values())
    return {f"cpu_{k}_s": v for k, v in parts.items()} | {"cpu_total_s": total,
                                                         "cpu_bound_s": total / (os.cpu_count() or 1)}


def fmlray_phases(lines: list[tuple[float, str]], wall: float) -> dict:
    """Split a `fmlray run`'s wall time by the lines it printed (seconds; see the README for each)."""
    at = {}
    rounds = []
    for t, text in lines:
        if "title" not in at:
            at["title"] = t
        elif m := DATA.match(text):
            at["data"], at["prepare_s"] = t, float(m.group(1))
        elif STARTING.match(text):
            at["starting"] = t
        elif m := READY.match(text):
            at["ready"], at["ready_own_s"] = t, float(m.group(2))
            at |= {what: float(s) for what, s in SPLIT.findall(m.group(3))}
        elif m := ROUND.match(text):
            rounds.append((t, float(m.group(3))))
        elif WROTE.match(text):
            at["wrote"] = t
    missing = [k for k in ("title", "data", "starting", "ready", "wrote") if k not in at]
    if missing or not rounds:
        raise SystemExit(f"fmlray's output lacks the lines that end {missing or 'the rounds'}; has its format changed?")
    ray_up, actors = at.get("Ray up", 0.0), at.get("actors ready", 0.0)
    return {
        "imports_s": at["title"],  # interpreter, the CLI and the config: the run's first line
        "torch_import_s": at["data"] - at["title"] - at["prepare_s"],  # fmlray.checkpoint brings torch
        "prepare_s": at["prepare_s"],  # load and partition the data, check the models
        "engine_import_s": at["starting"] - at["data"],  # make_engine: imports Ray
        "ray_up_s": ray_up,  # waiting for the private ray.init (started in a thread at the first line)
        "actors_ready_s": actors,  # put the data, create the actors, until all answer
        "engine_other_s": at["ready"] - at["starting"] - ray_up - actors,
        "startup_s": at["ready"],  # spawn -> ready (round 1 starts)
        "startup_own_s": at["ready_own_s"],  # the same as the run measures it (from its process's creation)
        "round1_s": rounds[0][0] - at["ready"],  # the run folder, round 1 (warm-up), its checkpoint
        "round1_own_s": rounds[0][1],
        "later_rounds_s": rounds[-1][0] - rounds[0][0],
        "later_round_mean_s": (rounds[-1][0] - rounds[0][0]) / max(1, len(rounds) - 1),
        "end_s": at["wrote"] - rounds[-1][0],  # close the engine and Ray, merge metrics, summary, plot
        "exit_s": wall - at["wrote"],  # the interpreter's exit
        "rounds": len(rounds),
    }


def plain_phases(lines: list[tuple[float, str]], wall: float) -> dict:
    """The plain script's: imports + data + models up to its 'ready' line, round 1, later rounds, exit."""
    ready = next(t for t, text in lines if text.startswith("ready in "))
    rounds = [t for t, text in lines if text.startswith("round ")]
    return {"startup_s": ready, "round1_s": rounds[0] - ready, "later_rounds_s": rounds[-1] - rounds[0],
            "later_round_mean_s": (rounds[-1] - rounds[0]) / max(1, len(rounds) - 1),
            "exit_s": wall - rounds[-1], "rounds": len(rounds)}


def timing(reps: int, rounds: int, log=print, sample: bool = False) -> tuple[list[dict], list[dict]]:
    """`reps` runs of each way, taking turns with the order rotating; one row per run. With `sample`
    (--smoke: the numbers mean nothing there) the same runs are sampled for memory too, one row each."""
    rows, mem = [], []
    for rep in range(reps):
        order = WAYS[rep % 2:] + WAYS[:rep % 2]
        for pos, way in enumerate(order):
            got = spawn(way, rounds, f"wholerun-{rep}", sample)
            phases = (fmlray_phases if way == "fmlray" else plain_phases)(got["lines"], got["wall_s"])
            rows.append({"kind": "timing", "way": way, "rep": rep, "position": pos, "wall_s": got["wall_s"], **phases,
                         **got["cpu"]})
            log(f"rep {rep + 1}/{reps} {way}: {got['wall_s']:.1f}s wall, start-up {phases['startup_s']:.1f}s")
            if sample:
                mem.append(memory_row(way, got, log))
    return rows, mem


def memory(rounds: int, log=print) -> list[dict]:
    """One more run of each way alone, its process tree's PSS sampled every 0.1 s; one row per way."""
    return [memory_row(way, spawn(way, rounds, "wholerun-memory", sample=True), log) for way in WAYS]


def memory_row(way: str, got: dict, log=print) -> dict:
    peak = {f"pss_{k}_mib": v / benchlib.MIB for k, v in got["peak"].items()}
    log(f"memory {way}: {peak['pss_total_mib'] / 1024:.2f} GiB peak PSS")
    return {"kind": "memory", "way": way, "wall_s": got["wall_s"], **peak}


def summarise(rows: list[dict]) -> dict:
    """Per way, the median of each column over the timing runs; the wall ratio per repetition."""
    timed = [r for r in rows if r["kind"] == "timing"]
    out = {}
    for way in WAYS:
        mine = [r for r in timed if r["way"] == way]
        out[way] = {k: statistics.median(r[k] for r in mine) for k in mine[0]
                    if isinstance(mine[0][k], float)}
    walls = {(r["rep"], r["way"]): r["wall_s"] for r in timed}
    out["ratios"] = [walls[rep, "fmlray"] / walls[rep, "plain"] for rep in sorted({r["rep"] for r in timed})]
    return out


FMLRAY_PHASES = [
    ("imports_s", "interpreter, CLI and config (spawn → first line)"),
    ("torch_import_s", "torch import (before the data)"),
    ("prepare_s", "data: load, partition, check the models"),
    ("engine_import_s", "Ray import (make_engine)"),
    ("ray_up_s", "`ray.init` (private, loopback): the wait left once the data is in (it starts at the first line)"),
    ("actors_ready_s", "put the data, start the actors, until all answer"),
    ("engine_other_s", "rest of the engine start (plans, capacity)"),
    ("startup_s", "**start-up: spawn → ready**"),
    ("round1_s", "run folder + round 1 (warm-up) + its checkpoint"),
    ("later_round_mean_s", "a later round (mean)"),
    ("end_s", "end: close actors and Ray, merge metrics, summary, plot"),
    ("exit_s", "interpreter exit"),
    ("wall_s", "**process wall**"),
]
PLAIN_PHASES = {"startup_s": "imports, data, models", "round1_s": "round 1", "later_round_mean_s": "a later round",
                "exit_s": "interpreter exit", "wall_s": "process wall"}


PLOT_PARTS = [  # (label, fmlray's column, the plain script's): the process wall, start to exit, in order
    ("interpreter, CLI, config", "imports_s", None), ("torch import", "torch_import_s", None),
    ("data", "prepare_s", None), ("Ray import", "engine_import_s", None), ("`ray.init`", "ray_up_s", None),
    ("actors ready", "actors_ready_s", None), ("rest of the engine start", "engine_other_s", None),
    ("plain: imports, data, models", None, "startup_s"), ("round 1", "round1_s", "round1_s"),
    ("later rounds", "later_rounds_s", "later_rounds_s"), ("end: close, merge, summary, plot", "end_s", None),
    ("interpreter exit", "exit_s", "exit_s")]


def plot(summary: dict, mem: list[dict], title: str, path: Path) -> Path:
    """The process wall split into phases, fmlray run against the plain script (medians); beside it, with
    memory rows, the peak PSS of each one's tree by part."""
    from matplotlib import colormaps
    fig, axes = benchlib.figure(2 if mem else 1)
    f, p = summary["fmlray"], summary["plain"]
    benchlib.bars(axes[0], ["fmlray run", "plain script"],
                  {label: [f.get(a) if a else None, p.get(b) if b else None] for label, a, b in PLOT_PARTS},
                  "seconds, spawn to exit (median of each phase)", stacked=True,
                  colors=list(colormaps["tab20"].colors)[:len(PLOT_PARTS)])
    for i, (way, col) in enumerate(((f, 1), (p, 2))):  # col: the way's column in PLOT_PARTS
        top = sum(way.get(part[col], 0.0) for part in PLOT_PARTS if part[col])
        axes[0].annotate(f"median wall {way['wall_s']:.1f} s", (i, top), ha="center", va="bottom", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()  # top to bottom, as the bars stack
    axes[0].legend(handles[::-1], labels[::-1], fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[0].set_title(f"{title}: where the time goes", fontsize=10)
    if mem:
        benchlib.bars(axes[1], [m["way"] for m in mem],
                      {k: [m.get(f"pss_{k}_mib") for m in mem] for k in ("driver", "actors", "ray_system")},
                      "peak PSS, MiB", stacked=True)
        axes[1].set_title(f"{title}: peak memory of the process tree", fontsize=10)
    return benchlib.save_png(fig, path)


def targets(summary: dict, mem: list[dict]) -> list[dict]:
    """Issue 12's targets for a whole run (ratio: median of the per-repetition ratios)."""
    tree = next((m["pss_total_mib"] / 1024 for m in mem if m["way"] == "fmlray"), None)
    checks = [("process wall, fmlray run ÷ plain script", statistics.median(summary["ratios"]), 2.0),
              ("start-up, spawn → round 1 (s)", summary["fmlray"]["startup_s"], 6.0)]
    if tree is not None:
        checks.append(("peak tree PSS (GiB)", tree, 2.0))
    return [{"check": c, "value": v, "target": f"<= {t:g}", "met": "yes" if v <= t else "no"} for c, v, t in checks]


def markdown(args, meta: dict, rows: list[dict], summary: dict, mem: list[dict], stem: str) -> str:
    f, p = summary["fmlray"], summary["plain"]
    phases = [{"phase": label, "fmlray": f.get(k), "plain": p.get(k) if k in PLAIN_PHASES else None}
              for k, label in FMLRAY_PHASES]
    runs = [r for r in rows if r["kind"] == "timing"]
    cpu = [{"part": label, "fmlray": f.get(f"cpu_{k}_s"), "plain": p.get(f"cpu_{k}_s")} for k, label in (
        ("driver", "driver (the spawned process)"), ("client_actors", "client actors"), ("aggregator", "aggregator"),
        ("ray_system", "Ray's processes (gcs, raylet, agents, monitors, idle workers)"), ("total", "**total**"),
        ("bound", "**total ÷ logical cores**: the least start-up this work allows"))]
    parts = [f"# wholerun: digits default, {args.variant}", "", benchlib.environment_markdown(meta), "",
             f"`fmlray run` of the embedded digits default (FML, 20 clients in two groups: `mlp` and `lenet5` local "
             f"models, `mlp` meme; 5 epochs of batch 16; {args.rounds} rounds, evaluated and checkpointed each; Ray "
             "engine, 2 client actors) against `plain_fml.py` (the same rounds in one process, one thread, no "
             f"checkpoints). {args.reps} runs of each, taking turns (order rotating); each timed from spawn to exit. "
             "Medians over the runs.", "",
             "## Targets", "", benchlib.markdown_table(targets(summary, mem), [
                 ("check", "check", ""), ("value", "value", ".2f"), ("target", "target", ""), ("met", "met", "")]), "",
             "Wall ratio per repetition: " + ", ".join(f"{r:.2f}" for r in summary["ratios"]) + ".", "",
             benchlib.png_link("process wall by phase and peak PSS by part", args.out / f"{stem}.png"), "",
             "## Where the time goes (s, median)", "",
             benchlib.markdown_table(phases, [("phase", "phase", ""), ("fmlray", "fmlray run", ".2f"),
                                              ("plain", "plain script", ".2f")]), "",
             "## CPU seconds spent by the ready line (median)", "",
             "Each process of the tree, read when the run prints `ready` (the plain script's: its own process). "
             f"Spent on {os.cpu_count()} logical cores, the total takes at least total ÷ cores of wall time, however "
             "well it overlaps: start-up cannot go below that bound without less work.", "",
             benchlib.markdown_table(cpu, [("part", "part", ""), ("fmlray", "fmlray run", ".2f"),
                                           ("plain", "plain script", ".2f")]), "",
             "## Runs", "",
             benchlib.markdown_table(runs, [("rep", "rep", ""), ("way", "way", ""), ("position", "turn", ""),
                                            ("wall_s", "wall s", ".2f"), ("startup_s", "start-up s", ".2f"),
                                            ("round1_s", "round 1 s", ".2f"),
                                            ("later_round_mean_s", "later round s", ".2f"),
                                            ("end_s", "end s", ".2f"), ("exit_s", "exit s", ".2f")]), ""]
    if mem:
        how = "sampled in the timed run (--smoke)" if args.smoke else "one run of each alone"
        parts += [f"## Memory (peak PSS, MiB; {how}, sampled every 0.1 s)", "",
                  "driver = the spawned process; actors = client actors and the aggregator; ray_system = the rest "
                  "of its tree (gcs_server, raylet, dashboard and runtime-env agents, API server, monitors, idle "
                  "workers). PSS splits shared pages among the processes mapping them, so the total counts them "
                  "once.", "",
                  benchlib.markdown_table(mem, [("way", "way", ""), ("pss_driver_mib", "driver", ".0f"),
                                                ("pss_actors_mib", "actors", ".0f"),
                                                ("pss_ray_system_mib", "ray_system", ".0f"),
                                                ("pss_total_mib", "total", ".0f"), ("wall_s", "wall s", ".1f")]), ""]
    import tomli_w
    parts += ["## Config (the embedded default, as run)", "", "```toml", tomli_w.dumps(meta["config"]).strip(), "```", ""]
    return "\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before anything runs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="timed runs of each way (default 3)")
    p.add_argument("--rounds", type=int, default=10, help="rounds of each run (default 10, the default's)")
    p.add_argument("--no-memory", action="store_true", help="skip the two memory runs")
    p.add_argument("--tag", default="", help="a word in the output names, e.g. before")
    p.add_argument("--smoke", action="store_true", help="1 round, 1 run of each (its memory sampled in that run): "
                   "checks the script runs")
    p.add_argument("--out", type=Path, default=benchlib.DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.smoke:
        args.reps, args.rounds = 1, 1
    if args.reps < 1 or args.rounds < 1:
        p.error("--reps and --rounds must be >= 1")
    benchlib.check_tag(p, args.tag)
    benchlib.check_out(p, args.out)
    args.variant = "smoke" if args.smoke else args.tag or "full"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta = benchlib.run_meta(args) | {"load_before": os.getloadavg(),
                                      "config": to_dict(load_config(None, [f"run.rounds={args.rounds}"]))}
    log = lambda m: print(m, flush=True)  # noqa: E731
    rows, mem = timing(args.reps, args.rounds, log, sample=args.smoke and not args.no_memory)
    if not (args.smoke or args.no_memory):
        mem = memory(args.rounds, log)
    meta["load_after"] = os.getloadavg()
    summary = summarise(rows)
    stem = benchlib.result_stem("wholerun", "digits", "" if args.variant == "full" else args.variant, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows + mem for k in r))  # Arrow takes the first row's keys only
    benchlib.write_parquet([{k: r.get(k) for k in columns} for r in rows + mem], args.out / f"{stem}.parquet",
                           meta | {"summary": summary})
    report = markdown(args, meta, rows, summary, mem, stem)
    (args.out / f"{stem}.md").write_text(report)
    plot(summary, mem, f"wholerun {args.variant}", args.out / f"{stem}.png")
    print(report)
    print(f"wrote {args.out / stem}.parquet, .md and .png")
    return 0


if __name__ == "__main__":
    benchlib.exit_with(main)
