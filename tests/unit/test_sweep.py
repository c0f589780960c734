"""Sweeps: the grid, one combined table, skipping finished runs, and sweep-file errors."""

import pyarrow.parquet as pq
import pytest

from fmlray.cli import main
from fmlray.errors import ConfigError
from fmlray.sweep import plan

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


@pytest.mark.parametrize("text, fragment", [
    ("[sweep]\nname='x'\nbogus=1\n", "unknown key(s) ['bogus']"),
    ("[sweep]\nseeds=[0]\n", "needs a name"),
    ("[sweep]\nname='x'\nseeds=[-1]\n", "sweep.seeds must be"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=[3]\n", "each value is"),
    ("[sweep]\nname='x'\n[[axis]]\nname='a'\nvalues=['training.lr=-5']\n", "run -5-s0: training.lr must be in"),
    ("[sweeps]\nname='x'\n", "a sweep file has a [sweep] table"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, text, fragment):
    spec = tmp_path / "s.toml"
    spec.write_text(text)
    with pytest.raises(ConfigError) as info:
        plan(spec)
    assert fragment in str(info.value) and "\n" not in str(info.value)
