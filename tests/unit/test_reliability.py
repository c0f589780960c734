"""Checkpoints and resume, signals, and bad client updates (serial engine; Ray in integration/)."""

import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

import fmlray.data
from fmlray import checkpoint
from fmlray.cli import main

SERIAL = ["--set", "engine.kind=serial", "--set", "training.epochs=1"]


def accuracies(run_dir):
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    return {(r["round"], r["client"], r["model"], r["split"]): r["accuracy"] for r in rows if r["split"] != "round"}


def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-9, nan_ok=True), k


def private_rows(run_dir):
    """Every client's latest checkpointed row of private state, as bytes."""
    from fmlray.engine.state import open_rows
    ckpt = checkpoint.load(run_dir)
    return {cid: bytes(open_rows(ckpt.folder / ref.file)[ref.row]) for cid, ref in ckpt.refs().items()}


@pytest.mark.parametrize("algorithm", ["fml", "fedper", "apfl", "dml"])  # a local model; a head; a scalar; two models
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, capsys, algorithm):
    out = ["--set", f"run.output_dir={tmp_path}", "--set", "clients.fraction=0.5", "--set", f"algorithm.name={algorithm}"]
    assert main(["run", *SERIAL, *out, "--set", "run.rounds=4", "--set", "run.name=whole"]) == 0
    assert main(["run", *SERIAL, *out, "--set", "run.rounds=2", "--set", "run.name=split"]) == 0
    assert checkpoint.load(tmp_path / "split").round == 2
    assert main(["run", "--resume", str(tmp_path / "split"), "--set", "run.rounds=4"]) == 0
    assert "resumed after round 2" in capsys.readouterr().out
    same(accuracies(tmp_path / "whole"), accuracies(tmp_path / "split"))
    a, b = checkpoint.load(tmp_path / "whole"), checkpoint.load(tmp_path / "split")
    assert a.round == b.round == 4 and (a.global_state is None) == (b.global_state is None) == (algorithm == "dml")
    for k in a.global_state or {}:
        np.testing.assert_array_equal(a.global_state[k], b.global_state[k])
    rows_a, rows_b = private_rows(tmp_path / "whole"), private_rows(tmp_path / "split")
    assert rows_a and rows_a == rows_b


def test_a_checkpoint_writes_only_the_rows_that_changed_and_leaves_no_temporaries(tmp_path):
    # half the clients a round: each checkpoint writes about half the rows, the manifest names the live files
    assert main(["run", *SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=3",
                 "--set", "clients.fraction=0.5"]) == 0
    folder = tmp_path / "digits-fml" / "checkpoint"
    import json
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["round"] == 3 and manifest["global"] == "global-r000003.npz"
    files = {p.name for p in folder.iterdir()}
    assert files == {"manifest.json", "global-r000003.npz", *(s["file"] for s in manifest["shards"])}
    assert not [f for f in files if f.startswith(".")]
    written = [len(s["cids"]) for s in manifest["shards"] if "-r000003-" in s["file"]]
    assert sum(written) == 10  # the clients of round 3, not all 20
    with np.load(folder / "global-r000003.npz", allow_pickle=False) as z:
        assert set(z.files) == set(checkpoint.load(tmp_path / "digits-fml").global_state)


def _damage_manifest(run_dir, how):
    path = run_dir / "checkpoint" / "manifest.json"
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:50])
    else:
        path.write_bytes(how)


def _edit_cids(run_dir, cids, sign=True):
    """The first row file's first client ids replaced; with `sign`, the manifest's checksum made anew (as by
    someone who meant it: what fmlray checks beyond the checksum)."""
    import json
    path = run_dir / "checkpoint" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["cids"][:len(cids)] = cids  # a client id the run does not have, or one twice
    if sign:
        manifest["manifest_crc32"] = checkpoint.manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))


def _damage_row(run_dir, how):
    import json
    folder = run_dir / "checkpoint"
    shard = json.loads((folder / "manifest.json").read_text())["shards"][0]
    path = folder / shard["file"]
    if how == "flip":
        import numpy as np
        start = np.load(path, mmap_mode="r").offset  # the first row's first byte
        data = bytearray(path.read_bytes())
        data[start + 5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "missing":
        path.unlink()
    else:
        path.write_bytes(b"PK\x03\x04 not a numpy file")


def _edit_manifest(run_dir, **changes):
    import json
    path = run_dir / "checkpoint" / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    if manifest.get("version", 4) >= 4:  # signed anew, so that what is checked beyond the checksum is reached
        manifest["manifest_crc32"] = checkpoint.manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))


def _special_global(run_dir, kind):
    path = run_dir / "checkpoint" / "global-r000001.npz"
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(kind)


def _replace_global(run_dir):
    """The global model's file replaced whole by another valid one of the same keys and shapes (another run's)."""
    path = run_dir / "checkpoint" / "global-r000001.npz"
    with np.load(path) as z:
        other = {k: z[k] * 2 for k in z.files}
    with open(path, "wb") as f:
        np.savez(f, **other)


