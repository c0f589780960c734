"""`fmlray tune` files: what a search reads, and one clear line for each mistake, before Ray starts."""

import pytest

from fmlray.errors import ConfigError
from fmlray.search import literal, plan_search

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
])
def test_bad_tune_files_name_the_problem(tmp_path, change, fragment):
    path = tmp_path / "t.toml"
    text = GOOD.format(out=tmp_path / "runs")
    assert change[0] in text
    path.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError) as info:
        plan_search(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)
