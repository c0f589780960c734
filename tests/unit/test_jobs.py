"""Inside a `ray job submit` job, a relative path would land in the job's temporary working directory:
refused with one line before anything runs (a real job: tests/integration/test_cluster.py)."""

import pytest

from fmlray.cli import main
from fmlray.errors import ConfigError
from fmlray.jobs import JOB_DRIVER_VAR, check_path, in_ray_job

QUICK = ["--set", "run.rounds=1", "--set", "training.epochs=1", "--set", "engine.kind=serial"]


@pytest.fixture
def job_driver(monkeypatch, tmp_path):
    monkeypatch.setenv(JOB_DRIVER_VAR, '{"runtime_env": {}, "metadata": {}}')  # what Ray's job supervisor sets
    monkeypatch.chdir(tmp_path)  # the job's working directory
    return tmp_path


def test_a_job_driver_is_recognised(monkeypatch):
    monkeypatch.delenv(JOB_DRIVER_VAR, raising=False)
    assert not in_ray_job()
    monkeypatch.setenv(JOB_DRIVER_VAR, "{}")
    assert in_ray_job()


def test_relative_paths_are_refused_only_in_a_job(monkeypatch, job_driver):
    with pytest.raises(ConfigError, match=r"run.output_dir='runs' is relative, but this is a Ray job"):
        check_path("runs", "run.output_dir")
    check_path(job_driver / "runs", "run.output_dir")  # absolute: fine
    monkeypatch.delenv(JOB_DRIVER_VAR)
    check_path("runs", "run.output_dir")  # not a job: relative to where the user stands, as always


@pytest.mark.parametrize("argv, fragment", [
    (["run", *QUICK], "run.output_dir='runs' is relative, but this is a Ray job"),
    (["run", *QUICK, "--set", "run.output_dir=out/runs"], "run.output_dir='out/runs' is relative"),
    (["run", "--resume", "runs/digits-fml"], "--resume='runs/digits-fml' is relative"),
    (["compare", *QUICK, "--algorithms", "fedavg"], "run.output_dir='runs' is relative"),
    (["partition", "--save", "table.csv"], "--save='table.csv' is relative"),
])
def test_the_cli_refuses_a_relative_path_in_a_job_with_one_line(job_driver, capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith("fmlray: error: ") and fragment in err
    assert f"temporary working directory ({job_driver})" in err and err.endswith("or on shared storage")
    assert list(job_driver.iterdir()) == [], "nothing may be written before the refusal"


def test_a_sweep_with_a_relative_output_dir_is_refused_in_a_job(job_driver, capsys):
    sweep = job_driver.parent / "sweep.toml"  # outside the job's working directory, which must stay empty
    sweep.write_text('[sweep]\nname = "s"\nset = ["engine.kind=serial", "run.rounds=1"]\n')
    assert main(["sweep", str(sweep)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "the sweep's output_dir='runs/sweeps/s' is relative" in err
    assert list(job_driver.iterdir()) == []
