"""`fmlray tune` files: what a search reads, and one clear line for each mistake, before Ray starts."""

import os
from pathlib import Path

import pytest

from fmlray.errors import ConfigError, FmlrayError
from fmlray.search import _write_record, changed, fingerprint, literal, plan_search, resume_point

GOOD = """
[tune]
name = "s"
output_dir = "{out}"
set = ["engine.kind=serial", "run.rounds=4"]
samples = 5

[[param]]
key = "algorithm.fml.alpha"
uniform = [0.1, 0.9]

[[param]]
key = "training.optimizer"
grid = ["sgd", "adam"]
"""


def test_a_tune_file_is_read_with_its_defaults(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(GOOD.format(out=tmp_path / "runs"))
    s = plan_search(path)
    assert (s.metric, s.mode, s.scheduler, s.rounds, s.total) == ("local_mean", "max", "asha", 4, 10)
    cfg = s.config({"algorithm.fml.alpha": 0.25, "training.optimizer": "adam"}, "trial-00007")
    assert cfg.algorithm.fml.alpha == 0.25 and cfg.training.optimizer == "adam"
    assert cfg.run.name == "trial-00007" and cfg.run.output_dir == str(tmp_path / "runs" / "s")
    assert literal(0.5) == "0.5" and literal("a'b") == '"a\'b"'


@pytest.mark.parametrize("change, fragment", [
    (("samples = 5", "samples = 0"), "tune.samples must be a number of samples from 1 to 100,000"),
    (("samples = 5", "metric = 'accuracy'"), "tune.metric must be one of local_mean"),
    (("samples = 5", "search = 'optuna'"), "Tune's other searchers need packages"),
    (("samples = 5", "scheduler = 'pbt'"), "tune.scheduler must be \"asha\" or \"fifo\""),
    (("samples = 5", "bogus = 1"), "unknown key(s) ['bogus'] in [tune]"),
    (("uniform = [0.1, 0.9]", "uniform = [0.9, 0.1]"), "uniform takes [low, high] with low < high"),
    (("uniform = [0.1, 0.9]", "uniform = [0.1, 1.5]"), "with algorithm.fml.alpha=1.5"),
    (("uniform = [0.1, 0.9]", "loguniform = [0, 0.9]"), "both > 0"),
    (("uniform = [0.1, 0.9]", "uniform = [0.1, 0.9]\nchoice = [1]"), "exactly one of uniform"),
    (("algorithm.fml.alpha", "algorithm.fml.alfa"), "unknown key 'algorithm.fml.alfa'"),
    (("training.optimizer", "algorithm.fml.alpha"), "a key is searched twice"),
    (("run.rounds=4", "run.eval_every=2"), "set run.eval_every = 1"),
    (("samples = 5", "grace_rounds = 9"), "tune.grace_rounds = 9 is more than run.rounds = 4"),
    (("samples = 5", "parallel = 0"), "tune.parallel must be a number of trials at once"),
    (('"training.optimizer"\ngrid = ["sgd", "adam"]', '"training.epochs"\nuniform = [1, 3]'),
     "training.epochs must be an integer, got 1.0; uniform and loguniform draw real numbers: give an integer key "
     "randint = [low, high]"),  # the ends as written are integers; the draws are not
    (('"training.optimizer"\ngrid = ["sgd", "adam"]', '"training.batch_size"\nloguniform = [16, 64]'),
     "training.batch_size must be an integer, got 16.0; uniform and loguniform draw real numbers"),
    # keys whose values would be ignored, or mislabel the trials
    (('"algorithm.fml.alpha"\nuniform = [0.1, 0.9]', '"run.name"\nchoice = ["a", "b"]'),
     "param run.name: run.name cannot be searched: the search names each trial's run trial-NNNNN"),
    (('"algorithm.fml.alpha"\nuniform = [0.1, 0.9]', '"run.output_dir"\nchoice = ["a", "b"]'),
     "param run.output_dir: run.output_dir cannot be searched: trials write into tune.output_dir/tune.name"),
    (('"algorithm.fml.alpha"\nuniform = [0.1, 0.9]', '"run.rounds"\nrandint = [2, 4]'),
     "param run.rounds: run.rounds cannot be searched: every trial runs the same run.rounds"),
    (('"algorithm.fml.alpha"\nuniform = [0.1, 0.9]', '"run.eval_every"\nchoice = [2, 1]'),
     "run.eval_every cannot be searched"),
    (('run.rounds=4"', 'run.rounds=4", "run.name=mine"'),
     "tune.set: 'run.name=mine' sets run.name, which would be ignored: the search names each trial's run"),
    (('run.rounds=4"', 'run.rounds=4", "run.rounds=5"'), "tune.set: sets run.rounds twice"),
    (('"training.optimizer"', '"algorithm.fml"'), "a key is searched twice (algorithm.fml.alpha, algorithm.fml)"),
    # an empty key read as "--set '=0.1' must look like section.key=value"; one with spaces kept them in its column
    (('"training.optimizer"', '""'), "[[param]] 1: key must be a config key such as \"training.lr\" (letters, "
                                     "digits, _ and ., no spaces), got ''"),
    (('"training.optimizer"', '" training.optimizer "'), "got ' training.optimizer '"),
    (('grid = ["sgd", "adam"]', 'grid = ["sgd", "adam", "sgd"]'),
     'param training.optimizer: grid values "sgd" and "sgd" give the same config; list each value once'),
    (('"training.optimizer"\ngrid = ["sgd", "adam"]', '"training.lr"\ngrid = [0.01, 0.010]'),
     "param training.lr: grid values 0.01 and 0.01 give the same config"),
    # a value of tune.set that no trial uses; a metric no trial reports (every trial would rank NaN)
    (('run.rounds=4"', 'run.rounds=4", "training.optimizer=\'adam\'"'),
     "tune.set sets training.optimizer, but param training.optimizer replaces it in every trial; drop it from tune.set"),
    (('run.rounds=4"', 'run.rounds=4", "training={optimizer=\'adam\'}"'),
     "tune.set sets training.optimizer, but param training.optimizer replaces it"),
    (('run.rounds=4"', 'run.rounds=4", "algorithm.name=\'fedavg\'"'),
     "tune.metric = 'local_mean' is never reported (fedavg tests no local models); choose another metric "
     "(global_clients_mean, "),
    (('samples = 5\n', 'samples = 5\nmetric = "global_test"\n[[param]]\nkey = "algorithm.name"\ngrid = ["fml", "local"]\n'),
     "tune.metric = 'global_test' is never reported (local has no global model)"),
])
def test_bad_tune_files_name_the_problem(tmp_path, change, fragment):
    path = tmp_path / "t.toml"
    text = GOOD.format(out=tmp_path / "runs")
    assert change[0] in text
    path.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError) as info:
        plan_search(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def plan(tmp_path, text, name="t.toml"):
    path = tmp_path / name
    path.write_text(text)
    return plan_search(path)


def test_a_fingerprint_changes_with_what_draws_or_trains_the_trials_not_with_top_or_parallel(tmp_path):
    # Prepare
    good = GOOD.format(out=tmp_path / "runs")
    start = fingerprint(plan(tmp_path, good))
    # Execute / Assert: the keys that differ, by name
    assert changed(start, fingerprint(plan(tmp_path, good))) == []
    assert changed(start, fingerprint(plan(tmp_path, good.replace("samples = 5", "samples = 5\ntop = 1\nparallel = 2")))) == []
    assert changed(start, fingerprint(plan(tmp_path, good.replace("[0.1, 0.9]", "[0.2, 0.9]")))) == \
        ["param.algorithm.fml.alpha"]
    assert changed(start, fingerprint(plan(tmp_path, good.replace("samples = 5", "samples = 6\nseed = 1")))) == \
        ["tune.samples", "tune.seed"]
    assert changed(start, fingerprint(plan(tmp_path, good.replace("run.rounds=4", "run.rounds=5")))) == ["run.rounds"]
    assert changed(start, fingerprint(plan(tmp_path, good.replace('grid = ["sgd", "adam"]', 'grid = ["sgd"]')))) == \
        ["param.training.optimizer"]
    assert changed({"a": 1, "b": [1, 2]}, {"b": [1, 2], "c": 0}) == ["a", "c"]


def test_resume_point_needs_the_same_search_and_tunes_records(tmp_path):
    # Prepare: a search's folder with its record, but no Tune experiment yet
    good = GOOD.format(out=tmp_path / "runs")
    search = plan(tmp_path, good)
    with pytest.raises(FmlrayError, match="holds no search to resume"):
        resume_point(search, "t.toml")
    _write_record(search, 2)
    assert resume_point(search, "t.toml") == (None, 2)  # no trial started: from the beginning, with this plan
    # Execute: Tune's experiments (the newest one is continued)
    for name in ("20250101-000000", "20250102-000000"):
        (search.folder / ".tune" / name).mkdir()
        (search.folder / ".tune" / name / "tuner.pkl").write_bytes(b"")
    # Assert
    assert resume_point(search, "t.toml") == (search.folder / ".tune" / "20250102-000000", 2)
    other = plan(tmp_path, good.replace("[0.1, 0.9]", "[0.1, 0.8]"))
    with pytest.raises(FmlrayError) as info:
        resume_point(other, "t.toml")
    assert "t.toml changed since the search" in str(info.value) and "(param.algorithm.fml.alpha)" in str(info.value)


def test_resume_keeps_the_parallel_the_search_started_with(tmp_path):
    from fmlray.search import run_search

    path = tmp_path / "t.toml"
    path.write_text(GOOD.format(out=tmp_path / "runs"))
    search = plan_search(path)
    _write_record(search, 2)
    (search.folder / ".tune" / "20250101-000000").mkdir()
    (search.folder / ".tune" / "20250101-000000" / "tuner.pkl").write_bytes(b"")
    with pytest.raises(FmlrayError, match=r"--resume keeps the parallel the search started with \(2\)"):
        run_search(path, parallel=3, resume=True)


def test_a_search_may_draw_the_seed(tmp_path):
    s = plan(tmp_path, GOOD.format(out=tmp_path / "runs").replace('"training.optimizer"', '"run.seed"').replace(
        '["sgd", "adam"]', "[1, 2]"))
    assert s.config({"algorithm.fml.alpha": 0.5, "run.seed": 2}).run.seed == 2


def test_a_search_in_a_relative_folder_resumes_from_tunes_absolute_path(tmp_path, monkeypatch):
    # Prepare: output_dir relative to where fmlray tune runs (as in experiments/tune-digits.toml)
    monkeypatch.chdir(tmp_path)
    search = plan(tmp_path, GOOD.format(out="runs"))
    _write_record(search, 2)
    (search.folder / ".tune" / "20250101-000000").mkdir()
    (search.folder / ".tune" / "20250101-000000" / "tuner.pkl").write_bytes(b"")
    # Execute
    point = resume_point(search, "t.toml")
    # Assert: Tune gets an absolute path (a relative one is an invalid URI to it); the recorded search, and
    # so the fingerprint an older search was started with, keeps the folder as written
    assert point == (tmp_path.resolve() / "runs" / "s" / ".tune" / "20250101-000000", 2)
    assert fingerprint(search)["run.output_dir"] == "runs/s" and search.folder == Path("runs/s")


@pytest.mark.parametrize("command, text", [
    ("tune", GOOD.replace("samples = 5", "samples = 2").replace('"run.rounds=4"', '"run.rounds=4", "data.dataset=\'cifar10\'"')),
    ("sweep", '[sweep]\nname = "s"\noutput_dir = "{out}"\nexecutor = "tune"\nseeds = [0]\n'
              'set = ["engine.kind=serial", "data.dataset=\'cifar10\'"]\n\n[[axis]]\nname = "lr"\n'
              'values = ["training.lr=0.01", "training.lr=0.02"]\n'),
    ("tune", GOOD.replace("[0.1, 0.9]", "[0.1, 0.9]\n\n[[param]]\nkey = \"clients.num_clients\"\nrandint = [4, 900]")),
    # a dataset between a choice's ends: its trials failed alone, "cifar10 not found" (audit 41)
    ("tune", GOOD.replace('key = "training.optimizer"\ngrid = ["sgd", "adam"]',
                          'key = "data.dataset"\nchoice = ["digits", "cifar10", "digits"]')),
])
def test_a_trial_whose_data_cannot_be_prepared_is_one_line_before_tune_writes_anything(tmp_path, capsys, command,
                                                                                     text):
    # the trial used to fail inside Tune: a Ray Tune traceback (tune) or Tune's records left behind (sweep),
    # and `fmlray tune` then refused to start again without --resume
    from fmlray.cli import main

    path = tmp_path / "t.toml"
    path.write_text(text.format(out=tmp_path / "runs").replace("{{", "{").replace("}}", "}"))
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert ("cifar10 not found" in err) != ("clients.num_clients=900" in err), err  # the largest client count
    assert not (tmp_path / "runs").exists()


def test_a_searched_table_is_written_inline_and_sets_its_keys_one_by_one(tmp_path):
    s = plan(tmp_path, GOOD.format(out=tmp_path / "runs").replace(
        'key = "training.optimizer"\ngrid = ["sgd", "adam"]', 'key = "training"\nchoice = [{lr = 0.1}, {lr = 0.2, epochs = 2}]'))
    assert literal({"lr": 0.2, "epochs": 2, "a b": "x"}) == '{lr = 0.2, epochs = 2, "a b" = "x"}'
    cfg = s.config({"algorithm.fml.alpha": 0.5, "training": {"lr": 0.2, "epochs": 2}})
    assert (cfg.training.lr, cfg.training.epochs, cfg.training.batch_size) == (0.2, 2, 16)  # the rest: defaults


def test_trials_of_values_of_two_kinds_are_written_with_each_value_as_toml_writes_it(tmp_path):
    # grid = ["all", 3]: both valid values of run.eval_clients, and no parquet column holds both
    import pyarrow.parquet as pq

    from fmlray.search import write_outputs
    from fmlray.trials import METRICS
    s = plan(tmp_path, GOOD.format(out=tmp_path / "runs").replace(
        'key = "training.optimizer"\ngrid = ["sgd", "adam"]', 'key = "run.eval_clients"\ngrid = ["all", 3]'))
    rows = [{"trial": f"trial-0000{i}", "algorithm.fml.alpha": 0.5, "run.eval_clients": v, "complete": True,
             "rounds": 4, **{m: 0.5 + i / 10 for m in METRICS}} for i, v in enumerate(["all", 3])]
    s.folder.mkdir(parents=True)
    write_outputs(s, rows)
    table = pq.read_table(s.folder / "trials.parquet")
    assert table.column("run.eval_clients").to_pylist() == ['"all"', "3"]
    assert table.column("algorithm.fml.alpha").to_pylist() == [0.5, 0.5]  # one kind: as it is
    assert "eval_clients = 3" in (s.folder / "best-2.toml").read_text()


def four_trials(tmp_path):
    """The GOOD search (top = 3) and the rows of four finished trials, best first; its folder made, empty."""
    from fmlray.trials import METRICS
    s = plan(tmp_path, GOOD.format(out=tmp_path / "runs"))
    rows = [{"trial": f"trial-0000{i}", "algorithm.fml.alpha": 0.5, "training.optimizer": "sgd", "complete": True,
             "rounds": 4, **{m: 0.9 - i / 10 for m in METRICS}} for i in range(4)]
    s.folder.mkdir(parents=True)
    return s, rows


def test_a_resume_with_a_smaller_top_leaves_no_stale_preset_and_keeps_a_users_file(tmp_path):
    import dataclasses

    from fmlray.search import write_outputs
    s, rows = four_trials(tmp_path)
    write_outputs(s, rows)
    mine = s.folder / "best-4.toml"
    mine.write_text("# my notes\n")  # rank 4 was never written (top = 3): a file of the user's own
    (s.folder / "best-².toml").write_text("# mine too\n")  # '²' passes str.isdigit(); int() raised a traceback
    assert sorted(p.name for p in s.folder.glob("best-*.toml")) == ["best-1.toml", "best-2.toml", "best-3.toml",
                                                                     "best-4.toml", "best-².toml"]
    write_outputs(dataclasses.replace(s, top=1), rows)
    assert sorted(p.name for p in s.folder.glob("best-*.toml")) == ["best-1.toml", "best-4.toml", "best-².toml"]
    assert mine.read_text() == "# my notes\n"


def test_a_metric_is_never_reported_exactly_where_a_run_leaves_it_nan():
    # what plan_search refuses, checked against one real round of every algorithm
    import math

    from fmlray.config import ALGORITHMS, load_config
    from fmlray.metrics import round_summary
    from fmlray.trials import METRICS, figures, unreported
    from test_baselines import whole_run
    for name in ALGORITHMS:
        result = whole_run(f"algorithm.name={name}", "algorithm.fedper.head_layers=2", "run.rounds=1",
                           "training.epochs=2")  # FedRep's head trains in the epochs before its body's
        got = figures(round_summary([r for r in result.rows if r["round"] == 1]))
        cfg = load_config(None, [f"algorithm.name={name}"])
        nan, refused = {m for m in METRICS if math.isnan(got[m])}, {m for m in METRICS if unreported(cfg, m)}
        assert refused <= nan, name  # never refuses a metric the run reports
        if name not in ("fedper", "fedbn", "fedrep", "lgfedavg", "apfl", "ditto"):  # whole-model or none
            assert refused == nan, name


def test_a_search_whose_trials_never_reported_the_metric_is_a_warning(tmp_path):
    # FedPer's global model is only its body, never tested: global_* figures are NaN in every trial
    from fmlray.search import unranked
    s = plan(tmp_path, GOOD.format(out=tmp_path / "runs"))
    nan, half = [{"local_mean": float("nan")}] * 2, [{"local_mean": float("nan")}, {"local_mean": 0.5}]
    assert unranked(s, nan) == ("no trial reported tune.metric = 'local_mean', so the ranking is arbitrary; search "
                                "again with a metric the trials report")
    assert unranked(s, half) is None and unranked(s, []) is None


def resumable_search(tmp_path, tune_state: bool = True):
    """A search's folder laid out by hand: its recorded plan and, with `tune_state`, a Tune experiment to restore."""
    path = tmp_path / "t.toml"
    path.write_text(GOOD.format(out=tmp_path / "runs"))
    search = plan_search(path)
    _write_record(search, 1)
    if tune_state:
        (search.folder / ".tune" / "20250101-000000").mkdir()
        (search.folder / ".tune" / "20250101-000000" / "tuner.pkl").write_bytes(b"")
    return path, search


def files(folder: Path) -> dict:
    """Each path under `folder`: a link or not, and its time of change (a folder's changes as a lock comes and goes)."""
    return {str(p): (p.is_symlink(), None if p.is_dir() else p.lstat().st_mtime_ns) for p in folder.rglob("*")}


def past_the_checks(*args, **kwargs):
    raise AssertionError("the search went past its checks (it would load data, start Ray, run trials)")


def test_write_outputs_own_files_pass_its_checks_and_an_edited_preset_is_rewritten(tmp_path):
    # Prepare: a search's own outputs, then its best-1.toml edited below its first line
    from fmlray.search import check_outputs, write_outputs
    s, rows = four_trials(tmp_path)
    write_outputs(s, rows)
    best = s.folder / "best-1.toml"
    best.write_text(best.read_text() + "# my edit\n")
    # Execute / Assert: an output, made again by every resume
    check_outputs(s, "then resume again")
    write_outputs(s, rows)
    assert "# my edit" not in best.read_text()


def not_a_table(folder):
    (folder / "trials.parquet").write_text("my table\n")


def another_table(folder):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"trial": ["trial-00000"], "rounds": [4], "complete": [True], "lr": [0.1]}),
                   folder / "trials.parquet")


