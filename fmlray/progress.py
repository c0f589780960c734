"""What a run prints: permanent lines, and a progress status inside long rounds.

On a terminal the status is one line rewritten in place about once a second; anywhere else (a pipe,
a `ray job submit` log) it is a plain line at most every `every` seconds, and only in a phase that
lasts that long, so short runs print exactly what they always did.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path


@contextlib.contextmanager
def plain_warnings():
    """fmlray's own warnings (e.g. a batching mode that cannot apply) as one line, `fmlray: warning: ...`, not
    Python's two lines with the source line that raised it; every other warning as Python shows it."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "fmlray" not in Path(filename).parts:
            return shown(message, category, filename, lineno, file, line)
        print(f"fmlray: warning: {' '.join(str(message).splitlines())}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        if warnings.showwarning is show:
            warnings.showwarning = shown


class Console:
    """`console(text)` prints a line; `console.phase(label, total)` returns a callable `(done)` that
    shows how far a phase of `total` items is, with an estimate of the time left."""

    def __init__(self, write: Callable[[str], None] | None = None, *, tty: bool | None = None,
                 every: float = 5.0):
        self.write = write or (lambda text: print(text, flush=True))
        self.tty = (write is None and sys.stdout.isatty()) if tty is None else tty
        self.every = every
        self.showing = False  # a status is on the terminal's last line

    def __call__(self, text: str) -> None:
        self._clear()
        self.write(text)

    def phase(self, label: str, total: int) -> "Phase":
        return Phase(self, label, total)

    def status(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\r\x1b[K" + text)
            sys.stdout.flush()
            self.showing = True
        else:
            self.write(text)

    def _clear(self) -> None:
        if self.showing:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()
            self.showing = False


class Phase:
    """Progress of one phase (a round's training, an evaluation): call it with the items done so far."""

    def __init__(self, console: Console, label: str, total: int):
        self.console, self.label, self.total = console, label, total
        self.started = time.monotonic()
        self.shown = self.started  # a status comes once the phase has lasted `every` (1 s on a terminal)

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.shown < (1.0 if self.console.tty else self.console.every):
            return
        self.shown = now
        elapsed = now - self.started
        eta = f", about {elapsed / done * (self.total - done):.0f}s left" if 0 < done < self.total else ""
        self.console.status(f"{self.label}: {done}/{self.total} clients, {elapsed:.0f}s{eta}")
