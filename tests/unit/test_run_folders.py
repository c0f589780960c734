"""Run folders are never lost: an existing folder is refused unless --overwrite, a folder without
fmlray's marker is never deleted, a new run takes its place only at its first checkpoint, and one
writer at a time holds a name (serial engine; each refusal is one line and exit code 2)."""

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import fmlray.data
from fmlray.cli import main
from fmlray.errors import FmlrayError
from fmlray.rundir import MARKER, RunFolder

# a small, quick run: 4 clients of one architecture, one round
QUICK = ["--set", "engine.kind=serial", "--set", "training.epochs=1", "--set", "run.rounds=1",
         "--set", "clients.num_clients=4", "--set", "clients.groups=[{name='mlp', share=1.0, local_model='mlp'}]"]
HOLD = ("import sys\nfrom fmlray.rundir import RunFolder\n"
        "with RunFolder(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    sys.stdin.read()\n")


def run(out, name, *extra):
    return main(["run", *QUICK, "--set", f"run.output_dir={out}", "--set", f"run.name={name}", *extra])


def cli(*argv, **kwargs):
    return subprocess.run([sys.executable, "-m", "fmlray", *argv], capture_output=True, text=True, timeout=600,
                          **kwargs)


def snapshot(folder):
    """Every file under `folder`, as bytes, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys, code, *fragments):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def hidden(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


@pytest.fixture
def no_data(monkeypatch):
    """Loading data fails loudly: a refusal must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded")
    monkeypatch.setattr(fmlray.data, "load_dataset", refuse)


def test_a_second_run_of_the_same_name_is_refused_before_loading_data(tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    assert run(out, "a") == 0
    (out / "a" / "notes.txt").write_text("my notes")
    before = snapshot(out / "a")
    capsys.readouterr()
    monkeypatch.setattr(fmlray.data, "load_dataset", lambda *a, **k: pytest.fail("data was loaded"))
    one_line(capsys, run(out, "a", "--set", "run.seed=1"), f"{out / 'a'} already exists", "run.name", "--overwrite")
    assert snapshot(out / "a") == before and hidden(out) == []


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, capsys, monkeypatch):
    from fmlray import checkpoint
    out = tmp_path / "runs"
    assert run(out, "a") == 0
    (out / "a" / "notes.md").write_text("mine")  # added to the old run: --overwrite takes it too, and says so first
    (out / "a" / "checkpoint" / "saved-r1").mkdir()  # so does a saved copy where the README says notes may go
    before = snapshot(out / "a")
    seen = []
    real = checkpoint.Writer.__call__

    def write(self, rnd, engine, state):  # the moment the new run writes its first checkpoint
        seen.append((snapshot(out / "a") == before, (out / ".a.new" / MARKER).is_file(), (out / ".a.lock").is_file()))
        return real(self, rnd, engine, state)

    monkeypatch.setattr(checkpoint.Writer, "__call__", write)
    capsys.readouterr()
    assert run(out, "a", "--overwrite", "--set", "run.rounds=2", "--set", "run.checkpoint_every=1") == 0
    assert seen[0] == (True, True, True)  # old run untouched, new one in its hidden sibling, name locked
    assert seen[1][0] is False  # the second checkpoint goes into the renamed folder
    assert checkpoint.load(out / "a").round == 2 and (out / "a" / "metrics.parquet").is_file()
    assert (out / "a" / MARKER).is_file() and hidden(out) == [] and not (out / "a" / "notes.md").exists()
    printed = capsys.readouterr().out
    assert "wrote " + str(out / "a") in printed
    assert (f"--overwrite: {out / 'a'} (an earlier run) is replaced once this run has its first checkpoint, with 2 "
            "entries added to it since: notes.md, checkpoint/saved-r1") in printed.splitlines()[1]


