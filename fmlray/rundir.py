"""A run's folder, `runs/<name>/`: made when the run starts, completed when it ends.

While the run goes on it holds config.toml, partition.csv, the latest checkpoint (checkpoint/, so it
can be resumed) and each finished round's metric rows (metrics/); metrics.parquet, the summaries and
the plot arrive at the end. Each file is written under a
temporary name and renamed, so no file is ever half-written.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute
import pyarrow.csv
import pyarrow.parquet as pq
import tomli_w

from fmlray import metrics, plots
from fmlray.config import Config, to_dict
from fmlray.errors import FmlrayError

CONFIG, METRICS, SUMMARY, SUMMARY_JSON, PARTITION, PARTITION_FILE, PLOT, PARTS = (
    "config.toml", "metrics.parquet", "summary.txt", "summary.json", "partition.csv", "partition.npz", "accuracy.png",
    "metrics")


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def create(cfg: Config, partition_table: pa.Table, partition) -> Path:
    """A fresh runs/<name>/ (an older run of that name is replaced) with the config and partition."""
    from fmlray.data import save_partition

    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    try:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
    except OSError as exc:
        raise FmlrayError(f"cannot create {run_dir}: {exc.strerror}; set run.output_dir to a writable folder") from None
    write_config(run_dir, cfg)
    buf = io.BytesIO()
    pa.csv.write_csv(partition_table, buf)
    _atomic(run_dir / PARTITION, buf.getvalue())
    tmp = run_dir / f".{PARTITION_FILE}.tmp.npz"
    save_partition(tmp, partition)
    os.replace(tmp, run_dir / PARTITION_FILE)
    return run_dir


def write_config(run_dir: Path, cfg: Config) -> None:
    _atomic(run_dir / CONFIG, tomli_w.dumps(to_dict(cfg)).encode())


def resumable_config(run_dir: str | Path, overrides: list[str]) -> Config:
    """The config a run in `run_dir` was started with, plus `overrides`, still writing to `run_dir`."""
    from fmlray.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise FmlrayError(f"{run_dir} is not an fmlray run folder (no {CONFIG}); give a folder under runs/")
    place = [f"run.output_dir={str(run_dir.parent)!r}", f"run.name={run_dir.name!r}"]
    return load_config(run_dir / CONFIG, [*overrides, *place])


class Records:
    """A run's metric rows, written round by round: each round's rows become one Parquet file under
    `metrics/` as the round ends (so a crash loses at most the round in flight and the driver never holds
    the whole run), merged into `metrics.parquet`, one row group per round, when the run ends or stops.
    `upto` (a resumed run's checkpoint round) keeps the rows of rounds up to it and drops the rest."""

    def __init__(self, run_dir: Path, upto: int = 0):
        self.run_dir, self.parts = Path(run_dir), Path(run_dir) / PARTS
        self.parts.mkdir(exist_ok=True)
        merged = self.run_dir / METRICS
        if upto and merged.is_file() and not any(self.parts.iterdir()):
            # a finished (or stopped) run extended: its rounds go back into parts, one file per round
            for rnd, table in _rounds(merged):
                if rnd <= upto:
                    self._write(rnd, table)
        for part in self.parts.iterdir():
            if not _part_round(part) or _part_round(part) > upto:
                part.unlink()  # rounds after the checkpoint are run again; temporaries cut short

    def _write(self, rnd: int, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        _atomic(self.parts / f"round-{rnd:06d}.parquet", buf.getvalue())

    def append(self, rnd: int, rows: list[dict]) -> None:
        self._write(rnd, metrics.to_table(rows))

    def merge(self, final: bool = False) -> list[dict]:
        """Write metrics.parquet from the parts (streamed, a round at a time); return the round summaries.
        `final`: the run is complete, its parts go (an extension splits metrics.parquet again)."""
        tmp = self.run_dir / f".{METRICS}.tmp"
        summary = []
        with pq.ParquetWriter(tmp, metrics.SCHEMA) as writer:
            for part in sorted(self.parts.iterdir()):
                table = pq.read_table(part, schema=metrics.SCHEMA)
                writer.write_table(table)
                s = metrics.summaries(table)
                summary += s
        os.replace(tmp, self.run_dir / METRICS)
        if final:
            shutil.rmtree(self.parts, ignore_errors=True)
        return summary


def _part_round(path: Path) -> int:
    name = path.name
    if name.startswith("round-") and name.endswith(".parquet") and name[6:-8].isdigit():
        return int(name[6:-8])
    return 0


def _rounds(path: Path):
    """(round, its rows) of a metrics file, a row group at a time."""
    f = pq.ParquetFile(path)
    for i in range(f.num_row_groups):
        table = f.read_row_group(i)
        for rnd in sorted(set(table.column("round").to_pylist())):
            yield rnd, table.filter(pa.compute.equal(table.column("round"), rnd))


def finish(run_dir: Path, summary: list[dict], title: str) -> None:
    """Summaries and the plot of a finished run (its metrics.parquet is written by `Records.merge`)."""
    if not summary:
        return
    _atomic(run_dir / SUMMARY, (metrics.format_summary(summary[-1], title) + "\n").encode())
    _atomic(run_dir / SUMMARY_JSON, (json.dumps(summary, indent=1) + "\n").encode())
    tmp = run_dir / f".{PLOT}.tmp.png"
    plots.accuracy_plot(summary, title, tmp)
    os.replace(tmp, run_dir / PLOT)


def read_run(path: str | Path) -> tuple[pa.Table, str]:
    """A finished run's metrics table and the title line of its summary; a damaged one is a one-line error."""
    path = Path(path)
    if not (path / METRICS).is_file():
        raise FmlrayError(f"{path} is not a finished fmlray run (no {METRICS}); give a folder under runs/")
    try:
        table = pq.read_table(path / METRICS)
    except (pa.ArrowException, OSError) as exc:
        raise FmlrayError(f"{path / METRICS} cannot be read ({str(exc).splitlines()[0]}); rerun the experiment") from None
    have = dict(zip(table.column_names, table.schema.types))
    wrong = [f.name for f in metrics.SCHEMA if have.get(f.name) != f.type]
    if wrong:
        raise FmlrayError(f"{path / METRICS} is not an fmlray metrics table (columns {wrong} are missing or "
                          "of another type; the schema is in the README); rerun the experiment")
    if any(table[c].null_count for c in ("round", "model", "split")) or \
            not {"test", "global_test"} & set(table["split"].unique().to_pylist()):
        raise FmlrayError(f"{path / METRICS} holds no complete evaluated round; rerun the experiment")
    summary_file = path / SUMMARY
    if not summary_file.is_file():
        return table, path.name
    try:
        lines = summary_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    if len(lines) < 2 or not lines[0].strip() or not lines[0].isprintable() or not lines[1].startswith("accuracy (round"):
        raise FmlrayError(f"{summary_file} is not an fmlray summary (empty, binary or another format); "
                          "delete it to report under the folder's name, or rerun the experiment")
    return table, lines[0]
