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

import contextlib
import errno
import fcntl
import io
import json
import os
import re
import shutil
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute
import pyarrow.csv
import pyarrow.parquet as pq
import tomli_w

from fmlray import metrics, signals
from fmlray.config import Config, ascii_digits, quoted, to_dict
from fmlray.errors import ConfigError, FmlrayError

# Written first into every folder fmlray makes: a folder without it is the user's, and never deleted.
MARKER = ".fmlray-run"
CONFIG, METRICS, SUMMARY, SUMMARY_JSON, PARTITION, PARTITION_FILE, PLOT, PARTS = (
    "config.toml", "metrics.parquet", "summary.txt", "summary.json", "partition.csv", "partition.npz", "accuracy.png",
    "metrics")
CHECKPOINT_MANIFEST = Path("checkpoint") / "manifest.json"  # fmlray.checkpoint's FOLDER / MANIFEST (it imports us)
# What marks the other folders fmlray writes (their modules import this one): a sweep's combined table and a
# search's record (fmlray.sweep, fmlray.search)
SWEEP_TABLE, SEARCH_RECORD = "results.parquet", Path(".tune/search.json")


Writer = Callable[[BinaryIO], object]


@contextlib.contextmanager
def _temporary(path: Path, write: Writer, durable: bool = False):
    """A temporary file beside `path`, filled by `write(file)`, of a fresh name and created exclusively (so never
    through a link someone left there, nor shared with another writer); `durable`: on disk before it is renamed.
    Deleted when the block ends, unless renamed away."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    f = open(tmp, "xb")  # only a name this call made is deleted below
    try:
        with f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _writer(data: bytes | Writer) -> Writer:
    return data if callable(data) else lambda f: f.write(data)


def write_atomic(path: Path, data: bytes | Writer, *, durable: bool = False) -> None:
    """Write `path` whole or not at all: a temporary file (`_temporary`) of `data`, or filled by `data(file)`,
    then renamed over `path`. Every file fmlray writes into a run, a sweep or a search folder goes this way."""
    with _temporary(path, _writer(data), durable) as tmp:
        os.replace(tmp, path)


def read_parquet(path: Path, **kwargs) -> pa.Table:
    """`path` read as the local file it names (pyarrow, given a string, would take `file:x` for a URI); as bytes,
    since pyarrow encodes a str as UTF-8, which a path's non-UTF-8 byte (os.fsdecode's escape) is not."""
    with pa.OSFile(os.fsencode(path)) as f:
        return pq.read_table(f, **kwargs)


def partition_files(dataset, partition) -> dict[str, bytes]:
    """A run's partition.csv (its client × class counts) and partition.npz (each client's row indices, with the
    dataset's fingerprint), as their bytes: written as a run starts, and put back by a resume that finds them gone."""
    from fmlray.data import partition_counts, save_partition

    counts, rows = io.BytesIO(), io.BytesIO()
    pa.csv.write_csv(partition_counts(dataset, partition), counts)
    save_partition(rows, partition, dataset.fingerprint())
    return {PARTITION: counts.getvalue(), PARTITION_FILE: rows.getvalue()}


