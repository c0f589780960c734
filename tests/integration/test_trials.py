"""Sweeps on Ray Tune: the same table as the sequential loop, trials in placement groups sized to their
runs, two single-actor trials at once on two CPUs, a stopped sweep finished by a rerun, and the one-line
error for a trial that cannot fit (a trial larger than one node, over three raylets: test_cluster.py).
Searches: the best configs as presets, and a search stopped by SIGTERM finished by --resume."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fmlray import checkpoint
from fmlray.cli import main
from fmlray.engine.resources import DRIVER_MEMORY

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

GRID = """
[sweep]
name = "grid"
output_dir = "{out}"
seeds = [0, 1]
set = ["engine.kind=ray", "run.rounds=2", "training.epochs=1", "clients.num_clients=8",
       "clients.groups=[{{name='all', share=1.0, local_model='mlp', num_cpus=1}}]"{extra}]

[[axis]]
name = "algorithm"
values = ["algorithm.name=fml", "algorithm.name=fedavg"]
"""


def spec(tmp_path, name="s.toml", extra="", text=GRID):
    path = tmp_path / name
    path.write_text(text.format(out=tmp_path / "runs", extra=extra))
    return path


def rows(path):
    key = lambda r: (r["run"], r["round"], r["client"], r["model"], r["split"])  # noqa: E731
    return {key(r): r for r in pq.read_table(path).to_pylist()}


def stopped(args: list[str], run_dir: Path) -> tuple[subprocess.Popen, str, str]:
    """`fmlray ARGS` in a process of its own, SIGTERMed once `run_dir` has a checkpoint: (process, stdout, stderr)."""
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "fmlray", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not checkpoint.exists(run_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    return proc, out, err


def tune_records(folder: Path) -> list[dict]:
    """The last result Tune recorded for each trial (Tune's own files, in the sweep's folder)."""
    out = []
    for f in folder.glob(".tune/*/*/result.json"):
        out.append(json.loads(f.read_text().splitlines()[-1]))
    return out


def test_parallel_sweep_matches_the_sequential_one_two_single_actor_trials_at_once(ray_session, tmp_path, capsys):
    import ray

    # Prepare: the same grid of 2 runs (FML and FedAvg), into two folders
    seq_dir, par_dir = tmp_path / "seq", tmp_path / "par"
    seq_dir.mkdir(), par_dir.mkdir()
    # the loop on the serial engine (no actor to start: that Ray's runs equal the serial engine's is
    # test_ray_engine's to show), the trials on Ray
    grid = GRID.replace("seeds = [0, 1]", "seeds = [0]")
    seq, par = spec(seq_dir, text=grid.replace("engine.kind=ray", "engine.kind=serial")), spec(par_dir, text=grid)
    # Execute
    assert main(["sweep", str(seq)]) == 0  # the loop, one run after another
    capsys.readouterr()
    assert main(["sweep", str(par), "--parallel", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    # Assert: one line per run (and a header and the last line), not Tune's tables
    assert len(out) == 4 and sum(": done in" in line for line in out) == 2, out
    a, b = rows(seq_dir / "runs/grid/results.parquet"), rows(par_dir / "runs/grid/results.parquet")
    assert a.keys() == b.keys() and len(a) > 50 and {k[0] for k in a} == {"fml-s0", "fedavg-s0"}
    for k in a:
        for col in ("loss", "accuracy"):
            x, y = a[k][col], b[k][col]
            assert (math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-5 * max(1.0, abs(x)), (k, col, x, y)
        assert a[k]["samples"] == b[k]["samples"] and a[k]["seed"] == b[k]["seed"]
    # each trial ran its engine in its own placement group: a memory-only driver bundle and one 1-CPU actor
    records = tune_records(par_dir / "runs/grid")
    assert len(records) == 2 and all(r["status"] == "done" for r in records)
    assert all("1 client actors on 1 node(s) in the trial's placement group" in r["log"] for r in records)
    shapes = [sorted((i, dict(b)) for i, b in pg["bundles"].items())
              for pg in ray.util.placement_group_table().values()]
    assert [(0, {"memory": float(DRIVER_MEMORY)}), (1, {"CPU": 1.0})] in shapes
    # two trials at once on two CPUs: some two runs overlapped in time
    spans = sorted((r["began"], r["ended"]) for r in records)
    assert any(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1)), spans
    assert not (Path.home() / "ray_results").exists() or "grid" not in os.listdir(Path.home() / "ray_results")


def test_a_trial_that_cannot_fit_is_one_line_before_anything_starts(ray_session, tmp_path, capsys):
    path = spec(tmp_path, extra=', "engine.num_actors=3"')  # 3 one-CPU actors; the cluster has 2 CPUs
    code = main(["sweep", str(path), "--parallel", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "run fml-s0 cannot be a trial on this cluster" in err and "need 3 CPUs" in err, err
    assert not (tmp_path / "runs" / "grid").exists() or list((tmp_path / "runs" / "grid").iterdir()) == []


STOPPABLE = """
[sweep]
name = "stop"
output_dir = "{out}"
seeds = [0, 1]
set = ["engine.kind=serial", "training.epochs=1", "run.checkpoint_every=1"{extra}]

