"""Checkpoints and resume, signals, and bad client updates (serial engine; Ray in integration/)."""

import os
import signal
import subprocess
import sys
import time

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


def test_resumed_run_equals_the_uninterrupted_one(tmp_path, capsys):
    out = ["--set", f"run.output_dir={tmp_path}"]
    assert main(["run", *SERIAL, *out, "--set", "run.rounds=4", "--set", "run.name=whole"]) == 0
    assert main(["run", *SERIAL, *out, "--set", "run.rounds=2", "--set", "run.name=split"]) == 0
    assert checkpoint.load(tmp_path / "split").round == 2
    assert main(["run", "--resume", str(tmp_path / "split"), "--set", "run.rounds=4"]) == 0
    assert "resumed after round 2" in capsys.readouterr().out
    same(accuracies(tmp_path / "whole"), accuracies(tmp_path / "split"))
    a, b = checkpoint.load(tmp_path / "whole"), checkpoint.load(tmp_path / "split")
    assert a.round == b.round == 4 and a.private.keys() == b.private.keys()
    for k in a.global_state:
        np.testing.assert_array_equal(a.global_state[k], b.global_state[k])
    for k in a.private:
        np.testing.assert_array_equal(a.private[k], b.private[k])


def test_checkpoint_is_replaced_atomically_and_read_without_pickle(tmp_path):
    ckpt = checkpoint.Checkpoint(3, {"w": np.ones(2, np.float32)}, {"0/local/w": np.zeros(2)}, [{"round": 1, "loss": float("nan")}])
    checkpoint.save(tmp_path, ckpt)
    checkpoint.save(tmp_path, ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]  # no temporary left
    back = checkpoint.load(tmp_path)
    assert back.round == 3 and np.isnan(back.rows[0]["loss"]) and back.private["0/local/w"].shape == (2,)


@pytest.mark.parametrize("damage", [b"", b"not a zip file at all", "truncate"])
def test_a_damaged_checkpoint_is_one_line_and_exit_2(tmp_path, capsys, damage):
    assert main(["run", *SERIAL, "--set", f"run.output_dir={tmp_path}", "--set", "run.rounds=1"]) == 0
    path = tmp_path / "digits-fml" / "checkpoint.npz"
    path.write_bytes(path.read_bytes()[:2000] if damage == "truncate" else damage)
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "digits-fml"), "--set", "run.rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint.npz is damaged" in err


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


def test_sigint_stops_after_the_round_with_a_checkpoint_and_resume_finishes(tmp_path):
    cmd = [sys.executable, "-m", "fmlray", "run", "--set", "engine.kind=serial", "--set", "run.rounds=30",
           "--set", f"run.output_dir={tmp_path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("round"):
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopping after this round" in out
    assert f"continue with: fmlray run --resume {tmp_path / 'digits-fml'}" in err and "Traceback" not in err
    stopped = checkpoint.load(tmp_path / "digits-fml").round
    assert 1 <= stopped < 30
    assert not (tmp_path / "digits-fml" / "metrics.parquet").exists()
    done = subprocess.run([sys.executable, "-m", "fmlray", "run", "--resume", str(tmp_path / "digits-fml"),
                           "--set", "run.rounds=" + str(stopped + 1)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rounds = {r["round"] for r in pq.read_table(tmp_path / "digits-fml" / "metrics.parquet").to_pylist()}
    assert rounds == set(range(1, stopped + 2))