def write_new(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all, and only where nothing is (FileExistsError otherwise: a user's file,
    a link, a device stay as they are): a temporary file (`_temporary`), then hard-linked to `path`, which,
    unlike a rename, never replaces. Where the file system has no hard links, `path` is created exclusively."""
    with _temporary(path, _writer(data)) as tmp:
        try:
            os.link(tmp, path)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):  # not "no hard links here" (FAT)
                raise
            _create(path, data)


def _create(path: Path, data: bytes) -> None:
    f = open(path, "xb")
    try:
        with f:
            f.write(data)
    except OSError:
        path.unlink(missing_ok=True)  # ours, half-written
        raise


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
        if resume and os.path.islink(self.final):  # the lock goes beside the folder itself, which a writer
            self.final = Path(os.path.realpath(self.final))  # through another path to it must find
            self.parent, name = self.final.parent, self.final.name
        self.temp, self.aside = self.parent / f".{name}.new", self.parent / f".{name}.old"
        self.lock_file = self.parent / f".{name}.lock"
        self.overwrite, self.resume = overwrite, resume
        self.path = self.final if resume else self.temp
        self.promoted, self._made, self._lock, self._made_dirs = resume, False, None, []

    @property
    def _or_rename(self) -> str:
        """The other way out of a name that is taken: none for a resumed run, which goes on in its folder."""
        return "" if self.resume else ", or choose another run.name"

    def __enter__(self) -> "RunFolder":
        check_length(self.temp, "run.output_dir and run.name")
        self._made_dirs = _missing(self.parent)  # removed again if the run leaves nothing in them
        elsewhere = ("make it writable, or copy the run's folder to a writable place and resume the copy"
                     if self.resume else "set run.output_dir to a writable folder")
        try:
            self._lock = _claim(self.lock_file, self.final, self._or_rename, elsewhere)
        except FmlrayError:
            self._remove_made_dirs()
            raise
        try:
            try:
                self._recover()
            except OSError as exc:
                raise FmlrayError(f"cannot tidy {exc.filename} left by an earlier run ({exc.strerror}); "
                                  "move it away yourself") from None
            if not self.resume:
                check_new(self.final, self.overwrite)
                self._check_leftovers()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if not self.promoted and self._made:  # nothing worth keeping yet; the old run is as it was
                try:
                    _delete_run(self.temp)  # its marker last: cut short, the next run of the name finishes it
                except OSError:
                    pass
        finally:
            self._release()

    def replacing(self) -> str | None:
        """What `--overwrite` will replace, said at the start: the earlier run and anything added to it since."""
        if self.resume or not _ours(self.final):
            return None
        from fmlray.checkpoint import OWN

        own = {MARKER, CONFIG, METRICS, SUMMARY, SUMMARY_JSON, PARTITION, PARTITION_FILE, PLOT, PARTS, "checkpoint"}
        added = sorted(p.name for p in self.final.iterdir() if p.name not in own)
        for sub, ours in (("checkpoint", OWN), (PARTS, re.compile(r"round-\d+\.parquet"))):  # a user's notes there too
            if (self.final / sub).is_dir() and not (self.final / sub).is_symlink():
                added += sorted(f"{sub}/{p.name}" for p in (self.final / sub).iterdir() if not ours.fullmatch(p.name))
        return (f"--overwrite: {self.final} (an earlier run) is replaced once this run has its first checkpoint"
                + (f", with {len(added)} entr{'y' if len(added) == 1 else 'ies'} added to it since: "
                   f"{', '.join(added[:3])}{', ...' if len(added) > 3 else ''}" if added else ""))

    def create(self, cfg: Config, dataset, partition) -> Path:
        """The new run's (still hidden) folder: the marker first, then the config and the partition."""
        try:
            self.temp.mkdir()
            self._made = True
            write_atomic(self.temp / MARKER, b"made by fmlray; fmlray deletes a run folder only when this file is in it\n")
            write_config(self.temp, cfg)
            for name, data in partition_files(dataset, partition).items():
                write_atomic(self.temp / name, data)
        except OSError as exc:
            raise FmlrayError(f"cannot write {exc.filename or self.temp} ({exc.strerror}); nothing of an earlier run "
                              "was changed; set run.output_dir to a writable folder") from None
        return self.temp

    def promote(self) -> Path:
        """Rename the new run into place; an old run there (allowed by `overwrite`) goes only now."""
        if self.promoted:
            return self.path
        replaced = False
        try:
            if os.path.lexists(self.final):
                check_new(self.final, self.overwrite)  # again: the folder may have changed since the start
                os.rename(self.final, self.aside)
                try:
                    os.rename(self.temp, self.final)
                except OSError:
                    os.rename(self.aside, self.final)
                    raise
                replaced = True
            else:
                os.rename(self.temp, self.final)
            fsync_dir(self.parent)
        except (OSError, FmlrayError) as exc:
            if not replaced:
                raise FmlrayError(f"cannot move the new run into {self.final} "
                                  f"({exc.strerror if isinstance(exc, OSError) else exc}); {self._keep()}") from None
        self.path, self.promoted = self.final, True
        if replaced:  # the new run is in place whatever follows: the old one's deletion cannot undo that
            try:
                _delete_run(self.aside)
            except OSError as exc:
                warnings.warn(f"--overwrite: the earlier run could not be deleted whole ({exc.strerror}: "
                              f"{exc.filename}); what is left of it is in {self.aside}, which the next run named "
                              f"{self.final.name!r} deletes once it can; the new run goes on in {self.final}")
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
        renames puts the old run back; a stale new run or a replaced old one is deleted (marked ones only, or
        ones left with nothing in them: see `_emptied`)."""
        if _ours(self.aside):
            if os.path.lexists(self.final):
                _delete_run(self.aside)
            else:
                os.rename(self.aside, self.final)
        elif _emptied(self.aside):
            _delete_run(self.aside)
        if _ours(self.temp) or _emptied(self.temp):
            _delete_run(self.temp)
        if _ours(self.final):
            _tidy_temporaries(self.final)

    def _check_leftovers(self) -> None:
        """Refuse, before any data is loaded, a hidden name the new run needs that something else holds.
        We hold the lock, which a run keeps from start to end, so no live run uses these names: what is
        left is a killed run's leftover that `_recover` could not prove fmlray's (no marker), kept in case
        it is someone's."""
        for path in (self.temp, *([self.aside] if os.path.lexists(self.final) else [])):
            if os.path.lexists(path):
                kind = "a symlink" if path.is_symlink() else "a folder without fmlray's marker" if path.is_dir() \
                    else "a file"
                raise FmlrayError(f"{path} ({kind}) is in the way of the new run's hidden folder; no fmlray run holds "
                                  f"{self.lock_file.name} now, so it is a leftover of an interrupted run (or not "
                                  "fmlray's at all): delete it or move it away, then run again")

    def _release(self) -> None:
        if self._lock is not None:
            self.lock_file.unlink(missing_ok=True)  # while still held: see _take_lock
            os.close(self._lock)
            self._lock = None
        self._remove_made_dirs()

    def _remove_made_dirs(self) -> None:
        """Bad input leaves no empty runs/ behind (another writer's lock file or run keeps it)."""
        _remove_empty(self._made_dirs)


def _missing(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, deepest first."""
    out = []
    while not os.path.lexists(folder) and folder != folder.parent:
        out.append(folder)
        folder = folder.parent
    return out


# fmlray's own names under a run folder (a checkpoint's scratch files, e.g. "checkpoint/.rows-r000001-....npy.tmp")
# take fewer bytes than this; a folder whose path leaves less below the system's limit fails mid-run
OWN_NAMES = 160


def check_length(folder: Path, keys: str) -> None:
    """Refuse, before anything is written, a folder whose path leaves fmlray too little room below PATH_MAX."""
    there = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), Path("."))
    try:
        limit = os.pathconf(there, "PC_PATH_MAX")
    except (OSError, ValueError):
        limit = 4096
    length = len(os.fsencode(os.path.abspath(folder)))
    if length + OWN_NAMES >= limit:
        raise ConfigError(f"{keys} make a path of {length} bytes ({str(folder)[:60]}...), and fmlray writes files up "
                          f"to {OWN_NAMES} bytes below it: past this system's limit of {limit} bytes; choose a "
                          "shorter one")


def check_writable(folder: Path, key: str) -> None:
    """Refuse, before anything starts, a folder that cannot be made or written in: one line naming `key`."""
    why = _not_a_folder(folder)
    there = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), None)
    if why is None and there is not None:
        if os.statvfs(there).f_flag & os.ST_RDONLY:
            why = os.strerror(errno.EROFS)
        elif not os.access(there, os.W_OK | os.X_OK):
            why = os.strerror(errno.EACCES)
    if why:
        raise FmlrayError(f"cannot write into {folder} ({why}); nothing was changed there; set {key} to a "
                          "writable folder")
    check_length(folder, key)


def _not_a_folder(path: Path) -> str | None:
    """Why `path` cannot be a folder to write in, when it or a folder above it is a symlink loop, a broken
    link or a file (None: something else, e.g. permissions)."""
    there = next((p for p in (path, *path.parents) if os.path.lexists(p)), None)
    if there is None or os.path.isdir(there):
        return None
    try:
        os.stat(there)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{there} is a symlink loop: following its links never ends"
        if exc.errno == errno.ENOENT and os.path.islink(there):
            return f"{there} is a symlink to {os.readlink(there)}, which does not exist"
        return None
    return f"{there} is a file, not a folder"


def check_new(folder: Path, overwrite: bool, hint: str = "") -> None:
    """Refuse, with one line, to start a new run into an existing `folder`, unless `overwrite` and
    fmlray made it; `hint` ends the refusal of an existing folder (what else the command offers)."""
    if not os.path.lexists(folder):
        return
    if not overwrite:
        raise FmlrayError(f"{folder} already exists; choose another run.name (--set run.name=NEW) "
                          f"or add --overwrite to replace it{hint}")
    if folder.is_symlink():  # _ours: deleting follows no link, so a link is never replaced
        raise FmlrayError(f"{folder} is a symlink (to {os.readlink(folder)}); fmlray never replaces a symlink, even "
                          "with --overwrite (it does not follow links when deleting, for safety); remove the link "
                          "yourself or choose another run.name")
    if not folder.is_dir():
        raise FmlrayError(f"{folder} is a file, not a run folder, so it is never deleted, even with --overwrite; "
                          "move it away yourself or choose another run.name")
    if not _ours(folder):
        grid = ("a search's folder (fmlray tune made it), not a run's" if (folder / SEARCH_RECORD).is_file() else
                "a sweep's folder (fmlray sweep made it), not a run's" if (folder / SWEEP_TABLE).is_file() else
                f"not a run fmlray made (it has no {MARKER} file)")
        raise FmlrayError(f"{folder} is {grid}, so it is never deleted, even with --overwrite; move it away "
                          "yourself or choose another run.name")


_TEMPORARY = re.compile(r"\..+\.(\d+)-[0-9a-f]{8}\.tmp")  # `_temporary`'s names


def _tidy_temporaries(folder: Path) -> None:
    """Delete what a killed writer left of `write_atomic` in `folder` (e.g. a run killed while it wrote its plot):
    fmlray's temporary names of processes that are gone."""
    for entry in os.scandir(folder):
        found = _TEMPORARY.fullmatch(entry.name)
        if found and entry.is_file(follow_symlinks=False) and not _running(int(found.group(1))):
            os.unlink(entry.path)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's: alive
        return True
    return True


def _delete_run(folder: Path) -> None:
    """Delete a run folder fmlray made, its marker last: a deletion cut short (a file that cannot go) leaves a
    folder fmlray still knows as its own, which the next writer of the name finishes deleting (`_recover`)."""
    failed = None
    for entry in folder.iterdir():
        if entry.name != MARKER:
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError as exc:  # the rest still goes
                failed = failed or exc
    if failed:
        raise failed
    shutil.rmtree(folder)


def _ours(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and (folder / MARKER).is_file()


_MARKER_BEING_WRITTEN = re.compile(re.escape(f".{MARKER}.") + r"\d+-[0-9a-f]{8}\.tmp")  # `_temporary`'s name for it


def _emptied(folder: Path) -> bool:
    """A hidden run folder holding nothing, or only its marker's temporary: a run killed before its marker was
    in (`RunFolder.create`), or after the marker of one being deleted went (`_delete_run`). Nothing to lose."""
    return (folder.is_dir() and not folder.is_symlink()
            and all(_MARKER_BEING_WRITTEN.fullmatch(p.name) and p.is_file() for p in folder.iterdir()))


def _take_lock(path: Path) -> int | None:
    """An exclusive flock on `path` (the kernel drops it when the process dies, so a crash leaves no
    stale lock), or None when another process holds it; its folder is made if missing. The file is
    unlinked before it is released; a taker that locked a file unlinked meanwhile tries again, so two
    never both hold the name. What is at `path` and is not a lock file of fmlray's (a link, a user's file)
    is refused, never followed, emptied or deleted (`_not_a_lock`)."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except FileNotFoundError:
            if os.path.isdir(path.parent):  # e.g. /proc: no new files there, however often it is asked
                raise
            continue  # a writer that failed removed the folder it had made: make it again
        except OSError as exc:
            if exc.errno == errno.ELOOP and os.path.islink(path):
                raise FmlrayError(_not_a_lock(path, f"a symlink (to {os.readlink(path)})")) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        info = os.fstat(fd)
        what = ("a special file" if not stat.S_ISREG(info.st_mode) else
                None if info.st_size <= 24 and re.fullmatch(rb"\d*\n?", os.pread(fd, 24, 0)) else "a file")
        if what is not None:  # someone else's: left whole, and the name refused
            os.close(fd)
            raise FmlrayError(_not_a_lock(path, what))
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd


def _claim(lock_file: Path, folder: Path, other_way: str, writable: str) -> int:
    """`_take_lock(lock_file)`, the lock of the name `folder` (a run's, a sweep's or a search's folder), or one
    line saying why not: another fmlray command (a run, a sweep or a search: the lock does not say which)
    holds it, or the lock cannot be made there (`writable`: what to do then); `other_way`, e.g. ", or choose
    another run.name", ends the messages that suggest waiting."""
    try:
        fd = _take_lock(lock_file)
    except OSError as exc:
        if os.path.isdir(lock_file):
            raise FmlrayError(f"{lock_file} is a folder, where fmlray keeps the lock file of {folder.name!r} (a "
                              f"plain file; fmlray never makes a folder there); move it away{other_way}") from None
        why = _not_a_folder(lock_file.parent)
        raise FmlrayError(f"cannot write into {lock_file.parent} ({why or exc.strerror}); nothing was changed "
                          f"there; {writable}") from None
    if fd is None:
        raise FmlrayError(f"{folder} is being written by another fmlray command{_holder(lock_file)}; wait for "
                          f"it to end{other_way}")
    return fd


@contextlib.contextmanager
def writing(folder: Path, key: str):
    """Hold the lock of `folder`, the one a run of that name would take (`RunFolder`), while a sweep or a search
    writes there: a second command on the folder refuses with one line. Without it, a `tune --resume` refused
    trial by trial beside a running one recorded a trial the first finished as failed, in the Tune state they
    share, and the next resume left that trial out of trials.parquet. `key`: the setting that moves the folder."""
    if os.path.islink(folder):  # beside the folder itself, as a resumed run's lock (`RunFolder`)
        folder = Path(os.path.realpath(folder))
    lock_file = folder.parent / f".{folder.name}.lock"
    made = _missing(folder.parent)
    try:
        fd = _claim(lock_file, folder, "", f"set {key} to a writable folder")
    except FmlrayError:
        _remove_empty(made)
        raise
    try:
        for own in (folder, (folder / SEARCH_RECORD).parent):  # a killed command's table, presets, plan record
            if own.is_dir() and not own.is_symlink():
                _tidy_temporaries(own)
        yield
    finally:
        lock_file.unlink(missing_ok=True)  # while still held: see _take_lock
        os.close(fd)
        _remove_empty(made)  # a command that wrote nothing leaves no empty output_dir


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) that are empty: what a refused command made and left nothing in."""
    for f in folders:
        try:
            f.rmdir()
        except OSError:
            break


def _not_a_lock(path: Path, what: str) -> str:
    return (f"{path} is {what}, not a lock file of fmlray's (an empty file or a process id), where fmlray locks "
            f"run.name {path.name[1:-len('.lock')]!r}; it was left as it is: move it away, or choose another run.name")


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if ascii_digits(pid) else ""


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_config(run_dir: Path, cfg: Config) -> None:
    write_atomic(run_dir / CONFIG, tomli_w.dumps(to_dict(cfg)).encode())


def _itself(run_dir: Path) -> Path:
    """The run folder by its own name and place: a path through a symlink (whose lock would be another
    one) or ending in "." or ".." is resolved; any other path stays as given."""
    real = Path(os.path.realpath(run_dir))
    if run_dir.name in ("", ".", "..") or Path(os.path.abspath(run_dir)) != real:
        return real
    return run_dir


ALWAYS_WRITTEN = ("run", "data", "clients", "model", "training", "algorithm", "engine")  # by every fmlray so far


def resumable_config(run_dir: str | Path, overrides: list[str]) -> Config:
    """The config a run in `run_dir` was started with, plus `overrides`, still writing to `run_dir`."""
    from fmlray.config import load_config, load_toml

    run_dir = _itself(Path(run_dir))
    if not (run_dir / CONFIG).is_file() or re.fullmatch(r"\.(.+)\.(new|old)", run_dir.name):
        raise FmlrayError(not_a_run(run_dir, resume=True) or f"{run_dir} is not an fmlray run folder (no {CONFIG}); "
                          "give a folder under runs/")
    lacking = [f"[{k}]" for k in ALWAYS_WRITTEN if k not in load_toml(run_dir / CONFIG)]
    if lacking:  # emptied or cut short: read as defaults it would pass for another config the checkpoint refuses
        raise FmlrayError(f"{run_dir / CONFIG} is damaged: it lacks {', '.join(lacking)}, which every run's config "
                          "holds; put the run's copy of it back, or start a new run")
    saved, asked = load_config(run_dir / CONFIG), load_config(run_dir / CONFIG, overrides)
    here = {"name": run_dir.name, "output_dir": str(run_dir.parent)}
    moved = [k for k, v in here.items() if getattr(asked.run, k) != getattr(saved.run, k)
             and Path(getattr(asked.run, k)) != Path(v)]
    if moved:  # the folder given is where the run goes on: another name or place would be silently dropped
        keys = " and ".join(f"run.{k}" for k in moved)
        raise ConfigError(f"--resume continues {run_dir} in place; drop --set {keys} "
                          "(on resume only run.rounds, run.eval_every, run.eval_clients, run.checkpoint_every, "
                          "engine.* and the groups' num_cpus / num_gpus may change; to go on elsewhere, copy the "
                          "folder and resume the copy)")
    place = [f"run.output_dir={quoted(str(run_dir.parent))}", f"run.name={quoted(run_dir.name)}"]
    cfg = load_config(run_dir / CONFIG, [*overrides, *place])
    owner = grid_of(run_dir)
    if owner:
        from fmlray.sweep import finished_otherwise
        changed = finished_otherwise(run_dir, cfg)
        if changed:  # extended in place, it was neither the grid's run nor a new one: the grid refused it for good
            raise ConfigError(f"{run_dir} is a run of {owner}; changed there ({', '.join(changed[:3])}), it would no "
                              "longer be that grid's run, and the grid would refuse it; copy the folder and resume "
                              f"the copy (cp -a {run_dir} DEST, then fmlray run --resume DEST ...)")
    return cfg


def grid_of(run_dir: Path) -> str | None:
    """The sweep or search `run_dir` is a run of ("the search in F" / "the sweep in F"), or None."""
    parent = run_dir.parent
    if (parent / SEARCH_RECORD).is_file():
        return f"the search in {parent}"
    try:  # a sweep's table names its runs (a user's results.parquet does not name this one)
        runs = read_parquet(parent / SWEEP_TABLE, columns=["run"]).column("run").to_pylist()
    except (pa.ArrowException, OSError, KeyError):
        return None
    return f"the sweep in {parent}" if run_dir.name in runs else None


class Records:
    """A run's metric rows, written round by round: each round's rows become one Parquet file under
    `metrics/` as the round ends (so a crash loses at most the round in flight and the driver never holds
    the whole run), merged into `metrics.parquet`, one row group per round, when the run ends or stops.
    `upto` (a resumed run's checkpoint round) keeps the rows of rounds up to it and drops the rest."""

    def __init__(self, run_dir: Path, upto: int = 0):
        self.run_dir, self.parts = Path(run_dir), Path(run_dir) / PARTS
        self.parts.mkdir(exist_ok=True)
        merged = self.run_dir / METRICS
        have = {_part_round(p) for p in self.parts.iterdir() if _readable_part(p)}
        if upto and merged.is_file() and not have >= set(range(1, upto + 1)):
            # a finished run extended (or a split cut short): its rounds go back into parts, one file per round
            for rnd, table in _rounds(merged):
                if rnd <= upto and rnd not in have:
                    self._write(rnd, table)  # over a damaged part too (check_history found the round here)
                    have.add(rnd)
        for part in _own_entries(self.parts):  # anything else there is the user's, and stays
            if not _part_round(part) or _part_round(part) > upto or _part_round(part) not in have:
                part.unlink()  # rounds after the checkpoint are run again; temporaries cut short

    def relocate(self, run_dir: Path) -> None:
        """The run folder was renamed (a new run moved into place)."""
        self.run_dir, self.parts = Path(run_dir), Path(run_dir) / PARTS

    def _write(self, rnd: int, table: pa.Table) -> None:
        write_atomic(self.parts / f"round-{rnd:06d}.parquet", lambda f: pq.write_table(table, f))

    def append(self, rnd: int, rows: list[dict]) -> None:
        self._write(rnd, metrics.to_table(rows))

    def merge(self) -> list[dict]:
        """Write metrics.parquet from the parts (streamed, a round at a time); return the round summaries.
        The parts stay until `finish` has written the rest: a run is finished only without them (`finished`)."""
        summary = []

        def write(f):
            with pq.ParquetWriter(f, metrics.SCHEMA) as writer:
                for part in sorted(p for p in _own_entries(self.parts) if _part_round(p)):
                    table = read_parquet(part, schema=metrics.SCHEMA)
                    writer.write_table(table)
                    summary.extend(metrics.summaries(table))
        write_atomic(self.run_dir / METRICS, write)
        return summary


def missing_rounds(run_dir: Path, upto: int) -> list[int]:
    """The rounds 1..`upto` whose metric rows are neither in metrics/ nor in metrics.parquet (every round
    has rows: at least its own summary row)."""
    parts, merged = Path(run_dir) / PARTS, Path(run_dir) / METRICS
    have = {_part_round(p) for p in _own_entries(parts) if _readable_part(p)}
    if not have >= set(range(1, upto + 1)) and merged.is_file():
        try:
            have |= set(read_parquet(merged, columns=["round"]).column("round").to_pylist())
        except (pa.ArrowException, OSError, KeyError):
            pass  # unreadable: its rounds are missing
    return sorted(set(range(1, upto + 1)) - have)


def check_entries(run_dir: Path) -> None:
    """Refuse, before a resumed run changes anything, one of the run's own names holding what fmlray would not
    write there (a folder where a file goes, a link: the stale-part clean-up of metrics/ would follow it), the
    rounds' parts in metrics/ included."""
    parts = Path(run_dir) / PARTS
    rounds = [(f"{PARTS}/{p.name}", False) for p in sorted(parts.iterdir()) if _part_round(p)] \
        if parts.is_dir() and not parts.is_symlink() else []  # a link there is refused as metrics/ itself
    for name, folder in ((CONFIG, False), (METRICS, False), (SUMMARY, False), (SUMMARY_JSON, False), (PLOT, False),
                         (PARTITION, False), (PARTITION_FILE, False), (PARTS, True), *rounds):
        path = Path(run_dir) / name
        odd = path.is_symlink() or path.is_dir() != folder or not (path.is_dir() or path.is_file())
        if os.path.lexists(path) and odd:
            kind = "a symlink" if path.is_symlink() else "a folder" if path.is_dir() else "a file" if path.is_file() \
                else "a special file"
            raise FmlrayError(f"{path} is {kind}, where the run keeps its {'folder' if folder else 'file'} {name}; "
                              "move it away (fmlray does not replace it), then resume again")


def check_history(run_dir: Path, upto: int) -> None:
    """Refuse to resume after round `upto` a run whose earlier metric rows are gone: the resumed run's
    metrics.parquet would silently lack them, and no checkpoint holds metrics to rebuild them from."""
    missing = missing_rounds(run_dir, upto)
    if missing:
        which = f"{missing[0]}-{missing[-1]}" if missing == list(range(missing[0], missing[-1] + 1)) and \
            len(missing) > 1 else ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise FmlrayError(f"{run_dir} lacks the metric rows of round(s) {which} ({METRICS} or {PARTS}/ was deleted "
                          f"or damaged), and its checkpoint holds no metrics to rebuild them from; a resumed run "
                          f"would silently lose them: put {METRICS} back, or start the run again under another "
                          "run.name")


def _readable_part(path: Path) -> bool:
    """A round's part file that can be read as a metrics table (its footer and schema); a damaged one (a copy
    cut short) counts as missing."""
    if not _part_round(path):
        return False
    try:
        return pq.read_schema(str(path)).names == metrics.SCHEMA.names
    except (pa.ArrowException, OSError):
        return False


# write_atomic's temporary of a round's part (see `_temporary`), left by a process killed while writing it
_PART_TEMPORARY = re.compile(r"\.round-\d+\.parquet\.\d+-[0-9a-f]{8}\.tmp")


def _own_entries(parts: Path) -> list[Path]:
    """What fmlray writes into metrics/: its rounds' parts and their temporaries, as plain files. A user's file
    or folder there is never read nor deleted (metrics/ itself goes at the run's end only once it is empty), nor
    what a link put in place of metrics/ points to."""
    if parts.is_symlink() or not parts.is_dir():
        return []
    return [p for p in parts.iterdir() if (_part_round(p) or _PART_TEMPORARY.fullmatch(p.name))
            and p.is_file() and not p.is_symlink()]


def has_parts(run_dir: Path) -> bool:
    """Whether `run_dir`'s metrics/ holds a round's rows not yet merged into metrics.parquet."""
    parts = Path(run_dir) / PARTS
    return any(_part_round(p) for p in _own_entries(parts))


def _part_round(path: Path) -> int:
    name = path.name
    if name.startswith("round-") and name.endswith(".parquet") and ascii_digits(name[6:-8]):
        return int(name[6:-8])
    return 0


def _rounds(path: Path):
    """(round, its rows) of a metrics file, a row group at a time."""
    with pa.OSFile(os.fsencode(path)) as source:
        f = pq.ParquetFile(source)
        for i in range(f.num_row_groups):
            table = f.read_row_group(i)
            for rnd in sorted(set(table.column("round").to_pylist())):
                yield rnd, table.filter(pa.compute.equal(table.column("round"), rnd))


def finish(run_dir: Path, records: "Records", title: str) -> list[dict]:
    """A run's outputs, its round summaries returned: metrics.parquet (`Records.merge`), the summaries and
    the plot, and only then its metrics/ parts go. A run stopped or killed before that has its checkpoint and
    its parts, so it is unfinished (`finished`), and `--resume` writes these again."""
    summary = records.merge()
    if summary:
        write_atomic(run_dir / SUMMARY, (metrics.format_summary(summary[-1], title) + "\n").encode())
        write_atomic(run_dir / SUMMARY_JSON, (json.dumps(summary, indent=1) + "\n").encode())
        with signals.held():  # a second Ctrl-C inside matplotlib's C extensions aborted Python
            from fmlray import plots  # matplotlib: 0.3 s of import, only when a run ends
        write_atomic(run_dir / PLOT, lambda f: plots.accuracy_plot(summary, title, f))
    for part in _own_entries(records.parts):
        part.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        records.parts.rmdir()  # a user's file put there stays, and so does the folder
    return summary


def finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds a finished run: its metrics.parquet, and no metrics/ parts left (see `finish`)."""
    return (Path(run_dir) / METRICS).is_file() and not has_parts(run_dir)


def resumable(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run that `--resume` continues: a checkpoint, and not `finished`."""
    return (Path(run_dir) / CHECKPOINT_MANIFEST).is_file() and not finished(run_dir)


def not_a_run(path: Path, resume: bool) -> str | None:
    """Why `path`, given to `report` (or `--resume`), is no run folder, where it is something else fmlray knows:
    missing, a file, a sweep's or a search's folder, a run without its config; None otherwise."""
    if not os.path.lexists(path):
        aside = path.parent / f".{path.name}.old"
        if _ours(aside):  # a kill between --overwrite's two renames: the next writer of the name puts it back
            return (f"{path} does not exist: an --overwrite that was cut short left the earlier run in {aside}; "
                    f"any fmlray run with run.name = {path.name!r} there puts it back first (or rename it yourself)")
        return f"{path} does not exist; give a run's folder (e.g. runs/digits-fml)"
    if path.is_symlink() and not path.exists():  # os.path.exists follows it: a link to nowhere, or a loop
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"{path} is a symlink that leads back to itself; give a run's folder"
        return f"{path} is a symlink to {os.readlink(path)}, which does not exist; give a run's folder"
    if not path.is_dir():
        inside = f", {path.parent}" if (path.parent / CONFIG).is_file() else " (e.g. runs/digits-fml)"
        return f"{path} is a file; give the run's folder{inside}"
    runs = sorted(p.name for p in path.iterdir() if (p / CONFIG).is_file())
    if (path / SEARCH_RECORD).is_file():
        how = "continue it with `fmlray tune FILE --resume`" if resume else \
            f"report one of its trials, e.g. {path / (runs[0] if runs else 'trial-00000')}"
        return f"{path} is a search's folder (fmlray tune), not a run's: {how}"
    if (path / SWEEP_TABLE).is_file():
        how = "run the same `fmlray sweep FILE` again to finish it" if resume else \
            f"report one of its runs{f', e.g. {path / runs[0]}' if runs else ''}; its combined table is {SWEEP_TABLE}"
        return f"{path} is a sweep's folder, not a run's: {how}"
    if runs and not (path / MARKER).exists():
        return f"{path} holds runs but is not one; give one of them, e.g. {path / runs[0]}"
    hidden = re.fullmatch(r"\.(.+)\.(new|old)", path.name)
    if hidden and (path / MARKER).is_file():  # a RunFolder's hidden sibling
        what, then = (("a new run cut short before its first checkpoint", "deletes it") if hidden[2] == "new" else
                      ("the run an --overwrite replaced", f"puts it back where {hidden[1]} is gone, or deletes it"))
        return (f"{path} is the hidden folder of {what}, not a run to {'resume' if resume else 'report'}; the next "
                f"fmlray run named {hidden[1]!r} there {then}")
    if (path / MARKER).is_file() and not (path / CONFIG).is_file():
        if os.path.lexists(path / CONFIG):
            return f"{path / CONFIG} is not a file; put the run's {CONFIG} back there (fmlray wrote it when the run began)"
        return f"{path} is an fmlray run whose {CONFIG} is missing; put it back (fmlray wrote it when the run began)"
    return None


def read_run(path: str | Path) -> tuple[pa.Table, str]:
    """A finished run's metrics table and the title line of its summary; a damaged one is a one-line error."""
    path = Path(path)
    if (path / CHECKPOINT_MANIFEST).is_file() and has_parts(path):  # a finished run has merged its parts
        what = f"and {METRICS} is not its last" if (path / METRICS).is_file() else f"but no {METRICS}"
        raise FmlrayError(f"{path} is an unfinished fmlray run (it has a checkpoint and metric rows in {PARTS}/, "
                          f"{what}): it is still running or was stopped; `fmlray run --resume {path}` continues a "
                          "stopped one, and report works once it ends")
    if not (path / METRICS).is_file():
        if (path / CHECKPOINT_MANIFEST).is_file():
            raise FmlrayError(f"{path} is an fmlray run whose metric rows are gone (no {METRICS} and no rounds in "
                              f"{PARTS}/); put {METRICS} back, or run the experiment again")
        raise FmlrayError(not_a_run(path, resume=False) or f"{path} is not a finished fmlray run (no {METRICS}); "
                          "give a folder under runs/")
    try:
        table = read_parquet(path / METRICS)
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
