"""What `connect()` decides before any Ray starts: which address "auto" means, and a deadline for an
address with no Ray behind it. (Real heads and private runs: tests/integration/test_private_ray.py.)"""

import http.server
import socket
import threading

import pytest

from fmlray.engine.connect import _host_port, _serves_ray, _timeout, connect
from fmlray.errors import ResourceError


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.1:6379", ("10.0.0.1", 6379)),
    ("[::1]:6379", ("::1", 6379)),
    ("auto", None),
    ("ray://10.0.0.1:10001", None),
    ("10.0.0.1", None),
    ("10.0.0.1:²", None),  # a digit to str.isdigit(), not to int()
])
def test_only_plain_host_port_addresses_are_probed(address, expected):
    assert _host_port(address) == expected


def test_the_connect_deadline_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("FMLRAY_CONNECT_TIMEOUT_S", raising=False)
    assert _timeout("FMLRAY_CONNECT_TIMEOUT_S", 30) == 30
    monkeypatch.setenv("FMLRAY_CONNECT_TIMEOUT_S", "2.5")
    assert _timeout("FMLRAY_CONNECT_TIMEOUT_S", 30) == 2.5
    for bad, message in (("soon", "is not a number of seconds"), ("0", "must be a number of seconds above 0, at most "
                                                                         "1,000,000 \\(unset: 30\\), got '0'"),
                         ("nan", "got 'nan'"), ("inf", "got 'inf'"), ("-1", "got '-1'")):
        monkeypatch.setenv("FMLRAY_CONNECT_TIMEOUT_S", bad)
        with pytest.raises(ResourceError, match=message):
            _timeout("FMLRAY_CONNECT_TIMEOUT_S", 30)


def test_a_bad_actor_start_deadline_is_one_line_before_the_ray_engine_starts_anything(monkeypatch):
    # FMLRAY_READY_TIMEOUT_S was read when fmlray imported its Ray engine: "abc" was a traceback, "-1" one
    # from Ray's wait once the actors had started
    from fmlray.config import load_config
    from fmlray.engine.ray_engine import RayEngine
    for bad in ("abc", "-1", "nan"):
        monkeypatch.setenv("FMLRAY_READY_TIMEOUT_S", bad)
        with pytest.raises(ResourceError, match=f"FMLRAY_READY_TIMEOUT_S.*'{bad}'"):
            RayEngine().start(load_config(None, ["engine.kind=ray"]), None, None)  # nothing read before it


class Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_an_http_server_is_not_taken_for_a_ray_head():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert _serves_ray(f"127.0.0.1:{server.server_address[1]}", timeout=1) is False
    finally:
        server.shutdown()


@pytest.fixture
def ray_tmpdir(monkeypatch, tmp_path):
    """Ray's temp folder for this test alone (RAY_TMPDIR), never the machine's /tmp/ray."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # In a whole-suite run the integration tests' session Ray is up, and connect() leaves a live Ray as
    # it is; these tests are about what connect() does before any Ray exists in this process.
    import ray
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    return tmp_path


def test_auto_without_a_ray_start_cluster_is_refused(ray_tmpdir):
    with pytest.raises(ResourceError, match=rf"no `ray start` cluster on this machine \(no {ray_tmpdir}/ray/"):
        connect("auto")


def test_auto_with_a_stale_address_file_names_the_file_and_the_dead_address(ray_tmpdir):
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(dead + "\n")
    with pytest.raises(ResourceError) as caught:
        connect("auto")
    assert str(caught.value).startswith(f"engine.address=auto: {ray_tmpdir}/ray/ray_current_cluster names {dead}, "
                                        "but no Ray head answers there")


def test_ray_address_auto_in_the_environment_means_the_same(ray_tmpdir, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(ResourceError, match="^RAY_ADDRESS=auto: no `ray start` cluster on this machine"):
        connect("")  # named as the user set it (it said engine.address=auto)


@pytest.mark.parametrize("set_as", ["engine.address", "RAY_ADDRESS"])
def test_an_http_address_says_what_to_give_instead(monkeypatch, set_as):
    # Ray's own message was cut, by the one line, just before its advice ("To fix this, either:)")
    import ray
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265" if set_as == "RAY_ADDRESS" else "")
    with pytest.raises(ResourceError) as caught:
        connect("http://127.0.0.1:8265" if set_as == "engine.address" else "")
    assert str(caught.value) == (f"{set_as} = http://127.0.0.1:8265 is an HTTP address (a dashboard's, for `ray job "
                                 "submit`); give the cluster's GCS address (HOST:PORT, 6379 unless `ray start --port` "
                                 "said otherwise), or \"auto\" for the `ray start` cluster on this machine")


@pytest.mark.parametrize("where", ["a file", "too deep"])
def test_a_temp_folder_ray_cannot_use_is_one_line_and_leaves_no_run(tmp_path, where):
    import os
    import subprocess
    import sys
    if where == "a file":
        tmp = tmp_path / "afile"
        tmp.write_text("x")
    else:  # Ray's socket paths under it would pass the 107 bytes an AF_UNIX path may have
        tmp = tmp_path / ("d" * 100)
        tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_TMPDIR", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-m", "fmlray", "run", "--set", "run.rounds=1", "--set",
                          f"run.output_dir={tmp_path / 'runs'}"], env={**env, "TMPDIR": str(tmp)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("fmlray: error: cannot start a local Ray in its temp folder") and \
        "set TMPDIR" in out.stderr and len(out.stderr.splitlines()) == 1
    assert not (tmp_path / "runs" / "digits-fml").exists()


def test_a_local_ray_that_times_out_starting_is_one_line(monkeypatch):
    from fmlray.engine import connect as conn
    from fmlray.errors import ResourceError

    def slow():  # what Ray raises, a bare Exception, when its raylet has not registered within 30 s
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")
    monkeypatch.setattr(conn, "start_private_ray", slow)
    monkeypatch.setattr(conn.ray, "shutdown", lambda: None)  # not this worker's session Ray, if it has one
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ResourceError) as info:
        conn._connect("")
    assert str(info.value) == ("cannot start a local Ray (The current node timed out during startup. This could happen "
                               "because some of the raylet failed to startup or the GCS has become overloaded.); the "
                               "machine may be too busy right now: try again when it is quieter")


def test_the_drivers_error_listener_ends_quietly_on_a_ray_system_error(monkeypatch):
    # seen in CI: the thread's RaySystemError (InvalidAuthToken) from a failed poll printed a traceback
    # above a run's one-line error
    import threading

    import ray
    from ray._private import worker

    from fmlray.engine.connect import _quiet_error_listener

    def poll_fails(ray_worker, threads_stopped):
        raise ray.exceptions.RaySystemError("InvalidAuthToken: Authentication token is missing or incorrect")

    monkeypatch.setattr(worker, "listen_error_messages", poll_fails)
    _quiet_error_listener()
    _quiet_error_listener()  # once only: not a wrapper of a wrapper
    quiet, stopped = worker.listen_error_messages, threading.Event()
    assert quiet is not poll_fails and quiet.__closure__[0].cell_contents is poll_fails
    assert quiet(None, stopped) is None  # while Ray runs
    stopped.set()
    assert quiet(None, stopped) is None  # once ray.shutdown has told the thread to stop

    def other_error(ray_worker, threads_stopped):
        raise ValueError("not Ray's")

    monkeypatch.setattr(worker, "listen_error_messages", other_error)
    _quiet_error_listener()
    with pytest.raises(ValueError):  # anything else stays as loud as Ray makes it
        worker.listen_error_messages(None, stopped)
