"""Beyond one process: three raylets on this machine (runs and Tune trials spread over them), and `ray job
submit` to a private head."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fmlray.config import load_config
from fmlray.engine.serial import SerialEngine
from fmlray.simulation import prepare, simulate
from raynodes import BIN, PrivateHead
from test_trials import GRID, spec  # the same grid of two runs (FML and FedAvg)

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("cluster")]  # one head, one cluster
REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


OVERRIDES = ["run.rounds=3", "training.epochs=1", "engine.kind=ray",
             "clients.groups=[{name='all', share=1.0, local_model='mlp', num_cpus=1}]"]


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    """What ran on one three-raylet cluster (its start is most of a run's time): a sweep's grid as Tune trials,
    each larger than a node; half the clients a round (FML's clients move between the nodes' actors to even the
    rounds out); then the disk store with a worker node removed after round 1's checkpoint. {"trials": (where
    the trials ran, the sweep's folder), run name: (global state, what the script saw)}."""
    folder = tmp_path_factory.mktemp("three-nodes")
    # each trial has two one-CPU actors, so its placement group cannot fit on one node of one CPU (trials of one
    # actor each were placed wherever Ray liked: once all four on one node, as they may be)
    sweep = spec(folder, text=GRID.replace("seeds = [0, 1]", "seeds = [0]"),
                 extra=', "engine.state_store=\'memory\'", "engine.num_actors=2"')
    runs = {"trials": {"sweep": str(sweep), "out": str(folder / "placed.json")},  # first: it needs all three nodes
            "moving": {"overrides": [*OVERRIDES, "clients.fraction=0.5"], "out": str(folder / "moving" / "out.npz")},
            "losing": {"overrides": [*OVERRIDES, "engine.state_store='disk'"], "out": str(folder / "losing" / "out.npz"),
                       "remove_after": 1}}  # last: the node stays gone
    for name in ("moving", "losing"):
        Path(runs[name]["out"]).parent.mkdir()
    # Ray's Cluster writes its address file in Ray's temp folder, where any `ray.init()` on the machine
    # would find it (and find it stale if this test is killed): give it a private one (short: socket paths)
    ray_tmp = tempfile.mkdtemp(prefix="fr", dir="/tmp")
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp}
    try:
        proc = subprocess.run([sys.executable, str(HERE / "multinode_script.py"), json.dumps(list(runs.values()))],
                              capture_output=True, text=True, timeout=600, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"trials": (json.loads(Path(runs["trials"]["out"]).read_text()), folder / "runs" / "grid")} | {
        name: (np.load(runs[name]["out"]), json.loads(Path(runs[name]["out"] + ".json").read_text()))
        for name in ("moving", "losing")}


def serial_run(*extra):
    cfg = load_config(None, [*OVERRIDES, *extra])
    prepared = prepare(cfg)
    engine = SerialEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    return simulate(cfg, prepared.dataset, prepared.partition, engine)


@pytest.fixture(scope="module")
def serial_reference():
    return serial_run()


def assert_matches(serial, state, rows):
    for k, v in serial.global_state.items():
        np.testing.assert_allclose(state[k], v, atol=1e-6, err_msg=k)
    key = lambda r: (r["round"], r["client"], r["model"], r["split"])  # noqa: E731
    a = {key(r): r["accuracy"] for r in serial.rows}
    b = {key(r): r["accuracy"] for r in rows if r["split"] != "recovered"}
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a if not np.isnan(a[k])) < 1e-6


def test_three_nodes_each_host_an_actor_and_match_the_serial_run(three_nodes):
    # half the clients a round: FML's clients move between the nodes' actors, local models and all, to even
    # the rounds out (RayEngine._rebalance), and the models are still the serial run's
    state, info = three_nodes["moving"]
    assert len(info["nodes"]) == 3 and len(info["actor_nodes"]) == 3
    assert sorted(info["actor_nodes"]) == info["nodes"], "SPREAD should put one actor on every node"
    assert info["aggregator_nodes"] == [info["driver_node"]], "the aggregator belongs beside the driver"
    assert info["moved"], "some client should have moved to another node's actor"
    assert_matches(serial_run("clients.fraction=0.5"), state, info["rows"])


def test_a_trial_larger_than_a_node_spans_the_nodes(three_nodes):
    # both runs finished, each with its two actors in a placement group over two or three nodes
    placed, folder = three_nodes["trials"]
    assert len(placed["nodes"]) == 3 and sorted(placed["runs"]) == ["fedavg-s0", "fml-s0"]
    for name, trial in placed["runs"].items():
        assert trial["node"] in placed["nodes"]
        spread = re.search(r"2 client actors on (\d) node\(s\) in the trial's placement group", trial["log"])
        assert spread and int(spread[1]) >= 2, (name, trial["log"])
    assert (folder / "results.parquet").is_file()


def test_losing_a_node_mid_run_loses_nothing(three_nodes, serial_reference):
    # with the disk store: the survivors adopt the lost node's clients from the rows its actor checkpointed
    state, info = three_nodes["losing"]
    assert len(info["nodes"]) == 2  # one raylet gone for good
    recovered = [r for r in info["rows"] if r["split"] == "recovered"]
    assert recovered and {r["round"] for r in recovered} == {2}
    assert "private state of round 1" in recovered[0]["note"]
    for rnd in (1, 2, 3):
        assert {r["client"] for r in info["rows"] if r["round"] == rnd and r["split"] == "train"} == set(range(20))
    assert_matches(serial_reference, state, info["rows"])


@pytest.fixture(scope="module")
def private_head():
    head = PrivateHead(num_cpus=2)
    head.start()
    yield head
    assert head.stop() == [], "SIGTERM to `ray start --block` left processes of its head (and only its) behind"


