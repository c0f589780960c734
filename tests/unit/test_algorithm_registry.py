"""An algorithm is one module plus one registry line: the README's walkthrough module, registered in those
two places only, runs through the engine and gives FedPer's results; nothing outside fmlray/algorithms
tests an algorithm's name."""

import re
import sys
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


def registered(tmp_path, monkeypatch, name: str, source: str | None) -> None:
    """`source` saved as algorithm module `name` (None: no module) and `name` added to the registry."""
    if source is not None:
        (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.delitem(sys.modules, f"fmlray.algorithms.{name}", raising=False)  # another test's module of that name
    monkeypatch.setattr(fmlray.algorithms, "__path__", [*fmlray.algorithms.__path__, str(tmp_path)])
    monkeypatch.setattr(config, "ALGORITHMS", (*config.ALGORITHMS, name))


# A new algorithm's likely slips, each the walkthrough with one edit: a traceback mid-round before (or, for an
# extra key, a loss term that sequential training added and batched training dropped; for a typo in a Model's
# init, the other value, silently)
SLIPS = [
    ('return {"local": cross_entropy(logits["local"], y)}', 'return {"loc": cross_entropy(logits["local"], y)}',
     "algorithm 'slip': its loss(logits, y, rnd) must return a dict with one loss per model it trains, keyed "
     "['local']; it returned ['loc']"),
    ('return {"local": cross_entropy(logits["local"], y)}',
     'return {"local": cross_entropy(logits["local"], y), "meme": cross_entropy(logits["local"], y)}',
     "keyed ['local']; it returned ['local', 'meme']"),
    ('cross_entropy(logits["local"], y)', 'cross_entropy(logits["local"], y).expand(4)',  # not reduced
     "its loss(logits, y, rnd) gives 'local' a tensor of shape (4,); each loss must be a scalar float tensor"),
    ('cross_entropy(logits["local"], y)', 'cross_entropy(logits["local"], y).item()',
     "gives 'local' a float; each loss must be a scalar float tensor (reduce the batch, e.g. with a mean, and "
     "keep it a tensor: no .item())"),
    ('cross_entropy(logits["local"], y)', 'cross_entropy(logits["meme"], y)',
     "its loss(logits, y, rnd) failed on a probe batch of 4 of the run's rows (KeyError: 'meme')"),
    ('init="global")', 'init="Global")', "Model('local'): init = 'Global' is not one of 'seed', 'global'"),
    ('Model("local", arch="global"', 'Model("local", arch="globl"',
     "Model('local'): arch = 'globl' is not one of 'client', 'global'"),
    ('evaluates=("local",)', 'evaluates=("locl",)', "slip: names ['locl'] are not among its models ['local']"),
]


@pytest.mark.parametrize("old, new, message", SLIPS, ids=[s[1][:40] for s in SLIPS])
def test_a_new_algorithms_slip_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, old, new, message):
    from fmlray.cli import main
    source = walkthrough().replace('name="fedper"', 'name="slip"')
    assert source.count(old) == 1
    registered(tmp_path, monkeypatch, "slip", source.replace(old, new))
    out = tmp_path / "runs"
    assert main(["run", "--set", "algorithm.name=slip", "--set", "engine.kind=serial", "--set", f"run.output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fmlray: error: {message}" or (err.startswith("fmlray: error: ") and message in err), err
    assert "\n" not in err and not out.exists()


# What the probe must not refuse (audit 51: a probe of random 3-class leaf logits refused each, which trained
# before it): an in-place op on the logits, a loss tied to the dataset's classes, a forward hook's extra output,
# a loss with no gradient in round 1 (a warm-up)
FINE = [
    ('return {"local": cross_entropy(logits["local"], y)}',
     'z = logits["local"]\n    z = z.sub_(z.max(1, keepdim=True).values.detach())\n'
     '    return {"local": cross_entropy(z, y)}'),
    ('return {"local": cross_entropy(logits["local"], y)}',
     'import torch\n    w = torch.linspace(0.5, 1.5, 10)\n'
     '    return {"local": torch.nn.functional.cross_entropy(logits["local"], y, weight=w)}'),
    ('return {"local": cross_entropy(logits["local"], y)}',
     'return {"local": cross_entropy(logits["local"], y) * (0.0 if rnd == 1 else 1.0) + 0.0 * logits["local"].sum()}'),
]


@pytest.mark.parametrize("old, new", FINE, ids=["in-place", "class-weights", "zero-in-round-1"])
def test_what_a_loss_may_do_the_probe_lets_through(tmp_path, monkeypatch, capsys, old, new):
    from fmlray.cli import main
    source = walkthrough().replace('name="fedper"', 'name="fine"')
    assert source.count(old) == 1
    registered(tmp_path, monkeypatch, "fine", source.replace(old, new))
    assert main(["run", "--set", "algorithm.name=fine", "--set", "engine.kind=serial", "--set", "run.rounds=2",
                 "--set", "training.epochs=1", "--set", "clients.num_clients=4",
                 "--set", f"run.output_dir={tmp_path / 'runs'}"]) == 0, capsys.readouterr().err


def test_a_forward_hooks_extra_output_reaches_the_probed_loss(tmp_path, monkeypatch, capsys):
    from fmlray.cli import main
    source = walkthrough().replace('name="fedper"', 'name="fwd"')
    source = source.replace('return {"local": cross_entropy(logits["local"], y)}',
                            'return {"local": cross_entropy(logits["local"], y) + 0.0 * logits["norm"].mean()}')
    source = source.replace('evaluates=("local",), server=server)',
                            'evaluates=("local",), server=server, forward=forward)')
    source += ('\n\ndef forward(models, scalars, x, names):\n    z = models["local"](x)\n'
               '    return {"local": z, "norm": z.norm(dim=1)}\n')
    registered(tmp_path, monkeypatch, "fwd", source)
    assert main(["run", "--set", "algorithm.name=fwd", "--set", "engine.kind=serial", "--set", "run.rounds=1",
                 "--set", "training.epochs=1", "--set", "clients.num_clients=4",
                 "--set", f"run.output_dir={tmp_path / 'runs'}"]) == 0, capsys.readouterr().err


def test_a_registered_name_without_its_module_is_one_line(tmp_path, monkeypatch, capsys):
    from fmlray.cli import main
    registered(tmp_path, monkeypatch, "nosuch", None)
    assert main(["run", "--set", "algorithm.name=nosuch", "--set", f"run.output_dir={tmp_path / 'runs'}"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fmlray: error: algorithm.name = 'nosuch' is in fmlray.config.ALGORITHMS but has no module "
        "fmlray/algorithms/nosuch.py; add the module (README: Adding an algorithm)")
    assert not (tmp_path / "runs").exists()


def test_a_new_algorithm_keeps_the_length_of_an_fml_schedule_set_for_it(tmp_path, monkeypatch):
    # a copy of fml.py reads algorithm.fml's schedule: its run was extended on resume, bending the schedule
    registered(tmp_path, monkeypatch, "myfml", (ROOT / "fmlray/algorithms/fml.py").read_text())
    cfg = config.load_config(None, ["algorithm.name=myfml", "algorithm.fml.alpha_end=0.1"])
    assert cfg.algorithm.schedule_keys() == ["algorithm.fml.alpha_end"]
    cfg = config.load_config(None, ["algorithm.name=fedavg", "algorithm.fml.alpha_end=0.1"])
    assert cfg.algorithm.schedule_keys() == []  # a built-in that never reads it


def test_the_algorithms_said_to_ignore_algorithm_fml_never_read_it():
    assert set(config.IGNORE_FML) < set(config.ALGORITHMS)
    for name in config.IGNORE_FML:
        assert not re.search(r"\.fml\b", (ROOT / f"fmlray/algorithms/{name}.py").read_text()), name
