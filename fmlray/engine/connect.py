"""Joining a Ray cluster, or starting a private local Ray for one run, with one-line errors.

Kept apart from the engine (which imports torch) so that a run can start its private Ray in a thread
while the driver imports torch and loads the data (`start_early`): on two cores, ~1 s of start-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import warnings

import psutil
import ray

from fmlray import signals
from fmlray.config import ascii_digits
from fmlray.errors import ResourceError


MAX_TIMEOUT_S = 1_000_000


def _timeout(name: str, default: float) -> float:
    """A deadline in seconds from the environment (read when used, so a test can shorten it)."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        raise ResourceError(f"{name}={os.environ[name]!r} is not a number of seconds") from None
    if not 0 < value <= MAX_TIMEOUT_S:  # NaN too; Ray's waits take at most ~24 days (int32 milliseconds)
        raise ResourceError(f"{name} must be a number of seconds above 0, at most {MAX_TIMEOUT_S:,} "
                            f"(unset: {default:g}), got {os.environ[name]!r}")
    return value


def _host_port(address: str) -> tuple[str, int] | None:
    """("host", port) of a plain "host:port" address; None for "auto", "ray://..." and forms Ray judges."""
    host, _, port = address.rpartition(":")
    if not host or not ascii_digits(port) or "://" in address:
        return None
    return host.strip("[]"), int(port)


def _reachable(address: str) -> bool:
    """A quick TCP check of a "host:port" or "ray://host:port" address (the Ray Client server's port), so a wrong
    one fails now instead of after minutes (Ray's client retried ~35 s, then warned in three lines)."""
    where = _host_port(address.removeprefix("ray://"))
    if where is None:
        return True
    try:
        socket.create_connection(where, timeout=3).close()
        return True
    except OSError:
        return False


def _serves_ray(address: str, timeout: float) -> bool:
    """Whether `address` answers a gRPC health check with SERVING within `timeout` seconds. Ray's GCS
    does (without a token); an HTTP server or anything else that merely accepts TCP does not, where
    `ray.init` would retry for minutes printing C++ warnings."""
    import grpc
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:  # wait_for_ready: a head that is still starting gets the whole deadline
            reply = check(b"", timeout=timeout, wait_for_ready=True)
        except grpc.RpcError:
            return False
    return reply == b"\x08\x01"  # HealthCheckResponse{status: SERVING}


def _asks_for_token(address: str, timeout: float) -> bool:
    """Whether the GCS at `address` refuses a call without a token (Ray 2.60 turns token auth on for every new
    head). A driver outside token mode then retried for ~20 s, printing a C++ warning each time, and failed
    without saying why."""
    import grpc
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")
        try:
            call(b"", timeout=timeout)  # an empty GetClusterIdRequest
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def _check_head(address: str, hint: str) -> None:
    """Fail in one line, within FMLRAY_CONNECT_TIMEOUT_S, unless a Ray head answers at "host:port"."""
    if not _reachable(address):
        raise ResourceError(f"no Ray cluster answers at {address}; {hint}")
    if _host_port(address) is None or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return  # "ray://..." or a TLS cluster: Ray itself judges those
    timeout = _timeout("FMLRAY_CONNECT_TIMEOUT_S", 30)
    if not _serves_ray(address, timeout):
        raise ResourceError(f"{address} accepts connections but is not a Ray cluster (no Ray GCS answered within "
                            f"{timeout:g}s; FMLRAY_CONNECT_TIMEOUT_S sets this deadline); {hint}")
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token" and _asks_for_token(address, timeout):
        raise ResourceError(f"the Ray cluster at {address} asks for a token (token authentication, on for every new "
                            "head since Ray 2.60): set RAY_AUTH_MODE=token, with the head's token in "
                            "~/.ray/auth_token or RAY_AUTH_TOKEN")


def _ray_start_address() -> tuple[str, str | None]:
    """Ray's address file (`ray_current_cluster`, which `ray start` writes in Ray's temp folder) and
    the address in it, or None when there is none."""
    from ray._common.utils import get_ray_address_file
    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            return path, f.read().strip() or None
    except FileNotFoundError:
        return path, None


