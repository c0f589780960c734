"""An algorithm is one module plus one registry line: the README's walkthrough module, registered in those
two places only, runs through the engine and gives FedPer's results; nothing outside fmlray/algorithms
tests an algorithm's name."""

import re
from pathlib import Path

import numpy as np
import pytest

import fmlray.algorithms
from fmlray import config
from test_baselines import whole_run  # the same small serial run

ROOT = Path(__file__).resolve().parents[2]


def walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Adding an algorithm"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run(name: str):
    return whole_run(f"algorithm.name={name}", "algorithm.fedper.head_layers=2")


def test_the_readmes_walkthrough_is_a_whole_algorithm_in_one_module_and_one_registry_line(tmp_path, monkeypatch):
    source = walkthrough()
    assert len(source.splitlines()) <= 30
    (tmp_path / "walkthrough.py").write_text(source)  # 1: its own module (in a folder of the package's path)
    monkeypatch.setattr(fmlray.algorithms, "__path__", [*fmlray.algorithms.__path__, str(tmp_path)])
    monkeypatch.setattr(config, "ALGORITHMS", (*config.ALGORITHMS, "walkthrough"))  # 2: the registry line
    mine, theirs = run("walkthrough"), run("fedper")
    assert mine.global_state.keys() == theirs.global_state.keys()
    assert "5.weight" not in mine.global_state and "3.weight" not in mine.global_state  # a head of two layers
    for k in mine.global_state:
        np.testing.assert_array_equal(mine.global_state[k], theirs.global_state[k], err_msg=k)
    figures = lambda r: [(x["round"], x["client"], x["model"], x["split"], x["accuracy"]) for x in r.rows]  # noqa: E731
    assert figures(mine) == figures(theirs)


def test_an_unregistered_module_is_not_an_algorithm():
    with pytest.raises(config.ConfigError, match="algorithm.name = 'walkthrough' is unknown"):
        config.load_config(None, ["algorithm.name=walkthrough"])


@pytest.mark.parametrize("path", ["fmlray/engine", "fmlray/simulation.py", "fmlray/metrics.py", "fmlray/checkpoint.py",
                                  "fmlray/aggregate.py", "fmlray/rundir.py"])
def test_no_engine_aggregator_metrics_or_checkpoint_module_names_an_algorithm(path):
    files = sorted((ROOT / path).glob("*.py")) if (ROOT / path).is_dir() else [ROOT / path]
    names = [n for n in config.ALGORITHMS if n != "local"]  # "local" is also the personalised model's name
    for f in files:
        text = f.read_text()
        for name in names:
            assert not re.search(rf"['\"]{name}['\"]", text), f"{f.name} names algorithm {name!r}"
        assert not re.search(r"algorithm\.name\s*[!=]=|algo\.name\s*[!=]=", text), f"{f.name} tests an algorithm's name"
        assert "algorithm.fml" not in text and "algorithm.fedprox" not in text, f"{f.name} reads an algorithm's keys"
