"""docs/make_results.py never empties a recorded section of RESULTS.md for want of its sweep's table."""

import shutil
import subprocess
import sys
from pathlib import Path

from fmlray.cli import main

REPO = Path(__file__).resolve().parents[2]


def regenerate(docs: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(docs / "make_results.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=docs.parent, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def sections(text: str) -> dict[str, str]:
    return {part.split("\n", 1)[0]: part for part in text.split("\n## ")[1:]}


def test_sections_without_a_table_keep_their_recorded_text_and_no_table_at_all_changes_nothing(tmp_path):
    # it rewrote every section without a table as "Not run yet" (and --only one as such), exit 0 (audit 23)
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs, ignore=shutil.ignore_patterns("results"))
    recorded = (docs / "RESULTS.md").read_text()
    done = regenerate(docs, "--runs", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and done.stderr.startswith("make_results.py: error: no sweep table under "), done.stderr
    done = regenerate(docs, "--only", "digits", "--runs", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "run `fmlray sweep experiments/digits.toml` first" in done.stderr, done.stderr
    assert (docs / "RESULTS.md").read_text() == recorded
    # one experiment's table (a tiny stand-in for the digits sweep): its section is new, the others as recorded
    spec = tmp_path / "digits.toml"
    spec.write_text(f'[sweep]\nname = "digits"\noutput_dir = "{tmp_path / "runs"}"\nseeds = [0]\n'
                    'set = ["engine.kind=serial", "run.rounds=1", "training.epochs=1", "clients.num_clients=4"]\n\n'
                    '[[axis]]\nname = "algorithm"\nvalues = ["algorithm.name=fedavg"]\n')
    assert main(["sweep", str(spec)]) == 0
    done = regenerate(docs, "--runs", str(tmp_path / "runs"))
    assert done.returncode == 0 and "kept as recorded, no table here: fmnist-heterogeneity" in done.stdout, done.stderr
    text = (docs / "RESULTS.md").read_text()
    assert text.split("\n## ")[0] == recorded.split("\n## ")[0]  # the header's hardware: the recorded sections'
    old, new = sections(recorded), sections(text)
    assert old.keys() == new.keys()
    changed = [title for title in old if old[title] != new[title]]
    assert len(changed) == 1 and changed[0].startswith("5. The heterogeneity grid on digits"), changed
    assert "4 clients" in new[changed[0]] and "20 clients" in old[changed[0]]