@contextlib.contextmanager
def _environ(**values: str | None):
    """Set (or, with None, remove) environment variables inside the block; restore them after."""
    def put(items):
        for k, v in items:
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    old = [(k, os.environ.get(k)) for k in values]
    put(values.items())
    try:
        yield
    finally:
        put(old)


def _quiet_error_listener() -> None:
    """Ray's driver polls the GCS for error messages in a thread ("ray_listen_error_messages"). A poll that
    fails with RaySystemError (seen in CI: InvalidAuthToken, both while `ray.shutdown` stopped the thread
    and, in a test process, while Ray ran) ends the thread with a traceback on the driver's stderr, above a
    run's one-line error; Ray ends it quietly only for an OSError. Here that error ends it quietly too: the
    thread only relays the GCS's notes, and a broken GCS fails the run itself, in its own line. Idempotent
    (it wraps Ray's function once)."""
    from ray._private import worker
    listen = worker.listen_error_messages
    if getattr(listen, "fmlray_quiet", False):
        return

    def quiet(ray_worker, threads_stopped) -> None:
        with contextlib.suppress(ray.exceptions.RaySystemError):
            listen(ray_worker, threads_stopped)

    quiet.fmlray_quiet = True
    worker.listen_error_messages = quiet


def _reread_auth() -> None:
    """Make this process read RAY_AUTH_MODE / RAY_AUTH_TOKEN again: Ray caches both at first use (and
    a private Ray of an earlier run in this process left its own there). Ray does the same when it
    turns token auth on for a new local cluster."""
    from ray._raylet import AuthenticationTokenLoader, Config
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def start_private_ray(**resources) -> None:
    """Start a new single-node Ray for this process alone (`resources`: ray.init's num_cpus, num_gpus).

    - A new instance whatever the machine holds (address="local"): never a cluster that a `ray start`
      left running, nor a stale address file of one that is gone.
    - Loopback only: every server (GCS, raylet, object manager, agents, workers) listens on
      127.0.0.1. Ray does this where it expects no cluster (macOS, Windows); RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
      asks for it here, read by the processes Ray starts, and the patched constant by this one.
    - A token of its own: nothing else can join it, not even `ray.init(address="auto")`, which finds
      any Ray's GCS on the machine from the process list. Setting the mode explicitly also keeps Ray
      from warning that it turned token authentication on.
    - Without the head's autoscaler monitor and dashboard API server (`_lean_head`).
    """
    from ray._private import ray_constants
    _quiet_error_listener()
    with _environ(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                  RAY_AUTH_TOKEN=secrets.token_hex(32)), _lean_head(resources.get("log_to_driver", True)):
        loopback, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
        try:
            _reread_auth()
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False,
                     logging_level=logging.WARNING, **resources)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = loopback
    # The processes started keep the token in their environment, and this one in Ray's cache.


@contextlib.contextmanager
def _lean_head(log_to_driver: bool = True):
    """Keep `ray.init` from starting two head processes that a private one-node Ray has no use for: the
    autoscaler monitor (nothing to scale) and the dashboard API server (job submission, state API; nobody can
    reach this Ray anyway). Each is a Python process importing much of Ray: on two cores they took 2.5 s of
    CPU and ~2.3 s of `ray.init`'s 6.4 s (benchmarks/README.md). `ray.init` has no switch for them (with
    include_dashboard=False it still starts the API server), so Ray's node is kept from calling them; a Ray
    without these methods starts them as usual. The trade-off: the dashboard agent, which the raylet still
    starts, logs once a second into Ray's session folder that it finds no dashboard (~2 MB an hour).
    Without `log_to_driver` (the test session's Ray), the log monitor goes too: it only forwards the workers'
    output to the driver, and it rereads every worker's log file all the while (1.1 % of a core in a fresh
    Ray, measured; more as a session's actors leave log files behind)."""
    from ray._private.node import Node
    names = ("start_monitor", "start_api_server") + (() if log_to_driver else ("start_log_monitor",))
    saved = {name: Node.__dict__[name] for name in names if name in Node.__dict__}
    for name in saved:
        setattr(Node, name, lambda self, *args, **kwargs: None)
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(Node, name, method)


