"""How FML's private state scales with the clients that exist, when about 50 of them train a round.

The workload of issue 10: Fashion-MNIST (all 60,000 training rows and 10,000 test rows, each dealt
evenly at random over the clients, given as a partition file), `cnn5` local models
(~13 MiB of private state each with SGD momentum), a `lenet5` meme, about 50 clients a round, one
epoch, evaluating each round the round's trained clients plus a seeded sample of 200 others, and a
checkpoint every round, on the Ray engine with two one-CPU actors. Per configuration it records:
seconds per round split into training, evaluation and checkpoint (wall, in the driver), the rows'
load + store time summed over clients against their training time (inside the actors), peak PSS of
the process tree by driver / client actors / the rest of Ray, disk used by the state store and the
checkpoint, and the time to resume from the last checkpoint. With --resume-check, a run stopped
half way and resumed must end where the uninterrupted run ends.

    python benchmarks/state_scale.py --clients 100,1000,10000 --resume-check 10000 --against 2d817fb
    python benchmarks/state_scale.py --quick      # 100 and 1,000 clients, 3 rounds: a few minutes

Results: benchmarks/results/state-scale-fmnist-<N>cpu-<date>.{md,parquet}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from fmlray import checkpoint  # noqa: E402
from fmlray.config import load_config, to_dict  # noqa: E402
from fmlray.engine.ray_engine import RayEngine  # noqa: E402
from fmlray.engine.host import initial_global_state  # noqa: E402
from fmlray.simulation import eval_clients, prepare, sample_clients  # noqa: E402

GiB = 2**30


def partition_file(clients: int, folder: Path) -> Path:
    """IID: the 60,000 training rows and the 10,000 test rows each dealt evenly over the clients. (The built-in
    IID partition deals the test set by the clients' classes, which leaves some of 10,000 clients with 6
    training rows no test row.)"""
    from fmlray.data import Partition, save_partition
    path = folder / f"iid-{clients}.npz"
    if not path.is_file():
        rng = np.random.default_rng(0)
        split = lambda n: tuple(np.sort(p) for p in np.array_split(rng.permutation(n), clients))  # noqa: E731
        folder.mkdir(parents=True, exist_ok=True)
        save_partition(path, Partition(split(60_000), split(10_000)))
    return path


def config(clients: int, rounds: int, per_round: int, ckpt: bool, out: Path, state: str):
    return load_config(None, [
        "run.name='state-scale'", f"run.output_dir={str(out)!r}", f"run.rounds={rounds}", "run.eval_clients=200",
        f"run.checkpoint_every={1 if ckpt else 0}",
        "data.dataset='fmnist'", "data.partition='file'", "data.min_samples=5",
        f"data.partition_file={str(partition_file(clients, out.parent / 'partitions'))!r}",
        f"clients.num_clients={clients}", f"clients.fraction={per_round / clients}",
        "clients.groups=[{name='cnn5', share=1.0, local_model='cnn5', num_cpus=1.0}]",
        "model.meme='lenet5'", "training.epochs=1", "training.batch_size=32",
        "engine.kind='ray'", "engine.num_actors=2", f"engine.state_dir={state!r}"])


def du(path: Path) -> int:
    """Bytes allocated on disk below `path` (sparse files count what they hold)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def run_rounds(cfg, prepared, engine, first: int, last: int, state, writer, sampler, disk_paths) -> tuple[list, object]:
    """Rounds first..last as simulate() runs them, timing each phase; returns per-round rows and the state."""
    rows = []
    for rnd in range(first, last + 1):
        started = time.perf_counter()
        ids = sample_clients(cfg, rnd)
        result = engine.train_round(rnd, ids, state)
        state = result.global_state
        benchlib.wait_state(state)
        trained = time.perf_counter()
        ev = engine.evaluate(state, eval_clients(cfg, rnd, ids))
        evaluated = time.perf_counter()
        info = writer(rnd, engine, engine.fetch(state)) if writer is not None else {"bytes": 0, "disk": 0}
        done = time.perf_counter()
        clients = result.clients
        rows.append({
            "round": rnd, "sampled": len(ids), "evaluated": len(ev.clients),
            "round_s": done - started, "train_s": trained - started, "eval_s": evaluated - trained,
            "checkpoint_s": done - evaluated,
            "client_train_s": sum(c["seconds"] - c.get("state_seconds", 0.0) - c.get("init_seconds", 0.0)
                                  for c in clients),
            "client_state_s": sum(c.get("state_seconds", 0.0) for c in clients),
            "client_init_s": sum(c.get("init_seconds", 0.0) for c in clients),
            "eval_state_s": sum(c.get("state_seconds", 0.0) for c in ev.clients),
            "checkpoint_mib": info["bytes"] / 2**20,
            "disk_gib": (sum(du(p) for p in disk_paths)) / GiB,
        })
        sampler.sample()
        print(f"  round {rnd}: {rows[-1]['round_s']:.2f}s (train {rows[-1]['train_s']:.2f}, eval "
              f"{rows[-1]['eval_s']:.2f}, checkpoint {rows[-1]['checkpoint_s']:.2f}), disk {rows[-1]['disk_gib']:.2f} GiB",
              flush=True)
    return rows, state


