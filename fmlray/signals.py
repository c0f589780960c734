"""SIGTERM outside the rounds: the CLI's handler raises `Terminated`, which unwinds every `finally` (the
engine closes, a new run folder goes) and ends the command with one line and exit 130.

Python runs a signal handler between two bytecodes of the main thread; when those belong to a finaliser or
a callback (a weakref's, logging's fork hook), an exception raised there is printed as "Exception ignored
in ..." and dropped. So the handler also leaves a mark, and `check` raises again where start-up is over.
Ray's workers lose a SIGTERM the same way; `redeliver_lost_sigterm` sends it again there."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


class Terminated(BaseException):
    """SIGTERM outside the rounds (start-up, between a sweep's runs); like KeyboardInterrupt, it
    passes `except Exception`."""


# A plain flag, not a threading.Event: Event.set takes a lock, and a second SIGTERM arriving while the first
# handler held it ran the handler again inside it, which then waited on that lock for ever (the process deaf to
# every later SIGTERM). Only the main thread runs handlers and reads the flag.
_seen = False
# Every SIGINT / SIGTERM a run took without ending at once: a stop after the round (`simulation.StopOnSignal`), or
# a finish `shielded` from it. A run that ended anyway (the signal came in its last round, or while it wrote its
# outputs) returns normally; a command with more runs to do (compare, a sequential sweep) stops after it.
_asked: list[str] = []


def terminate(signum, frame) -> None:
    global _seen
    _seen = True
    raise Terminated


def check() -> None:
    """Raise `Terminated` if a SIGTERM came (and its raise was lost) since `reset`."""
    if _seen:
        raise Terminated


def reset() -> None:
    global _seen
    _seen = False


def record(signum: int) -> None:
    """A run took signal `signum` as a request to stop (or finish) rather than end at once."""
    _asked.append(signal.Signals(signum).name)


def asked() -> int:
    """A mark for `asked_since`."""
    return len(_asked)


def asked_since(mark: int) -> str | None:
    """The name of the first signal a run took since `mark` (`asked()`), or None."""
    return _asked[mark] if len(_asked) > mark else None


def raised_by_handler(exc: BaseException) -> BaseException | None:
    """The KeyboardInterrupt or `Terminated` a signal handler raised inside one of Ray's C calls (`ray.wait`,
    `ray.get` run the handlers while they wait): Ray hands it back as a SystemError ("returned a result with
    an exception set") caused by it. None for any other exception."""
    cause = exc.__cause__ if isinstance(exc, SystemError) else None
    return cause if isinstance(cause, (KeyboardInterrupt, Terminated)) else None


def sigint_ignored() -> bool:
    """Whether this process was started with SIGINT ignored, as a shell starts a script's background jobs
    (so that Ctrl-C ends the script, not them). fmlray keeps it ignored, as Python and the shell tools do."""
    return signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@contextlib.contextmanager
def shielded(doing: str = "shutting down"):
    """Work at a run's end that a signal must not cut in half (the engine's close, `ray.shutdown`, the run's
    outputs): a cut shut-down left Ray's agents running and the interpreter's own `ray.shutdown` at exit
    interrupted in turn. A SIGINT or SIGTERM inside is announced and the work finishes (the run is ending
    anyway); a second SIGINT abandons it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came = []

    def note(signum, frame) -> None:
        if came and signum == signal.SIGINT:
            raise KeyboardInterrupt
        came.append(signum)
        record(signum)
        again = "Ctrl-C again" if signum == signal.SIGINT else "a Ctrl-C (SIGINT)"  # a second SIGTERM: ignored
        print(f"{signal.Signals(signum).name}: {doing} first ({again} to abandon that)", file=sys.stderr, flush=True)

    sigs = [signal.SIGTERM] + ([] if sigint_ignored() else [signal.SIGINT])
    previous = {sig: signal.signal(sig, note) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def held():
    """SIGINT and SIGTERM wait for the end of the block, then go to the handler that was there. For the import
    of a C extension (matplotlib's): a handler's exception inside its initialisation failed it as an ImportError,
    with a traceback, or aborted Python ("PyThreadState_Get: ... the GIL is released")."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came = []
    sigs = [signal.SIGTERM] + ([] if sigint_ignored() else [signal.SIGINT])
    previous = {sig: signal.signal(sig, lambda signum, frame: came.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in came:  # in turn, each to the handler itself: Python would run two raised SIGINTs as one
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


_redelivering = False


def redeliver_lost_sigterm() -> None:
    """In a Ray worker process (client actor, aggregator, Tune trial): a SIGTERM whose exit was lost in a
    callback is sent again, so the worker ends as Ray meant it to.

    Ray's worker handler raises SystemExit where the signal lands; inside a weakref's callback Python
    prints it ("Exception ignored in ... SystemExit: 1", seen at the end of parallel sweeps) and goes on,
    so the worker outlived its SIGTERM until Ray killed it. The hook marks such a loss and a waiting thread
    sends the signal again, after the callback has returned (a signal sent from within the hook would be
    handled inside it). Other unraisable exceptions go to the hook that was there before."""
    global _redelivering
    if _redelivering:
        return
    _redelivering = True
    lost = threading.Event()

    def again() -> None:
        while True:
            lost.wait()
            lost.clear()
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=again, name="fmlray-sigterm-again", daemon=True).start()
    before = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, SystemExit) and "SIGTERM" in getattr(unraisable.exc_value,
                                                                                   "ray_terminate_msg", ""):
            lost.set()
        else:
            before(unraisable)

    sys.unraisablehook = hook