@contextlib.contextmanager
def _keep_sigterm():
    """`ray.init` would put in two SIGTERM handlers of its own, and Ray is kept from both, so the handler in
    force (the CLI's: one line, exit 130, see fmlray.signals) hears a SIGTERM that comes while Ray starts:
    - Python's: `sys.exit(15)`, no message, no cleanup of the run, lost outright where it lands in a finaliser;
    - the core worker's C failure-signal handler: a C stack dump on stderr (sometimes a SIGABRT), and, once
      `ray.shutdown` uninstalls it, SIGTERM's default action under Python's handler: a SIGTERM while Ray
      shut down at a run's end killed fmlray at once (exit -15, no line, no outputs). Where the driver
      crashes in C, Python prints no stack for it; Ray's workers keep their own."""
    from ray._private import ray_constants, utils
    install, utils.set_sigterm_handler = utils.set_sigterm_handler, lambda handler: None
    dump, ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER, True
    try:
        yield
    finally:
        utils.set_sigterm_handler = install
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = dump


def connect(address: str) -> bool:
    """Join `address` (or RAY_ADDRESS), else start a private local Ray; True when this call connected
    (or the early start it waits for did).

    "auto" means the cluster a `ray start` on this machine recorded in Ray's address file, and only
    that one (Ray's own "auto" would also join any Ray it finds in the process list, e.g. another
    fmlray run's private one).

    A private Ray starts in a thread (`start_early`, if the run did not already), so that a signal cannot cut
    its start in half: one cut short there left Ray's agents running for a minute (a Ctrl-C while a sweep's
    trials started); `abandon_early` shuts down what there is."""
    start_early(address)
    if _early:
        try:
            return _join_early()
        except BaseException:
            abandon_early()
            raise
    if ray.is_initialized():
        return False
    with _keep_sigterm():
        return _connect(address)


# The private Ray a run began starting before it needed it: {"ready": Event, "box": {"owned" | "error": ...}}.
_early: dict = {}
_parked: list[threading.Event] = []  # releases the threads that started a Ray, once it is shut down