def ray_job(head: PrivateHead, command: str, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """`ray job <command> --address <head> <args>` as the README says: every `ray job` command needs
    RAY_AUTH_MODE=token (Ray 2.60 turns token auth on for a new head; the job CLI sends the token only
    in token mode). Returns the process and its output."""
    cmd = [str(BIN / "ray"), "job", command, "--address", head.dashboard, *args]
    deadline = time.monotonic() + 600  # a fresh head's job agent may take a while to come up on a busy machine
    while True:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=head.env(RAY_AUTH_MODE="token"),
                              cwd=REPO)
        logs = proc.stdout + proc.stderr
        if "No available agent to submit job" not in logs or time.monotonic() > deadline:
            return proc, logs
        time.sleep(2)


def test_auto_joins_the_cluster_a_ray_start_recorded(private_head, tmp_path):
    # RAY_TMPDIR: Ray's folder is the head's, as /tmp/ray is for a plain `ray start`; RAY_AUTH_MODE
    # unset: joining turns token auth on because a token exists, as Ray's own "auto" does
    env = {k: v for k, v in private_head.env(PYTHONPATH=str(REPO), RAY_TMPDIR=private_head.tmpdir).items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    proc = subprocess.run([sys.executable, "-m", "fmlray", "run", "--address", "auto", "--set", "run.rounds=1",
                           "--set", "training.epochs=1", "--set", f"run.output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 1/1" in proc.stdout and (tmp_path / "digits-fml" / "metrics.parquet").is_file()


def test_an_address_of_a_head_that_asks_for_a_token_says_so_in_one_line(private_head, tmp_path):
    # outside token mode, ray.init retried for ~20 s, printing a C++ warning each time, then said only that it
    # could not connect (audit 45)
    env = {k: v for k, v in private_head.env(PYTHONPATH=str(REPO)).items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    proc = subprocess.run([sys.executable, "-m", "fmlray", "run", "--address", private_head.gcs, "--set",
                           f"run.output_dir={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"fmlray: error: the Ray cluster at {private_head.gcs} asks for a token (token authentication, on for every "
        "new head since Ray 2.60): set RAY_AUTH_MODE=token, with the head's token in ~/.ray/auth_token or "
        "RAY_AUTH_TOKEN"], proc.stderr[-3000:]
    assert not (tmp_path / "runs").exists()


def fmlray_job(*args: str) -> list[str]:
    """What `ray job submit` runs: this checkout (uploaded as the working dir) under the head's python."""
    return ["--working-dir", str(REPO), "--", "python", "-m", "fmlray", "run", "--set", "engine.kind=ray",
            "--set", "training.epochs=1", *args]


def test_ray_job_submit_runs_fmlray_and_writes_its_outputs(private_head, tmp_path):
    runs = tmp_path / "runs"
    proc, logs = ray_job(private_head, "submit", *fmlray_job("--set", "run.rounds=2", "--set", f"run.output_dir={runs}",
                                                             "--set", "run.name=job"))
    assert proc.returncode == 0, logs[-3000:]
    assert "succeeded" in logs and "round 2/2" in logs and "global model, global test set" in logs
    table = pq.read_table(runs / "job" / "metrics.parquet")
    assert set(table.column("round").to_pylist()) == {1, 2}
    assert (runs / "job" / "accuracy.png").stat().st_size > 0


def test_a_relative_output_dir_in_a_job_is_refused_with_one_line(private_head):
    proc, logs = ray_job(private_head, "submit", *fmlray_job("--set", "run.rounds=1"))  # run.output_dir = "runs"
    assert proc.returncode != 0
    assert "fmlray: error: run.output_dir='runs' is relative, but this is a Ray job" in logs and "Traceback" not in logs


def test_a_stopped_job_resumes_from_its_last_checkpoint(private_head, tmp_path):
    # Prepare: a long job, stopped the README's way once round 2 is done
    from fmlray import checkpoint
    runs, job = tmp_path / "runs", f"fmlray-stop-{os.getpid()}"
    where = ("--set", f"run.output_dir={runs}", "--set", "run.name=long")
    proc, logs = ray_job(private_head, "submit", "--no-wait", "--submission-id", job,  # 4 clients: small rounds
                         *fmlray_job("--set", "run.rounds=2000", "--set", "clients.num_clients=4", *where))
    assert proc.returncode == 0, logs[-3000:]
    # the job's checkpoint on disk says its round (each `ray job logs` would cost a Python start and Ray's import)
    manifest, deadline = runs / "long" / "checkpoint" / "manifest.json", time.monotonic() + 300
    while not (manifest.is_file() and json.loads(manifest.read_text())["round"] >= 2):
        assert time.monotonic() < deadline, ray_job(private_head, "logs", job)[1][-3000:]
        time.sleep(0.5)
    # Execute: `ray job stop` sends SIGTERM, then SIGKILL 3 s later; then the README's resume
    proc, logs = ray_job(private_head, "stop", job)
    assert proc.returncode == 0, logs[-3000:]
    stopped = checkpoint.load(runs / "long").round
    proc, logs = ray_job(private_head, "submit", *fmlray_job("--resume", str(runs / "long"),
                                                             "--set", f"run.rounds={stopped + 1}"))
    # Assert
    assert proc.returncode == 0, logs[-3000:]
    assert stopped >= 2 and f"round {stopped + 1}/{stopped + 1}" in logs
    rounds = pq.read_table(runs / "long" / "metrics.parquet").column("round").to_pylist()
    assert sorted(set(rounds)) == list(range(1, stopped + 2))
