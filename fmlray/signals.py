"""SIGTERM outside the rounds: the CLI's handler raises `Terminated`, which unwinds every `finally` (the
engine closes, a new run folder goes) and ends the command with one line and exit 130.

Python runs a signal handler between two bytecodes of the main thread; when those belong to a finaliser or
a callback (a weakref's, logging's fork hook), an exception raised there is printed as "Exception ignored
in ..." and dropped. So the handler also leaves a mark, and `check` raises again where start-up is over."""

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
