"""SIGTERM outside the rounds: the CLI's handler raises `Terminated`, which unwinds every `finally` (the
engine closes, a new run folder goes) and ends the command with one line and exit 130.

Python runs a signal handler between two bytecodes of the main thread; when those belong to a finaliser or
a callback (a weakref's, logging's fork hook), an exception raised there is printed as "Exception ignored
in ..." and dropped. So the handler also leaves a mark, and `check` raises again where start-up is over.
Ray's workers lose a SIGTERM the same way; `redeliver_lost_sigterm` sends it again there."""

from __future__ import annotations

import threading


class Terminated(BaseException):
    """SIGTERM outside the rounds (start-up, between a sweep's runs); like KeyboardInterrupt, it
    passes `except Exception`."""


_seen = threading.Event()


def terminate(signum, frame) -> None:
    _seen.set()
    raise Terminated


def check() -> None:
    """Raise `Terminated` if a SIGTERM came (and its raise was lost) since `reset`."""
    if _seen.is_set():
        raise Terminated


def reset() -> None:
    _seen.clear()


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
    import os
    import signal
    import sys

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