[[axis]]
name = "length"
values = [{{label = "short", set = ["run.rounds=2"]}}, {{label = "long", set = ["run.rounds=12"]}}]
"""


def test_sigterm_mid_sweep_then_a_rerun_finishes_only_the_missing_runs(ray_session, tmp_path, capsys):
    # Prepare: two short runs, then two long ones, two at a time, in a process of its own (its own Ray)
    path = spec(tmp_path, text=STOPPABLE)
    folder = tmp_path / "runs" / "stop"
    # Execute: SIGTERM once a long run has its first checkpoint
    proc, out, err = stopped(["sweep", str(path), "--parallel", "2"], folder / "long-s0")
    # Assert: stopped with a line saying so, the short runs finished, the long ones not
    assert proc.returncode == 130, (out, err[-3000:])
    assert "run(s) unfinished" in err and "Traceback" not in err, err[-3000:]
    assert (folder / "short-s0/metrics.parquet").is_file() and (folder / "short-s1/metrics.parquet").is_file()
    assert not (folder / "long-s0/metrics.parquet").exists() and checkpoint.exists(folder / "long-s0")
    stopped_at = checkpoint.load(folder / "long-s0").round
    assert stopped_at < 12
    finished = {p: p.stat().st_mtime_ns for p in folder.glob("*/metrics.parquet")}
    # Execute: the same sweep again
    assert main(["sweep", str(path), "--parallel", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Assert: the finished runs were not run again; the long ones resumed and finished
    assert "[1/4] short-s0: done" in lines and "[2/4] short-s1: done" in lines
    assert any(line.startswith("[3/4] long-s0: done (resumed) in") for line in lines), lines
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    table = pq.read_table(folder / "results.parquet").to_pylist()
    assert {r["run"] for r in table} == {"short-s0", "short-s1", "long-s0", "long-s1"}
    assert sorted({r["round"] for r in table if r["run"] == "long-s0"}) == list(range(1, 13))


SEARCH = """
[tune]
name = "s"
output_dir = "{out}"
set = ["engine.kind=serial", "run.rounds=3", "training.epochs=1", "clients.num_clients=8"]
samples = 3
grace_rounds = 1
top = 2

[[param]]
key = "algorithm.fml.alpha"
uniform = [0.1, 0.9]

[[param]]
key = "training.lr"
loguniform = [0.003, 0.1]
"""


def test_fmlray_tune_prints_the_best_configs_and_writes_them_as_presets(ray_session, tmp_path, capsys):
    from fmlray.config import load_config

    path = spec(tmp_path, text=SEARCH)
    assert main(["tune", str(path), "--parallel", "2"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "runs" / "s"
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    assert len(trials) == 3 and all(0.1 <= t["algorithm.fml.alpha"] <= 0.9 for t in trials)
    complete = [t for t in trials if t["complete"]]
    assert complete and trials[0]["complete"]  # ASHA may stop some; the best ran every round
    assert trials[0]["local_mean"] == max(t["local_mean"] for t in complete)
    table = out.split("rank", 1)[1].splitlines()
    assert "trial-0000" in table[1] and f"{trials[0]['local_mean']:.4f}" in table[1]
    best = load_config(folder / "best-1.toml")
    assert best.algorithm.fml.alpha == trials[0]["algorithm.fml.alpha"] and best.run.rounds == 3
    assert (folder / trials[0]["trial"] / "metrics.parquet").is_file()  # its run folder, as fmlray run writes it
    assert (folder / "best-2.toml").is_file() and not (folder / "best-3.toml").exists()


RESUMABLE = """
[tune]
name = "r"
output_dir = "{out}"
set = ["engine.kind=serial", "run.rounds=10", "training.epochs=1", "clients.num_clients=4",
       "run.checkpoint_every=1"]
