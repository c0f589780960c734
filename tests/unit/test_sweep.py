"""Sweeps: the grid, one combined table, skipping finished runs, and sweep-file errors."""

import dataclasses
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from fmlray.cli import main
from fmlray.errors import ConfigError
from fmlray.sweep import plan, plan_sweep

SPEC = """
[sweep]
name = "t"
output_dir = "{out}"
seeds = [0, 1]
set = ["engine.kind=serial", "run.rounds=1", "training.epochs=1"]

[[axis]]
name = "algorithm"
values = ["algorithm.name=fml", "algorithm.name=fedavg"]

[[axis]]
name = "partition"
values = ["data.partition=iid", {{ label = "dir0.5", set = ["data.partition=dirichlet", "data.dirichlet_alpha=0.5"] }}]
"""


def test_a_sweep_runs_its_grid_once_and_combines_it(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(out=tmp_path / "runs"))
    folder, runs = plan(spec)
    assert [r.name for r in runs][:3] == ["fml-iid-s0", "fml-iid-s1", "fml-dir0.5-s0"] and len(runs) == 8
    assert runs[2].cfg.data.dirichlet_alpha == 0.5 and runs[2].cfg.run.seed == 0
    assert main(["sweep", str(spec)]) == 0
    table = pq.read_table(folder / "results.parquet")
    assert {"run", "algorithm", "partition", "seed"} <= set(table.column_names)
    assert set(table.column("run").to_pylist()) == {r.name for r in runs}
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 0  # everything finished: nothing runs again
    assert capsys.readouterr().out.count(": done") == 8


