"""A run's folder, `runs/<name>/`: made when the run starts, completed when it ends.

While the run goes on it holds config.toml, partition.csv and checkpoint.npz (so it can be
resumed); metrics, summaries and the plot arrive at the end. Each file is written under a
temporary name and renamed, so no file is ever half-written.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import tomli_w

from fmlray import metrics, plots
from fmlray.config import Config, to_dict
from fmlray.errors import FmlrayError

CONFIG, METRICS, SUMMARY, SUMMARY_JSON, PARTITION, PARTITION_FILE, PLOT = (
    "config.toml", "metrics.parquet", "summary.txt", "summary.json", "partition.csv", "partition.npz", "accuracy.png")


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


def finish(run_dir: Path, table: pa.Table, title: str) -> None:
    """Metrics, summaries and the plot of a finished run."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _atomic(run_dir / METRICS, buf.getvalue())
    summary = metrics.summaries(table)
    _atomic(run_dir / SUMMARY, (metrics.format_summary(summary[-1], title) + "\n").encode())
    _atomic(run_dir / SUMMARY_JSON, (json.dumps(summary, indent=1) + "\n").encode())
    tmp = run_dir / f".{PLOT}.tmp.png"
    plots.accuracy_plot(summary, title, tmp)
    os.replace(tmp, run_dir / PLOT)


def read_run(path: str | Path) -> tuple[pa.Table, str]:
    """A finished run's metrics table and the title line of its summary."""
    path = Path(path)
    if not (path / METRICS).is_file():
        raise FmlrayError(f"{path} is not a finished fmlray run (no {METRICS}); give a folder under runs/")
    try:
        table = pq.read_table(path / METRICS)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FmlrayError(f"{path / METRICS} cannot be read ({exc}); rerun the experiment") from None
    summary_file = path / SUMMARY
    title = summary_file.read_text().splitlines()[0] if summary_file.is_file() else path.name
    return table, title
