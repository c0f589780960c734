"""`signals.redeliver_lost_sigterm`, in a child Python that mimics a Ray worker's SIGTERM handler."""

import subprocess
import sys
import textwrap

import pytest

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


SHIELD = textwrap.dedent("""
    import os, signal, sys, time
    from fmlray import signals

    with signals.shielded():
        for _ in range(int(sys.argv[1])):
            os.kill(os.getpid(), getattr(signal, sys.argv[2]))
            time.sleep(0.2)
        print("finished", flush=True)
    print("after", flush=True)
""")


# A SIGTERM arriving while the handler of an earlier one runs, at each line it (and what it calls) executes in
# turn: the handler's Event.set took a lock, and a second handler run inside it waited on that lock for ever.
REENTERED = textwrap.dedent("""
    import os, signal, sys
    from fmlray import signals
    signal.signal(signal.SIGTERM, signals.terminate)
    signal.alarm(20)  # a hang ends the process with SIGALRM
    for at in range(1, 40):
        seen = [0]
        def tracer(frame, event, arg):
            if event == "call" and frame.f_code is signals.terminate.__code__ and not seen[0]:
                seen[0] = 1
            if seen[0] and event == "line":
                seen[0] += 1
                if seen[0] == at + 1:
                    os.kill(os.getpid(), signal.SIGTERM)
            return tracer
        sys.settrace(tracer)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
        except signals.Terminated:
            pass
        sys.settrace(None)
        try:
            signals.check()
        except signals.Terminated:
            pass
        signals.reset()
    print("ok")
""")