def test_an_old_run_that_cannot_be_deleted_whole_is_a_warning_and_the_next_run_of_the_name_finishes_it(
        tmp_path, capsys, monkeypatch):
    # a failure to delete the replaced run (a read-only folder a user added to it) ended the new run, already in
    # place, with exit 2 and "kept in .a.new", which no longer existed; the old run's rest lost its marker, and
    # every later run of the name was refused (audit 23)
    import shutil

    from fmlray import rundir
    out = tmp_path / "runs"
    assert run(out, "a") == 0
    (out / "a" / "zz").mkdir()
    (out / "a" / "zz" / "locked").write_text("x")
    real = shutil.rmtree

    def stuck(path, *args, **kwargs):
        if os.path.basename(path) == "zz":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)
    monkeypatch.setattr(rundir.shutil, "rmtree", stuck)
    capsys.readouterr()
    assert run(out, "a", "--overwrite", "--set", "run.rounds=2") == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("fmlray: warning: --overwrite: the earlier run could not be deleted whole (Permission "
                          f"denied: {out / '.a.old' / 'zz'}); what is left of it is in {out / '.a.old'}"), err
    assert len(err.splitlines()) == 1
    assert (out / "a" / "metrics.parquet").is_file() and (out / "a" / MARKER).is_file()
    assert sorted(p.name for p in (out / ".a.old").iterdir()) == [MARKER, "zz"]  # fmlray's still: marked
    monkeypatch.setattr(rundir.shutil, "rmtree", real)
    assert run(out, "a", "--overwrite") == 0 and hidden(out) == []


def test_a_run_without_checkpoints_takes_its_place_when_it_ends(tmp_path, capsys):
    out = tmp_path / "runs"
    assert run(out, "a", "--set", "run.checkpoint_every=0") == 0
    assert (out / "a" / "summary.txt").is_file() and not (out / "a" / "checkpoint" / "manifest.json").exists()
    assert hidden(out) == []


def test_a_folder_without_the_marker_is_never_deleted(tmp_path, capsys, no_data):
    out = tmp_path / "runs"
    (out / "src").mkdir(parents=True)
    (out / "src" / "main.py").write_text("print('mine')")
    one_line(capsys, run(out, "src"), "already exists")
    one_line(capsys, run(out, "src", "--overwrite"), f"{out / 'src'} is not a run fmlray made", MARKER,
             "run.name")
    assert snapshot(out / "src") == {"main.py": b"print('mine')"} and hidden(out) == []


