"""Private Rays for tests: the session's own, and `ray start` heads stopped by their own process
ids (never `ray stop`, which would end every Ray on the machine, other test sessions' included)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
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
    from fmlray.engine.ray_engine import start_private_ray
    start_private_ray(num_cpus=2, num_gpus=2)


class PrivateHead:
    """`ray start --head` with its own temp dir (short: Unix socket paths are limited) and ports."""

    def __init__(self, num_cpus: int = 2):
        self.temp_dir = tempfile.mkdtemp(prefix="fr", dir="/tmp")
        self.port, self.dashboard_port = free_port(), free_port()
        self.num_cpus = num_cpus

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                        f"--num-cpus={self.num_cpus}", f"--temp-dir={self.temp_dir}", "--include-dashboard=true",
                        "--disable-usage-stats"], check=True, capture_output=True, timeout=120,
                       env=env())

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

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; repeated, since a dying raylet may still have spawned a worker."""
        for attempt in range(5):
            procs = [p for p in self.processes() if _alive(p)]
            if not procs:
                return
            for p in procs:
                _signal(p, psutil.Process.kill if attempt else psutil.Process.terminate)
            psutil.wait_procs(procs, timeout=10)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(p: psutil.Process, how) -> None:
    try:
        how(p)
    except psutil.NoSuchProcess:
        pass
