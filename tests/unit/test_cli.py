"""The CLI end to end: outputs of a run, and one clear line with exit code 2 for each bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import fmlray.cli
import fmlray.data
from fmlray import signals
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
    assert "class_0" in out and len(out.splitlines()) >= 21 and out.endswith(f"\nwrote {tmp_path / 'p.csv'}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]  # no temporary left
    assert (tmp_path / "p.csv").read_text().count("\n") == 21


def test_a_pipe_closed_early_ends_the_command_quietly():
    """`fmlray partition | head -1`: the reader goes first; the table's print meets a closed pipe."""
    proc = subprocess.Popen([sys.executable, "-m", "fmlray", "partition"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the child has written anything
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_under_stdout_is_one_line_not_a_traceback():
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "fmlray", "config"], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "fmlray: error: No space left on device; free space on that disk\n", proc.stderr


def test_a_closed_stdout_or_an_ascii_terminal_is_no_traceback(tmp_path):
    """cron and daemons close fd 1 (Python then leaves sys.stdout None); PYTHONIOENCODING=ascii cannot show ×."""
    closed = ["sh", "-c", 'exec "$0" -m fmlray "$@" >&-', sys.executable]  # started with fd 1 closed
    for argv in (["config"], ["run", *QUICK, "--set", "run.rounds=1", "--set", "clients.num_clients=4",
                               "--set", f"run.output_dir={tmp_path}", "--set", "run.name=closed"]):
        proc = subprocess.run([*closed, *argv], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stderr == "", (argv, proc.stderr)
    assert (tmp_path / "closed" / "summary.txt").is_file()
    ascii_ = subprocess.run([sys.executable, "-m", "fmlray", "config"], capture_output=True, timeout=120,
                            env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert ascii_.returncode == 0 and ascii_.stderr == b"", ascii_.stderr
    assert b"\\u2190" in ascii_.stdout  # the key table's arrow, escaped as Python's stderr escapes


def test_a_name_an_ascii_locale_cannot_hold_is_one_line_naming_the_locale(tmp_path):
    # with Python's UTF-8 mode off under the C locale: a traceback (os.fsencode), or "not UTF-8 text ... rename
    # that folder", for a name the user typed in UTF-8 (audit 48)
    env = {**os.environ, "LANG": "C", "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    (tmp_path / "n.toml").write_text('[run]\nname = "na\u00efve"\n', encoding="utf-8")
    fix = "run fmlray under a UTF-8 locale (e.g. LANG=C.UTF-8) or with PYTHONUTF8=1"
    for argv, said in ((["-c", str(tmp_path / "n.toml")], "'\\xef' cannot be written in this locale's encoding (ascii); "),
                       (["--set", 'run.name="r\u00e9sum\u00e9"'], "run.name = 'r\\xe9sum\\xe9' cannot be read in this "
                                                                  "locale's encoding (ascii); ")):
        proc = subprocess.run([sys.executable, "-m", "fmlray", "run", *argv, "--set", "engine.kind=serial",
                               "--set", f"run.output_dir={tmp_path / 'runs'}"], capture_output=True, timeout=120,
                              env=env, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.decode() == f"fmlray: error: {said}{fix}\n", proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_run_whose_output_pipe_closes_stops_with_the_resume_command_on_stderr(tmp_path):
    """`fmlray run ... | head -6`: the run stops at its next line, as a shell tool does, and says how to go on."""
    proc = subprocess.Popen([sys.executable, "-m", "fmlray", "run", *QUICK, "--set", "run.rounds=4",
                             "--set", "clients.num_clients=4", "--set", f"run.output_dir={tmp_path}",
                             "--set", "run.name=piped"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("round 1/4"):
            break
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141
    assert err == f"fmlray: output closed (broken pipe), so the run stopped; continue with: fmlray run --resume " \
                  f"{tmp_path / 'piped'}\n", err
    assert main(["run", "--resume", str(tmp_path / "piped")]) == 0


def test_fmlrays_own_warnings_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fmlray", "run", *QUICK, "--set", "run.rounds=1",
                           "--set", "clients.num_clients=4", "--set", "training.optimizer=adam",
                           "--set", "training.batching=vmap", "--set", f"run.output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["fmlray: warning: training.batching = 'vmap': clients with models mlp+mlp "
                                        "train one after another: the batched step is SGD's (training.optimizer = "
                                        "'adam')"], proc.stderr  # not Python's two lines with the source line


def test_compare_prints_all_algorithms_side_by_side(tmp_path, capsys):
    assert main(["compare", *QUICK, "--set", f"run.output_dir={tmp_path}"]) == 0
    table = capsys.readouterr().out.split("algorithm")[-1]
    for name in ("fml", "fedavg", "fedprox", "local"):
        assert f"\n{name} " in table
        assert (tmp_path / f"digits-fml-{name}" / "metrics.parquet").is_file()


@pytest.mark.parametrize("extra, fragment", [
    (["--algorithms", "fml,fedper", "--set", "algorithm.fedper.head_layers=3"],
     "compare's fedper run: algorithm 'fedper' shares no part of model.meme"),
    (["--algorithms", "lgfedavg", "--set", "algorithm.lgfedavg.global_layers=0"], "algorithm 'lgfedavg' shares no part"),
    (["--algorithms", "fml,fedrep", "--set", "algorithm.fedrep.body_epochs=6"],
     "compare's fedrep run (digits-fml-fedrep): algorithm.fedrep.body_epochs = 6 is more than training.epochs"),
])
def test_compare_checks_every_algorithms_settings_before_any_run_is_written(tmp_path, capsys, extra, fragment):
    fail(capsys, ["compare", *QUICK, "--set", f"run.output_dir={tmp_path / 'out'}", *extra], fragment,
         out_dir=tmp_path / "out")


def test_compare_settings_of_an_algorithm_it_does_not_run_are_not_its_business(tmp_path, capsys):
    assert main(["compare", *QUICK, "--set", f"run.output_dir={tmp_path}", "--set", "clients.num_clients=4",
                 "--set", "algorithm.name=fedper", "--set", "algorithm.fedper.head_layers=50",
                 "--algorithms", "fedavg"]) == 0


def test_compare_stopped_by_a_signal_names_the_run_to_resume_and_what_did_not_start(tmp_path, capsys, monkeypatch):
    import fmlray.simulation as simulation
    ran = []

    def run_experiment(cfg, *args, **kwargs):  # the second algorithm's run is stopped, as SIGINT stops it
        ran.append(cfg.algorithm.name)
        if len(ran) == 2:
            raise simulation.RunInterrupted(3)
        return tmp_path / cfg.run.name, {}
    monkeypatch.setattr(simulation, "run_experiment", run_experiment)
    assert main(["compare", *QUICK, "--set", f"run.output_dir={tmp_path}", "--algorithms", "fml,fedavg,local"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("fmlray: stopped the fedavg run after round 3 (not started: local); continue with the same "
                   "command and --resume") and ran == ["fml", "fedavg"]


def test_compare_resume_refuses_overwrite_and_runs_of_another_config(tmp_path, capsys):
    base = ["compare", *QUICK, "--set", f"run.output_dir={tmp_path}", "--set", "clients.num_clients=4",
            "--algorithms", "fedavg,local"]
    fail(capsys, [*base, "--resume", "--overwrite"], "--resume keeps what the compare's runs did, --overwrite "
         "replaces them; give one")
    assert main(["run", *QUICK, "--set", f"run.output_dir={tmp_path}", "--set", "clients.num_clients=4",
                 "--set", "algorithm.name=local", "--set", "run.name=digits-fml-local", "--set", "training.lr=0.3"]) == 0
    capsys.readouterr()
    fail(capsys, base, f"{tmp_path / 'digits-fml-local'} already exists; choose another run.name (--set run.name=NEW) "
         "or add --overwrite to replace it; or add --resume to continue a compare that stopped")
    err = fail(capsys, [*base, "--resume"], f"run digits-fml-local finished in {tmp_path / 'digits-fml-local'} with "
               "another config than this compare now asks for (differs in training.lr)")
    assert err.endswith("restore those settings, or choose another run.name or run.output_dir for the new runs")
    (tmp_path / "digits-fml-fedavg").mkdir()  # someone's folder, not a run
    fail(capsys, [*base, "--resume"], f"{tmp_path / 'digits-fml-fedavg'} exists but holds neither a finished run nor a "
         "checkpoint of digits-fml-fedavg; move it away, or choose another run.name or run.output_dir")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["digits-fml-fedavg",
                                                                                      "digits-fml-local"]


def test_compare_stopped_before_a_run_replaced_its_earlier_one_says_the_earlier_run_stays(tmp_path, capsys,
                                                                                        monkeypatch):
    import fmlray.simulation as simulation

    def run_experiment(cfg, *args, **kwargs):  # as a SIGINT in round 1 of an --overwrite run ends it
        raise simulation.RunDropped(1, tmp_path / cfg.run.name)
    monkeypatch.setattr(simulation, "run_experiment", run_experiment)
    assert main(["compare", *QUICK, "--set", f"run.output_dir={tmp_path}", "--algorithms", "fml,fedavg"]) == 130
    assert capsys.readouterr().err.strip() == (
        f"fmlray: the fml run stopped in round 1, before it replaced the earlier run: {tmp_path / 'digits-fml-fml'} "
        "is left as it was, and nothing of this run was kept (--overwrite replaces it once the new run has its "
        "first checkpoint) (not started: fedavg)")


@pytest.mark.parametrize("argv, fragment", [
    (["run", "--set", "training.lr=abc"], "training.lr must be a number"),
    (["run", "--set", "training.lrr=0.1"], "unknown key 'training.lrr'"),
    (["run", "--set", "algorithm.fml.alpha=2"], "algorithm.fml.alpha must be in [0, 1]"),
    (["run", "--config", "/nonexistent.toml"], "does not exist"),
    (["run", "--set", "clients.num_clients=500"], "clients"),
    (["run", "--set", "data.max_train_samples=5"], "digits has 5 training rows (data.max_train_samples = 5 kept); "
     "lower clients.num_clients, raise data.max_train_samples (now 5; 0 keeps every row) or lower data.min_samples"),
    (["run", "--set", "data.min_samples=1", "--set", "clients.num_clients=2000"],
     "digits has 1438 training rows; lower clients.num_clients"),  # and nothing about min_samples, already 1
    (["run", "--set", "data.dataset=fmnist", "--set", "data.root=/nonexistent"], "data.root"),
    (["run", "--set", "data.dataset=synthetic", "--set", "model.meme=cnn"], "model.meme = 'cnn': model 'cnn' needs "
     "image input (C, H, W) but the dataset gives flat features of shape (60,); use 'mlp'"),
    (["run", "--set", "data.dataset=synthetic", "--set", "model.meme=lenet5"],
     "model.meme and clients.groups[lenet5].local_model = 'lenet5': model 'lenet5' needs image input"),
    (["run", "--set", "data.partition=shards", "--set", "data.classes_per_client=11"], "classes"),
    (["run", "--set", "run.rounds=0"], "run.rounds must be >= 1"),
    (["compare", "--algorithms", "fml,fedsgd"], "fedsgd"),
    (["run", "--set", "algorithm.name=fedper", "--set", "algorithm.fedper.head_layers=3"],
     "algorithm 'fedper' shares no part of model.meme 'mlp' (3 layers)"),
    (["run", "--set", "algorithm.name=lgfedavg", "--set", "algorithm.lgfedavg.global_layers=0"], "shares no part"),
    (["run", "--set", "algorithm.name=lgfedavg", "--set", "algorithm.lgfedavg.global_layers=50"],  # was FedAvg, silently
     "algorithm 'lgfedavg' asks for the last 50 layers of a model that has 3 (model.meme 'mlp'); give at most 3 in "
     "algorithm.lgfedavg.*"),
    (["run", "--set", "algorithm.name=fedper", "--set", "algorithm.fedper.head_layers=4"], "asks for the last 4 layers"),
    (["run", "--set", "algorithm.name=fedrep", "--set", "algorithm.fedrep.body_epochs=6"],
     "algorithm.fedrep.body_epochs = 6 is more than training.epochs = 5"),
    (["run", "--set", "algorithm.ditto.lam=-1"], "algorithm.ditto.lam must be in [0, 100]"),
    (["run", "--set", "algorithm.apfl.alpha=1.5"], "algorithm.apfl.alpha must be in [0, 1]"),
    (["run", "--set", "algorithm.apfl.adaptive=1"], "algorithm.apfl.adaptive must be true or false"),
    (["run", "--set", "algorithm.server_lr=0"], "algorithm.server_lr must be in (0, 10]"),
    (["report", "/dev"], "is not a finished fmlray run"),
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
    # Ray refuses amounts below 1e-4 when the actor is made: it was a ValueError traceback after Ray had started
    (["run", "--set", "clients.groups.0.num_cpus=1e-30"], "num_cpus = 1e-30 is below Ray's smallest share"),
    (["run", "--set", "clients.groups.0.num_gpus=5e-5"], "num_gpus = 5e-05 is below Ray's smallest share"),
    (["run", "--set", "clients.groups=[{name='a', count=5}]"], "counts add up to 5"),
    (["run", "--set", "clients.groups.0.count=20", "--set", "clients.groups.0.share=0"],
     "clients.groups[lenet5] gets no client (share 0.5 of the 0 left by counts, of clients.num_clients = 20)"),
    (["run", "--set", "clients.groups.0.share=1e-9"], "clients.groups[mlp] gets no client (share 1e-09 of the 20"),
    (["run", "--set", "run.eval_every=0"], "run.eval_every must be >= 1"),
    (["run", "--set", "engine.num_actors=-1"], "engine.num_actors must be >= 0"),
    (["run", "--resume", "/dev"], "is not an fmlray run folder"),
    (["run", "--resume", "/tmp", "--config", "x.toml"], "drop --config"),
    (["launch"], "invalid choice"),
    (["run", "--bogus"], "unrecognized arguments"),
    (["run", "--resume", "", "--overwrite"], "argument --resume: is empty; give a path"),  # not a new run
    (["partition", "--save", " "], "argument --save: is empty"),
    (["run", "--config", ""], "argument --config/-c: is empty"),
    (["report", ""], "argument run_dir: is empty"),
    # values that once passed validation and failed later (after loading data or starting Ray)
    (["run", "--set", r'run.name="a\u0000b"'], "run.name = 'a\\x00b' holds a control character"),
    (["run", "--set", r'run.name="a\nb"'], "holds a control character"),
    (["run", "--set", r'run.name="a\tb"'], "holds a control character"),
    (["run", "--set", "run.name='..'"], "must be a plain folder name"),
    (["run", "--set", "run.name='a\\b'"], "must be a plain folder name"),
    (["run", "--set", "run.name=' a'"], "must be a plain folder name"),
    (["run", "--set", "run.name=" + "x" * 201], "run.name is 201 bytes long"),
    (["run", "--set", "run.name.x=1"], "'run.name' is a single value, not a table; drop '.x'"),
    (["run", "--set", "clients.groups.0.name.x=1"], "'clients.groups.0.name' is a single value"),
    (["run", "--set", "run.rounds.x.y=1"], "'run.rounds' is a single value"),
    (["run", "--set", "clients.groups.0.name=\"g\\u0007\""], "clients.groups[0].name = 'g\\x07' holds a control"),
    (["partition", "--set", r'run.output_dir="r\u0000s"'], "run.output_dir = 'r\\x00s' holds a control character"),
    (["partition", "--set", "run.output_dir=" + "y" * 256], "run.output_dir holds a name of 256 bytes"),
    (["run", "--set", r'data.root="/tmp/\u0000"'], "data.root = '/tmp/\\x00' holds a control character"),
    (["run", "--set", "data.partition=file", "--set", r'data.partition_file="p\nz"'], "data.partition_file = 'p\\nz'"),
    (["run", "--set", r'engine.state_dir="s\u001b"'], "engine.state_dir = 's\\x1b' holds a control"),
    (["run", "--set", r'engine.address="auto\u0000"'], "engine.address = 'auto\\x00' holds a control"),
    (["run", "--set", "data.synthetic_dim=1000000000000000"], "data.synthetic_dim must be <= 10,000"),
    (["run", "--set", "data.synthetic_classes=1000000000000000"], "data.synthetic_classes must be <= 1,000"),
    (["run", "--set", "clients.num_clients=1000000000000000"], "clients.num_clients must be <= 1,000,000"),
    (["run", "--set", "clients.groups.0.count=1000000000000000"], "clients.groups[mlp].count must be <= 1,000,000"),
    (["run", "--set", "data.max_train_samples=1000000000000000"], "data.max_train_samples must be <= 2,147,483,647"),
    (["run", "--set", "data.max_test_samples=1000000000000000"], "data.max_test_samples must be <= 2,147,483,647"),
    (["run", "--set", "data.min_samples=1000000000000000"], "data.min_samples must be <= 2,147,483,647"),
    (["run", "--set", "data.partition=shards", "--set", "data.classes_per_client=1000000000000000"],
     "data.classes_per_client must be <= 10 (the digits"),
    (["run", "--set", "data.classes_per_client=1000000000000000"], "data.classes_per_client must be <= 2,147,483,647"),
    (["run", "--set", "data.dataset=synthetic", "--set", "data.synthetic_classes=1"],  # not classes_per_client's fault
     "data.synthetic_classes must be >= 2, got 1"),
    (["run", "--set", "training.batch_size=1000000000000000"], "training.batch_size must be <= 2,147,483,647"),
    (["run", "--set", "training.epochs=1000000000000000"], "training.epochs must be <= 2,147,483,647"),
    (["run", "--set", "run.rounds=3000000000"], "run.rounds must be <= 2,147,483,647"),
    (["run", "--set", "engine.num_actors=1000000000000000"], "engine.num_actors must be <= 1,000,000"),
    (["run", "--set", "run.seed=99999999999999999999"], "run.seed = 99999999999999999999 does not fit in 64 bits"),
    (["run", "--set", "training.weight_decay=inf"], "training.weight_decay must be a finite number, got inf"),
    (["run", "--set", "clients.groups.0.num_gpus=inf"], "clients.groups[mlp].num_gpus must be a finite number"),
    (["run", "--set", "clients.groups.0.num_cpus=1e308"], "clients.groups[mlp].num_cpus must be a finite number"),
    (["run", "--set", "algorithm.fml.temperature=nan"], "algorithm.fml.temperature must be a finite number, got nan"),
    (["run", "--set", "algorithm.fedprox.mu=inf"], "algorithm.fedprox.mu must be a finite number"),
    (["run", "--set", "data.synthetic_beta=-inf"], "data.synthetic_beta must be a finite number"),
    (["run", "--set", "training.weight_decay=1e300"], "training.weight_decay must be in [0, 1]"),
    (["run", "--set", "algorithm.fml.temperature=1e-300"], "algorithm.fml.temperature must be in [0.01, 100]"),
    (["run", "--set", "algorithm.fml.temperature=1e300"], "algorithm.fml.temperature must be in [0.01, 100]"),
    (["run", "--set", "algorithm.fedprox.mu=1e300"], "algorithm.fedprox.mu must be in [0, 100]"),
    (["run", "--set", "data.synthetic_beta=1e300"], "data.synthetic_beta must be in [0, 100]"),
    (["compare", "--algorithms", "fml,fml"], "names one twice"),
    (["compare", "--algorithms", "all,fml"], "\"all\" stands alone (every algorithm); give it alone, or list"),
    (["compare", "--set", "run.name=" + "n" * 195], "-fedavg): run.name is 202 bytes long"),
    (["partition", "--set", r'run.name="\u0000"'], "holds a control character"),
    (["run", "--config", "/tmp"], "config file /tmp is a folder"),
    (["compare", "--algorithms", ""], "--algorithms '' names no algorithm; give at least one, e.g. --algorithms fml,"),
    (["compare", "--algorithms", " , "], "names no algorithm"),
    (["config", "--set", "run.name=" + "[" * 3000 + "]" * 3000], "the value nests lists or tables hundreds of levels"),
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
    assert err.count("lower training.lr or check the data") == 1  # said once, not by the client and again by the round


def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fmlray", "run", "--set", "data.dataset=nope"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fmlray: error: data.dataset = 'nope' is unknown; choose one of digits, synthetic, fmnist, mnist, cifar10, cifar100, emnist"]
    assert not (tmp_path / "runs").exists()


def finished_run(folder):
    """A run folder as `fmlray run` leaves it, written directly (no training)."""
    from fmlray import metrics
    rows = [metrics.row(1, 0, "mlp", "local", "test", accuracy=0.5, samples=4),
            metrics.row(1, model="global", split="global_test", accuracy=0.25, samples=9), metrics.row(1, seconds=1.0)]
    folder.mkdir()
    pq.write_table(metrics.to_table(rows), folder / "metrics.parquet")
    (folder / "summary.txt").write_text(metrics.format_summary(metrics.summaries(metrics.to_table(rows))[-1], "t: title") + "\n")
    return folder


def test_report_reprints_a_finished_run(tmp_path, capsys):
    assert main(["report", str(finished_run(tmp_path / "r"))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("t: title\n") and "global model, global test set" in out


@pytest.mark.parametrize("name, content, fragment", [
    ("metrics.parquet", b"", "metrics.parquet cannot be read"),
    ("metrics.parquet", bytes(range(256)) * 8, "metrics.parquet cannot be read"),
    ("metrics.parquet", "other schema", "is not an fmlray metrics table (columns ['round', 'client'"),
    ("metrics.parquet", "round as text", "columns ['round'] are missing or of another type"),
    ("metrics.parquet", "no rows", "holds no complete evaluated round"),
    ("metrics.parquet", "null rounds", "holds no complete evaluated round"),
    ("summary.txt", b"", "summary.txt is not an fmlray summary"),
    ("summary.txt", b"\xff\xfe\x00\x01binary", "summary.txt is not an fmlray summary"),
    ("summary.txt", b'{"round": 1}\n', "summary.txt is not an fmlray summary"),
])
def test_report_on_a_damaged_run_is_one_line_and_exit_2(tmp_path, capsys, name, content, fragment):
    import pyarrow as pa

    from fmlray import metrics
    run = finished_run(tmp_path / "r")
    tables = {"other schema": pa.table({"a": [1]}), "no rows": metrics.to_table([]),
              "round as text": metrics.to_table([metrics.row(1)]).set_column(0, "round", pa.array(["1"])),
              "null rounds": metrics.to_table([metrics.row(1)]).set_column(0, "round", pa.array([None], pa.int32()))}
    if isinstance(content, bytes):
        (run / name).write_bytes(content)
    else:
        pq.write_table(tables[content], run / name)
    fail(capsys, ["report", str(run)], fragment)


@pytest.mark.parametrize("target, fragment", [
    ("missing/p.csv", "is in a folder that does not exist"),
    (".", "is a folder"),
    ("sub/", "sub/ is a folder"),  # it wrote a file named sub (audit 23)
    ("ro/p.csv", "its folder"),  # it printed the whole table first (audit 23)
])
def test_partition_save_to_a_bad_path_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, target, fragment):
    (tmp_path / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "ro" and real(path, mode))  # root writes all
    before = sorted(tmp_path.rglob("*"))
    assert main(["partition", "--save", str(tmp_path) + "/" + target]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and fragment in err and out == "", (out, err)  # no table first
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("argv", [
    ["run", "--set", "run.name.x=1"],
    ["run", "--set", "data.synthetic_dim=1000000000000000"],
    ["compare", "--set", "run.rounds=0"],
    ["partition", "--set", "clients.num_clients=0"],
    ["config", "--set", "training.lr=abc"],
    ["sweep", "{spec}"],
])
def test_a_config_error_answers_before_torch_or_ray_is_imported(tmp_path, argv):
    spec = tmp_path / "s.toml"
    spec.write_text("[sweep]\nname = 'x'\nset = ['run.rounds=0']\n")
    code = ("import sys\nfrom fmlray.cli import main\ncode = main(sys.argv[1:])\n"
            "print(code, sorted(m for m in ('torch', 'ray', 'sklearn') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, *[a.format(spec=spec) for a in argv]],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.stdout.split("\n")[0] == "2 []", proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "fmlray: error:" in proc.stderr


def test_a_dataset_too_large_for_memory_is_one_line_naming_the_keys(tmp_path, capsys, monkeypatch):
    import fmlray.data.sources
    import fmlray.data.synthetic
    out = tmp_path / "runs"
    monkeypatch.setattr(fmlray.data.synthetic.psutil, "virtual_memory", lambda: type("M", (), {"available": 2**20}))
    synthetic = ["--set", "data.dataset=synthetic", "--set", "data.synthetic_dim=10000"]
    fail(capsys, ["run", *QUICK, *synthetic, "--set", f"run.output_dir={out}"],
         "data.synthetic_dim = 10000 for clients.num_clients = 20 needs about", out)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(fmlray.data.sources, "_load_raw", no_memory)
    fail(capsys, ["run", *QUICK, "--set", f"run.output_dir={out}"], "digits does not fit in memory; lower data.max_train", out)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped raise, on purpose
def test_a_sigterm_whose_raise_python_dropped_still_stops_the_start_up(tmp_path, monkeypatch, capsys):
    """A signal that lands while a finaliser runs: Python prints "Exception ignored" and drops the raise."""
    import signal
    import weakref

    from fmlray import signals
    from fmlray.engine.serial import SerialEngine
    real = SerialEngine.start

    def start_then_a_lost_sigterm(self, *args):
        real(self, *args)
        weakref.finalize(type("Doomed", (), {})(), signals.terminate, signal.SIGTERM, None)  # runs and is dropped

    monkeypatch.setattr(SerialEngine, "start", start_then_a_lost_sigterm)
    assert main(["run", "--set", "engine.kind=serial", "--set", f"run.output_dir={tmp_path}"]) == 130
    assert "terminated (SIGTERM) outside a round" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(["partition"]) == 0  # the mark is this command's only


@pytest.mark.parametrize("kind", ["file", "symlink", "dangling symlink", "fifo"])
def test_partition_save_never_replaces_what_is_there(tmp_path, capsys, monkeypatch, kind):
    notes = tmp_path / "notes.csv"
    notes.write_text("my notes")
    target = tmp_path / "p.csv"
    {"file": lambda: target.write_text("mine"), "symlink": lambda: target.symlink_to(notes),
     "dangling symlink": lambda: target.symlink_to(tmp_path / "nowhere"), "fifo": lambda: os.mkfifo(target)}[kind]()
    before = {p.name: (p.is_symlink(), os.lstat(p).st_ino) for p in tmp_path.iterdir()}
    monkeypatch.setattr(fmlray.data, "load_dataset", lambda *a, **k: pytest.fail("data was loaded"))
    fail(capsys, ["partition", "--save", str(target)], f"--save {target} already exists")
    assert {p.name: (p.is_symlink(), os.lstat(p).st_ino) for p in tmp_path.iterdir()} == before
    assert notes.read_text() == "my notes" and (kind != "file" or target.read_text() == "mine")


def test_partition_save_made_meanwhile_is_kept(tmp_path, capsys, monkeypatch):
    """The path appears while the data loads: the write is refused then too, atomically."""
    target = tmp_path / "p.csv"
    real = fmlray.data.load_dataset

    def load_and_race(*args, **kwargs):
        target.write_text("theirs")
        return real(*args, **kwargs)
    monkeypatch.setattr(fmlray.data, "load_dataset", load_and_race)
    fail(capsys, ["partition", "--save", str(target)], "already exists (a file); fmlray never replaces it")
    assert target.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]


def test_report_on_an_unfinished_run_says_how_to_continue_it(tmp_path, capsys):
    run = tmp_path / "r"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "manifest.json").write_text("{}")
    (run / "metrics").mkdir()
    (run / "metrics" / "round-000001.parquet").write_bytes(b"")
    fail(capsys, ["report", str(run)], f"{run} is an unfinished fmlray run (it has a checkpoint and metric rows in "
         f"metrics/, but no metrics.parquet): it is still running or was stopped; `fmlray run --resume {run}` continues")
    (run / "metrics.parquet").write_bytes(b"")  # a finished run extended, and stopped: its old end is not its end
    fail(capsys, ["report", str(run)], "unfinished fmlray run (it has a checkpoint and metric rows in metrics/, and "
         "metrics.parquet is not its last)")
    (run / "metrics.parquet").unlink()
    # a finished run's metrics.parquet deleted (its parts went when it ended): resuming cannot bring it back
    (run / "metrics" / "round-000001.parquet").unlink()
    fail(capsys, ["report", str(run)], "whose metric rows are gone (no metrics.parquet and no rounds in metrics/)")


@pytest.mark.parametrize("raised,line", [
    (signals.Terminated, "fmlray: terminated (SIGTERM) outside a round; what no checkpoint held yet was dropped"),
    (KeyboardInterrupt, "fmlray: interrupted; what no checkpoint held yet was dropped")])
def test_a_signal_raised_inside_a_ray_call_ends_with_the_signals_line(monkeypatch, capsys, raised, line):
    # Ray's C calls (ray.wait) run the handlers while they wait, and hand their raise back as a SystemError
    def report(args):
        try:
            raise raised
        except BaseException as exc:
            raise SystemError("<cyfunction CoreWorker.wait> returned a result with an exception set") from exc

    monkeypatch.setattr(fmlray.cli, "cmd_report", report)
    assert main(["report", "somewhere"]) == 130
    assert capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize("raised,what", [(signals.Terminated, "terminated (SIGTERM)"),
                                         (KeyboardInterrupt, "interrupted")])
def test_a_signal_while_the_summary_prints_says_the_run_was_written(tmp_path, monkeypatch, capsys, raised, what):
    # it used to say "what no checkpoint held yet was dropped" of a run that was whole
    import fmlray.metrics
    import fmlray.simulation

    def summary(*args):
        raise raised

    monkeypatch.setattr(fmlray.simulation, "run_experiment", lambda cfg, **kwargs: (tmp_path / "digits-fml", {}))
    monkeypatch.setattr(fmlray.metrics, "format_summary", summary)
    assert main(["run", *QUICK, "--set", f"run.output_dir={tmp_path}"]) == 130
    assert capsys.readouterr().err == (f"fmlray: {what} while printing the summary; the run was written to "
                                       f"{tmp_path / 'digits-fml'}\n")


def test_another_system_error_is_not_taken_for_a_signal(monkeypatch):
    def report(args):
        raise SystemError("something else")

    monkeypatch.setattr(fmlray.cli, "cmd_report", report)
    with pytest.raises(SystemError, match="something else"):
        main(["report", "somewhere"])


@pytest.mark.parametrize("command", ["sweep", "tune"])
def test_a_sweep_or_search_folder_that_cannot_be_written_is_one_line_before_anything_starts(tmp_path, capsys, command):
    # tune said "Not a directory (afile/t/.tune)", exit 1, once its trials were planned; a sweep named run.output_dir
    afile = tmp_path / "afile"
    afile.write_text("mine")
    body = ('set = ["engine.kind=serial", "run.rounds=1"]\n[[axis]]\nname = "a"\nvalues = ["algorithm.name=fedavg"]\n'
            if command == "sweep" else
            'set = ["engine.kind=serial", "run.rounds=1"]\nmetric = "local_mean"\nmode = "max"\nsamples = 2\n'
            '[[param]]\nkey = "training.lr"\nloguniform = [0.003, 0.1]\n')
    spec = tmp_path / "s.toml"
    spec.write_text(f'[{command}]\nname = "t"\noutput_dir = "{afile}"\n{body}')
    fail(capsys, [command, str(spec)], f"cannot write into {afile / 't'} ({afile} is a file, not a folder); nothing "
         f"was changed there; set {command}.output_dir to a writable folder")
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "s.toml"]


def test_a_run_folder_too_long_for_the_system_is_one_line_before_the_data_loads(tmp_path, capsys):
    # it passed the checks, then failed in round 1 writing a checkpoint file: "File name too long", exit 1
    deep = tmp_path.joinpath(*["d" * 250] * 15)
    fail(capsys, ["run", *QUICK, "--set", f"run.output_dir={deep}", "--set", "run.name=" + "n" * 200],
         "run.output_dir and run.name make a path of", out_dir=tmp_path)


def test_resume_of_a_folder_that_is_not_there_or_kept_no_checkpoint_says_why(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"fmlray: error: {tmp_path / 'nope'} does not exist; give a run's " \
                                              "folder (e.g. runs/digits-fml)"
    assert main(["run", *QUICK, "--set", "run.checkpoint_every=0", "--set", f"run.output_dir={tmp_path}"]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path / "digits-fml"), "--set", "run.rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no complete checkpoint (it ran with run.checkpoint_every = 0, which keeps none)" in err, err


def test_report_and_resume_of_something_other_than_a_run_say_what_it_is(tmp_path, capsys):
    # each was "is not a finished fmlray run (no metrics.parquet); give a folder under runs/" or "(no config.toml)",
    # even for metrics.parquet itself, a folder that is not there, a sweep's or a search's folder (audit 23)
    sweep, search, run_dir = tmp_path / "sweep", tmp_path / "search", tmp_path / "sweep" / "fml-s0"
    run_dir.mkdir(parents=True)
    for name in (".fmlray-run", "config.toml", "metrics.parquet"):
        (run_dir / name).write_text("")
    (sweep / "results.parquet").write_text("")
    (search / ".tune").mkdir(parents=True)
    (search / ".tune" / "search.json").write_text("{}")
    bare = tmp_path / "bare"
    (bare / "checkpoint").mkdir(parents=True)
    (bare / ".fmlray-run").write_text("")
    cases = [
        (["report", str(tmp_path / "nope")], f"{tmp_path / 'nope'} does not exist"),
        (["report", str(run_dir / "metrics.parquet")], f"is a file; give the run's folder, {run_dir}"),
        (["report", str(sweep)], f"is a sweep's folder, not a run's: report one of its runs, e.g. {run_dir}"),
        (["run", "--resume", str(sweep)], "is a sweep's folder, not a run's: run the same `fmlray sweep FILE` again"),
        (["report", str(search)], "is a search's folder (fmlray tune), not a run's: report one of its trials"),
        (["run", "--resume", str(search)], "continue it with `fmlray tune FILE --resume`"),
        (["run", "--resume", str(bare)], "is an fmlray run whose config.toml is missing; put it back"),
        (["report", str(tmp_path / "t1")], f"an --overwrite that was cut short left the earlier run in "
                                           f"{tmp_path / '.t1.old'}"),
    ]
    (tmp_path / ".t1.old").mkdir()
    (tmp_path / ".t1.old" / ".fmlray-run").write_text("")
    (tmp_path / ".t2.new").mkdir()
    for name in (".fmlray-run", "config.toml"):
        (tmp_path / ".t2.new" / name).write_text("")
    cases.append((["run", "--resume", str(tmp_path / ".t2.new")], "is the hidden folder of a new run cut short before "
                  "its first checkpoint, not a run to resume; the next fmlray run named 't2' there deletes it"))
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, (argv, err)


def test_a_sweep_or_tune_file_given_as_a_config_says_which_command_runs_it(capsys):
    # it was "unknown key 'sweep'; valid keys: run, data, ..." (audit 23)
    repo = Path(__file__).resolve().parents[2]
    for kind, name in (("sweep", "digits.toml"), ("tune", "tune-digits.toml")):
        path = repo / "experiments" / name
        assert main(["config", "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"fmlray: error: {path} is a {kind} file, not a config file: run it with fmlray {kind} {path}", err
    # and each file where another kind goes: it was "a tune file has a [tune] table ... (found ['axis', 'sweep'])"
    config = repo / "fmlray" / "presets" / "fmnist-fml.toml"  # (audit 40)
    for command, path, kind, run in (("tune", repo / "experiments" / "digits.toml", "sweep", "fmlray sweep"),
                                     ("sweep", repo / "experiments" / "tune-digits.toml", "tune", "fmlray tune"),
                                     ("sweep", config, "config", "fmlray run --config"),
                                     ("tune", config, "config", "fmlray run --config")):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"fmlray: error: {path} is a {kind} file, not a {command} file: run it with {run} {path}", err


PROBE = '''
import atexit, sys
from fmlray import cli

class Late:
    def __del__(self):
        print("teardown ran", flush=True)

keep = Late()  # freed only when Python tears its modules down
real = cli.main

def main():
    atexit.register(lambda: print("handler ran"))  # as Ray and logging do once the command runs; unflushed
    return real(["run", "--set", "engine.kind=nope"])

cli.main = main
cli.command()
'''


def test_a_sigterm_after_the_command_finished_is_one_line_and_keeps_its_code():
    # a SIGTERM while Ray shuts down after the outputs are written: it used to kill the process silently (-15)
    probe = PROBE.replace('print("handler ran")', '(os.kill(os.getpid(), 15), time.sleep(0.5))').replace(
        "import atexit, sys", "import atexit, os, sys, time")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["fmlray: error: engine.kind = 'nope' is unknown; choose one of serial, ray",
                                        "fmlray: SIGTERM after the command had finished; nothing was lost"]


def test_the_command_runs_every_exit_handler_keeps_mains_code_and_skips_pythons_teardown():
    # tearing torch's, Ray's and pyarrow's modules down took ~1 s after a run's last line, for nothing
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "handler ran\n", (proc.stdout, proc.stderr)
    assert proc.stderr == "fmlray: error: engine.kind = 'nope' is unknown; choose one of serial, ray\n"


def test_a_folder_whose_name_is_not_utf8_is_reported_and_refused_in_one_line(tmp_path, capsys, monkeypatch):
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/bad\xffdir"))  # a byte no UTF-8 text holds
    odd.mkdir()
    monkeypatch.chdir(odd)
    assert main(["run", *QUICK, "--set", "run.rounds=1", "--set", "clients.num_clients=4",
                 "--set", "run.output_dir=runs", "--set", "run.name=a"]) == 0  # relative: config.toml stays UTF-8
    capsys.readouterr()
    assert main(["report", str(odd / "runs" / "a")]) == 0  # was pyarrow's UnicodeEncodeError
    assert "local models, own test splits" in capsys.readouterr().out
    err = fail(capsys, ["run", "--resume", str(odd / "runs" / "a"), "--set", "run.rounds=2"],
               "holds the byte 0xff, which is not UTF-8 text")
    assert "control character" not in err


def test_a_home_matplotlib_cannot_write_to_adds_nothing_to_stderr(tmp_path):
    # matplotlib's import logs two lines about a temporary cache when HOME cannot hold its config folder
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    proc = subprocess.run([sys.executable, "-c", "import fmlray.plots"], capture_output=True, text=True, timeout=120,
                          env={**env, "HOME": str(home)})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_an_unforeseen_os_error_the_user_can_fix_is_one_line_with_what_to_do_and_exit_2(capsys, monkeypatch):
    import errno

    def denied(args):
        raise PermissionError(errno.EACCES, "Permission denied", "runs/a/checkpoint/manifest.json")
    monkeypatch.setattr(fmlray.cli, "cmd_report", denied)
    assert main(["report", "runs/a"]) == 2
    assert capsys.readouterr().err == ("fmlray: error: Permission denied (runs/a/checkpoint/manifest.json); give this "
                                       "user access to it\n")

    def other(args):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(fmlray.cli, "cmd_report", other)
    assert main(["report", "runs/a"]) == 1  # not the user's to fix: as before
    assert capsys.readouterr().err == "fmlray: error: Input/output error\n"


@pytest.mark.parametrize("argv", [["config", "--config", "{long}.toml"], ["run", "--config", "{long}.toml"],
                                  ["compare", "--config", "{long}.toml"], ["partition", "--config", "{long}.toml"],
                                  ["partition", "--save", "{long}.csv"], ["report", "{long}"],
                                  ["run", "--resume", "{long}"], ["sweep", "{long}.toml"], ["tune", "{long}.toml"],
                                  ["tune", "--resume", "{long}.toml"]])
def test_a_path_with_a_name_too_long_for_the_system_is_one_line_and_exit_2(tmp_path, capsys, argv):
    # each was "fmlray: error: File name too long (...)", exit 1: the first stat of the path raised (audit 40)
    long = str(tmp_path / ("y" * 300))
    fail(capsys, [a.format(long=long) for a in argv], "a folder or file name holds at most 255 bytes")
    assert sorted(tmp_path.iterdir()) == []


def test_a_path_through_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    fail(capsys, ["partition", "--save", str(tmp_path / "afile" / "p.csv"), "--set", "clients.num_clients=2"],
         f"is in {tmp_path / 'afile'}, which is a file, not a folder")  # was "a folder that does not exist"
    assert (tmp_path / "afile").read_text() == "mine"


def test_report_and_resume_of_a_broken_link_or_a_folder_for_config_say_so(tmp_path, capsys):
    # each said "X is a file" / "config.toml is missing" (audit 40)
    from fmlray.rundir import MARKER
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    run_dir = tmp_path / "r"
    (run_dir / "config.toml").mkdir(parents=True)
    (run_dir / MARKER).write_text("")
    for command in (["report"], ["run", "--resume"]):
        fail(capsys, [*command, str(tmp_path / "loop")], f"{tmp_path / 'loop'} is a symlink that leads back to itself")
        fail(capsys, [*command, str(run_dir)], f"{run_dir / 'config.toml'} is not a file; put the run's config.toml back")
    fail(capsys, ["report", str(tmp_path / "dangling")],
         f"{tmp_path / 'dangling'} is a symlink to {tmp_path / 'nowhere'}, which does not exist")
    fail(capsys, ["run", "--resume", str(tmp_path / "dangling")], f"{tmp_path / 'nowhere'} does not exist")


def test_a_partition_refused_offers_only_the_fixes_this_config_can_still_make(capsys):
    # digits' test rows come out of its training rows: data.test_fraction was never named; a task that keeps too
    # little offered "lower data.min_samples" at 1 and "raise data.max_test_samples" at 0 (all rows) (audit 40)
    fail(capsys, ["partition", "--set", "data.test_fraction=0.99", "--set", "clients.num_clients=3"],
         "lower data.test_fraction (now 0.99)")
    two = ["--set", "clients.groups.0.task=[0,1,-1,-1,-1,-1,-1,-1,-1,-1]",
           "--set", "clients.groups.1.task=[0,1,-1,-1,-1,-1,-1,-1,-1,-1]", "--set", "data.min_samples=1",
           "--set", "data.dirichlet_alpha=0.05", "--set", "clients.num_clients=10"]
    # more clients than rows in all: only fewer clients can help (it offered min_samples and test_fraction too)
    fail(capsys, ["partition", "--set", "clients.num_clients=2000", "--set", "data.min_samples=1"],
         "digits has 1438 training rows; lower clients.num_clients (digits has 1797 rows in all: fewer than one a "
         "client)")
    err = fail(capsys, ["partition", *two], "keeps 0 training rows of its task's classes")
    assert "lower data.min_samples" not in err and "max_test_samples" not in err, err


def test_a_run_name_in_a_script_the_plots_font_lacks_is_drawn_without_a_warning_per_glyph(tmp_path):
    # run.name=ü-名前 printed four "fmlray: warning: Glyph ... missing from font(s) DejaVu Sans" lines (audit 40)
    import warnings

    from fmlray.plots import accuracy_plot
    summary = [{"round": r, "local": {"mean": 0.5, "p10": 0.4}, "global_clients": None, "global_test": 0.6}
               for r in (1, 2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        accuracy_plot(summary, "ü-名前: fml", tmp_path / "a.png")
    assert not [str(w.message) for w in caught if "Glyph" in str(w.message)]
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_the_summary_says_how_many_clients_its_figures_cover(tmp_path, capsys):
    # at 5,000 clients, eval_clients "sampled", 100 and "all" gave local means 0.375, 0.302, 0.135 under one label
    # and nothing in summary.txt, summary.json or `report` told them apart (audit 43)
    import json
    for how, count in (("sampled", 2), ("3", 5), ('"all"', 6)):  # 3: the 2 sampled and 3 others
        name = f"e{count}"
        assert main(["run", *QUICK, "--set", "clients.num_clients=6", "--set", "clients.fraction=0.34",
                     "--set", f"run.eval_clients={how}", "--set", f"run.output_dir={tmp_path}",
                     "--set", f"run.name={name}"]) == 0
        capsys.readouterr()
        assert main(["report", str(tmp_path / name)]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[1].split()[-1] == "clients" and table[2].split()[-1] == str(count), table
        last = json.loads((tmp_path / name / "summary.json").read_text())[-1]
        assert last["local"]["clients"] == count and last["global_clients"]["clients"] == count


def test_a_partition_of_many_clients_prints_its_ends_and_spread_and_saves_every_row(tmp_path, capsys):
    # 10,000 clients printed a 10,004-line table (audit 43)
    import pyarrow.csv
    save = tmp_path / "p.csv"
    assert main(["partition", "--set", "clients.num_clients=60", "--set", "data.min_samples=5", "--save",
                 str(save)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[22] == "... 30 more clients (--save F.csv writes every row)", lines
    clients = [line.split()[0] for line in lines[2:33] if not line.startswith("...")]
    assert clients == [str(c) for c in (*range(20), *range(50, 60))], clients
    assert [line.split()[0] for line in lines[-5:-1]] == ["total", "fewest", "median", "most"], lines[-5:]
    assert pyarrow.csv.read_csv(save).num_rows == 60


def test_the_serial_engine_names_the_ray_settings_it_does_not_use(tmp_path, capsys):
    assert main(["run", "--set", "engine.kind=serial", "--set", "engine.num_actors=3", "--address", "10.0.0.1:6379",
                 "--set", "clients.groups.0.num_gpus=0.5", "--set", "run.rounds=1", "--set", "training.epochs=1",
                 "--set", f"run.output_dir={tmp_path}"]) == 0
    assert ("the serial engine trains in this process on the CPU: engine.address, engine.num_actors, "
            "clients.groups[mlp].num_gpus unused") in capsys.readouterr().out


def test_a_lost_actors_error_ends_with_the_command_that_resumes_the_run():
    # "... the last checkpoint is resumable" said that it was, not how (audit 45: the head killed mid-run)
    from fmlray.cli import _resume_hint
    from fmlray.errors import RESUMABLE, ResourceError
    for resumable, said in ((True, "continue from the last checkpoint with: fmlray run --resume runs/x"),
                            (False, RESUMABLE)):
        with pytest.raises(ResourceError) as info, _resume_hint("fmlray run --resume runs/x", lambda: resumable):
            raise ResourceError(f"a second client actor was lost; {RESUMABLE}")
        assert str(info.value) == f"a second client actor was lost; {said}"
