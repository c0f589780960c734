"""Which Ray a run joins: its own private one whatever the machine holds (a stale `ray start` address
file, another run's Ray), on loopback only; `auto` only a `ray start` cluster; and one line, exit 2, for
an address with no Ray behind it."""

import http.server
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import pytest

from raynodes import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
QUICK = ["--set", "run.rounds=1", "--set", "training.epochs=1"]


def ray_tmpdir() -> str:
    """A Ray temp folder of this test's own (RAY_TMPDIR): never the machine's /tmp/ray, which other
    sessions use. Short, since Ray's socket paths live under it."""
    return tempfile.mkdtemp(prefix="fr", dir="/tmp")


def env_with(tmpdir: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    return {**env, "RAY_TMPDIR": tmpdir, "PYTHONPATH": str(REPO), **extra}


def fmlray(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmlray", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


@pytest.fixture(scope="module")
def stale():
    """A Ray temp folder whose address file names a head that is gone: what a `ray start` leaves when
    it ends without `ray stop` (killed, crashed, suspended)."""
    tmpdir = ray_tmpdir()
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    (Path(tmpdir) / "ray").mkdir()
    (Path(tmpdir) / "ray" / "ray_current_cluster").write_text(dead)
    yield tmpdir, dead
    shutil.rmtree(tmpdir, ignore_errors=True)


def test_the_stale_address_file_is_what_ray_itself_joins(stale):
    # Prepare: the situation of issue 17 is real only if a plain ray.init() trips over this file
    tmpdir, dead = stale
    code = "import ray; ray.init(num_cpus=2, num_gpus=2)"
    # Execute
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=env_with(tmpdir))
    # Assert
    assert proc.returncode != 0
    assert "When connecting to an existing cluster, num_cpus and num_gpus must not be provided" in proc.stderr


STARTS = {
    "the test session's fixture": ("import raynodes; raynodes.start_session_ray()", {"CPU": 2.0, "GPU": 2.0}),
    "the benchmarks": ("import benchlib; benchlib.start_ray(1)", {"CPU": 1.0}),
}


@pytest.mark.parametrize("who", sorted(STARTS))
def test_a_stale_address_file_does_not_stop_a_private_ray(stale, who):
    tmpdir, dead = stale
    start, expected = STARTS[who]
    code = (f"import sys, json; sys.path[:0] = [{str(HERE)!r}, {str(REPO / 'benchmarks')!r}]\n"
            f"import ray\n{start}\n"
            "print(json.dumps([ray.cluster_resources(), ray.get_runtime_context().gcs_address]))\n"
            "ray.shutdown()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          env=env_with(tmpdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    resources, gcs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k: resources.get(k) for k in expected} == expected and gcs != dead
    assert "Token authentication is enabled" not in proc.stderr


def test_fmlray_run_is_unaffected_by_a_stale_address_file(stale, tmp_path):
    tmpdir, _ = stale
    proc = fmlray("run", *QUICK, "--set", f"run.output_dir={tmp_path}", env=env_with(tmpdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "digits-fml" / "metrics.parquet").is_file()


def test_auto_with_a_stale_address_file_is_one_line_and_exit_2(stale, tmp_path):
    tmpdir, dead = stale
    proc = fmlray("run", "--address", "auto", "--set", f"run.output_dir={tmp_path}", env=env_with(tmpdir))
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"fmlray: error: engine.address=auto: {tmpdir}/ray/ray_current_cluster names {dead}, "
                           "but no Ray head answers there")
    assert list(tmp_path.iterdir()) == []


def test_auto_without_a_ray_start_cluster_says_so(tmp_path):
    tmpdir = ray_tmpdir()
    try:
        proc = fmlray("run", "--address", "auto", "--set", f"run.output_dir={tmp_path}", env=env_with(tmpdir))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fmlray: error: engine.address=auto: no `ray start` cluster on this machine (no {tmpdir}/ray/"
        "ray_current_cluster; a head started with --temp-dir keeps its file there: give its address, HOST:PORT, "
        "instead); start one with `ray start --head`, give a cluster's address, or leave engine.address empty for "
        "a private local Ray"]


class Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # Ray's HTTP/2 preface would be logged as a bad request
        pass


def test_an_address_that_is_not_ray_fails_within_the_deadline(tmp_path):
    # Prepare: something that accepts TCP but is no Ray (before, ray.init retried for minutes)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    tmpdir = ray_tmpdir()
    try:
        # Execute
        proc = fmlray("run", "--address", address, "--set", f"run.output_dir={tmp_path}",
                      env=env_with(tmpdir, FMLRAY_CONNECT_TIMEOUT_S="3"), timeout=120)
    finally:
        server.shutdown()
        shutil.rmtree(tmpdir, ignore_errors=True)
    # Assert
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fmlray: error: {address} accepts connections but is not a Ray cluster (no Ray GCS answered within 3s; "
        "FMLRAY_CONNECT_TIMEOUT_S sets this deadline); check engine.address / RAY_ADDRESS, or leave both empty "
        "for a local Ray"]
    assert list(tmp_path.iterdir()) == []


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def listening(root: psutil.Process) -> list[tuple[str, str]]:
    """(process name, address) of every listening inet socket of `root` and its descendants."""
    found = []
    for p in [root, *root.children(recursive=True)]:
        try:
            found += [(p.name(), c.laddr.ip) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return found


def python_scripts(root: psutil.Process) -> set[str]:
    """The file names of the Python scripts `root`'s descendants run (e.g. Ray's log_monitor.py)."""
    found = set()
    for p in root.children(recursive=True):
        try:
            found |= {Path(a).name for a in p.cmdline()[:3] if a.endswith(".py")}
        except psutil.NoSuchProcess:
            pass
    return found


def gcs_address_of(root: psutil.Process) -> str:
    for p in root.children(recursive=True):
        try:
            args = p.cmdline()
        except psutil.NoSuchProcess:  # gone, or a zombie (a worker ending)
            continue
        for arg in args:
            if arg.startswith("--gcs-address="):
                return arg.split("=", 1)[1]
    raise AssertionError("no process of the run names its GCS address")


def test_a_private_run_listens_on_loopback_only_and_nothing_else_can_join_it(tmp_path):
    tmpdir = ray_tmpdir()
    # 4 clients: small rounds, as the run only has to be alive while the probes below look at it
    cmd = [sys.executable, "-m", "fmlray", "run", "--set", "run.rounds=1000", "--set", "training.epochs=1",
           "--set", "clients.num_clients=4", "--set", f"run.output_dir={tmp_path}"]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with(tmpdir),
                           cwd=REPO)
    try:
        for line in run.stdout:  # round 1 done: Ray, its agents, the aggregator and the client actors are up
            if line.startswith("round"):
                break
        root = psutil.Process(run.pid)
        sockets = listening(root)
        scripts = python_scripts(root)
        gcs = gcs_address_of(root)
        # fmlray's `auto` looks for a `ray start` cluster only, not for any Ray it can find
        auto = fmlray("run", "--address", "auto", *QUICK, "--set", f"run.output_dir={tmp_path / 'auto'}",
                      env=env_with(tmpdir))
        # Ray itself, even given the address, with a token that is not the run's (as ~/.ray/auth_token would
        # be); RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from swapping 127.0.0.1 for the host's outward IP;
        # RAY_gcs_server_port_wait_time_s: Ray retries a refused token once a second for 20 s, 3 tries show it
        join = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={gcs!r})"], capture_output=True,
                              text=True, timeout=180,
                              env=env_with(tmpdir, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                                           RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_gcs_server_port_wait_time_s="3"))
    finally:
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=180)
        shutil.rmtree(tmpdir, ignore_errors=True)
    names = {name for name, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, f"the run's Ray was not found: {sockets}"
    assert [(name, ip) for name, ip in sockets if not is_loopback(ip)] == []
    # a private Ray's head runs no autoscaler monitor and no dashboard API server (connect._lean_head)
    assert "log_monitor.py" in scripts and not {"monitor.py", "dashboard.py"} & scripts, scripts
    assert auto.returncode == 2 and "no `ray start` cluster on this machine" in auto.stderr
    assert join.returncode != 0 and "Authentication token is missing or incorrect" in join.stderr
    assert run.returncode == 130 and "Token authentication is enabled" not in err, err[-3000:]


def test_a_run_that_fails_while_its_ray_starts_early_leaves_no_ray_behind(tmp_path):
    # The private Ray starts in a thread while the data loads; a data error must still end in one line,
    # exit 2, and with that Ray shut down (no process of it left, whatever moment the error came).
    tmpdir = ray_tmpdir()
    try:
        proc = fmlray("run", "--set", f"run.output_dir={tmp_path}", "--set", "clients.num_clients=150",
                      "--set", "data.partition=iid", "--set", "data.min_samples=2", env=env_with(tmpdir))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.startswith("fmlray: error: client") and proc.stderr.count("\n") == 1
        assert list(tmp_path.iterdir()) == []
        left = [p.pid for p in psutil.process_iter(["cmdline"]) if any(tmpdir in a for a in p.info["cmdline"] or [])]
        assert left == [], f"processes of the run's Ray left: {left}"
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def test_an_early_start_is_the_ray_connect_hands_over(tmp_path):
    code = ("import ray\nfrom fmlray.engine import connect as c\nc.start_early('')\nassert c.connect('') is True\n"
            "assert ray.is_initialized() and c.connect('') is False\nc.abandon_early()\nassert ray.is_initialized()\n"
            "ray.shutdown()\nprint('ok')")
    tmpdir = ray_tmpdir()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env=env_with(tmpdir), cwd=REPO)
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