samples = 3
scheduler = "fifo"
parallel = 1

[[param]]
key = "algorithm.fml.alpha"
uniform = [0.1, 0.9]
"""


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_sigterm_mid_search_then_resume_finishes_it_without_rerunning_finished_trials(ray_session, tmp_path, capsys):
    # Prepare: three trials one at a time, in a process of its own (its own Ray)
    path = spec(tmp_path, text=RESUMABLE)
    folder = tmp_path / "runs" / "r"
    # Execute: SIGTERM once the second trial has its first checkpoint
    proc, out, err = stopped(["tune", str(path)], folder / "trial-00001")
    # Assert: stopped with one line naming --resume; the first trial finished, the second not
    assert proc.returncode == 130, (out, err[-3000:])
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith(f"fmlray tune {path} --resume"), err[-3000:]
    assert "[2/3] trial-00001: stopped in" in out, out
    assert (folder / "trial-00000/metrics.parquet").is_file() and not (folder / "trial-00001/metrics.parquet").exists()
    assert checkpoint.load(folder / "trial-00001").round < 10
    finished = (folder / "trial-00000/metrics.parquet").stat().st_mtime_ns
    # Execute: --resume after the searched range changed
    path.write_text(path.read_text().replace("uniform = [0.1, 0.9]", "uniform = [0.2, 0.9]"))
    before = tree(folder)
    assert main(["tune", str(path), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    # Assert: one line naming what changed, nothing written
    assert len(err.splitlines()) == 1 and "changed since the search" in err and "param.algorithm.fml.alpha" in err, err
    assert tree(folder) == before
    # Execute: --resume with the file as the search started
    path.write_text(path.read_text().replace("uniform = [0.2, 0.9]", "uniform = [0.1, 0.9]"))
    assert main(["tune", str(path), "--resume"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Assert: the stopped trial went on from its checkpoint, the finished one did not run again, and the
    # search ends with as many trials as it planned, every one complete
    assert any(line.startswith("[2/3] trial-00001: done (resumed) in") for line in lines), lines
    assert not any(line.startswith("[1/3]") for line in lines), lines
    assert (folder / "trial-00000/metrics.parquet").stat().st_mtime_ns == finished
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    assert sorted(t["trial"] for t in trials) == ["trial-00000", "trial-00001", "trial-00002"]
    assert all(t["complete"] and t["rounds"] == 10 for t in trials)
    assert sorted(p.name for p in folder.glob("trial-*")) == ["trial-00000", "trial-00001", "trial-00002"]
    for t in trials:  # every round once
        rounds = pq.read_table(folder / t["trial"] / "metrics.parquet")["round"].to_pylist()
        counts = {r: rounds.count(r) for r in set(rounds)}
        assert sorted(counts) == list(range(1, 11)) and len(set(counts.values())) == 1, (t["trial"], counts)
    assert (folder / "best-1.toml").is_file()


TINY_SEARCH = RESUMABLE.replace("run.rounds=10", "run.rounds=2").replace("samples = 3", "samples = 2")


def test_a_search_interrupted_once_it_recorded_its_plan_is_continued_by_resume(ray_session, tmp_path, capsys):
    # Prepare / Execute: Ctrl-C as soon as the plan is recorded (before Tune's first state, or just after)
    path = spec(tmp_path, text=TINY_SEARCH)
    folder = tmp_path / "runs" / "r"
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "fmlray", "tune", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not (folder / ".tune" / "search.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    # Assert: one line giving the command that continues it (the folder was once neither startable nor resumable)
    assert proc.returncode == 130, (out, err[-3000:])
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith(f"fmlray tune {path} --resume"), err[-3000:]
    # Execute / Assert: that command ends with the whole search's outputs
    assert main(["tune", str(path), "--resume"]) == 0, capsys.readouterr().err
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    assert sorted(t["trial"] for t in trials) == ["trial-00000", "trial-00001"] and all(t["complete"] for t in trials)


def test_resume_without_a_search_to_resume_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = spec(tmp_path, text=RESUMABLE)
    folder = tmp_path / "runs" / "r"
    # no folder at all
    assert main(["tune", str(path), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no search to resume" in err, err
    assert not folder.exists()
    # a folder without the search's record (e.g. a run folder only): a plain start refuses it too, so the line
    # does not offer one
    (folder / "trial-00000").mkdir(parents=True)
    assert main(["tune", str(path), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a search's folder" in err and "without --resume" not in err, err
    assert [p.name for p in folder.rglob("*")] == ["trial-00000"]


def test_an_existing_search_folder_is_refused_and_the_message_suggests_resume(tmp_path, capsys):
    path = spec(tmp_path, text=RESUMABLE)
    (tmp_path / "runs" / "r" / ".tune").mkdir(parents=True)
    (tmp_path / "runs" / "r" / ".tune" / "search.json").write_text("{}")
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists (an earlier search); continue it with --resume" in err, err
    # a folder that is not a search's (a run's, a sweep's, a user's): --resume is not offered, as it would only
    # answer that the folder holds no search to resume (audit 23)
    shutil.rmtree(tmp_path / "runs" / "r" / ".tune")
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists and is not a search's folder" in err and "--resume" not in err, err


MIDDLE = """
[tune]
name = "m"
output_dir = "{out}"
set = ["engine.kind=serial", "run.rounds=1", "training.epochs=1", "data.partition='iid'"]
scheduler = "fifo"
samples = 1
parallel = 1

