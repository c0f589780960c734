"""A run's folder, `runs/<name>/`, written whole or not at all.

Everything goes to a hidden sibling folder first and is renamed into place at the end, so a
failed or interrupted run leaves nothing half-written behind.
"""

from __future__ import annotations

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

CONFIG, METRICS, SUMMARY, SUMMARY_JSON, PARTITION, PLOT = (
    "config.toml", "metrics.parquet", "summary.txt", "summary.json", "partition.csv", "accuracy.png")


def write_run(cfg: Config, table: pa.Table, partition_table: pa.Table, title: str) -> Path:
    """Write config, metrics, summary, partition and plot; return the final folder."""
    out = Path(cfg.run.output_dir)
    final = out / cfg.run.name
    tmp = out / f".{cfg.run.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir(parents=True, exist_ok=False)
    except OSError as exc:
        raise FmlrayError(f"cannot create {tmp}: {exc.strerror}; set run.output_dir to a writable folder") from None
    try:
        (tmp / CONFIG).write_bytes(tomli_w.dumps(to_dict(cfg)).encode())
        pq.write_table(table, tmp / METRICS)
        pa.csv.write_csv(partition_table, tmp / PARTITION)
        summary = metrics.summaries(table)
        (tmp / SUMMARY).write_text(metrics.format_summary(summary[-1], title) + "\n")
        (tmp / SUMMARY_JSON).write_text(json.dumps(summary, indent=1) + "\n")
        plots.accuracy_plot(summary, title, tmp / PLOT)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` by `tmp`; an older run of the same name is removed only once the new one is in."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


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