def a_link(name):
    def make(folder):
        (folder.parent / "mine.toml").write_text("# fmlray tune s: rank 2 of 5 by local_mean\n")
        (folder / name).symlink_to(folder.parent / "mine.toml")
    return make


def headless(folder):
    (folder / "best-3.toml").write_text("[run]\nrounds = 3\n")


def a_folder(folder):
    (folder / "best-1.toml").mkdir()


def a_pipe(folder):
    os.mkfifo(folder / "best-2.toml")


@pytest.mark.parametrize("lay, name, why", [
    (not_a_table, "trials.parquet", "is not a Parquet table"),
    (another_table, "trials.parquet", "is another table (no column algorithm.fml.alpha)"),
    (a_link("trials.parquet"), "trials.parquet", "is a link"),
    (a_link("best-2.toml"), "best-2.toml", "is a link"),
    (headless, "best-3.toml", "is a file without the first line this search writes (# fmlray tune s: rank 3 of ...)"),
    (a_folder, "best-1.toml", "is not a file"),
    (a_pipe, "best-2.toml", "is not a file"),
])
def test_resume_refuses_a_file_the_search_did_not_write_where_it_writes_its_outputs(tmp_path, capsys, monkeypatch,
                                                                                     lay, name, why):
    # Prepare: a stopped (or finished) search's folder, and a user's file at one of its outputs' names
    import fmlray.trials
    from fmlray.cli import main
    path, search = resumable_search(tmp_path)
    lay(search.folder)
    monkeypatch.setattr(fmlray.trials, "check_data", past_the_checks)
    before = files(tmp_path)
    # Execute
    assert main(["tune", str(path), "--resume"]) == 2
    # Assert: one line naming the file and what to do, before Ray or Tune; the file, or link, as it was
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{search.folder / name} {why}" in err and "move it away, then resume again" in err, err
    assert files(tmp_path) == before
    mine = search.folder.parent / "mine.toml"
    assert not mine.exists() or mine.read_text() == "# fmlray tune s: rank 2 of 5 by local_mean\n"