def one(clients: int, rounds: int, per_round: int, ckpt: bool, prepared_by_n: dict) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fmlray-state-scale-"))
    try:
        cfg = config(clients, rounds, per_round, ckpt, work / "runs", str(work / "state"))
        prepared = prepared_by_n.setdefault(clients, prepare(cfg))
        run_dir = work / "runs" / cfg.run.name
        run_dir.mkdir(parents=True)
        with benchlib.MemorySampler(benchlib.actors_by_title(os.getpid())) as sampler:
            engine = RayEngine()
            engine.start(cfg, prepared.dataset, prepared.partition)
            try:
                writer = checkpoint.Writer(run_dir, cfg) if ckpt else None
                rows, state = run_rounds(cfg, prepared, engine, 1, rounds, initial_global_state(cfg, prepared.dataset),
                                         writer, sampler, [work / "state", run_dir])
                stored = sum(ray.get([a.stored.remote() for a in engine.actors]))
            finally:
                engine.close()
            peak = sampler.peak()
        resume_s = None
        if ckpt:  # a fresh engine, restored from the last checkpoint: what `fmlray run --resume` waits for
            engine = RayEngine()
            engine.start(cfg, prepared.dataset, prepared.partition)
            try:
                started = time.perf_counter()
                resume = checkpoint.load(run_dir, cfg)
                engine.restore(resume.folder, resume.refs(), resume.placement)
                resume_s = time.perf_counter() - started
            finally:
                engine.close()
        steady = rows[1:] if len(rows) > 1 else rows  # round 1 also warms the actors up
        mean = lambda k: float(np.mean([r[k] for r in steady]))  # noqa: E731
        return {"config": to_dict(cfg), "clients": clients, "per_round": per_round, "rounds": rounds, "checkpoint": ckpt,
                "store": engine.plan.kind, "row_mib": engine.plan.row_bytes["cnn5"] / 2**20,
                "clients_with_rows": stored,
                "round_s": mean("round_s"), "train_s": mean("train_s"), "eval_s": mean("eval_s"),
                "checkpoint_s": mean("checkpoint_s"), "checkpoint_mib": mean("checkpoint_mib"),
                "state_vs_train": mean("client_state_s") / mean("client_train_s"),
                "init_vs_train": mean("client_init_s") / mean("client_train_s"),
                "eval_state_s": mean("eval_state_s"),
                "peak_total_gib": peak["total"] / GiB, "peak_driver_gib": peak["driver"] / GiB,
                "peak_actors_gib": peak["actors"] / GiB, "peak_ray_gib": peak["ray_system"] / GiB,
                "disk_gib": rows[-1]["disk_gib"], "resume_s": resume_s}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def versus(commit: str, rounds: int, per_round: int) -> dict:
    """s/round of the same 100-client `fmlray run` on `commit` (checked out into a temporary worktree) and on
    this work tree, each in its own process, with no checkpoints (the older code's cost them a full pull)."""
    import subprocess
    import pyarrow.parquet as pq
    work = Path(tempfile.mkdtemp(prefix="fmlray-versus-"))
    try:
        subprocess.run(["git", "-C", str(benchlib.REPO), "worktree", "add", "--detach", str(work / "src"), commit],
                       check=True, capture_output=True)
        sets = ["run.name='v'", f"run.rounds={rounds}", "run.checkpoint_every=0", "data.dataset='fmnist'",
                "data.partition='iid'", "clients.num_clients=100", f"clients.fraction={per_round / 100}",
                "clients.groups=[{name='cnn5', share=1.0, local_model='cnn5', num_cpus=1.0}]", "model.meme='lenet5'",
                "training.epochs=1", "training.batch_size=32", "engine.num_actors=2"]
        out = {}
        for label, src in (("before", work / "src"), ("now", benchlib.REPO)):
            cmd = [sys.executable, "-m", "fmlray", "run", *[a for s in sets for a in ("--set", s)],
                   "--set", f"run.output_dir={str(work / label)!r}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=src,
                                  env={**os.environ, "PYTHONPATH": str(src)})
            if proc.returncode:
                raise RuntimeError(f"{label}: {proc.stderr[-2000:]}")
            if label == "now":
                out["store"] = next((line.split("kept ", 1)[1] for line in proc.stdout.splitlines()
                                     if line.startswith("private state")), "?")
            rows = pq.read_table(work / label / "v" / "metrics.parquet").to_pylist()
            out[label] = float(np.mean([r["seconds"] for r in rows if r["split"] == "round" and r["round"] > 1]))
        return out
    finally:
        subprocess.run(["git", "-C", str(benchlib.REPO), "worktree", "remove", "--force", str(work / "src")],
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def resume_check(clients: int, rounds: int, per_round: int, prepared_by_n: dict) -> dict:
    """Stop after half the rounds, resume on a fresh engine, and compare with the uninterrupted run."""
    work = Path(tempfile.mkdtemp(prefix="fmlray-state-resume-"))
    try:
        finals = {}
        for way in ("whole", "split"):
            cfg = config(clients, rounds, per_round, True, work / way, str(work / "state"))
            prepared = prepared_by_n.setdefault(clients, prepare(cfg))
            run_dir = work / way / cfg.run.name
            run_dir.mkdir(parents=True)
            with benchlib.MemorySampler(interval_s=None) as sampler:
                half = rounds // 2 if way == "split" else rounds
                engine = RayEngine()
                engine.start(cfg, prepared.dataset, prepared.partition)
                try:
                    rows, state = run_rounds(cfg, prepared, engine, 1, half, initial_global_state(cfg, prepared.dataset),
                                             checkpoint.Writer(run_dir, cfg), sampler, [])
                    state = engine.fetch(state)
                finally:
                    engine.close()
                if way == "split":
                    engine = RayEngine()
                    engine.start(cfg, prepared.dataset, prepared.partition)
                    try:
                        resume = checkpoint.load(run_dir, cfg)
                        engine.restore(resume.folder, resume.refs(), resume.placement)
                        _, state = run_rounds(cfg, prepared, engine, half + 1, rounds, resume.global_state,
                                              checkpoint.Writer(run_dir, cfg, resume), sampler, [])
                        state = engine.fetch(state)
                    finally:
                        engine.close()
            finals[way] = (state, checkpoint.load(run_dir, cfg))
        (a, ca), (b, cb) = finals["whole"], finals["split"]
        diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
        ra, rb = ca.refs(), cb.refs()
        rows_equal = ra.keys() == rb.keys() and all(ra[c].crc32 == rb[c].crc32 for c in ra)
        return {"clients": clients, "rounds": rounds, "max_abs_diff_global": diff, "private_rows_equal": rows_equal,
                "clients_with_rows": len(ra)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


COLUMNS = [("clients", "clients", "d"), ("checkpoint", "ckpt", ""), ("store", "store", ""),
           ("clients_with_rows", "rows held", "d"), ("round_s", "s/round", ".2f"), ("train_s", "train s", ".2f"),
           ("eval_s", "eval s", ".2f"), ("checkpoint_s", "ckpt s", ".2f"), ("checkpoint_mib", "ckpt MiB", ".0f"),
           ("state_vs_train", "load+store ÷ train", ".3f"), ("init_vs_train", "seeded init ÷ train", ".3f"),
           ("peak_total_gib", "peak PSS GiB", ".2f"),
           ("peak_driver_gib", "driver", ".2f"), ("peak_actors_gib", "actors", ".2f"), ("peak_ray_gib", "Ray", ".2f"),
           ("disk_gib", "disk GiB", ".2f"), ("resume_s", "resume s", ".2f")]


def plot(rows: list[dict], path: Path) -> Path:
    """By client count: seconds per round split into train / eval / checkpoint, and peak PSS by part."""
    fig, (time_ax, mem_ax) = benchlib.figure(2)
    groups = [f"{r['clients']:,}" + ("" if r["checkpoint"] else "\nno ckpt") for r in rows]
    benchlib.bars(time_ax, groups, {k: [r[f"{k}_s"] for r in rows] for k in ("train", "eval", "checkpoint")},
                  "seconds per round (mean of rounds 2 on)", stacked=True, slant=False)
    benchlib.bars(mem_ax, groups, {k: [r[f"peak_{k}_gib"] for r in rows] for k in ("driver", "actors", "ray")},
                  "peak PSS, GiB", stacked=True, slant=False)
    for ax, what in ((time_ax, "time per round"), (mem_ax, "memory")):
        ax.set_xlabel("clients")
        ax.set_title(f"state scale: {what}", fontsize=10)
    return benchlib.save_png(fig, path)


def counts(text: str) -> list[int]:
    """A comma-separated list of client counts; "" is none."""
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before any configuration starts (each in a child with its own Ray)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=benchlib.comma_list(int), default=[100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--no-checkpoint-baseline", type=counts, default=[1000],
                        help="client counts also run without checkpoints (the 1.2x target)")
    parser.add_argument("--resume-check", type=counts, default=[10000])
    parser.add_argument("--against", metavar="COMMIT", default="",
                        help="also time whole `fmlray run`s of the 100-client workload (no checkpoints) on this "
                             "commit and on the work tree, one after the other (the 'no slower than before' target)")
    parser.add_argument("--quick", action="store_true", help="100 and 1,000 clients, 3 rounds, resume check at 100")
    parser.add_argument("--out", type=Path, default=benchlib.DEFAULT_OUT)
    parser.add_argument("--one", metavar="N,CKPT,JSON", help=argparse.SUPPRESS)  # a configuration, in a child
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.rounds, args.resume_check = [100, 1000], 3, [100]
    if args.one:  # a child: the parent checked what it passes on
        return args
    benchlib.check_at_least(parser, "--per-round", args.per_round, 1)
    for flag, ns in (("--clients", args.clients), ("--resume-check", args.resume_check)):
        if small := [n for n in ns if n < args.per_round]:
            parser.error(f"{flag}: each count must be >= --per-round ({args.per_round}), the clients a round "
                         f"trains; got {small[0]}")
    benchlib.check_at_least(parser, "--rounds", args.rounds, 1)
    if args.resume_check and args.rounds < 2:
        parser.error("--rounds must be >= 2 with --resume-check (it stops half way); --resume-check '' skips it")
    if args.against:
        if args.per_round > 100:
            parser.error(f"--against times a 100-client run: --per-round must be <= 100; got {args.per_round}")
        if subprocess.run(["git", "-C", str(benchlib.REPO), "rev-parse", "--verify", "--quiet",
                           f"{args.against}^{{commit}}"], capture_output=True).returncode:
            parser.error(f"--against: {args.against!r} is not a commit of {benchlib.REPO}")
    benchlib.check_out(parser, args.out)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:  # one configuration in this fresh process and its own Ray; its row as JSON
        n, ckpt, out = args.one.split(",", 2)
        benchlib.start_ray(num_cpus=2)
        try:
            row = one(int(n), args.rounds, args.per_round, ckpt == "1", {})
        finally:
            ray.shutdown()
        Path(out).write_text(json.dumps(row))
        return 0
    meta = benchlib.run_meta(args)
    meta["load_before"] = os.getloadavg()
    rows = []
    # Each configuration runs in a fresh process with its own Ray, so that its driver holds one size's data
    # and nothing a larger run left behind: the driver's PSS per size is then comparable across sizes.
    for n in args.clients:
        for ckpt in ([True, False] if n in args.no_checkpoint_baseline else [True]):
            print(f"{n} clients, checkpoint {'every round' if ckpt else 'never'}", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                got = Path(tmp) / "row.json"
                done = subprocess.run([sys.executable, __file__, "--one", f"{n},{int(ckpt)},{got}", "--rounds",
                                       str(args.rounds), "--per-round", str(args.per_round)])
                if done.returncode:
                    return done.returncode  # its one line (or its traceback) said why
                rows.append(json.loads(got.read_text()))
                meta.setdefault("configs", {})[f"{n} clients, checkpoint {'every round' if ckpt else 'never'}"] = \
                    rows[-1].pop("config")
    prepared: dict = {}
    if args.resume_check:
        benchlib.start_ray(num_cpus=2)
    checks = [resume_check(n, args.rounds, args.per_round, prepared) for n in args.resume_check]
    against = versus(args.against, args.rounds, args.per_round) if args.against else None
    meta["load_after"] = os.getloadavg()
    variant = "quick" if args.quick else "-".join(map(str, args.clients)) + "-clients"
    stem = benchlib.result_stem("state-scale", "fmnist", variant, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    benchlib.write_parquet(rows, args.out / f"{stem}.parquet", meta)
    lines = [f"# State scale: FML on Fashion-MNIST, cnn5 locals, ~{args.per_round} clients a round",
             "", benchlib.environment_markdown(meta), "",
             f"{args.rounds} rounds, 1 epoch, batch 32, 2 Ray actors × 1 CPU, evaluation of the round's clients + 200 "
             "a round; means over rounds 2 on (round 1 warms up). Each configuration ran in a fresh process with "
             "its own Ray (its driver holds that size's data only).", "",
             benchlib.markdown_table(rows, COLUMNS), "",
             benchlib.png_link("time per round and peak memory by client count", args.out / f"{stem}.png"), ""]
    for n in args.no_checkpoint_baseline:
        with_ckpt = [r for r in rows if r["clients"] == n and r["checkpoint"]]
        without = [r for r in rows if r["clients"] == n and not r["checkpoint"]]
        if with_ckpt and without:
            lines.append(f"- {n:,} clients: s/round with a checkpoint every round ÷ without = "
                         f"{with_ckpt[0]['round_s'] / without[0]['round_s']:.2f}")
    if against:
        lines.append(f"- whole `fmlray run`, 100 clients, {args.rounds} rounds, no checkpoints, s/round (mean of rounds "
                     f"2 on): {against['before']:.2f} at {args.against}, {against['now']:.2f} now "
                     f"({against['now'] / against['before']:.3f}×; store: {against['store']})")
    for c in checks:
        lines.append(f"- resume check, {c['clients']:,} clients, {c['rounds']} rounds stopped at {c['rounds'] // 2}: "
                     f"global model max |diff| {c['max_abs_diff_global']:.2e}, private rows equal: "
                     f"{c['private_rows_equal']} ({c['clients_with_rows']} clients with rows)")
    lines += ["", benchlib.configs_markdown(meta.get("configs", {}))]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(rows, args.out / f"{stem}.png")
    print("\n".join(lines))
    ok = all(c["private_rows_equal"] and c["max_abs_diff_global"] < 1e-5 for c in checks)
    return 0 if ok else 1


if __name__ == "__main__":
    benchlib.exit_with(main)