def test_a_sigterm_inside_the_handler_of_another_never_hangs():
    done = subprocess.run([sys.executable, "-c", REENTERED], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


def test_a_signal_during_shut_down_is_announced_and_the_shut_down_finishes():
    for sig in ("SIGINT", "SIGTERM"):
        out = subprocess.run([sys.executable, "-c", SHIELD, "1", sig], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout == "finished\nafter\n", out.stderr
        again = "Ctrl-C again" if sig == "SIGINT" else "a Ctrl-C (SIGINT)"
        assert out.stderr == f"{sig}: shutting down first ({again} to abandon that)\n"


def test_a_second_sigint_abandons_the_shut_down():
    out = subprocess.run([sys.executable, "-c", SHIELD, "2", "SIGINT"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "finished" not in out.stdout and "KeyboardInterrupt" in out.stderr


# a run whose engine receives SIGINT while it closes (after its last round): the close finishes, the run's
# outputs are written, exit 0; before, the KeyboardInterrupt cut the close (and Ray's shut-down) in half
CLOSING = textwrap.dedent("""
    import os, signal, sys, time
    from fmlray.cli import main
    from fmlray.engine.serial import SerialEngine

    real = SerialEngine.close

    def close(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)
        real(self)
        print("closed", flush=True)

    SerialEngine.close = close
    sys.exit(main(["run", "--set", "engine.kind=serial", "--set", "run.rounds=1", "--set",
                   "run.output_dir=" + sys.argv[1]]))
""")


def test_a_sigint_while_the_engine_closes_lets_the_run_finish_its_outputs(tmp_path):
    out = subprocess.run([sys.executable, "-c", CLOSING, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "closed" in out.stdout and "SIGINT: shutting down first" in out.stderr
    assert (tmp_path / "digits-fml" / "metrics.parquet").is_file()


# signals while a run writes its outputs (after its engine closed): the first is announced and the outputs are
# written; a second SIGINT abandons them, and the one line says how to finish the run, which is left resumable
OUTPUTS = textwrap.dedent("""
    import os, signal, sys, time
    from fmlray import rundir
    from fmlray.cli import main

    real = rundir.finish

    def finish(*args):
        for _ in range(int(sys.argv[2])):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)
        return real(*args)

    rundir.finish = finish
    sys.exit(main(["run", "--set", "engine.kind=serial", "--set", "run.rounds=1", "--set",
                   "run.output_dir=" + sys.argv[1]]))
""")


def test_a_sigint_while_the_outputs_are_written_lets_them_finish(tmp_path):
    out = subprocess.run([sys.executable, "-c", OUTPUTS, str(tmp_path), "1"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "SIGINT: writing the run's outputs first (Ctrl-C again to abandon that)\n"
    assert (tmp_path / "digits-fml" / "metrics.parquet").is_file()


def test_a_second_sigint_abandons_the_outputs_and_says_how_to_finish_the_run(tmp_path):
    out = subprocess.run([sys.executable, "-c", OUTPUTS, str(tmp_path), "2"], capture_output=True, text=True,
                         timeout=120)
    run_dir = tmp_path / "digits-fml"
    assert out.returncode == 130, out.stderr
    assert out.stderr.splitlines()[-1] == ("fmlray: interrupted; what no checkpoint held yet was dropped; continue "
                                           f"with: fmlray run --resume {run_dir}")
    assert not (run_dir / "metrics.parquet").exists()
    done = subprocess.run([sys.executable, "-m", "fmlray", "run", "--resume", str(run_dir)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "metrics.parquet").is_file()


# a signal that a run takes in its last round, or while it writes its outputs, lets that run finish; a command
# with more runs to do stops after it (compare and sequential sweeps went on to their next runs, and exit 0)
MANY = textwrap.dedent("""
    import os, signal, sys
    from fmlray import metrics, rundir
    from fmlray.cli import main

    sig, where, command, out = sys.argv[1:5]
    resume = sys.argv[5:] == ["--resume"]
    sent, lines = [], []

    def send():
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), getattr(signal, sig))

    if resume:
        pass
    elif where == "outputs":
        real_finish = rundir.finish
        rundir.finish = lambda *args: (send(), real_finish(*args))[1]
    else:  # a progress line, after the round's stop() was asked: the last round's, or the second run's first
        real_line = metrics.progress_line
        def line(summary, rounds):
            lines.append(1)
            if (summary["round"] == rounds) if where == "last round" else len(lines) == rounds + 1:
                send()
            return real_line(summary, rounds)
        metrics.progress_line = line
    rounds = 3 if resume or where == "mid-run" else 2  # mid-run: the stop asked in round 2 of the second run
    common = ["engine.kind=serial", f"run.rounds={rounds}", "training.epochs=1", "clients.num_clients=4"]
    if command == "compare":
        argv = ["compare", "--algorithms", "fedavg,local,fml"] + [a for c in common + ["run.output_dir=" + out]
                                                                    for a in ("--set", c)] + sys.argv[5:]
    else:
        spec = os.path.join(out, "s.toml")
        with open(spec, "w") as f:
            f.write(f'[sweep]\\nname = "t"\\noutput_dir = "{out}"\\nset = {common!r}\\n'
                    '[[axis]]\\nname = "a"\\nvalues = ["algorithm.name=fedavg", "algorithm.name=local", '
                    '"algorithm.name=fml"]\\n')
        argv = ["sweep", spec]
    sys.exit(main(argv))
""")


@pytest.mark.parametrize("sig, where, command", [("SIGINT", "outputs", "compare"), ("SIGTERM", "last round", "sweep")])
def test_a_signal_while_a_run_finishes_stops_a_compare_or_sweep_after_that_run(tmp_path, sig, where, command):
    out = subprocess.run([sys.executable, "-c", MANY, sig, where, command, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 130, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    if command == "compare":
        assert last == (f"fmlray: {sig}: stopped after the fedavg run finished (not started: local, fml); continue "
                        "with the same command and --resume")
        done, folders = tmp_path / "digits-fml-fedavg", {"digits-fml-fedavg"}
    else:
        assert last == f"fmlray: {sig}: stopped after run fedavg-s0 finished; run the same sweep again to continue"
        done, folders = tmp_path / "t" / "fedavg-s0", {"fedavg-s0"}
    assert (done / "metrics.parquet").is_file()
    assert {p.name for p in done.parent.iterdir() if p.is_dir() and not p.name.startswith(".")} == folders
    if command == "sweep":  # the rerun finishes the rest
        again = subprocess.run([sys.executable, "-m", "fmlray", "sweep", str(tmp_path / "s.toml")],
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and "[1/3] fedavg-s0: done" in again.stdout, again.stderr
        assert (tmp_path / "t" / "results.parquet").is_file()


# two SIGINTs while a finished run imports matplotlib (its plot): handlers wait for the import's end, then the
# second abandons the outputs as usual. Raised inside matplotlib's C extensions they failed the import as an
# ImportError with a traceback, or aborted Python (the finder below stands in for the extension's initialisation)
PLOT_IMPORT = textwrap.dedent("""
    import os, signal, sys, time
    from fmlray.cli import main

    class Finder:
        def find_spec(self, name, path=None, target=None):
            if name == "fmlray.plots":
                for _ in range(2):
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.2)
            return None

    sys.meta_path.insert(0, Finder())
    code = main(["run", "--set", "engine.kind=serial", "--set", "run.rounds=1", "--set", "run.output_dir=" + sys.argv[1]])
    print("plots imported:", "fmlray.plots" in sys.modules)
    sys.exit(code)
""")


def test_sigints_while_matplotlib_is_imported_wait_for_the_import_then_abandon_the_outputs(tmp_path):
    out = subprocess.run([sys.executable, "-c", PLOT_IMPORT, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 130 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout.strip().endswith("plots imported: True")
    assert out.stderr.splitlines()[-1] == ("fmlray: interrupted; what no checkpoint held yet was dropped; continue "
                                           f"with: fmlray run --resume {tmp_path / 'digits-fml'}")


def test_a_compare_stopped_mid_run_continues_with_resume_and_equals_an_uninterrupted_one(tmp_path, capsys):
    # a stopped compare could not be rerun (its finished runs' folders were refused); --resume keeps the runs it
    # finished, resumes the stopped one from its checkpoint, runs the rest, and prints the one table
    import pyarrow.parquet as pq
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    out = subprocess.run([sys.executable, "-c", MANY, "SIGINT", "mid-run", "compare", str(cut)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 130, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == ("fmlray: stopped the local run after round 2 (not started: fml); "
                                                   "continue with the same command and --resume")
    from fmlray.cli import main
    printed = {}
    for d in (cut, whole):  # nothing in `whole`: an uninterrupted compare (the settings are MANY's for mid-run)
        argv = ["compare", "--algorithms", "fedavg,local,fml", "--resume"]
        for c in ("engine.kind=serial", "run.rounds=3", "training.epochs=1", "clients.num_clients=4",
                  f"run.output_dir={d}"):
            argv += ["--set", c]
        assert main(argv) == 0
        printed[d] = capsys.readouterr().out
    assert f"fedavg: done ({cut / 'digits-fml-fedavg'})" in printed[cut] and "(resumed after round 2)" in printed[cut]
    assert printed[cut][printed[cut].index("algorithm"):] == printed[whole][printed[whole].index("algorithm"):]
    for algo in ("fedavg", "local", "fml"):
        a, b = (pq.read_table(d / f"digits-fml-{algo}" / "metrics.parquet").drop(["seconds"]).to_pandas()
                for d in (cut, whole))
        assert a.equals(b), algo  # NaN where NaN (rounds without a test evaluation)