def test_executor_and_parallel_are_read_from_the_sweep_file(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text("[sweep]\nname='x'\n")
    assert (plan_sweep(spec).executor, plan_sweep(spec).parallel) == ("loop", "auto")
    spec.write_text("[sweep]\nname='x'\nexecutor='tune'\nparallel=3\n")
    assert (plan_sweep(spec).executor, plan_sweep(spec).parallel) == ("tune", 3)


@pytest.mark.parametrize("argv, fragment", [
    (["--parallel", "0"], "--parallel must be a number of trials at once (1 to 10,000) or \"auto\", got '0'"),
    (["--parallel", "two"], "--parallel must be a number of trials at once"),
    (["--parallel", "²"], "--parallel must be a number of trials at once"),  # str.isdigit() is True, int() fails
    (["--parallel", "2", "--sequential"], "--sequential and --parallel contradict each other"),
])
def test_bad_parallel_options_are_one_line_and_exit_2(tmp_path, capsys, argv, fragment):
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(out=tmp_path / "runs"))
    assert main(["sweep", str(spec), *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text, fragment", [
    ("[sweep]\nname='x'\nexecutor='ray'\n", "sweep.executor = 'ray' is unknown; choose \"loop\""),
    ("[sweep]\nname='x'\nparallel=0\n", "sweep.parallel must be a number of trials at once"),
    ("[sweep]\nname='x'\nparallel=true\n", "sweep.parallel must be a number of trials at once"),
    ("[sweep]\nname='x'\nbogus=1\n", "unknown key(s) ['bogus']"),
    ("[sweep]\nseeds=[0]\n", "needs a name"),
    ("[sweep]\nname='x'\nseeds=[-1]\n", "sweep.seeds must be"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=[3]\n", "each value is"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=['training.lr=-5']\n", "run -5-s0: training.lr must be in"),
    ("[sweeps]\nname='x'\n", "a sweep file has a [sweep] table"),
    ("axis = 5\n[sweep]\nname='x'\n", "axes are [[axis]] tables (a list), got axis = 5"),
    ("[sweep]\nname='x'\nbase=5\n", "sweep.base must be a non-empty string (in quotes), got 5"),
    ("[sweep]\nname='x'\noutput_dir=5\n", "sweep.output_dir must be a non-empty string"),
    ("[sweep]\nname='x'\noutput_dir=['runs']\n", "sweep.output_dir must be a non-empty string"),
    ("[sweep]\nname=['x']\n", "sweep.name must be a string, got ['x']; quote it"),
    ("[sweep]\nname=5\n", "sweep.name must be a string, got 5"),
    ("[sweep]\nname='../x'\n", "sweep.name = '../x' must be a plain folder name"),
    ("[sweep]\nname='x'\nset='run.rounds=2'\n", "sweep.set must be a list of"),
    ("[sweep]\nname='x'\nset=[5]\n", "sweep.set must be a list of"),
    ("[sweep]\nname='x'\nseeds=[true]\n", "sweep.seeds must be"),
    ("[sweep]\nname='x'\nseeds=[1, 1]\n", "sweep.seeds must be a non-empty list of distinct integers"),
    ("[sweep]\nname='x'\n[[axis]]\nname=5\nvalues=['run.rounds=2']\n", "[[axis]] 0: name must be a string"),
    ("[sweep]\nname='x'\n[[axis]]\nname='seed'\nvalues=['run.rounds=2']\n", "none of run, seed, round"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues='run.rounds=2'\n", "needs exactly a name and a non-empty list"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=[['run.rounds=2']]\n", "each value is"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=[{label=5, set=['run.rounds=2']}]\n", "each value is"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=[{label='l', set='run.rounds=2'}]\n", "each value is"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=[{label='l', set=[5]}]\n", "each value is"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=['run.rounds=2', 'run.rounds=2']\n",
     "axis a: two values get the label '2' (run names would clash)"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=['training.epochs=2', 'run.rounds=2']\n", "get the label '2'"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=[{label='x y', set=[]}, {label='x_y', set=[]}]\n",
     "get the label 'x_y'"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=[{label='p-q', set=['training.lr=0.1']}, {label='p', set=[]}]\n"
     "[[axis]]\nname='b'\nvalues=[{label='r', set=[]}, {label='q-r', set=['training.epochs=2']}]\n",
     "would both be named 'p-q-r-s0'"),
    # overrides that would be ignored, leaving a label that lies
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=['training.lr=0.01', 'training.lr=0.05']\n"
     "[[axis]]\nname='b'\nvalues=['training.lr=0.2']\n", "axes a and b both set training.lr; a run would get only one"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=['training.lr=0.01']\n"
     "[[axis]]\nname='b'\nvalues=[{label='t', set=['training={lr=0.2}']}]\n", "axes a and b both set training"),
    ("[sweep]\nname='x'\nseeds=[0, 1]\n[[axis]]\nname='a'\nvalues=['run.seed=5']\n",
     "axis a, value '5': 'run.seed=5' sets run.seed, which would be ignored: the sweep runs each config once per "
     "seed; list the seeds in sweep.seeds"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=['run.name=mine']\n", "'run.name=mine' sets run.name, which "
     "would be ignored: the sweep names each run from its labels and seed; name the sweep with sweep.name"),
    ("[sweep]\nname='x'\nset=['run.output_dir=elsewhere']\n", "sweep.set: 'run.output_dir=elsewhere' sets "
     "run.output_dir, which would be ignored: the sweep writes its runs into sweep.output_dir/sweep.name"),
    ("[sweep]\nname='x'\nset=['run.rounds=1', 'run.rounds=3']\n", "sweep.set: sets run.rounds twice"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=[{label='l', set=['clients.groups.0.num_cpus=2', "
     "\"clients.groups=[{name='g', share=1.0}]\"]}]\n",
     "axis a, value 'l': sets clients.groups.0.num_cpus and then clients.groups, which overrides it"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=[{label='l', set=['training.lr=0.1', 'training={lr=0.2}']}]\n",
     "axis a, value 'l': sets training.lr twice"),  # a table sets its keys, one by one
    ("[sweep]\nname='x'\nset=['training.lr=0.1']\n[[axis]]\nname='a'\nvalues=['training.lr=0.05', 'training={lr=0.2}']\n",
     "sweep.set sets training.lr, but every value of axis a sets training.lr after it, so no run would use it; drop "
     "it from sweep.set"),
    ("[sweep]\nname='x'\nset=['clients.groups.0.num_cpus=0.5']\n[[axis]]\nname='a'\n"
     "values=[\"clients.groups=[{name='g', share=1.0}]\", \"clients.groups=[{name='h', share=1.0}]\"]\n",
     "sweep.set sets clients.groups.0.num_cpus, but every value of axis a sets clients.groups after it"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=['lr']\n", "axis a, value 'lr': --set 'lr' must look like"),
    # two values, one config
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=['training.lr=0.01', 'training.lr=0.010']\n",
     "axis a: values '0.01' and '0.010' give the same config (runs 0.01-s0 and 0.010-s0 would be one run twice)"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=['run.rounds=2']\n[[axis]]\nname='b'\n"
     "values=[{label='default', set=[]}, 'training.epochs=5']\n", "axis b: values 'default' and '5' give the same"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, text, fragment):
    spec = tmp_path / "s.toml"
    spec.write_text(text)
    with pytest.raises(ConfigError) as info:
        plan(spec)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_folder_in_the_way_of_a_sweep_run_is_refused_before_anything_runs(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(out=tmp_path / "runs"))
    folder, runs = plan(spec)
    theirs = folder / runs[5].name
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"{theirs} exists but holds neither a finished run nor a checkpoint" in err
    assert "--overwrite" not in err and len(err.strip().splitlines()) == 1  # sweep has no --overwrite
    assert sorted(p.name for p in folder.iterdir()) == [runs[5].name]  # nothing ran
    assert (theirs / "notes.txt").read_text() == "mine"


def test_a_finished_run_of_another_config_is_refused_not_reported_done(tmp_path, capsys):
    # Prepare: a one-run sweep, finished
    spec = tmp_path / "s.toml"
    text = SPEC.format(out=tmp_path / "runs").replace("seeds = [0, 1]", "seeds = [0]").replace(
        '"algorithm.name=fml", "algorithm.name=fedavg"', '"algorithm.name=fedavg"').replace(
        '"data.partition=iid", ', "")
    spec.write_text(text)
    folder, (run,) = plan(spec)
    assert main(["sweep", str(spec)]) == 0
    saved = (folder / run.name / "config.toml").read_text()
    capsys.readouterr()
    # Execute / Assert: where and how it ran may change; what it ran, and for how long, may not
    spec.write_text(text.replace('"run.rounds=1"', '"run.rounds=1", "run.checkpoint_every=0"'))
    assert main(["sweep", str(spec)]) == 0 and "[1/1] fedavg-dir0.5-s0: done" in capsys.readouterr().out
    for change, keys in [('"run.rounds=3"', "run.rounds"), ('"run.rounds=1", "training.lr=0.2", "run.eval_every=2"',
                                                             "training.lr, run.eval_every")]:
        spec.write_text(text.replace('"run.rounds=1"', change))
        assert main(["sweep", str(spec)]) == 2
        captured = capsys.readouterr()
        assert f"run {run.name} finished in {folder / run.name} with another config than {spec} now asks for " \
            f"(differs in {keys}); restore those settings, or give the sweep another name or output_dir" in captured.err
        assert len(captured.err.strip().splitlines()) == 1 and ": done" not in captured.out
        assert (folder / run.name / "config.toml").read_text() == saved


def test_a_stopped_run_of_another_config_is_refused_before_any_run_starts(tmp_path, capsys):
    from fmlray.simulation import RunInterrupted, run_experiment
    # Prepare: the sweep's last run stopped after its first round, with a checkpoint
    spec = tmp_path / "s.toml"
    text = SPEC.format(out=tmp_path / "runs").replace('"run.rounds=1"', '"run.rounds=2"')
    spec.write_text(text)
    folder, runs = plan(spec)
    with pytest.raises(RunInterrupted):
        run_experiment(runs[-1].cfg, echo=lambda line: None, stop=lambda: True)
    # Execute: the file changes what every run trains
    spec.write_text(text.replace('"training.epochs=1"', '"training.epochs=1", "training.lr=0.2"'))
    assert main(["sweep", str(spec)]) == 2
    # Assert: one line naming the stopped run, and no run started before it
    err = capsys.readouterr().err
    assert err.startswith(f"fmlray: error: run {runs[-1].name}: the checkpoint in {folder / runs[-1].name} belongs "
                          "to another config (differs in training.lr)") and len(err.strip().splitlines()) == 1
    assert [p.name for p in folder.iterdir() if not p.name.startswith(".")] == [runs[-1].name]


@pytest.mark.parametrize("rounds", [1, 3])
def test_a_stopped_run_is_refused_when_the_sweep_now_asks_for_other_rounds(tmp_path, capsys, rounds):
    # it used to be resumed with the new rounds: past them (a "finished" run of 2 rounds in a grid of 1, then
    # refused by the next rerun of the same file), or extended, which a finished run never is
    from fmlray.simulation import RunInterrupted, run_experiment
    spec = tmp_path / "s.toml"
    text = SPEC.format(out=tmp_path / "runs").replace('"run.rounds=1"', '"run.rounds=3"')
    spec.write_text(text)
    folder, runs = plan(spec)
    done = []
    with pytest.raises(RunInterrupted):  # stopped after round 2 of 3, with a checkpoint
        run_experiment(runs[0].cfg, echo=lambda line: None, report=lambda s: done.append(s["round"]),
                       stop=lambda: len(done) >= 1)
    spec.write_text(text.replace('"run.rounds=3"', f'"run.rounds={rounds + 1}"'))
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fmlray: error: run {runs[0].name} stopped in {folder / runs[0].name} with another "
                          "config") and "(differs in run.rounds)" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in folder.iterdir() if not p.name.startswith(".")] == [runs[0].name]
    # and `fmlray run --resume` refuses to go back past the checkpoint's round
    assert main(["run", "--resume", str(folder / runs[0].name), "--set", "run.rounds=1"]) == 2
    err = capsys.readouterr().err
    assert "has a checkpoint of round 2, past run.rounds = 1; resume with run.rounds >= 2" in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_sweep_or_tune_file_that_is_not_there_or_not_toml_is_named_as_such(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("x = [")
    for command, kind in (("sweep", "sweep file"), ("tune", "tune file")):
        for path, what in ((tmp_path / "nope.toml", "does not exist; give a TOML file (see experiments/)"),
                           (bad, "is not valid TOML")):
            assert main([command, str(path)]) == 2
            assert capsys.readouterr().err.startswith(f"fmlray: error: {kind} {path} {what}")


def one_axis(tmp_path, common: str, axis: str, values: str):
    """A sweep file of one axis, serial one-round runs with `common` settings besides."""
    spec = tmp_path / "s.toml"
    spec.write_text(f'[sweep]\nname = "t"\noutput_dir = "{tmp_path / "runs"}"\n'
                    f'set = ["engine.kind=serial", "run.rounds=1", "training.epochs=1", {common}]\n\n'
                    f'[[axis]]\nname = "{axis}"\nvalues = {values}\n')
    return spec


def test_a_run_that_fails_in_a_sequential_sweep_is_named_before_any_run_starts(tmp_path, capsys):
    spec = one_axis(tmp_path, '"data.min_samples=1"', "clients", '[{ label = "few", set = ["clients.num_clients=4"] }, '
                    '{ label = "many", set = ["clients.num_clients=2000"] }]')
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fmlray: error: run many-s0: cannot give 2000 clients") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs" / "t" / "few-s0").exists()  # it ran first, then the sweep failed (audit 48)


def test_a_sweep_run_killed_after_its_last_checkpoint_is_finished_by_the_rerun(tmp_path, capsys, monkeypatch):
    from fmlray import rundir
    spec = one_axis(tmp_path, '"clients.num_clients=4"', "algorithm", '["algorithm.name=fedavg"]')
    real = rundir.finish

    def killed(*args):
        raise KeyboardInterrupt  # killed between its checkpoint and its outputs
    monkeypatch.setattr(rundir, "finish", killed)
    assert main(["sweep", str(spec)]) == 130
    monkeypatch.setattr(rundir, "finish", real)
    assert main(["sweep", str(spec)]) == 0  # it once refused for ever: "already ran its 1 rounds"
    assert rundir.finished(tmp_path / "runs" / "t" / "fedavg-s0")
    assert (tmp_path / "runs" / "t" / "results.parquet").is_file()


def test_a_folder_where_the_sweeps_table_goes_is_one_line_and_the_rerun_writes_the_table(tmp_path, capsys):
    # it was exit 1 after every run had finished, naming the table's temporary file
    spec = tmp_path / "s.toml"
    spec.write_text(f'[sweep]\nname = "t"\noutput_dir = "{tmp_path / "runs"}"\nseeds = [0]\n'
                    'set = ["engine.kind=serial", "run.rounds=1", "training.epochs=1", "clients.num_clients=4"]\n\n'
                    '[[axis]]\nname = "algorithm"\nvalues = ["algorithm.name=fedavg"]\n')
    folder, runs = plan(spec)
    assert len(runs) == 1
    (folder / "results.parquet").mkdir(parents=True)
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write the sweep's table {folder / 'results.parquet'}" in err, err
    assert "every run is done" in err and not list(folder.glob(".results.parquet.*"))
    (folder / "results.parquet").rmdir()
    assert main(["sweep", str(spec)]) == 0
    assert "done" in capsys.readouterr().out and (folder / "results.parquet").is_file()


def test_a_run_another_command_wrote_into_the_sweep_since_it_began_is_refused_not_counted_done(tmp_path):
    # it was counted as the sweep's finished run, whatever it trained; only folders there at the start were checked
    from fmlray.errors import FmlrayError
    from fmlray.simulation import run_experiment
    from fmlray.sweep import run_sweep
    spec = one_axis(tmp_path, '"clients.num_clients=4"', "algorithm", '["algorithm.name=fedavg", "algorithm.name=fml"]')
    folder, runs = plan(spec)
    theirs = runs[1].cfg.replace(training=dataclasses.replace(runs[1].cfg.training, lr=runs[1].cfg.training.lr * 2))

    def echo(line: str) -> None:  # as run 1 starts, another command runs run 2's name with another lr
        if line.startswith("[1/2]"):
            run_experiment(theirs, echo=lambda _: None)
    with pytest.raises(FmlrayError, match=rf"run {runs[1].name} finished in {folder / runs[1].name} with another "
                       r"config than .* \(differs in training.lr\)"):
        run_sweep(spec, echo=echo, sequential=True)
    assert (folder / runs[0].name / "metrics.parquet").is_file() and not (folder / "results.parquet").exists()


def test_sweep_set_is_the_default_of_axis_values_that_leave_its_key_alone(tmp_path):
    # a table sets its keys one by one: {epochs=2} keeps sweep.set's lr, as a file's [training] table would
    spec = one_axis(tmp_path, '"training.lr=0.1"', "t", "[{label = 'e2', set = ['training={epochs=2}']}, "
                                                        "'training.lr=0.05']")
    runs = {r.name: r.cfg.training for r in plan(spec)[1]}
    assert (runs["e2-s0"].epochs, runs["e2-s0"].lr) == (2, 0.1) and (runs["0.05-s0"].epochs, runs["0.05-s0"].lr) == (1, 0.05)


def test_a_sweep_without_seeds_runs_its_base_files_seed(tmp_path):
    (tmp_path / "base.toml").write_text("[run]\nseed = 7\n")
    spec = tmp_path / "s.toml"
    spec.write_text('[sweep]\nname = "t"\nbase = "base.toml"\nset = ["run.rounds=1"]\n')
    assert [(r.name, r.cfg.run.seed) for r in plan(spec)[1]] == [("s7", 7)]
    spec.write_text('[sweep]\nname = "t"\nset = ["run.rounds=1"]\n')  # no base: the default config's
    assert [(r.name, r.cfg.run.seed) for r in plan(spec)[1]] == [("s0", 0)]


def test_the_sweeps_table_holds_any_seed_a_run_may_have(tmp_path, capsys):
    # run.seed goes up to 2**63 - 1; the table's seed column once was int32, and the finished sweep crashed
    spec = tmp_path / "s.toml"
    spec.write_text(f'[sweep]\nname = "t"\noutput_dir = "{tmp_path / "runs"}"\nseeds = [3000000000]\n'
                    'set = ["engine.kind=serial", "run.rounds=1", "training.epochs=1", "clients.num_clients=4"]\n')
    assert main(["sweep", str(spec)]) == 0
    assert set(pq.read_table(tmp_path / "runs" / "t" / "results.parquet").column("seed").to_pylist()) == {3000000000}


def test_a_values_label_is_the_value_as_typed_and_never_hides_its_run(tmp_path):
    # "training.lr = 0.1" was labelled " 0.1" (run "_0.1-s0"), a quoted string kept its quotes ("_iid_-s0"),
    # and a label starting with a dot made a hidden run folder, refused as a run.name
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(out=tmp_path / "runs").replace(
        '"algorithm.name=fml", "algorithm.name=fedavg"', '"training.lr = 0.1", "training.batching=\'vmap\'"').replace(
        'label = "dir0.5"', 'label = ".5"').replace('seeds = [0, 1]', 'seeds = [0]'))
    _, runs = plan(spec)
    assert [r.name for r in runs] == ["0.1-iid-s0", "0.1-_5-s0", "vmap-iid-s0", "vmap-_5-s0"]
    assert runs[0].labels == {"algorithm": "0.1", "partition": "iid", "seed": "0"}


def test_a_sweep_never_replaces_a_table_it_did_not_write_nor_writes_into_a_run_or_a_search(tmp_path, capsys):
    # results.parquet was replaced whatever it was: a user's own file, or the table of another grid that a
    # copied sweep file (same name and output_dir) had written; and a sweep wrote into a run's folder (audit 23)
    spec = one_axis(tmp_path, '"clients.num_clients=4"', "algorithm", '["algorithm.name=fedavg", "algorithm.name=fml"]')
    folder, _ = plan(spec)
    folder.mkdir(parents=True)
    (folder / "results.parquet").write_text("my own results")
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a table fmlray sweep wrote" in err and "move it away" in err, err
    assert (folder / "results.parquet").read_text() == "my own results" and sorted(os.listdir(folder)) == ["results.parquet"]
    (folder / "results.parquet").unlink()
    assert main(["sweep", str(spec)]) == 0
    first = (folder / "results.parquet").read_bytes()
    # the same sweep name with another grid: refused before it runs, the first grid's table kept
    spec.write_text(spec.read_text().replace('"algorithm.name=fedavg", "algorithm.name=fml"', '"algorithm.name=local"'))
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds runs this sweep file does not plan (fedavg-s0, fml-s0)" in err, err
    assert (folder / "results.parquet").read_bytes() == first and not (folder / "local-s0").exists()
    # a run's folder is not a sweep's
    run_dir = tmp_path / "elsewhere" / "t"
    assert main(["run", "--set", "engine.kind=serial", "--set", "run.rounds=1", "--set", "clients.num_clients=4",
                 "--set", f"run.output_dir={run_dir.parent}", "--set", "run.name=t"]) == 0
    spec.write_text(spec.read_text().replace(str(tmp_path / "runs"), str(run_dir.parent)))
    before = sorted(os.listdir(run_dir))
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a run's folder (fmlray run made it), not a sweep's" in err, err
    assert sorted(os.listdir(run_dir)) == before


TUNE = ('[tune]\nname = "t"\noutput_dir = "{out}"\nset = ["engine.kind=serial", "run.rounds=1"]\nsamples = 2\n'
        '[[param]]\nkey = "training.lr"\nloguniform = [0.003, 0.1]\n')


def holding(folder) -> subprocess.Popen:
    """Another process holding `folder` as a sweep or search does while it writes there (`rundir.writing`)."""
    code = ("import sys, time; from pathlib import Path; from fmlray.rundir import writing\n"
            "with writing(Path(sys.argv[1]), 'sweep.output_dir'):\n    print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def tree(root) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


@pytest.mark.parametrize("argv", [["sweep"], ["sweep", "--parallel", "2"], ["tune"], ["tune", "--resume"]])
def test_a_second_command_on_a_sweeps_or_searchs_folder_is_one_line_and_changes_nothing(tmp_path, capsys, argv):
    # a `tune --resume` beside a running one had its trials refused one by one, recorded them as failed in the
    # Tune state both read, and the next resume left a trial the first had finished out of trials.parquet
    spec = tmp_path / "s.toml"
    spec.write_text((SPEC if argv[0] == "sweep" else TUNE).format(out=tmp_path / "runs"))
    folder = tmp_path / "runs" / "t"
    other = holding(folder)
    try:
        before = tree(tmp_path)
        assert main([argv[0], str(spec), *argv[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"fmlray: error: {folder} is being written by another fmlray command (pid {other.pid}); wait " \
                      "for it to end", err
        assert tree(tmp_path) == before
        # a run of the folder's name in the same output_dir takes the same lock
        assert main(["run", "--set", "engine.kind=serial", "--set", f"run.output_dir={tmp_path / 'runs'}",
                     "--set", "run.name=t"]) == 2
        assert f"{folder} is being written by another fmlray command (pid {other.pid})" in capsys.readouterr().err
        assert tree(tmp_path) == before
    finally:
        other.kill()
        other.wait()
    if argv == ["sweep"]:  # once the other command has ended, the same sweep runs, and leaves no lock behind
        assert main(["sweep", str(spec)]) == 0
        assert (folder / "results.parquet").is_file() and sorted(os.listdir(tmp_path / "runs")) == ["t"]


def test_a_sweep_through_a_link_to_its_folder_and_one_by_the_folders_own_path_take_one_lock(tmp_path, capsys):
    real = tmp_path / "data" / "t"
    real.mkdir(parents=True)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "t").symlink_to(real)
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(out=tmp_path / "data"))
    other = holding(tmp_path / "runs" / "t")
    try:
        assert main(["sweep", str(spec)]) == 2
        assert f"{real} is being written by another fmlray command (pid {other.pid})" in capsys.readouterr().err
        assert list(real.iterdir()) == []
    finally:
        other.kill()
        other.wait()


def test_a_sequential_sweep_whose_runs_are_all_finished_starts_no_ray(tmp_path, capsys, monkeypatch):
    # it started a private Ray (~5 s) only to find every run done (audit 39)
    from fmlray.engine import connect
    spec = one_axis(tmp_path, '"clients.num_clients=4"', "algorithm", '["algorithm.name=fedavg"]')
    assert main(["sweep", str(spec)]) == 0
    spec.write_text(spec.read_text().replace("engine.kind=serial", "engine.kind=ray"))  # engine.* may change

    def no_ray(*args, **kwargs):
        raise AssertionError("a Ray started for a sweep with nothing left to run")
    monkeypatch.setattr(connect, "connect", no_ray)
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 0
    assert "[1/1] fedavg-s0: done" in capsys.readouterr().out


@pytest.mark.parametrize("grid", ["sweep", "search"])
def test_a_grids_run_changed_by_run_resume_is_refused_before_it_leaves_the_grid(tmp_path, capsys, grid):
    # `fmlray run --resume <a sweep's run> --set run.rounds=2` extended it in place; the sweep (or search) then
    # refused it for good as "another config's" (audit 48)
    if grid == "sweep":
        spec = one_axis(tmp_path, '"clients.num_clients=4"', "algorithm", '["algorithm.name=fedavg"]')
        assert main(["sweep", str(spec)]) == 0
        run = tmp_path / "runs" / "t" / "fedavg-s0"
    else:  # a search's folder, as its record marks it
        out = tmp_path / "runs" / "r"
        assert main(["run", "--set", "engine.kind=serial", "--set", "run.rounds=1", "--set", "training.epochs=1",
                     "--set", "clients.num_clients=4", "--set", f"run.output_dir={out}", "--set", "run.name=trial-00000"]) == 0
        (out / ".tune").mkdir()
        (out / ".tune" / "search.json").write_text("{}")
        run = out / "trial-00000"
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))
    capsys.readouterr()
    assert main(["run", "--resume", str(run), "--set", "run.rounds=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fmlray: error: {run} is a run of the {grid} in {run.parent}; changed there (run.rounds), it would "
                   "no longer be that grid's run, and the grid would refuse it; copy the folder and resume the copy "
                   f"(cp -a {run} DEST, then fmlray run --resume DEST ...)"), err
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before
    assert main(["run", "--resume", str(run)]) == 2  # finished: how to go on says the same
    assert capsys.readouterr().err.strip().endswith(
        f"already ran its 1 rounds; it is a run of the {grid} in {run.parent}, so to continue it copy the folder "
        f"(cp -a {run} DEST) and resume the copy with --set run.rounds=N (N > 1)")
    copy = tmp_path / "copy" / run.name
    shutil.copytree(run, copy)
    assert main(["run", "--resume", str(copy), "--set", "run.rounds=2"]) == 0  # the copy goes on


def test_run_overwrite_onto_a_sweeps_folder_names_what_the_folder_is(tmp_path, capsys):
    spec = one_axis(tmp_path, '"clients.num_clients=4"', "algorithm", '["algorithm.name=fedavg"]')
    assert main(["sweep", str(spec)]) == 0
    capsys.readouterr()
    assert main(["run", "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "run.name=t", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()  # it said the folder "was not made by fmlray"
    assert err == (f"fmlray: error: {tmp_path / 'runs' / 't'} is a sweep's folder (fmlray sweep made it), not a run's, "
                   "so it is never deleted, even with --overwrite; move it away yourself or choose another run.name")