def test_what_a_user_keeps_in_a_runs_checkpoint_folder_outlives_the_next_checkpoint(tmp_path):
    # every entry the new manifest did not name was deleted: a user's notes silently, and a saved copy of a
    # checkpoint in a folder ended every resume with "Is a directory", exit 1 (audit 23)
    assert main(["run", *SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=1"]) == 0
    folder = tmp_path / "digits-fml" / "checkpoint"
    old = sorted(p.name for p in folder.iterdir())
    (folder / "my-notes.txt").write_text("mine")
    (folder / "best").mkdir()
    for name in old:
        (folder / "best" / name).write_bytes((folder / name).read_bytes())
    assert main(["run", "--resume", str(tmp_path / "digits-fml"), "--set", "run.rounds=2"]) == 0
    assert (folder / "my-notes.txt").read_text() == "mine" and sorted(p.name for p in (folder / "best").iterdir()) == old
    assert "global-r000001.npz" not in {p.name for p in folder.iterdir()}  # fmlray's own superseded files go
    assert checkpoint.load(tmp_path / "digits-fml").round == 2


@pytest.mark.parametrize("damage, message", [
    (lambda d: _damage_manifest(d, b""), "manifest.json is damaged"),
    (lambda d: _damage_manifest(d, b"\xff\xfe binary"), "manifest.json is damaged"),
    (lambda d: _damage_manifest(d, "truncate"), "manifest.json is damaged"),
    (lambda d: _damage_manifest(d, b'{"version": 2, "round": "3", "global": null, "shards": []}'),
     "manifest.json is damaged"),
    (lambda d: _damage_manifest(d, b'{"version": 2, "round": 1, "global": null, "config": {}, '
                                   b'"shards": [{"file": "../x", "cids": [1], "crc32": [1], "layout": "a", "row_bytes": 1}]}'),
     "manifest.json is damaged"),
    (lambda d: _edit_cids(d, [99]), "names clients that a run of"),
    (lambda d: _edit_cids(d, [1, 1]), "or one client twice in a file"),
    # two clients' rows swapped by hand: each row still matched its checksum, so each client resumed the other's
    # state (a client left out of its file, with its checksum: its state restarted untrained) (audit 40)
    (lambda d: _edit_cids(d, [1, 0], sign=False), "manifest.json is damaged (it fails its checksum: edited since"),
    # ... with the version lowered to 3 as well (which has no checksum of its own): it resumed swapped (audit 48)
    (lambda d: (_edit_cids(d, [1, 0], sign=False), _edit_manifest(d, version=3)),
     "manifest.json is damaged (it fails its checksum: edited since"),
    # a newer fmlray's: "damaged ... start the run again" would have thrown a good run away
    (lambda d: _edit_manifest(d, version=99), "manifest.json is a checkpoint of a newer fmlray (VERSION 99; this one "
                                              "reads 2 to 4); resume it with that fmlray, or upgrade this one"),
    (lambda d: _damage_row(d, "flip"), "fails its checksum"),
    (lambda d: _damage_row(d, "missing"), "is missing"),
    (lambda d: _damage_row(d, "garbage"), "is missing or damaged"),
    (lambda d: (d / "checkpoint" / "global-r000001.npz").write_bytes(b"junk"), "global-r000001.npz is damaged"),
    # a whole file put in its place resumed silently (it has a checksum now, as each row has)
    (_replace_global, "global-r000001.npz is damaged (it fails its checksum"),
    # the manifest naming a file outside checkpoint/, or not a global model's: refused only in training, after
    # config.toml and metrics/ had changed, "the global state's keys do not match model 'mlp'"
    (lambda d: _edit_manifest(d, **{"global": "../partition.npz"}), "manifest.json is damaged"),
    (lambda d: _edit_manifest(d, **{"global": "manifest.json"}), "manifest.json is damaged"),
    (lambda d: _edit_manifest(d, global_crc32=None), "manifest.json is damaged"),  # a version 3 one keeps it
    # a FIFO in its place hung the resume; a link to /dev/zero read until memory ran out
    (lambda d: _special_global(d, "fifo"), "global-r000001.npz is a special file (a FIFO or a device)"),
    (lambda d: _special_global(d, "/dev/zero"), "global-r000001.npz is a special file (a FIFO or a device)"),
    # emptied: read as the defaults, it was "the checkpoint ... belongs to another config (differs in ...)"
    (lambda d: (d / "config.toml").write_text(""), "config.toml is damaged: it lacks [run], [data], [clients]"),
    (lambda d: (d / "config.toml").write_text((d / "config.toml").read_text().split("[training]")[0]),
     "config.toml is damaged: it lacks [training], [algorithm], [engine]"),
])
def test_a_damaged_checkpoint_is_one_line_and_exit_2(tmp_path, capsys, damage, message):
    assert main(["run", *SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=1"]) == 0
    damage(tmp_path / "digits-fml")
    before = snapshot(tmp_path / "digits-fml")
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "digits-fml"), "--set", "run.rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert snapshot(tmp_path / "digits-fml") == before  # refused before its config or metrics changed


def _flag_encrypted(path):
    """One bit of a zip changed: its first member flagged encrypted."""
    data = bytearray(path.read_bytes())
    data[data.index(b"PK\x01\x02") + 8] |= 1
    path.write_bytes(bytes(data))


def _other_partition_file(run_dir, tmp_path):
    """A run on data.partition_file whose file is then replaced by another partition of the same data."""
    import shutil
    shutil.copy(tmp_path / "other" / "partition.npz", tmp_path / "part.npz")


@pytest.mark.parametrize("setup, change, fragment", [
    ([], lambda run_dir, tmp_path: (run_dir / "partition.npz").write_bytes(
        (tmp_path / "other" / "partition.npz").read_bytes()), "the config's partition differs from the one"),
    (["--set", "data.partition=file"], _other_partition_file,  # made on seed 1's rows: its own check says so
     "holds row indices of other digits data than this config loads"),
    ([], "pixels", "was checkpointed on other digits data than data.root holds now"),
    ([], lambda run_dir, tmp_path: (run_dir / "partition.npz").write_bytes(  # cut short: it said "differs"
        (run_dir / "partition.npz").read_bytes()[:100]), "partition.npz, the partition the run started with, is damaged"),
    ([], lambda run_dir, tmp_path: _flag_encrypted(run_dir / "partition.npz"),  # a traceback (RuntimeError)
     "partition.npz, the partition the run started with, is damaged (RuntimeError)"),
])
def test_resuming_on_other_data_is_refused_and_changes_nothing(tmp_path, capsys, monkeypatch, setup, change, fragment):
    quick = [*SERIAL, "--set", "run.rounds=1", "--set", "clients.num_clients=4"]
    assert main(["run", *quick, "--set", f"run.output_dir={tmp_path}", "--set", "run.name=other",
                 "--set", "run.seed=1"]) == 0
    if setup:  # the run reads its partition from a file, a copy of the seed-0 partition
        assert main(["run", *quick, "--set", f"run.output_dir={tmp_path}", "--set", "run.name=seed0"]) == 0
        (tmp_path / "part.npz").write_bytes((tmp_path / "seed0" / "partition.npz").read_bytes())
        setup = [*setup, "--set", f"data.partition_file='{tmp_path / 'part.npz'}'"]
    assert main(["run", *quick, *setup, "--set", f"run.output_dir={tmp_path}"]) == 0
    run_dir = tmp_path / "digits-fml"
    if change == "pixels":  # a dataset file replaced in data.root: the same rows and labels, one pixel off
        load = fmlray.data.load_dataset

        def changed(*args, **kwargs):
            d = load(*args, **kwargs)
            d.x_train[0, 0] += 1.0
            return d
        monkeypatch.setattr(fmlray.data, "load_dataset", changed)
    else:
        change(run_dir, tmp_path)
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir), "--set", "run.rounds=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and ("start a new run" in err or "make a new one" in err), err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("entry", ["metrics-file", "summary-folder", "metrics-link"])
def test_an_entry_in_the_way_of_a_resumed_run_is_refused_before_anything_changes(tmp_path, capsys, entry):
    assert main(["run", *SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=1",
                 "--set", "clients.num_clients=4"]) == 0
    run_dir, mine = tmp_path / "digits-fml", tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's notes")
    if entry == "metrics-file":
        (run_dir / "metrics").write_text("x")
    elif entry == "summary-folder":
        (run_dir / "summary.txt").unlink()
        (run_dir / "summary.txt").mkdir()
    else:  # the clean-up of stale metric parts would have deleted the user's files through it
        (run_dir / "metrics").symlink_to(mine)
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir), "--set", "run.rounds=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "where the run keeps its" in err and "move it away" in err, err
    assert snapshot(run_dir) == before and (mine / "notes.txt").read_text() == "a user's notes"


@pytest.mark.parametrize("change, fragment", [
    ("clients.num_clients=30", "clients.num_clients"),
    ("model.meme=lenet5", "model.meme"),
    ("algorithm.fml.alpha=0.3", "algorithm.fml.alpha"),
])
def test_resuming_with_another_config_is_refused_by_name(tmp_path, capsys, change, fragment):
    assert main(["run", *SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=1"]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "digits-fml"), "--set", "run.rounds=2", "--set", change]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "belongs to another config" in err and fragment in err, err
    # what may change, may: how long, and where it runs
    assert main(["run", "--resume", str(tmp_path / "digits-fml"), "--set", "run.rounds=2",
                 "--set", "engine.state_store=disk", "--set", "run.eval_clients='sampled'"]) == 0


def test_a_run_whose_alpha_beta_follow_a_schedule_cannot_be_extended_but_resumes_with_its_rounds(tmp_path, capsys,
                                                                                                 monkeypatch):
    # α/β run from alpha to alpha_end over run.rounds: a resumed run extended to other rounds trained (and would
    # train) every round at other values than a run of that length; it went on silently
    from fmlray import rundir
    sched = [*SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "algorithm.fml.alpha_end=0.9",
             "--set", "clients.num_clients=4", "--set", "run.rounds=2"]
    assert main(["run", *sched]) == 0
    run_dir = tmp_path / "digits-fml"
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir), "--set", "run.rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "follows a schedule over its 2 rounds (algorithm.fml.alpha_end)" in err, err
    assert "keep run.rounds = 2, or start a new run" in err, err
    assert main(["run", "--resume", str(run_dir), "--set", "run.rounds=3", "--set", "training.lr=0.2"]) == 2
    err = capsys.readouterr().err.strip()  # with another change too: run.rounds is not offered as changeable
    assert "differs in run.rounds, training.lr" in err and "only run.eval_every, run.eval_clients" in err, err
    # with its own rounds it resumes (a run without a schedule still extends:
    # test_resumed_run_equals_the_uninterrupted_one): killed after its last checkpoint, resume finishes it
    real = rundir.finish

    def killed(run_dir, records, title):
        raise KeyboardInterrupt  # as a kill there would
    monkeypatch.setattr(rundir, "finish", killed)
    assert main(["run", *sched, "--set", "run.name=cut"]) == 130
    monkeypatch.setattr(rundir, "finish", real)
    assert main(["run", "--resume", str(tmp_path / "cut")]) == 0 and rundir.finished(tmp_path / "cut")
    same(accuracies(run_dir), accuracies(tmp_path / "cut"))


def test_a_checkpoint_from_before_the_algorithm_keys_resumes_and_they_stay_at_their_defaults(tmp_path, capsys):
    # a checkpoint written before algorithm.server_lr and the baselines' sections existed (issue 13)
    import json
    assert main(["run", *SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=1"]) == 0
    path = tmp_path / "digits-fml" / "checkpoint" / "manifest.json"
    manifest = json.loads(path.read_text())
    for key in ("server_lr", "ditto", "fedper", "fedrep", "apfl", "lgfedavg"):
        del manifest["config"]["algorithm"][key]
    manifest["version"] = 3  # as that fmlray wrote it: without the manifest's own checksum
    del manifest["manifest_crc32"]
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "digits-fml"), "--set", "run.rounds=2",
                 "--set", "algorithm.server_lr=0.5"]) == 2
    assert "differs in algorithm.server_lr" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "digits-fml"), "--set", "run.rounds=2"]) == 0


