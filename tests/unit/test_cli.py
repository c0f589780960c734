"""The CLI end to end: outputs of a run, and one clear line with exit code 2 for each bad input."""

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

import fmlray.data
from fmlray.cli import main

QUICK = ["--set", "run.rounds=2", "--set", "training.epochs=1", "--set", "engine.kind=serial"]  # Ray: integration/


def fail(capsys, argv, fragment, out_dir=None):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert fragment in err, err
    if out_dir is not None:
        assert not out_dir.exists() or list(out_dir.iterdir()) == [], "a failed run left files behind"
    return err


def _layout(arch):
    from fmlray.engine.state import Layout
    from fmlray.models import build_model
    return Layout(arch, build_model(arch, (1, 8, 8), 10), "sgd", 0.9).name.split("-", 1)[1]


def test_run_writes_every_output_and_report_reprints_it(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["run", *QUICK, "--set", f"run.output_dir={out}", "--set", "run.name=t"]) == 0
    printed = capsys.readouterr().out
    assert "round 2/2" in printed and "global model, global test set" in printed
    run_dir = out / "t"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".fmlray-run", "accuracy.png", "checkpoint", "config.toml", "metrics.parquet", "partition.csv", "partition.npz", "summary.json",
        "summary.txt"]
    # the last checkpoint: the manifest, the global model and the clients' rows (both rounds' rows are
    # live: every client trained in round 2, so round 1's file was superseded and deleted)
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == [
        "global-r000002.npz", "manifest.json", "rows-r000002-serial-lenet5-" + _layout("lenet5") + ".npy",
        "rows-r000002-serial-mlp-" + _layout("mlp") + ".npy"]
    table = pq.read_table(run_dir / "metrics.parquet")
    assert {"round", "client", "group", "model", "split", "loss", "accuracy", "samples", "seconds"} <= set(table.column_names)
    local = [r for r in table.to_pylist() if r["model"] == "local" and r["split"] == "test" and r["round"] == 2]
    assert len(local) == 20 and {r["group"] for r in local} == {"mlp", "lenet5"}
    assert main(["run", "--config", str(run_dir / "config.toml"), "--set", "run.name=again"]) == 0  # resolved config reruns
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    assert "local models, own test splits" in capsys.readouterr().out
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_partition_prints_and_saves_the_table(tmp_path, capsys):
    assert main(["partition", "--save", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    assert "class_0" in out and len(out.splitlines()) >= 21
    assert (tmp_path / "p.csv").read_text().count("\n") == 21


def test_compare_prints_all_algorithms_side_by_side(tmp_path, capsys):
    assert main(["compare", *QUICK, "--set", f"run.output_dir={tmp_path}"]) == 0
    table = capsys.readouterr().out.split("algorithm")[-1]
    for name in ("fml", "fedavg", "fedprox", "local"):
        assert f"\n{name} " in table
        assert (tmp_path / f"digits-fml-{name}" / "metrics.parquet").is_file()


@pytest.mark.parametrize("argv, fragment", [
    (["run", "--set", "training.lr=abc"], "training.lr must be a number"),
    (["run", "--set", "training.lrr=0.1"], "unknown key 'training.lrr'"),
    (["run", "--set", "algorithm.fml.alpha=2"], "algorithm.fml.alpha must be in [0, 1]"),
    (["run", "--config", "/nonexistent.toml"], "does not exist"),
    (["run", "--set", "clients.num_clients=500"], "clients"),
    (["run", "--set", "data.dataset=fmnist", "--set", "data.root=/nonexistent"], "data.root"),
    (["run", "--set", "data.dataset=synthetic", "--set", "model.meme=cnn"], "use 'mlp'"),
    (["run", "--set", "data.partition=shards", "--set", "data.classes_per_client=11"], "classes"),
    (["run", "--set", "run.rounds=0"], "run.rounds must be >= 1"),
    (["compare", "--algorithms", "fml,fedsgd"], "fedsgd"),
    (["report", "/tmp"], "is not a finished fmlray run"),
    (["run", "--set", "clients.fraction=1.5"], "clients.fraction must be in (0, 1]"),
    (["run", "--set", "training.batch_size=0"], "training.batch_size must be >= 1"),
    (["run", "--set", "training.optimizer=lbfgs"], "training.optimizer = 'lbfgs' is unknown"),
    (["run", "--set", "algorithm.fml.beta=-0.1"], "algorithm.fml.beta must be in [0, 1]"),
    (["run", "--set", "data.test_fraction=1"], "data.test_fraction must be in (0, 1)"),
    (["run", "--set", "data.dirichlet_alpha=0"], "data.dirichlet_alpha must be > 0"),
    (["run", "--set", "data.max_train_samples=-1"], "data.max_train_samples must be >= 0"),
    (["run", "--set", "data.dataset=cifar10", "--set", "data.root=/nonexistent"], "cifar10"),
    (["run", "--set", "clients.groups.0.local_model=vgg"], "local_model = 'vgg' is unknown"),
    (["run", "--set", "clients.groups.0.num_cpus=0"], "num_cpus must be > 0"),
    (["run", "--set", "clients.groups=[{name='a', count=5}]"], "counts add up to 5"),
    (["run", "--set", "run.eval_every=0"], "run.eval_every must be >= 1"),
    (["run", "--set", "engine.num_actors=-1"], "engine.num_actors must be >= 0"),
    (["run", "--resume", "/tmp"], "is not an fmlray run folder"),
    (["run", "--resume", "/tmp", "--config", "x.toml"], "drop --config"),
    (["launch"], "invalid choice"),
    (["run", "--bogus"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, fragment):
    out = tmp_path / "runs"
    extra = ["--set", f"run.output_dir={out}", "--set", "engine.kind=serial"] if argv[0] == "run" else []
    fail(capsys, argv + extra, fragment, out)


def test_bad_toml_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nrounds = = 3\n")
    fail(capsys, ["run", "--config", str(bad)], "is not valid TOML")


def test_nan_loss_stops_the_run_naming_the_client_and_writes_nothing(tmp_path, capsys, monkeypatch):
    real = fmlray.data.load_dataset

    def poisoned(*args, **kwargs):
        ds = real(*args, **kwargs)
        x = ds.x_train.copy()
        x[:] = np.nan
        return type(ds)(ds.name, x, ds.y_train, ds.x_test, ds.y_test, ds.num_classes)

    monkeypatch.setattr(fmlray.data, "load_dataset", poisoned)
    out = tmp_path / "runs"
    err = fail(capsys, ["run", *QUICK, "--set", f"run.output_dir={out}"], "loss is not finite", out)
    assert "client 0 (group mlp), round 1, training" in err


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fmlray", "run", "--set", "data.dataset=nope"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fmlray: error: data.dataset = 'nope' is unknown; choose one of digits, synthetic, fmnist, mnist, cifar10, cifar100, emnist"]
    assert not (tmp_path / "runs").exists()
