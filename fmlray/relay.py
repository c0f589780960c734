"""The one Tune callback fmlray gives a Tuner: it passes each event on to this process's listener.

Tune pickles a run's callbacks into its records (`tuner.pkl`) and hands those copies back to a restored
run (`Tuner.restore`). A callback that held the printer, the signal flag and the `Control` actor of the
process that started the search would, after `fmlray tune --resume`, report to a process that is gone;
this one holds nothing and finds its listener (`trials._progress_callback`) when called.
"""

from __future__ import annotations

import contextlib

from ray import tune

_listeners: list = []  # the listener of the Tune run in flight in this process (one at a time)


@contextlib.contextmanager
def listening(listener):
    """`listener` gets the events of every Relay inside the block."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


class Relay(tune.Callback):
    def on_step_begin(self, **info):
        _listeners[-1].on_step_begin(**info)

    def on_trial_start(self, **info):
        _listeners[-1].on_trial_start(**info)

    def on_trial_result(self, **info):
        _listeners[-1].on_trial_result(**info)

    def on_trial_complete(self, **info):
        _listeners[-1].on_trial_complete(**info)

    def on_trial_error(self, **info):
        _listeners[-1].on_trial_error(**info)