def test_write_outputs_never_writes_through_nor_removes_a_link_at_its_names(tmp_path):
    # Prepare: rank 5 is past top (3), a link to a file that looks like this search's preset
    from fmlray.search import write_outputs
    s, rows = four_trials(tmp_path)
    mine = tmp_path / "mine.toml"
    mine.write_text("# fmlray tune s: rank 5 of 9 by local_mean\n")
    (s.folder / "best-5.toml").symlink_to(mine)
    # Execute
    write_outputs(s, rows)
    # Assert: the stale-rank clean-up leaves the link alone (it removed it, reading its target's first line)
    assert (s.folder / "best-5.toml").is_symlink() and mine.read_text().startswith("# fmlray tune s: rank 5 of 9")
    # Execute: a link where the table goes, made while the trials ran
    (s.folder / "trials.parquet").unlink()
    (s.folder / "trials.parquet").symlink_to(mine)
    with pytest.raises(FmlrayError, match="trials.parquet is a link, .* move it away, then continue the search "
                                          "with --resume to write its outputs"):
        write_outputs(s, rows)
    assert (s.folder / "trials.parquet").is_symlink() and mine.read_text().startswith("# fmlray tune s: rank 5 of 9")


def test_resume_of_a_search_stopped_before_tunes_first_state_starts_it_with_the_recorded_plan(tmp_path, capsys,
                                                                                              monkeypatch):
    # Prepare: `fmlray tune` stopped right after it recorded its plan (no Tune state, no trial)
    import fmlray.trials
    from fmlray.cli import main
    path, search = resumable_search(tmp_path, tune_state=False)
    assert resume_point(search, str(path)) == (None, 1)  # from the beginning, with the parallel it started with
    # Execute / Assert: a plain start still points at --resume ...
    assert main(["tune", str(path)]) == 2
    assert "exists (an earlier search); continue it with --resume" in capsys.readouterr().err
    # ... and --resume goes past its checks, to the data and the trials
    monkeypatch.setattr(fmlray.trials, "check_data", past_the_checks)
    with pytest.raises(AssertionError, match="went past its checks"):
        main(["tune", str(path), "--resume"])
    # but not where trials ran and Tune's state is gone: starting afresh would run them again beside theirs
    (search.folder / "trial-00000").mkdir()
    with pytest.raises(FmlrayError, match=r"holds no Ray Tune state to resume, but .* holds trial-00000; move"):
        resume_point(search, str(path))


