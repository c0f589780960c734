"""Private Rays for tests: the session's own, and `ray start` heads stopped by their own process
ids (never `ray stop`, which would end every Ray on the machine, other test sessions' included)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    """This environment with the venv's bin first on PATH: a job's `python` must be the venv's."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "RAY_ADDRESS": "", **extra}


def start_session_ray() -> None:
    """The test session's Ray: always a new one of its own (never a cluster found through RAY_ADDRESS, a
    live `ray start` or a stale address file of a dead one), on loopback, that nothing else can join.
    Logical GPUs let the scheduler pack fractional-GPU actors on a CPU-only machine."""
    from fmlray.engine.connect import start_private_ray
    # log_to_driver=False: the workers' stderr (e.g. a Tune trial worker that Ray's SIGTERM ends inside a
    # weakref callback, "Exception ignored ... SystemExit: 1") must not land in whichever test's captured
    # stderr is open at the time; tests that assert one-line errors read it
    start_private_ray(num_cpus=2, num_gpus=2, log_to_driver=False)


class PrivateHead:
    """`ray start --head` with its own temp dir (short: Unix socket paths are limited) and ports."""

    def __init__(self, num_cpus: int = 2):
        # <tmpdir>/ray, as Ray lays out its default folder: RAY_TMPDIR=<tmpdir> then finds this head's
        # address file where it would find a plain `ray start`'s in /tmp/ray
        self.tmpdir = tempfile.mkdtemp(prefix="fr", dir="/tmp")
        self.temp_dir = os.path.join(self.tmpdir, "ray")
        # the job agent's HTTP port too: its default (52365) is taken by any other Ray on the machine (a sweep,
        # a benchmark), and then `ray job submit` waits for an agent that never came up
        self.port, self.dashboard_port, self.agent_port = free_port(), free_port(), free_port()
        self.num_cpus = num_cpus

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process that talks to this head: HOME is the head's folder, so the
        token `ray get-auth-token --generate` writes (~/.ray/auth_token) is this head's alone."""
        return env(HOME=self.tmpdir, **extra)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """`ray start --head --block` in the background, as the README shows: the head lives as long as
        that process, and ends (all of it, nothing else) when it gets SIGTERM."""
        os.makedirs(self.temp_dir)
        # the README's first step: a head in token mode refuses to start without a token (a fresh machine has none)
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=self.env(), check=True,
                       capture_output=True, timeout=120)
        self.log = open(Path(self.temp_dir) / "ray-start.log", "w")
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", f"--num-cpus={self.num_cpus}",
             f"--dashboard-agent-listen-port={self.agent_port}", f"--temp-dir={self.temp_dir}",
             "--include-dashboard=true", "--disable-usage-stats"],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env(RAY_AUTH_MODE="token"))
        # `ray start` writes the address file into its temp dir once the head is up, then blocks
        address_file = Path(self.temp_dir) / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not address_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start --head failed: " + (Path(self.temp_dir) / "ray-start.log").read_text()[-3000:])
            time.sleep(0.5)

    def processes(self) -> list[psutil.Process]:
        """Every process of this head: those naming its temp dir or GCS port, and all their descendants."""
        marks = (self.temp_dir, f":{self.port}")  # the Ray client server names only the GCS address
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if any(self.temp_dir in part or part.endswith(marks[1]) for part in cmd):
                roots.append(p)
        found = {p.pid: p for p in roots}
        for p in roots:
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        return list(found.values())

    def stop(self) -> list[str]:
        """SIGTERM to `ray start --block` (what the README says to do); returns what was still running
        after it, which is then killed by process id (repeated: a dying raylet may still spawn a worker)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        time.sleep(2)  # workers notice their raylet is gone within a moment
        left = [_describe(p) for p in self.processes() if _alive(p)]
        for attempt in range(5):
            procs = [p for p in self.processes() if _alive(p)]
            if not procs:
                break
            for p in procs:
                _signal(p, psutil.Process.kill if attempt else psutil.Process.terminate)
            psutil.wait_procs(procs, timeout=10)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        return left


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:120]}"
    except psutil.NoSuchProcess:
        return f"{p.pid} (gone)"


def _signal(p: psutil.Process, how) -> None:
    try:
        how(p)
    except psutil.NoSuchProcess:
        pass