def test_a_checkpoint_of_an_older_fmlray_is_named_as_such(tmp_path, capsys):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    from fmlray.config import load_config
    from fmlray.rundir import write_config
    write_config(run_dir, load_config())
    (run_dir / "checkpoint.npz").write_bytes(b"PK")
    assert main(["run", "--resume", str(run_dir), "--set", "run.rounds=3"]) == 2
    assert "written by an older fmlray" in capsys.readouterr().err


def test_a_full_disk_while_checkpointing_is_one_line_and_the_last_checkpoint_stays(tmp_path):
    # a real file-size quota (RLIMIT_FSIZE) on the resumed run: its row files (~16 MB) cannot be written
    assert main(["run", *SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=1"]) == 0
    run_dir = tmp_path / "digits-fml"
    quota = "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4_000_000, 4_000_000)); " \
            "from fmlray.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", quota, "run", "--resume", str(run_dir), "--set", "run.rounds=2"],
                          capture_output=True, text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert "cannot write checkpoint file" in err and "File too large" in err and "still resumable" in err
    assert checkpoint.load(run_dir).round == 1
    assert main(["run", "--resume", str(run_dir), "--set", "run.rounds=2"]) == 0
    assert checkpoint.load(run_dir).round == 2


def test_an_unwritable_state_dir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["run", *SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=1",
                 "--set", "engine.state_store=disk", "--set", f"engine.state_dir={str(blocker / 'sub')!r}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write client state under" in err and "engine.state_dir" in err
    assert not (tmp_path / "digits-fml").exists()


def test_one_bad_client_is_left_out_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    real = fmlray.data.partition_dataset

    def poison_client_3(dataset, *args, **kwargs):
        part = real(dataset, *args, **kwargs)
        dataset.x_train[part.train[3]] = np.nan
        return part

    monkeypatch.setattr(fmlray.data, "partition_dataset", poison_client_3)
    assert main(["run", "--set", "engine.kind=serial", "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=2"]) == 0
    rows = pq.read_table(tmp_path / "digits-fml" / "metrics.parquet").to_pylist()
    excluded = [r for r in rows if r["split"] == "excluded"]
    assert [(r["round"], r["client"]) for r in excluded] == [(1, 3), (2, 3)]
    assert "client 3 (group mlp), round 1, training: loss is not finite" in excluded[0]["note"]
    trained = {r["client"] for r in rows if r["split"] == "train" and r["round"] == 2}
    assert trained == set(range(20)) - {3}
    ckpt = checkpoint.load(tmp_path / "digits-fml")
    assert all(np.isfinite(v).all() for v in ckpt.global_state.values())
    glob = [r["accuracy"] for r in rows if r["split"] == "global_test"]
    assert glob[-1] > 0.6  # the others' memes were averaged as usual (0.73 with client 3 healthy)


def sigint_at_round_one(tmp_path, rounds: int, disposition) -> tuple[int, str, str]:
    """`fmlray run` (serial) started with SIGINT's `disposition`, sent SIGINT at its first round line: its
    exit code, stdout and stderr. (The disposition is set, not inherited from whatever started the tests.)"""
    cmd = [sys.executable, "-m", "fmlray", "run", "--set", "engine.kind=serial", "--set", f"run.rounds={rounds}",
           "--set", "clients.num_clients=6", "--set", f"run.output_dir={tmp_path}"]  # 6: small rounds
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    for line in proc.stdout:
        if line.startswith("round"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_sigint_stops_after_the_round_with_a_checkpoint_and_resume_finishes(tmp_path):
    code, out, err = sigint_at_round_one(tmp_path, 30, signal.SIG_DFL)
    assert code == 130, err
    assert "stopping after this round" in out
    assert f"continue with: fmlray run --resume {tmp_path / 'digits-fml'}" in err and "Traceback" not in err
    stopped = checkpoint.load(tmp_path / "digits-fml").round
    assert 1 <= stopped < 30
    # each round's rows are on disk already; metrics.parquet (a finished run's mark) waits for the end
    assert {r["round"] for r in pq.read_table(tmp_path / "digits-fml" / "metrics").to_pylist()} == \
        set(range(1, stopped + 1))
    assert not (tmp_path / "digits-fml" / "metrics.parquet").exists()
    done = subprocess.run([sys.executable, "-m", "fmlray", "run", "--resume", str(tmp_path / "digits-fml"),
                           "--set", "run.rounds=" + str(stopped + 1)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rounds = {r["round"] for r in pq.read_table(tmp_path / "digits-fml" / "metrics.parquet").to_pylist()}
    assert rounds == set(range(1, stopped + 2))


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(tmp_path):
    # as a shell starts a script's background job: Ctrl-C ends the script, not the run (SIGTERM still stops it)
    code, out, err = sigint_at_round_one(tmp_path, 3, signal.SIG_IGN)
    assert code == 0, err
    assert "stopping" not in out and (tmp_path / "digits-fml" / "metrics.parquet").is_file()


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stopped_before_its_outputs(quick, monkeypatch):
    """`fmlray run` of `quick` stopped after its last checkpoint, its rounds' metric parts not yet merged."""
    from fmlray import rundir

    def killed(run_dir, records, title):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(rundir, "finish", killed)
        assert main(["run", *quick]) == 130


# a SIGINT in round 1, whose checkpoint would have been the run's first (the handler hears it mid-round)
SIGINT_IN_ROUND_ONE = """
import os, signal, sys
from fmlray.cli import main
from fmlray.engine.serial import SerialEngine

real = SerialEngine.train_round

def train_round(self, rnd, *args, **kwargs):
    if rnd == 1:
        os.kill(os.getpid(), signal.SIGINT)
    return real(self, rnd, *args, **kwargs)

SerialEngine.train_round = train_round
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_before_an_overwriting_run_has_its_first_checkpoint_keeps_the_earlier_run(tmp_path):
    # before: the stop wrote round 1's checkpoint, and that first checkpoint replaced the earlier run
    args = ["run", *SERIAL, "--set", "run.rounds=3", "--set", "clients.num_clients=6", "--set",
            f"run.output_dir={tmp_path}"]
    assert main(args) == 0
    run_dir = tmp_path / "digits-fml"
    before = snapshot(run_dir)
    out = subprocess.run([sys.executable, "-c", SIGINT_IN_ROUND_ONE, *args, "--overwrite", "--set", "run.seed=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 130, out.stderr
    assert f"SIGINT: stopping after this round, keeping the earlier run {run_dir}, without a checkpoint" in out.stdout
    assert out.stderr.splitlines()[-1] == (
        f"fmlray: stopped in round 1, before it replaced the earlier run: {run_dir} is left as it was, and nothing "
        "of this run was kept (--overwrite replaces it once the new run has its first checkpoint)")
    assert snapshot(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-fml"]  # no hidden new run, no lock
    # without an earlier run, the same stop keeps round 1's checkpoint, to resume from
    fresh = tmp_path / "fresh"
    out = subprocess.run([sys.executable, "-c", SIGINT_IN_ROUND_ONE, *args[:-1], f"run.output_dir={fresh}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 130 and "continue with: fmlray run --resume" in out.stderr, out.stderr
    assert checkpoint.load(fresh / "digits-fml").round == 1


def test_resume_without_the_earlier_rounds_metrics_is_refused_and_changes_nothing(tmp_path, capsys, monkeypatch):
    assert main(["run", *SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=2"]) == 0
    run_dir = tmp_path / "digits-fml"
    (run_dir / "metrics.parquet").unlink()
    before = snapshot(run_dir)
    capsys.readouterr()
    monkeypatch.setattr(fmlray.data, "load_dataset", lambda *a, **k: pytest.fail("data was loaded"))
    assert main(["run", "--resume", str(run_dir), "--set", "run.rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{run_dir} lacks the metric rows of round(s) 1-2" in err, err
    assert "put metrics.parquet back" in err
    assert snapshot(run_dir) == before


def test_a_damaged_round_of_a_stopped_run_is_refused_before_anything_changes(tmp_path, capsys, monkeypatch):
    # a metrics/round-N.parquet cut short (a copy of the folder interrupted) was only found when the resumed run
    # merged its parts at the end: a pyarrow traceback after the folder had changed, on every resume (audit 23)
    from fmlray import rundir
    quick = [*SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=2", "--set", "clients.num_clients=4"]
    stopped_before_its_outputs(quick, monkeypatch)
    run_dir = tmp_path / "digits-fml"
    part = run_dir / "metrics" / "round-000001.parquet"
    part.write_bytes(part.read_bytes()[:50])
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir), "--set", "run.rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{run_dir} lacks the metric rows of round(s) 1 " in err, err
    assert snapshot(run_dir) == before
    # a damaged part of a round that metrics.parquet still holds (a finished run's extension cut short) is
    # rewritten from it
    assert main(["run", *quick, "--set", "run.name=whole"]) == 0
    whole = tmp_path / "whole"
    rundir.Records(whole, upto=2)  # splits metrics.parquet into parts, as an extension does
    (whole / "metrics" / "round-000002.parquet").write_bytes(b"PAR1")
    assert main(["run", "--resume", str(whole), "--set", "run.rounds=3"]) == 0
    assert sorted(set(pq.read_table(whole / "metrics.parquet")["round"].to_pylist())) == [1, 2, 3]


def test_an_extension_cut_short_while_splitting_the_metrics_takes_the_rest_from_metrics_parquet(tmp_path):
    from fmlray.rundir import Records
    assert main(["run", *SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=3"]) == 0
    run_dir = tmp_path / "digits-fml"
    whole = pq.read_table(run_dir / "metrics.parquet")
    Records(run_dir, upto=3)  # splits metrics.parquet into metrics/round-*.parquet
    (run_dir / "metrics" / "round-000003.parquet").unlink()  # as if killed before the last part was written
    (run_dir / "metrics" / "round-000002.parquet").unlink()
    Records(run_dir, upto=3).merge()
    assert repr(pq.read_table(run_dir / "metrics.parquet").to_pylist()) == repr(whole.to_pylist())  # nan == nan


@pytest.mark.parametrize("cut", ["before the outputs", "after metrics.parquet"])
def test_a_run_killed_after_its_last_checkpoint_is_finished_by_resume(tmp_path, capsys, monkeypatch, cut):
    # killed between the last round's checkpoint and the end of its outputs: resume writes them (it once
    # refused, "already ran its 2 rounds", while report sent the user back to --resume)
    from fmlray import rundir
    quick = [*SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=2", "--set", "clients.num_clients=4"]
    assert main(["run", *quick, "--set", "run.name=whole"]) == 0
    real = rundir.finish

    def killed(run_dir, records, title):
        if cut == "after metrics.parquet":
            records.merge()
        raise KeyboardInterrupt  # as a kill there would
    monkeypatch.setattr(rundir, "finish", killed)
    assert main(["run", *quick]) == 130
    monkeypatch.setattr(rundir, "finish", real)
    run_dir = tmp_path / "digits-fml"
    assert not rundir.finished(run_dir) and not (run_dir / "summary.txt").exists()
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 2 and "unfinished" in capsys.readouterr().err
    if cut == "after metrics.parquet":  # and its partition.npz deleted meanwhile: written back, as by any resume
        (run_dir / "partition.npz").unlink()
    assert main(["run", "--resume", str(run_dir)]) == 0
    assert "ran its 2 rounds; writing its outputs" in capsys.readouterr().out
    assert rundir.finished(run_dir) and (run_dir / "summary.txt").is_file() and (run_dir / "accuracy.png").is_file()
    same(accuracies(run_dir), accuracies(tmp_path / "whole"))
    with np.load(run_dir / "partition.npz") as got, np.load(tmp_path / "whole" / "partition.npz") as want:
        assert got.files == want.files and all(np.array_equal(got[k], want[k]) for k in want.files)
    assert main(["report", str(run_dir)]) == 0


@pytest.mark.parametrize("every", [1, 0])
def test_a_full_disk_while_the_outputs_are_written_is_one_line_saying_how_to_finish_the_run(tmp_path, capsys,
                                                                                         monkeypatch, every):
    # it was "fmlray: error: No space left on device", exit 1, naming nothing
    import errno

    from fmlray import rundir
    real = rundir.finish

    def full(folder, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "metrics.parquet"))
    monkeypatch.setattr(rundir, "finish", full)
    argv = ["run", *SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=1",
            "--set", f"run.checkpoint_every={every}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    run_dir = tmp_path / "digits-fml"
    assert len(err.splitlines()) == 1 and err.startswith("fmlray: error: cannot write the run's outputs (No space "
                                                         "left on device: "), err
    if every:
        assert err.endswith(f"its last checkpoint is kept: free space there and finish it with: fmlray run --resume "
                            f"{run_dir}")
        monkeypatch.setattr(rundir, "finish", real)
        assert main(["run", "--resume", str(run_dir)]) == 0 and rundir.finished(run_dir)
    else:
        assert err.endswith("it has no checkpoint (run.checkpoint_every = 0), so nothing of it is kept")
        assert list(tmp_path.iterdir()) == []


def test_a_permission_denied_while_the_outputs_are_written_says_to_make_it_writable(tmp_path, capsys, monkeypatch):
    # it said "free space there" whatever the error was
    import errno

    from fmlray import rundir

    def denied(folder, *args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder / "metrics.parquet"))
    monkeypatch.setattr(rundir, "finish", denied)
    assert main(["run", *SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write the run's outputs (Permission denied: " in err, err
    assert err.endswith("its last checkpoint is kept: make it writable and finish it with: fmlray run --resume "
                        f"{tmp_path / 'digits-fml'}"), err


@pytest.mark.parametrize("failing", [2, 1])
def test_a_full_disk_while_a_rounds_metrics_are_written_is_one_line_saying_how_to_go_on(tmp_path, capsys,
                                                                                     monkeypatch, failing):
    # it was "fmlray: error: No space left on device", exit 1, naming nothing (audit 23)
    import errno

    from fmlray import rundir
    real = rundir.Records.append

    def full(self, rnd, rows):
        if rnd == failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.parts / f"round-{rnd:06d}.parquet"))
        real(self, rnd, rows)
    quick = [*SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=3", "--set", "clients.num_clients=4"]
    assert main(["run", *quick, "--set", "run.name=whole"]) == 0
    monkeypatch.setattr(rundir.Records, "append", full)
    capsys.readouterr()
    assert main(["run", *quick]) == 2
    err = capsys.readouterr().err.strip()
    run_dir = tmp_path / "digits-fml"
    assert len(err.splitlines()) == 1 and err.startswith(f"fmlray: error: cannot write round {failing}'s metrics (No "
                                                         "space left on device: "), err
    monkeypatch.setattr(rundir.Records, "append", real)
    if failing == 2:  # round 1's checkpoint is kept, and resume goes on from it
        assert err.endswith(f"its last checkpoint is kept: free space there and finish it with: fmlray run --resume "
                            f"{run_dir}"), err
        assert main(["run", "--resume", str(run_dir)]) == 0
        same(accuracies(tmp_path / "whole"), accuracies(run_dir))
    else:
        assert err.endswith("it has no checkpoint yet, so nothing of it is kept"), err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["whole"]


def test_a_full_disk_at_a_new_runs_first_checkpoint_does_not_promise_an_earlier_one(tmp_path):
    quota = "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4_000_000, 4_000_000)); " \
            "from fmlray.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", quota, "run", *SERIAL, "--set", f"run.output_dir={tmp_path}",
                           "--set", "run.rounds=1"], capture_output=True, text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.endswith("(this run has no checkpoint yet, so none is kept)") and "still resumable" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_what_a_user_puts_into_metrics_survives_a_resume_and_the_end_of_the_run(tmp_path, capsys, monkeypatch):
    # a stopped run's metrics/ was cleared of every name that was not a round's part when it was resumed, and
    # deleted whole when the run ended: a user's notes there were lost without a word
    from fmlray import rundir
    quick = [*SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=2", "--set", "clients.num_clients=4"]
    assert main(["run", *quick, "--set", "run.name=whole", "--set", "run.rounds=3"]) == 0
    stopped_before_its_outputs(quick, monkeypatch)
    run_dir = tmp_path / "digits-fml"
    metrics_dir = run_dir / "metrics"
    (metrics_dir / "notes.txt").write_text("mine")
    (metrics_dir / "plots").mkdir()
    (metrics_dir / "plots" / "a.png").write_bytes(b"png")
    (metrics_dir / "round-3.csv").write_text("mine too")
    (metrics_dir / "round-².parquet").write_bytes(b"x")  # '²' passes str.isdigit() (int() raised: a traceback)
    assert main(["run", "--resume", str(run_dir), "--set", "run.rounds=3"]) == 0
    assert (metrics_dir / "notes.txt").read_text() == "mine" and (metrics_dir / "plots" / "a.png").read_bytes() == b"png"
    assert sorted(p.name for p in metrics_dir.iterdir()) == ["notes.txt", "plots", "round-3.csv", "round-².parquet"]
    assert rundir.finished(run_dir) and not rundir.resumable(run_dir)
    same(accuracies(run_dir), accuracies(tmp_path / "whole"))
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    # with nothing of the user's in it, metrics/ goes when the run ends, as before
    assert main(["run", *quick, "--set", "run.name=plain"]) == 0
    assert not (tmp_path / "plain" / "metrics").exists()


def test_a_folder_where_a_round_of_metrics_goes_is_refused_before_a_resume_changes_anything(tmp_path, capsys,
                                                                                           monkeypatch):
    quick = [*SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=2", "--set", "clients.num_clients=4"]
    stopped_before_its_outputs(quick, monkeypatch)
    run_dir = tmp_path / "digits-fml"
    odd = run_dir / "metrics" / "round-000003.parquet"  # the round a resume would write next
    odd.mkdir()
    (odd / "keep.txt").write_text("mine")
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir), "--set", "run.rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{odd} is a folder, where the run keeps its file metrics/round-000003.parquet" in err, err
    assert snapshot(run_dir) == before


QUICK = [*SERIAL, "--set", "run.rounds=1", "--set", "clients.num_clients=4"]


def test_a_checkpoint_of_the_format_before_checksummed_global_models_resumes_and_is_still_checked(tmp_path, capsys):
    # version 2 manifests keep no checksum of the global model: read still; a global file of the wrong keys is
    # refused before anything changes (it was refused only in training, after config.toml and metrics/ changed)
    import shutil
    assert main(["run", *QUICK, "--set", f"run.output_dir={tmp_path}"]) == 0
    run_dir, other = tmp_path / "digits-fml", tmp_path / "other"
    _edit_manifest(run_dir, version=2, global_crc32=None, partition=None, manifest_crc32=None)
    shutil.copytree(run_dir, other)
    shutil.copy(run_dir / "partition.npz", other / "checkpoint" / "global-r000001.npz")
    before = snapshot(other)
    capsys.readouterr()
    assert main(["run", "--resume", str(other), "--set", "run.rounds=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{other / 'checkpoint' / 'global-r000001.npz'} does not hold the global " \
        "state of model 'mlp'" in err, err
    assert snapshot(other) == before
    assert main(["run", "--resume", str(run_dir), "--set", "run.rounds=2"]) == 0
    assert checkpoint.load(run_dir).round == 2 and checkpoint.load(run_dir).partition is not None  # now version 3


def test_a_deleted_partition_npz_is_written_back_where_the_checkpoint_vouches_for_the_configs(tmp_path, capsys,
                                                                                             monkeypatch):
    # resumed without a check of the partition, and the finished run had no partition.npz
    import shutil
    assert main(["run", *QUICK, "--set", f"run.output_dir={tmp_path}"]) == 0
    run_dir = tmp_path / "digits-fml"
    saved, table = (run_dir / "partition.npz").read_bytes(), (run_dir / "partition.csv").read_bytes()
    older, other = tmp_path / "older", tmp_path / "other"
    (run_dir / "partition.npz").unlink()
    shutil.copytree(run_dir, older)
    shutil.copytree(run_dir, other)
    (run_dir / "partition.csv").unlink()  # it stayed missing (audit 40)
    assert main(["run", "--resume", str(run_dir), "--set", "run.rounds=2"]) == 0
    assert (run_dir / "partition.npz").read_bytes() == saved and (run_dir / "partition.csv").read_bytes() == table
    # an older checkpoint keeps no fingerprint of the partition: nothing vouches for the config's
    _edit_manifest(older, version=2, global_crc32=None, partition=None, manifest_crc32=None)
    before = snapshot(older)
    capsys.readouterr()
    assert main(["run", "--resume", str(older), "--set", "run.rounds=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{older / 'partition.npz'}, the partition the run started with, is " \
        "missing" in err and "put the run's copy back" in err, err
    assert snapshot(older) == before
    # the config gives another partition now (clients 0 and 1 swapped)
    real = fmlray.data.partition_dataset

    def swapped(*args, **kwargs):
        part = real(*args, **kwargs)
        return fmlray.data.Partition((part.train[1], part.train[0], *part.train[2:]), part.test)
    monkeypatch.setattr(fmlray.data, "partition_dataset", swapped)
    before = snapshot(other)
    assert main(["run", "--resume", str(other), "--set", "run.rounds=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"the config's partition differs from the one {other} was checkpointed " \
        "on" in err, err
    assert snapshot(other) == before


@pytest.mark.parametrize("code, where, fix", [
    ("EACCES", "rows", "make {folder} writable, then continue with: fmlray run --resume {run}"),
    ("ENOSPC", "rows", "free space there, then continue with: fmlray run --resume {run}"),
    ("EROFS", "global", "make {folder} writable, then continue with: fmlray run --resume {run}"),
    ("EACCES", "first", "set run.output_dir to a writable folder"),
])
def test_a_checkpoint_that_cannot_be_written_is_one_line_whose_remedy_fits_the_cause(tmp_path, capsys, monkeypatch,
                                                                                    code, where, fix):
    # "(Permission denied); free space there or set run.output_dir elsewhere", where run.output_dir cannot
    # change (a run with a checkpoint goes on in its folder) and space was not the problem
    import errno

    from fmlray.engine import state
    number = getattr(errno, code)
    if where != "first":
        assert main(["run", *QUICK, "--set", f"run.output_dir={tmp_path}"]) == 0
    if where == "global":
        real_write = checkpoint.write_atomic

        def failing(path, *args, **kwargs):
            if path.name.startswith("global-"):
                raise OSError(number, os.strerror(number), str(path))
            return real_write(path, *args, **kwargs)
        monkeypatch.setattr(checkpoint, "write_atomic", failing)
    else:
        def failing(path, *args):
            raise OSError(number, os.strerror(number), str(path))
        monkeypatch.setattr(state, "_open_direct", failing)
    capsys.readouterr()
    run_dir = tmp_path / "digits-fml"
    argv = ["run", *QUICK, "--set", f"run.output_dir={tmp_path}"] if where == "first" else \
        ["run", "--resume", str(run_dir), "--set", "run.rounds=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"({os.strerror(number)}); " + fix.format(
        folder=run_dir / "checkpoint", run=run_dir) in err, err
    if where == "first":
        assert err.endswith("(this run has no checkpoint yet, so none is kept)"), err
    else:
        assert err.endswith("(the previous checkpoint is still resumable)") and "run.output_dir" not in err, err
        monkeypatch.undo()
        assert main(["run", "--resume", str(run_dir), "--set", "run.rounds=2"]) == 0


def test_an_unreadable_manifest_is_said_to_be_unreadable_not_damaged(tmp_path, capsys, monkeypatch):
    # "manifest.json is damaged or not a checkpoint this fmlray can read; start the run again"
    import errno
    import pathlib
    assert main(["run", *QUICK, "--set", f"run.output_dir={tmp_path}"]) == 0
    real = pathlib.Path.read_bytes

    def denied(self):
        if self.name == "manifest.json":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self)
    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "digits-fml"), "--set", "run.rounds=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.json (Permission denied)" in err and "make it readable" in err, err
    assert "damaged" not in err and "start the run again" not in err, err


def _as_a_user():
    """Root ignores file modes; without CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER (dropped from the
    bounding set before exec) it cannot."""
    if os.geteuid() == 0:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2, 3):
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.mark.parametrize("mode, fragment", [
    ("checkpoint 555", "cannot write into {ckpt} (Permission denied); the run was left as it was: make it writable"),
    # a stopped run's metrics/ (made here: this run finished) was found read-only only as it was tidied, after
    # config.toml had been rewritten, in the general line for an OSError
    ("metrics 555", "cannot write into {run}/metrics (Permission denied); the run was left as it was: make it "
                    "writable"),
    ("manifest 000", "cannot read {ckpt}/manifest.json (Permission denied); the checkpoint was left as it is: make "
                     "it readable"),
])
def test_a_checkpoint_without_the_permissions_a_resume_needs_is_refused_before_anything_changes(tmp_path, mode,
                                                                                              fragment):
    assert main(["run", *QUICK, "--set", f"run.output_dir={tmp_path}"]) == 0
    run_dir = tmp_path / "digits-fml"
    what, bits = mode.split()
    target = run_dir / "metrics" if what == "metrics" else run_dir / "checkpoint" / (
        "manifest.json" if what == "manifest" else "")
    if what == "metrics":
        target.mkdir()
    before = snapshot(run_dir)
    target.chmod(int(bits, 8))
    try:
        done = subprocess.run([sys.executable, "-m", "fmlray", "run", "--resume", str(run_dir), "--set",
                               "run.rounds=2"], capture_output=True, text=True, timeout=300, preexec_fn=_as_a_user)
    finally:
        target.chmod(0o644 if what == "manifest" else 0o755)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert fragment.format(ckpt=run_dir / "checkpoint", run=run_dir) in err and "run.output_dir" not in err, err
    assert snapshot(run_dir) == before
