"""`signals.redeliver_lost_sigterm`, in a child Python that mimics a Ray worker's SIGTERM handler."""

import subprocess
import sys
import textwrap

# a Ray worker's handler raises SystemExit marked with ray_terminate_msg (ray/_private/worker.py); the
# callback sleeps, so the handler runs inside it, where Python can only print the exception and go on
CHILD = textwrap.dedent("""
    import os, signal, sys, time, weakref
    from fmlray import signals

    def ray_like(signum, frame):
        exc = SystemExit(1)
        exc.ray_terminate_msg = "The process receives a SIGTERM."
        raise exc

    signal.signal(signal.SIGTERM, ray_like)
    if sys.argv[1] == "hooked":
        signals.redeliver_lost_sigterm()

    class Held:
        pass

    def callback(kind):
        if kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        else:
            raise ValueError("an unrelated callback error")

    for kind in sys.argv[2:]:
        held = Held()
        weakref.finalize(held, callback, kind)
        del held
    time.sleep(2)
    print("outlived", flush=True)
""")


def child(*args):
    return subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=60)


def test_a_sigterm_lost_in_a_callback_is_lost_without_the_hook():
    # the premise: Python prints the SystemExit raised inside the callback and the process goes on
    out = child("bare", "sigterm")
    assert "Exception ignored" in out.stderr and "outlived" in out.stdout and out.returncode == 0


def test_a_sigterm_lost_in_a_callback_is_sent_again_and_ends_the_process_quietly():
    out = child("hooked", "sigterm")
    assert out.returncode == 1 and out.stderr == "" and "outlived" not in out.stdout


def test_other_callback_errors_still_reach_the_previous_hook():
    out = child("hooked", "error", "sigterm")
    assert "ValueError: an unrelated callback error" in out.stderr and out.returncode == 1
    assert "SystemExit" not in out.stderr