def test_a_run_failing_before_its_first_checkpoint_leaves_the_old_run_as_it_was(tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    assert run(out, "a") == 0
    before = snapshot(out / "a")
    real = fmlray.data.load_dataset

    def poisoned(*args, **kwargs):  # every client's loss is NaN: the run stops in round 1
        ds = real(*args, **kwargs)
        return type(ds)(ds.name, ds.x_train * float("nan"), ds.y_train, ds.x_test, ds.y_test, ds.num_classes)

    monkeypatch.setattr(fmlray.data, "load_dataset", poisoned)
    capsys.readouterr()
    one_line(capsys, run(out, "a", "--overwrite"), "loss is not finite")
    assert snapshot(out / "a") == before and hidden(out) == []
    one_line(capsys, run(out, "b"), "loss is not finite")
    assert sorted(p.name for p in out.iterdir()) == ["a"]


def test_a_run_killed_in_round_1_with_overwrite_leaves_the_old_run_intact(tmp_path, capsys):
    out = tmp_path / "runs"
    assert run(out, "a") == 0
    before = snapshot(out / "a")
    proc = subprocess.Popen([sys.executable, "-m", "fmlray", "run", *QUICK, "--set", f"run.output_dir={out}",
                             "--set", "run.name=a", "--set", "run.rounds=30", "--set", "run.checkpoint_every=10",
                             "--overwrite"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.split()[:2] == ["round", "1/30"]:  # round 1's rows are written, its checkpoint is nine rounds away
            assert (out / ".a.new" / "metrics" / "round-000001.parquet").is_file()
            proc.send_signal(signal.SIGKILL)
            break
    else:
        proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert snapshot(out / "a") == before
    # the next writer of the name tidies what the killed one left, and the kernel dropped its lock
    capsys.readouterr()
    one_line(capsys, run(out, "a"), "already exists")
    assert hidden(out) == [] and snapshot(out / "a") == before


def test_a_second_writer_is_refused_while_another_process_holds_the_name(tmp_path, capsys, no_data):
    out = tmp_path / "runs"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "a"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = one_line(capsys, run(out, "a"), f"{out / 'a'} is being written by another fmlray command",
                       f"(pid {holder.pid})", "run.name")
        assert not (out / "a").exists()
    finally:
        holder.kill()  # a crash: the kernel releases the lock, nothing stale stays behind
        holder.wait()
    holder.stdout.close()
    assert "being written" in err
    with RunFolder(out, "a") as folder:  # free again
        assert folder.path == out / ".a.new"
    assert hidden(out) == []


def test_resume_is_refused_while_the_run_is_being_written(tmp_path, capsys):
    out = tmp_path / "runs"
    assert run(out, "a") == 0
    with RunFolder(out, "a", resume=True):
        capsys.readouterr()
        err = one_line(capsys, main(["run", "--resume", str(out / "a"), "--set", "run.rounds=2"]), "is being written")
        assert err.endswith("wait for it to end") and "run.name" not in err, err  # a resume has no other name
    one_line(capsys, main(["run", "--resume", str(out / "a"), "--overwrite"]), "drop --overwrite")


def test_resume_through_a_symlink_or_dot_takes_the_runs_own_lock_and_keeps_its_name(tmp_path, capsys, monkeypatch):
    # a symlink to a run folder used to be another lock: two writers resumed one run at once, deleting each
    # other's checkpoint rows, and the run's config took the link's name; `--resume .` blamed run.name
    out = tmp_path / "runs"
    assert run(out, "a") == 0
    (out / "alink").symlink_to(out / "a")
    with RunFolder(out, "a", resume=True):
        capsys.readouterr()
        one_line(capsys, main(["run", "--resume", str(out / "alink"), "--set", "run.rounds=2"]),
                 f"{out / 'a'} is being written by another fmlray command")
    assert main(["run", "--resume", str(out / "alink"), "--set", "run.rounds=2"]) == 0
    assert 'name = "a"' in (out / "a" / "config.toml").read_text() and (out / "alink").is_symlink()
    monkeypatch.chdir(out / "a")
    assert main(["run", "--resume", ".", "--set", "run.rounds=3"]) == 0
    assert "round 3/3" in capsys.readouterr().out and hidden(out) == []


def test_two_runs_of_the_same_name_at_once_exactly_one_runs(tmp_path):
    out = tmp_path / "runs"
    procs = [subprocess.Popen([sys.executable, "-m", "fmlray", "run", *QUICK, "--set", f"run.output_dir={out}",
                               "--set", "run.name=a", "--set", f"run.seed={seed}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (1, 2)]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        done.append((p.returncode, stdout, stderr))
    assert sorted(code for code, _, _ in done) == [0, 2], done
    (_, _, err), = [d for d in done if d[0] == 2]
    assert len(err.strip().splitlines()) == 1 and str(out / "a") in err, err  # being written, or already exists
    seed = 1 + [d[0] for d in done].index(0)
    assert f"seed = {seed}\n" in (out / "a" / "config.toml").read_text()
    assert f"seed {seed}," in (out / "a" / "summary.txt").read_text()
    assert hidden(out) == []


def _without_dac_override():
    """Root ignores file modes; without CAP_DAC_OVERRIDE (dropped from the bounding set before exec) it cannot."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_an_unwritable_output_folder_is_one_line_and_the_old_run_is_untouched(tmp_path):
    out = tmp_path / "runs"
    assert run(out, "a") == 0
    before = snapshot(out / "a")
    out.chmod(0o555)
    try:
        for extra in ([], ["--overwrite"]):
            done = cli("run", *QUICK, "--set", f"run.output_dir={out}", "--set", "run.name=b", *extra,
                       preexec_fn=_without_dac_override)
            err = done.stderr.strip()
            assert done.returncode == 2 and len(err.splitlines()) == 1, err
            assert f"cannot write into {out} (Permission denied)" in err and "run.output_dir" in err
            done = cli("run", *QUICK, "--set", f"run.output_dir={out}", "--set", "run.name=a", *extra,
                       preexec_fn=_without_dac_override)
            assert done.returncode == 2 and "cannot write into" in done.stderr, done.stderr
    finally:
        out.chmod(0o755)
    assert snapshot(out / "a") == before and sorted(p.name for p in out.iterdir()) == ["a"]


def test_compare_refuses_existing_algorithm_folders_before_loading_data(tmp_path, capsys, no_data):
    out = tmp_path / "runs"
    (out / "x-fedavg").mkdir(parents=True)
    argv = ["compare", "--set", "engine.kind=serial", "--set", f"run.output_dir={out}", "--set", "run.name=x",
            "--algorithms", "fml,fedavg"]
    one_line(capsys, main(argv), f"{out / 'x-fedavg'} already exists", "--overwrite")
    one_line(capsys, main([*argv, "--overwrite"]), f"{out / 'x-fedavg'} is not a run fmlray made")
    assert sorted(p.name for p in out.iterdir()) == ["x-fedavg"] and not any((out / "x-fedavg").iterdir())


def test_compare_overwrite_replaces_its_own_folders(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["compare", *QUICK, "--set", f"run.output_dir={out}", "--set", "run.name=x", "--algorithms", "fedavg"]
    assert main(argv) == 0
    first = (out / "x-fedavg" / "config.toml").read_text()
    assert main([*argv, "--set", "run.seed=3", "--overwrite"]) == 0
    assert (out / "x-fedavg" / "config.toml").read_text() != first and hidden(out) == []


def test_a_swap_cut_short_puts_the_old_run_back(tmp_path):
    # killed between "old run aside" and "new run in": the next writer of the name restores the old one
    out = tmp_path / "runs"
    for name in (".a.old", ".a.new"):
        (out / name).mkdir(parents=True)
        (out / name / MARKER).write_text("")
    (out / ".a.old" / "config.toml").write_text("old")
    with pytest.raises(FmlrayError, match="already exists"):
        with RunFolder(out, "a"):
            pass
    assert (out / "a" / "config.toml").read_text() == "old" and hidden(out) == []


@pytest.mark.parametrize("left", [".a.new marker being written", ".a.new empty", ".a.old empty", ".a.old empty, no a"])
def test_a_hidden_folder_a_kill_left_with_nothing_in_it_is_tidied_by_the_next_run(tmp_path, left):
    # killed just before the marker went in (RunFolder.create), or just after the replaced run's marker went
    # (its deletion): the folder holds nothing of anyone's, yet it was refused as "in the way" of every later run
    out = tmp_path / "runs"
    folder = out / left.split()[0]
    folder.mkdir(parents=True)
    if "marker being written" in left:
        (folder / f".{MARKER}.4242-0123abcd.tmp").write_text("made by fmlray")
    if "no a" not in left:
        (out / "a").mkdir()
        (out / "a" / MARKER).write_text("")
        (out / "a" / "config.toml").write_text("the earlier run")
    with RunFolder(out, "a", overwrite=True):
        assert hidden(out) == [".a.lock"]
    assert hidden(out) == []
    if "no a" not in left:
        assert (out / "a" / "config.toml").read_text() == "the earlier run"


def test_a_hidden_folder_holding_more_than_a_marker_being_written_is_never_deleted(tmp_path, capsys, no_data):
    out = tmp_path / "runs"
    (out / ".a.new").mkdir(parents=True)
    (out / ".a.new" / f".{MARKER}.4242-0123abcd.tmp").write_text("")
    (out / ".a.new" / "mine.txt").write_text("someone's")
    one_line(capsys, run(out, "a"), "(a folder without fmlray's marker) is in the way")
    assert (out / ".a.new" / "mine.txt").read_text() == "someone's"


def test_a_kill_at_any_step_of_deleting_a_stopped_new_run_leaves_what_the_next_run_tidies(tmp_path, monkeypatch):
    # the hidden folder of a new run that stopped before its first checkpoint was deleted with shutil.rmtree, in
    # directory order: a kill midway could leave its files without the marker, a folder no later run of the name
    # could prove fmlray's, so every one was refused. Now the marker goes last, whatever step the kill lands at.
    out = tmp_path / "runs"
    real_unlink, real_rmdir = os.unlink, os.rmdir
    kill_at, killed = 0, True
    while killed:  # a kill at the 1st, 2nd, ... deletion, until one lands after the last
        kill_at, killed, calls = kill_at + 1, False, []

        def step(real):
            def call(path, *args, **kwargs):
                if not (str(path).endswith(".a.lock") or Path(path) == out):  # the lock and runs/: not the folder's
                    calls.append(os.fspath(path))
                    if len(calls) == kill_at:
                        raise KeyboardInterrupt
                return real(path, *args, **kwargs)
            return call

        try:
            with RunFolder(out, "a") as folder:
                folder.temp.mkdir()
                folder._made = True
                for name in (MARKER, "config.toml", "partition.npz", "checkpoint/rows.npy", "checkpoint/manifest.json",
                             "metrics/round-000001.parquet"):
                    (folder.temp / name).parent.mkdir(exist_ok=True)
                    (folder.temp / name).write_text("")
                monkeypatch.setattr(os, "unlink", step(real_unlink))
                monkeypatch.setattr(os, "rmdir", step(real_rmdir))
        except KeyboardInterrupt:
            killed = True
        finally:
            monkeypatch.setattr(os, "unlink", real_unlink)
            monkeypatch.setattr(os, "rmdir", real_rmdir)
        with RunFolder(out, "a"):  # not refused: what was left is tidied
            pass
        assert hidden(out) == [], (kill_at, calls)
    assert kill_at > 8  # every file and folder of it was a kill's moment once


def test_a_stop_while_an_overwriting_runs_first_checkpoint_is_written_keeps_the_earlier_run(tmp_path, capsys,
                                                                                           monkeypatch):
    # the stop was checked only before the checkpoint: one landing while it was written said "keeping the earlier
    # run", then the new run took its place, deleted the earlier one and trained one round more
    from fmlray import checkpoint
    out = tmp_path / "runs"
    assert run(out, "a") == 0
    (out / "a" / "notes.txt").write_text("mine")
    before = snapshot(out / "a")
    real = checkpoint.Writer.__call__

    def write(self, rnd, engine, state):
        info = real(self, rnd, engine, state)
        os.kill(os.getpid(), signal.SIGINT)  # the stop lands as the checkpoint's last file is written
        return info

    monkeypatch.setattr(checkpoint.Writer, "__call__", write)
    capsys.readouterr()
    assert run(out, "a", "--overwrite", "--set", "run.rounds=3", "--set", "run.checkpoint_every=1") == 130
    printed = capsys.readouterr()
    assert f"SIGINT: stopping after this round, keeping the earlier run {out / 'a'}, without a checkpoint" in printed.out
    assert "round 2/3" not in printed.out and "before it replaced the earlier run" in printed.err
    assert snapshot(out / "a") == before and hidden(out) == []


@pytest.mark.parametrize("leftover", ["file", "folder"])
def test_a_leftover_hidden_new_run_is_named_before_loading_data(tmp_path, capsys, no_data, leftover):
    out = tmp_path / "runs"
    out.mkdir()
    stale = out / ".a.new"
    if leftover == "file":
        stale.write_text("?")
    else:  # no marker: not provably fmlray's, so never deleted
        stale.mkdir()
        (stale / "x").write_text("?")
    kind = "a file" if leftover == "file" else "a folder without fmlray's marker"
    one_line(capsys, run(out, "a"), f"{stale} ({kind}) is in the way", "no fmlray run holds .a.lock now",
             "leftover of an interrupted run", "delete it or move it away")
    assert hidden(out) == [".a.new"] and not (out / "a").exists()


def test_a_folder_where_the_lock_file_goes_is_named(tmp_path, capsys, no_data):
    out = tmp_path / "runs"
    (out / ".a.lock").mkdir(parents=True)
    one_line(capsys, run(out, "a"), f"{out / '.a.lock'} is a folder, where fmlray keeps the lock file",
             "move it away, or choose another run.name")
    assert hidden(out) == [".a.lock"]


@pytest.mark.parametrize("kind", ["file", "link", "fifo"])
def test_what_is_at_the_lock_files_name_and_is_not_fmlrays_is_refused_and_left_whole(tmp_path, capsys, no_data, kind):
    # a user's file, or a link to one, where the lock goes: never followed, emptied or deleted
    out = tmp_path / "runs"
    out.mkdir()
    target, lock = tmp_path / "target.txt", out / ".a.lock"
    target.write_text("a user's data")
    {"file": lambda: lock.write_text("my notes\n"), "link": lambda: lock.symlink_to(target),
     "fifo": lambda: os.mkfifo(lock)}[kind]()
    what = {"file": "a file", "link": f"a symlink (to {target})", "fifo": "a special file"}[kind]
    one_line(capsys, run(out, "a"), f"{lock} is {what}, not a lock file of fmlray's", "left as it is",
             "choose another run.name")
    assert os.path.lexists(lock) and target.read_text() == "a user's data"
    assert kind != "file" or lock.read_text() == "my notes\n"
    assert hidden(out) == [".a.lock"] and not (out / "a").exists()


def test_a_lock_file_a_killed_run_left_is_taken_and_removed(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    (out / ".a.lock").write_text("4242\n")  # what a run killed with SIGKILL leaves: its pid
    with RunFolder(out, "a"):
        assert (out / ".a.lock").read_text() == f"{os.getpid()}\n"
    assert hidden(out) == []


def test_an_output_dir_where_no_file_can_be_made_is_one_line_not_a_hang(capsys, no_data):
    one_line(capsys, run("/proc", "a"), "cannot write into /proc", "set run.output_dir to a writable folder")


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_symlink_loop_as_output_dir_is_named(tmp_path, capsys, no_data, below):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    one_line(capsys, run(tmp_path / "loop1" / below, "a"), f"({tmp_path / 'loop1'} is a symlink loop",
             "set run.output_dir")


def test_a_symlinked_run_folder_is_never_replaced_and_says_so(tmp_path, capsys):
    out = tmp_path / "runs"
    assert run(out, "a") == 0
    (out / "b").symlink_to(out / "a")
    before = snapshot(out / "a")
    capsys.readouterr()
    one_line(capsys, run(out, "b", "--overwrite"), f"{out / 'b'} is a symlink (to {out / 'a'}); fmlray never "
             "replaces a symlink, even with --overwrite")
    assert (out / "b").is_symlink() and snapshot(out / "a") == before and hidden(out) == []


@pytest.mark.parametrize("key", ["run.name=other", "run.output_dir=elsewhere"])
def test_resume_refuses_another_name_or_place(tmp_path, capsys, key):
    out = tmp_path / "runs"
    assert run(out, "a") == 0
    before = snapshot(out / "a")
    capsys.readouterr()
    one_line(capsys, main(["run", "--resume", str(out / "a"), "--set", "run.rounds=2", "--set", key]),
             f"--resume continues {out / 'a'} in place; drop --set {key.split('=')[0]}")
    assert snapshot(out / "a") == before and sorted(p.name for p in out.iterdir()) == ["a"]
    # naming the folder it resumes is no change
    assert main(["run", "--resume", str(out / "a"), "--set", "run.rounds=2", "--set", "run.name=a"]) == 0


def test_an_atomic_write_goes_through_no_link_and_leaves_no_temporary_file(tmp_path):
    from fmlray.rundir import write_atomic
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("the user's\n")
    (tmp_path / ".summary.txt.tmp").symlink_to(victim)  # where the temporary file used to be written, always
    write_atomic(tmp_path / "summary.txt", b"new\n")
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError):  # the rename fails: nothing of the write may stay behind
        write_atomic(tmp_path / "folder", b"x")
    assert victim.read_text() == "the user's\n" and (tmp_path / "summary.txt").read_bytes() == b"new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".summary.txt.tmp", "elsewhere.txt", "folder",
                                                          "summary.txt"]


def test_output_dirs_are_local_paths_a_tilde_is_home_and_file_colon_a_folder(tmp_path, capsys, monkeypatch):
    # pyarrow, given a string, would take "file:..." for a URI and "~" for home while fmlray's other writes
    # did not: the run trained and then failed at its end, half written
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert run("~/runs", "a") == 0 and run("file:out", "b") == 0
    for folder in (tmp_path / "home" / "runs" / "a", tmp_path / "file:out" / "b"):
        assert (folder / "metrics.parquet").is_file() and (folder / "summary.txt").is_file()
        assert main(["report", str(folder)]) == 0
    assert not (tmp_path / "~").exists()
    assert sorted(p.name for p in (tmp_path / "home" / "runs" / "a").rglob(".*")) == [MARKER]  # no temporary left


def test_a_resume_that_cannot_write_its_folder_is_one_line_and_leaves_the_run_as_it_was(tmp_path, capsys, monkeypatch):
    # e.g. an immutable folder (chattr +i): it was exit 1, naming the temporary file of the config it wrote first
    import errno

    import fmlray.rundir
    out = tmp_path / "runs"
    assert run(out, "a") == 0
    before = snapshot(out / "a")

    def refuse(run_dir, cfg):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(run_dir / ".config.toml.1-x.tmp"))

    monkeypatch.setattr(fmlray.rundir, "write_config", refuse)
    capsys.readouterr()
    one_line(capsys, main(["run", "--resume", str(out / "a"), "--set", "run.rounds=2"]),
             f"cannot write into {out / 'a'} (Operation not permitted); the run was left as it was")
    assert snapshot(out / "a") == before and hidden(out) == []


def test_the_temporary_files_of_a_writer_killed_in_a_run_folder_are_deleted_by_the_next_writer(tmp_path, capsys):
    # a run killed while it wrote its plot left .accuracy.png.<pid>-<hex>.tmp for ever, which --overwrite then
    # listed as "added since"
    assert run(tmp_path, "r") == 0
    folder = tmp_path / "r"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    dead, live = folder / f".accuracy.png.{gone}-0123abcd.tmp", folder / f".metrics.parquet.{os.getpid()}-89abcdef.tmp"
    mine = folder / ".notes.tmp"  # not a name fmlray makes
    for path in (dead, live, mine):
        path.write_bytes(b"x")
    assert main(["run", "--resume", str(folder), "--set", "run.rounds=2"]) == 0
    assert not dead.exists() and live.exists() and mine.exists()
    live.unlink()
    mine.unlink()
    dead.write_bytes(b"x")
    assert run(tmp_path, "r", "--overwrite") == 0
    assert "added since" not in capsys.readouterr().err and not dead.exists()


def test_a_sweep_or_search_command_deletes_the_temporaries_a_killed_one_left_in_its_folder(tmp_path):
    # a sweep killed while it wrote results.parquet (a search: trials.parquet, .tune/search.json) left the
    # half-written .results.parquet.<pid>-<hex>.tmp for ever, through every later run of the sweep (audit 39)
    from fmlray.rundir import SEARCH_RECORD, writing
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    folder = tmp_path / "sweep"
    (folder / SEARCH_RECORD).parent.mkdir(parents=True)
    dead = [folder / f".results.parquet.{gone}-0123abcd.tmp", folder / f".best-1.toml.{gone}-0123abcd.tmp",
            (folder / SEARCH_RECORD).parent / f".search.json.{gone}-0123abcd.tmp"]
    kept = [folder / f".trials.parquet.{os.getpid()}-89abcdef.tmp", folder / ".notes.tmp"]  # alive; not fmlray's
    for path in dead + kept:
        path.write_bytes(b"x")
    with writing(folder, "sweep.output_dir"):
        assert not any(p.exists() for p in dead) and all(p.exists() for p in kept)