[[param]]
key = "clients.num_clients"
grid = [2, 100]

[[param]]
key = "data.min_samples"
grid = [100, 5]
"""


def test_a_trial_that_fails_inside_the_search_fails_alone_and_ranks_last(ray_session, tmp_path, capsys, caplog):
    # every end of every range makes a valid config; 100 clients of 100 rows (of 1,438) is the combination
    # that fails, in its trial. The search stopped there, exit 2, and could be neither started again (its folder
    # existed) nor resumed (the trial failed again): a search explores ranges, so that trial fails alone (audit 40)
    path = spec(tmp_path, text=MIDDLE)
    assert main(["tune", str(path)]) == 0
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fmlray: warning: 1 of 4 trial(s) failed and rank last"), err
    assert "cannot give 100 clients data.min_samples = 100 training samples each" in err, err
    failed = [line for line in captured.out.splitlines() if ": failed before round 1 (" in line]
    assert len(failed) == 1 and "cannot give 100 clients" in failed[0], captured.out
    folder = tmp_path / "runs" / "m"
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    assert [bool(t["error"]) for t in trials] == [False, False, False, True], trials
    assert (trials[-1]["clients.num_clients"], trials[-1]["data.min_samples"]) == (100, 100)
    assert sorted(p.name for p in folder.glob("best-*.toml")) == ["best-1.toml", "best-2.toml", "best-3.toml"]
    assert not [r for r in caplog.records if r.getMessage().startswith("Trials did not complete")], caplog.text
    # a resume keeps it as failed: nothing runs again, the same table
    assert main(["tune", str(path), "--resume"]) == 0
    captured = capsys.readouterr()
    assert not [line for line in captured.out.splitlines() if line.startswith("[")], captured.out
    assert repr(pq.read_table(folder / "trials.parquet").to_pylist()) == repr(trials)  # NaN figures: by repr


def test_a_trial_whose_error_stops_the_search_runs_again_on_resume(ray_session, tmp_path, capsys):
    # a folder in the second trial's way stopped the search (exit 2), but its trial returned normally: Tune
    # recorded it finished, --resume never ran it, and it was ranked and written as best-N.toml with NaN figures,
    # 0 of its rounds (audit 41). Its advice was `fmlray run`'s (--set run.name, --overwrite)
    path = spec(tmp_path, text=RESUMABLE.replace('name = "r"', 'name = "o"').replace("samples = 3", "samples = 2"))
    folder = tmp_path / "runs" / "o"
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "fmlray", "tune", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not (folder / "trial-00000").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    (folder / "trial-00001").mkdir()  # while the first trial runs: in the second's way
    (folder / "trial-00001" / "mine.txt").write_text("mine")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, (out, err[-3000:])
    line = err.strip().splitlines()[-1]
    assert "trial-00001 is in the way of this trial's run" in line and "--resume" in line, err[-3000:]
    assert "Traceback" not in err and "--overwrite" not in line, err[-3000:]
    shutil.move(folder / "trial-00001", tmp_path / "aside")
    assert main(["tune", str(path), "--resume"]) == 0
    assert "[2/2] trial-00001: done" in capsys.readouterr().out
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    assert sorted((t["trial"], t["complete"], t["error"]) for t in trials) == [("trial-00000", True, ""),
                                                                              ("trial-00001", True, "")]
    assert (tmp_path / "aside" / "mine.txt").read_text() == "mine"
