"""A run's folder, `runs/<name>/`: claimed before the run starts, in place from its first checkpoint.

While the run goes on it holds config.toml, partition.csv, the latest checkpoint (checkpoint/, so it
can be resumed) and each finished round's metric rows (metrics/); metrics.parquet, the summaries and
the plot arrive at the end. Each file is written under a
temporary name and renamed, so no file is ever half-written.

A run folder is never overwritten or deleted implicitly (MLflow's and Hydra's run directories work the
same way): `RunFolder` locks the name, refuses an existing folder unless asked to replace it, never
deletes a folder without fmlray's marker, and builds a new run in a hidden sibling that is renamed into
place only once it holds a checkpoint, so a run that dies early leaves the old one as it was.
"""

from __future__ import annotations

import errno
import fcntl
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

from fmlray import metrics
from fmlray.config import Config, to_dict
from fmlray.errors import FmlrayError

# Written first into every folder fmlray makes: a folder without it is the user's, and never deleted.
MARKER = ".fmlray-run"
CONFIG, METRICS, SUMMARY, SUMMARY_JSON, PARTITION, PARTITION_FILE, PLOT, PARTS = (
    "config.toml", "metrics.parquet", "summary.txt", "summary.json", "partition.csv", "partition.npz", "accuracy.png",
    "metrics")


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all (a temporary name, then renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class RunFolder:
    """One writer's hold on `output_dir/<name>/`, as a context manager.

    Entering takes the name's lock (a second writer refuses with one line), tidies what a killed
    writer left (see `_recover`) and, for a new run, refuses a folder that exists unless `overwrite`
    (and, even then, one without fmlray's marker). A new run is written into `path`, a hidden
    sibling, until `promote()` renames it into place (replacing the old run only then); leaving
    without promoting deletes that sibling and touches nothing else. A resumed run (`resume`) writes
    into its folder directly, under the same lock.
    """

    def __init__(self, output_dir: str | Path, name: str, *, overwrite: bool = False, resume: bool = False):
        self.parent = Path(output_dir)
        self.final = self.parent / name
        self.temp, self.aside = self.parent / f".{name}.new", self.parent / f".{name}.old"
        self.lock_file = self.parent / f".{name}.lock"
        self.overwrite, self.resume = overwrite, resume
        self.path = self.final if resume else self.temp
        self.promoted, self._made, self._lock, self._made_dirs = resume, False, None, []

    def __enter__(self) -> "RunFolder":
        self._made_dirs = _missing(self.parent)  # removed again if the run leaves nothing in them
        try:
            self._lock = _take_lock(self.lock_file)
        except OSError as exc:
            self._remove_made_dirs()
            raise FmlrayError(f"cannot write into {self.parent} ({exc.strerror}); nothing was changed there; "
                              "set run.output_dir to a writable folder") from None
        if self._lock is None:
            self._remove_made_dirs()
            raise FmlrayError(f"{self.final} is being written by another fmlray run{_holder(self.lock_file)}; "
                              "wait for it to end, or choose another run.name") from None
        try:
            try:
                self._recover()
            except OSError as exc:
                raise FmlrayError(f"cannot tidy {exc.filename} left by an earlier run ({exc.strerror}); "
                                  "move it away yourself") from None
            if not self.resume:
                check_new(self.final, self.overwrite)
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if not self.promoted and self._made:
                shutil.rmtree(self.temp, ignore_errors=True)  # nothing worth keeping yet; the old run is as it was
        finally:
            self._release()

    def create(self, cfg: Config, partition_table: pa.Table, partition) -> Path:
        """The new run's (still hidden) folder: the marker first, then the config and the partition."""
        from fmlray.data import save_partition

        try:
            self.temp.mkdir()
            self._made = True
            write_atomic(self.temp / MARKER, b"made by fmlray; fmlray deletes a run folder only when this file is in it\n")
            write_config(self.temp, cfg)
            buf = io.BytesIO()
            pa.csv.write_csv(partition_table, buf)
            write_atomic(self.temp / PARTITION, buf.getvalue())
            tmp = self.temp / f".{PARTITION_FILE}.tmp.npz"
            save_partition(tmp, partition)
            os.replace(tmp, self.temp / PARTITION_FILE)
        except OSError as exc:
            raise FmlrayError(f"cannot write {exc.filename or self.temp} ({exc.strerror}); nothing of an earlier run "
                              "was changed; set run.output_dir to a writable folder") from None
        return self.temp

    def promote(self) -> Path:
        """Rename the new run into place; an old run there (allowed by `overwrite`) goes only now."""
        if self.promoted:
            return self.path
        try:
            if os.path.lexists(self.final):
                check_new(self.final, self.overwrite)  # again: the folder may have changed since the start
                os.rename(self.final, self.aside)
                try:
                    os.rename(self.temp, self.final)
                except OSError:
                    os.rename(self.aside, self.final)
                    raise
                shutil.rmtree(self.aside)
            else:
                os.rename(self.temp, self.final)
            fsync_dir(self.parent)
        except (OSError, FmlrayError) as exc:
            raise FmlrayError(f"cannot move the new run into {self.final} "
                              f"({exc.strerror if isinstance(exc, OSError) else exc}); {self._keep()}") from None
        self.path, self.promoted = self.final, True
        return self.final

    def _keep(self) -> str:
        """Where a new run that could not take its place is kept (it holds a checkpoint: never deleted)."""
        self._made = False
        kept = self.parent / f"{self.final.name}-unplaced-{os.getpid()}"
        try:
            os.rename(self.temp, kept)
        except OSError:
            kept = self.temp
        return f"the new run is kept in {kept}"

    def _recover(self) -> None:
        """Under the lock, finish what a writer killed mid-way left: a swap cut short between its two
        renames puts the old run back; a stale new run or a replaced old one is deleted (marked ones only)."""
        if _ours(self.aside):
            if os.path.lexists(self.final):
                shutil.rmtree(self.aside)
            else:
                os.rename(self.aside, self.final)
        if _ours(self.temp) or (self.temp.is_dir() and not any(self.temp.iterdir())):
            shutil.rmtree(self.temp)

    def _release(self) -> None:
        if self._lock is not None:
            self.lock_file.unlink(missing_ok=True)  # while still held: see _take_lock
            os.close(self._lock)
            self._lock = None
        self._remove_made_dirs()

    def _remove_made_dirs(self) -> None:
        """Bad input leaves no empty runs/ behind (another writer's lock file or run keeps it)."""
        for folder in self._made_dirs:
            try:
                folder.rmdir()
            except OSError:
                break


def _missing(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, deepest first."""
    out = []
    while not os.path.lexists(folder) and folder != folder.parent:
        out.append(folder)
        folder = folder.parent
    return out


def check_new(folder: Path, overwrite: bool) -> None:
    """Refuse, with one line, to start a new run into an existing `folder`, unless `overwrite` and
    fmlray made it."""
    if not os.path.lexists(folder):
        return
    if not overwrite:
        raise FmlrayError(f"{folder} already exists; choose another run.name (--set run.name=NEW) "
                          "or add --overwrite to replace it")
    if not _ours(folder):
        raise FmlrayError(f"{folder} was not made by fmlray (it has no {MARKER} file), so it is never deleted, "
                          "even with --overwrite; move it away yourself or choose another run.name")


def _ours(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and (folder / MARKER).is_file()


def _take_lock(path: Path) -> int | None:
    """An exclusive flock on `path` (the kernel drops it when the process dies, so a crash leaves no
    stale lock), or None when another process holds it; its folder is made if missing. The file is
    unlinked before it is released; a taker that locked a file unlinked meanwhile tries again, so two
    never both hold the name."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a writer that failed removed the folder it had made: make it again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_config(run_dir: Path, cfg: Config) -> None:
    write_atomic(run_dir / CONFIG, tomli_w.dumps(to_dict(cfg)).encode())


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

    def relocate(self, run_dir: Path) -> None:
        """The run folder was renamed (a new run moved into place)."""
        self.run_dir, self.parts = Path(run_dir), Path(run_dir) / PARTS

    def _write(self, rnd: int, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        write_atomic(self.parts / f"round-{rnd:06d}.parquet", buf.getvalue())

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
    write_atomic(run_dir / SUMMARY, (metrics.format_summary(summary[-1], title) + "\n").encode())
    write_atomic(run_dir / SUMMARY_JSON, (json.dumps(summary, indent=1) + "\n").encode())
    tmp = run_dir / f".{PLOT}.tmp.png"
    from fmlray import plots  # matplotlib: 0.3 s of import, only when a run ends
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