@pytest.mark.parametrize("signal_raised", ["KeyboardInterrupt", "Terminated"])
def test_a_signal_that_ends_a_search_which_recorded_its_plan_gives_the_resume_command(tmp_path, capsys, monkeypatch,
                                                                                    signal_raised):
    import fmlray.trials
    from fmlray import signals
    from fmlray.cli import main
    raised = KeyboardInterrupt() if signal_raised == "KeyboardInterrupt" else signals.Terminated()

    def stop(*args, **kwargs):
        raise raised
    monkeypatch.setattr(fmlray.trials, "check_data", stop)
    path = tmp_path / "t.toml"
    path.write_text(GOOD.format(out=tmp_path / "runs"))
    # a search that has not recorded its plan: the same command again starts it
    assert main(["tune", str(path)]) == 130
    assert "--resume" not in capsys.readouterr().err
    # one that has (the plan, no Tune state yet): --resume continues it
    resumable_search(tmp_path, tune_state=False)
    assert main(["tune", str(path), "--resume"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(f"; continue with: fmlray tune {path} --resume"), err


def test_a_search_interrupted_while_it_records_its_plan_leaves_no_folder(tmp_path, monkeypatch):
    # a folder without the record would be refused by a plain start and by --resume alike
    import fmlray.rundir
    s = plan(tmp_path, GOOD.format(out=tmp_path / "runs"))
    (tmp_path / "runs").mkdir()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(fmlray.rundir, "write_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _write_record(s, 1)
    assert list((tmp_path / "runs").iterdir()) == []


def test_resume_of_a_folder_that_is_not_a_searchs_says_so_and_offers_no_start_that_fails(tmp_path, capsys):
    # a sweep's folder at tune.output_dir/tune.name: a plain `fmlray tune` refuses it too
    from fmlray.cli import main
    path = tmp_path / "t.toml"
    path.write_text(GOOD.format(out=tmp_path / "runs"))
    folder = tmp_path / "runs" / "s"
    (folder / "lr-0.01-seed0").mkdir(parents=True)
    (folder / "results.parquet").write_bytes(b"PAR1")
    for argv in (["tune", str(path), "--resume"], ["tune", str(path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is not a search's folder" in err, err
        assert "without --resume" not in err and "choose another tune.name or output_dir" in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["lr-0.01-seed0", "results.parquet"]


THREE_GROUPS = """
[clients]
num_clients = 5
[[clients.groups]]
name = "a"
share = 0.45
[[clients.groups]]
name = "b"
share = 0.45
[[clients.groups]]
name = "c"
share = 0.1
"""


def test_every_whole_number_a_randint_draws_is_checked_before_the_search_starts(tmp_path):
    # 5 and 7 clients give each group one; 6 leaves group c none. Only the ends were checked: the search stopped
    # at that trial, and neither a new start (the folder exists) nor --resume (it drew 6 again) could go on (audit 40)
    (tmp_path / "base.toml").write_text(THREE_GROUPS)
    text = GOOD.format(out=tmp_path / "runs").replace('samples = 5', 'samples = 5\nbase = "base.toml"').replace(
        'key = "training.optimizer"\ngrid = ["sgd", "adam"]', 'key = "clients.num_clients"\nrandint = [5, 7]')
    with pytest.raises(ConfigError) as info:
        plan(tmp_path, text)
    assert "clients.num_clients=6" in str(info.value) and "gets no client" in str(info.value), info.value
    assert plan(tmp_path, text.replace("randint = [5, 7]", "randint = [7, 9]")).params[1].values == (7, 9)


def test_a_searched_table_hides_only_the_keys_its_values_set(tmp_path):
    # training = {lr = ...} sets training.lr alone (tables merge key by key): tune.set's training.epochs
    # stays in every trial; it was refused as "param training replaces it in every trial" (audit 40)
    text = GOOD.format(out=tmp_path / "runs").replace('"run.rounds=4"', '"run.rounds=4", "training.epochs=1"').replace(
        'key = "training.optimizer"\ngrid = ["sgd", "adam"]', 'key = "training"\nchoice = [{lr = 0.1}, {lr = 0.2}]')
    s = plan(tmp_path, text)
    assert s.config({"algorithm.fml.alpha": 0.5, "training": {"lr": 0.2}}).training.epochs == 1
    with pytest.raises(ConfigError, match="tune.set sets training.lr, but param training replaces it"):
        plan(tmp_path, text.replace('"training.epochs=1"', '"training.lr=0.3"'))


def test_failed_trials_rank_last_are_never_a_preset_and_are_one_warning(tmp_path):
    import pyarrow.parquet as pq

    from fmlray.search import failures, format_best, ranks, unranked, write_outputs
    s, rows = four_trials(tmp_path)
    for r in rows:
        r["error"] = ""
    rows[0].update(error="every client's update went NaN in round 2", complete=False, rounds=1)
    rows = rows[1:] + rows[:1]  # as `ranked` sorts them: failed last
    write_outputs(s, rows)
    table = pq.read_table(s.folder / "trials.parquet").to_pylist()
    assert [t["error"] for t in table] == ["", "", "", "every client's update went NaN in round 2"]
    assert [p.name for p in sorted(s.folder.glob("best-*.toml"))] == ["best-1.toml", "best-2.toml", "best-3.toml"]
    assert "trial-00000" not in "".join(p.read_text() for p in s.folder.glob("best-*.toml"))
    assert "trial-00000" not in format_best(rows, s) and len(ranks(rows)) == 3
    assert failures(rows) == ("1 of 4 trial(s) failed and rank last (trials.parquet's error column says why); "
                              "trial-00000: every client's update went NaN in round 2")
    assert failures(rows[:3]) is None and unranked(s, rows) is None
    # the reason said is the first drawn trial's, not the best ranked failure's (audit 41)
    rows[1].update(error="every client's update went NaN in round 1", complete=False, rounds=0)
    assert failures(rows).endswith("trial-00000: every client's update went NaN in round 2")


def test_a_trial_an_earlier_fmlray_finished_with_an_error_ranks_as_failed(tmp_path):
    # before 2026-11-30 a diverged trial reported status "error" and ended normally: resumed now, it was ranked
    # as a success and written as a preset (audit 41)
    from types import SimpleNamespace

    from fmlray.search import failures, ranked, ranks
    from fmlray.trials import METRICS
    s = plan(tmp_path, GOOD.format(out=tmp_path / "runs"))
    values = {"algorithm.fml.alpha": 0.5, "training.optimizer": "sgd"}
    ok = {"trial_id": "a_00000", "round": 4, "status": "done", **{m: 0.5 for m in METRICS}}
    old = {"trial_id": "a_00001", "round": 1, "status": "error", "error": "round 2: every update went NaN",
           **{m: 0.6 for m in METRICS}}
    rows = ranked(s, [SimpleNamespace(metrics=m, config=values) for m in (old, ok)])
    assert [r["trial"] for r in ranks(rows)] == ["trial-00000"] and rows[-1]["error"] == old["error"]
    assert failures(rows).startswith("1 of 2 trial(s) failed")


def test_resume_refuses_a_trial_folder_replaced_by_another_run(tmp_path, capsys):
    # `fmlray run --set run.name=trial-00000 --overwrite` into the search's folder: resume still ranked the
    # trial by the figures Tune kept for it, though its folder held a run of another config (audit 40)
    from fmlray.cli import main
    path, search = resumable_search(tmp_path)
    assert main(["run", "--set", "engine.kind=serial", "--set", "run.rounds=1", "--set", "clients.num_clients=4",
                 "--set", "training.epochs=1", "--set", f"run.output_dir={search.folder}",
                 "--set", "run.name=trial-00000"]) == 0
    capsys.readouterr()
    with pytest.raises(FmlrayError) as info:
        resume_point(search, str(path))
    assert f"{search.folder / 'trial-00000'} holds a run of another config than this search's trial" in str(info.value)
    assert "run.rounds" in str(info.value)


def test_tunes_failed_to_fetch_metrics_warning_on_restore_is_not_shown(caplog):
    # `tune --resume` after a kill printed Tune's multi-line "Failed to fetch metrics for 2 trial(s): -
    # _trial_...: FileNotFoundError(...)" for the trials that had not reported yet (they run again; audit 39)
    import logging

    from fmlray.trials import _quiet_unfinished
    analysis = logging.getLogger("ray.tune.analysis.experiment_analysis")
    with caplog.at_level(logging.WARNING), _quiet_unfinished(lambda: False):
        analysis.warning("Failed to fetch metrics for 2 trial(s):\n- _trial_af56c_00001: FileNotFoundError('...')")
        analysis.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]


def test_a_value_is_written_as_one_toml_literal():
    from fmlray.search import literal
    assert literal([0.1, 0.2]) == "[0.1, 0.2]"  # it was "[\n    0.1,\n    0.2,\n]" in messages and --set
    assert literal({"lr": 0.1, "a b": [1, "x"]}) == '{lr = 0.1, "a b" = [1, "x"]}'
    assert literal("sgd") == '"sgd"' and literal(True) == "true"