class _NotMainThread(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # Ray's note that a thread sets no SIGTERM handler
        return not record.getMessage().startswith("SIGTERM handler is not set")


def start_early(address: str) -> None:
    """Begin starting the private Ray in a thread, where the run would start one (no address, no RAY_ADDRESS,
    none up): it comes up while the driver imports torch and loads the data, and `connect` waits for it.
    Ray installs no signal handler from a thread, so the CLI's SIGTERM handler stays in force meanwhile.

    The thread stays (parked) until `release` after Ray is shut down: Ray ties the processes it starts to
    the life of the *thread* that started them (Linux's parent-death signal), so they would die with it."""
    if _early or address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return
    box: dict = {}
    ready, park = threading.Event(), threading.Event()

    def up() -> None:
        quiet = _NotMainThread()
        logging.getLogger("ray._private.worker").addFilter(quiet)
        try:
            with _keep_sigterm():
                box["owned"] = _connect("")
        except BaseException as exc:  # handed to the main thread by `connect`
            box["error"] = exc
        finally:
            logging.getLogger("ray._private.worker").removeFilter(quiet)
            ready.set()
        park.wait()

    _parked.append(park)
    threading.Thread(target=up, name="fmlray-ray-start", daemon=True).start()
    _early.update(ready=ready, box=box)


def _join_early() -> bool:
    """Wait for the early start; a wait cut by a signal leaves it to `abandon_early`, which waits again."""
    ready, box = _early["ready"], _early["box"]
    ready.wait()
    _early.clear()
    if "error" in box:
        raise box["error"]
    return box["owned"]


def release() -> None:
    """Ray is shut down: let the threads that started one end."""
    while _parked:
        _parked.pop().set()


def shut_down() -> None:
    """`ray.shutdown()` of a Ray this process started or joined, shielded from a signal that would cut it in
    half (`signals.shielded`), then `release`."""
    with signals.shielded():
        started = _started_processes()
        ray.shutdown()
        for proc in started:  # what outlived it (see `_started_processes`)
            with contextlib.suppress(psutil.Error):
                proc.kill()
    release()


def own_ray_gone() -> bool:
    """Whether this process started its Ray and that Ray's GCS or raylet has died: then nothing answers a call
    (a SIGTERM to the whole process group reaches them too), and a wait for one only runs out its timeout."""
    node = getattr(ray._private.worker, "_global_node", None)
    for name in ("gcs_server", "raylet"):
        for info in (node.all_processes.get(name, []) if node is not None else []):
            if info.process.poll() is not None:
                return True
    return False


def _started_processes() -> list[psutil.Process]:
    """The processes of the Ray this process started, if it did (its head's daemons, and what the raylet
    started: agents, workers); none for a Ray it joined. `ray.shutdown` ends them, except where it comes
    while the raylet is still starting (a signal during start-up): then the raylet dies before its
    dashboard and runtime-env agents are up, and each waits 60 s for a GCS that is gone to hear that, as
    orphans holding ~200 MB. psutil's `kill` checks that a pid still names the same process."""
    node = getattr(ray._private.worker, "_global_node", None)
    found = []
    for infos in (node.all_processes.values() if node is not None else []):
        for info in infos:
            with contextlib.suppress(psutil.Error):
                head = psutil.Process(info.process.pid)
                found += [head] + head.children(recursive=True)
    return found


def abandon_early() -> None:
    """A run that fails before its engine starts: wait for an early start and shut that Ray down."""
    if _early:
        try:
            owned = _join_early()
        except BaseException:
            owned = True  # half started: shut down what there is
        if owned and ray.is_initialized():
            shut_down()
    if not ray.is_initialized():
        release()


def _connect(address: str) -> bool:
    _quiet_error_listener()
    _reread_auth()
    where = "engine.address" if address else "RAY_ADDRESS"  # what the user set, for the messages
    address = address or os.environ.get("RAY_ADDRESS", "")
    hint = "check engine.address / RAY_ADDRESS, or leave both empty for a local Ray"
    if address.lower().startswith(("http://", "https://")):  # Ray's own message on it is cut by our one line
        raise ResourceError(f"{where} = {address} is an HTTP address (a dashboard's, for `ray job submit`); give "
                            "the cluster's GCS address (HOST:PORT, 6379 unless `ray start --port` said otherwise), "
                            "or \"auto\" for the `ray start` cluster on this machine")
    if not address:
        try:
            start_private_ray()
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
            raise ResourceError(f"cannot start a local Ray ({_first_line(exc)})") from None
        except OSError as exc:  # e.g. TMPDIR a file, or so deep that Ray's socket paths pass 107 bytes
            from ray._common.utils import get_default_ray_temp_dir
            raise ResourceError(f"cannot start a local Ray in its temp folder {get_default_ray_temp_dir()} "
                                f"({_first_line(exc)}); set TMPDIR (or RAY_TMPDIR) to a short, writable folder "
                                "such as /tmp") from None
        except Exception as exc:  # Ray's bare Exception when its raylet has not registered within 30 s (a busy machine)
            if signals.raised_by_handler(exc):
                raise
            with contextlib.suppress(Exception):
                ray.shutdown()  # what came up of it
            raise ResourceError(f"cannot start a local Ray ({_first_line(exc)}); the machine may be too busy "
                                "right now: try again when it is quieter") from None
        return True
    if address == "auto":
        path, recorded = _ray_start_address()
        if recorded is None:
            raise ResourceError(f"{where}=auto: no `ray start` cluster on this machine (no {path}; a head started "
                                "with --temp-dir keeps its file there: give its address, HOST:PORT, instead); start "
                                f"one with `ray start --head`, give a cluster's address, or leave {where} empty for a "
                                "private local Ray")
        if not _reachable(recorded):
            raise ResourceError(f"{where}=auto: {path} names {recorded}, but no Ray head answers there (a "
                                "`ray start` that ended without `ray stop` left it); start the head again, delete "
                                f"that file, or leave {where} empty for a private local Ray")
        # What Ray does for "auto" (and only then): token auth on when a token exists and the mode is unset.
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        _check_head(recorded, hint)
        address = recorded  # given as is: Ray's "auto" might pick another GCS from the process list
    else:
        _check_head(address, hint)
    try:
        with warnings.catch_warnings():  # the client's timeout warning: the one line below says it
            warnings.filterwarnings("ignore", message="Ray Client connection timed out")
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        raise ResourceError(f"cannot join the Ray cluster at {address} ({_first_line(exc)}); {hint}") from None
    return True


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
