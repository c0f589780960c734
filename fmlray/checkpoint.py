"""Checkpoints written where the state lives: a folder of row files and one manifest, numpy and JSON only.

`runs/<name>/checkpoint/` holds, per checkpoint, one `.npy` of rows per host and architecture with
the private state of the clients that trained since the previous checkpoint (written by the host
that holds them: an actor, on its node), the global model as `global-r<round>.npz` (written by the
driver), and `manifest.json`, written last and atomically by the driver. The manifest lists every
row file still needed, with each row's client and checksum, so a client's latest row is found
without reading the others, and the global model's checksum. A checkpoint is the manifest: files it
does not name (a checkpoint cut short, superseded rows) are deleted after it is written, and are
never read.

There is no RNG state to save: every draw derives from (seed, round, client), so the round number is
the RNG state. The metric rows are not here either: they stream to `metrics/` round by round.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmlray.aggregate import State
from fmlray.config import Config, to_dict
from fmlray.engine.state import MANIFEST, RowRef, cannot_write, latest_rows
from fmlray.errors import DAMAGED_NPZ, FmlrayError, ResourceError
from fmlray.rundir import fsync_dir, write_atomic

FOLDER = "checkpoint"
# The names fmlray writes into a checkpoint folder (and their temporaries, and the engines' write probes):
# only these are deleted once superseded; anything else there (a user's copy of a checkpoint) stays.
OWN = re.compile(r"\.?(global-r\d+\.npz|rows-r\d+-[^/]+?\.npy|manifest\.json)(\.[\w-]*\.?tmp)?|\.probe-\d+")
# 3: the global model's checksum ("global_crc32") and the partition's fingerprint; 2 (read still) had neither
VERSION, READS = 4, (2, 3, 4)
# The row files a manifest may name (anything else, e.g. "../partition.npz", makes it a damaged checkpoint; its
# global model is the round's, `global_name`)
ROWS_NAME = re.compile(r"rows-r\d+-[^/]+?\.npy")
# Keys that may differ between a checkpoint and the config that resumes it: how long and how often,
# where and on what it runs. Anything else would make the resumed run a different experiment.
MAY_CHANGE = {"run": ("rounds", "eval_every", "eval_clients", "checkpoint_every", "output_dir", "name"),
              "engine": ("kind", "num_actors", "address", "state_store", "state_dir")}


def fixed_config(cfg: Config) -> dict:
    """The part of a config a checkpoint belongs to. run.rounds stays in it where a hyper-parameter follows a
    schedule over the rounds (`AlgorithmConfig.schedule_keys`): a longer run would have trained its earlier
    rounds, and would train the rest, at other values."""
    d = to_dict(cfg)
    for section, keys in MAY_CHANGE.items():
        for k in keys:
            if (section, k) != ("run", "rounds") or not cfg.algorithm.schedule_keys():
                d[section].pop(k, None)
        for g in d["clients"]["groups"]:  # resources per actor may change too (e.g. onto GPUs)
            g.pop("num_cpus", None)
            g.pop("num_gpus", None)
    return d


def _with_defaults(saved, defaults):
    """A checkpoint's config with the keys it lacks taken from `defaults`: a checkpoint of an older fmlray
    predates the keys added since (e.g. algorithm.server_lr), and ran as their defaults do."""
    if isinstance(saved, dict) and isinstance(defaults, dict):
        return {**defaults, **{k: _with_defaults(v, defaults.get(k)) for k, v in saved.items()}}
    return saved


def differences(a, b, prefix="") -> list[str]:
    """The dotted keys in which two config trees differ (also the sweep's check of its finished runs)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{prefix}{i}.")]
    return [] if a == b else [prefix.rstrip(".")]


@dataclass(frozen=True)
class Resume:
    round: int
    global_state: State | None
    shards: list[dict]  # the manifest's row files
    folder: Path
    placement: dict | None = None  # where the engine had each client (see Engine.placement)
    data: str | None = None  # the dataset's fingerprint (Dataset.fingerprint); absent in older checkpoints
    partition: str | None = None  # the partition's (`partition_fingerprint`); absent before VERSION 3

    def refs(self) -> dict[int, RowRef]:
        return latest_rows(self.shards)


class Writer:
    """Writes a run's checkpoints: hosts write their rows, then the driver the global model and the
    manifest. Called as `writer(rnd, engine, global_state)`; returns what it wrote."""

    def __init__(self, run_dir: Path, cfg: Config, resume: Resume | None = None, data: Callable[[], str] | None = None,
                 partition: Callable[[], str] | None = None):
        self.folder = Path(run_dir) / FOLDER
        self.config = fixed_config(cfg)
        # the dataset's and the partition's fingerprints, recorded with every checkpoint (computed at the first:
        # not in start-up)
        self.data, self._fingerprint = (resume.data if resume else None), data
        self.partition, self._partition = (resume.partition if resume else None), partition
        self.shards: list[dict] = list(resume.shards) if resume else []
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ResourceError(f"cannot create {self.folder} ({exc.strerror}); set run.output_dir to a writable "
                                "folder") from None

    def relocate(self, run_dir: Path) -> None:
        """The run folder was renamed (a new run moved into place): write the next checkpoints there."""
        self.folder = Path(run_dir) / FOLDER

    def __call__(self, rnd: int, engine, global_state: State | None) -> dict:
        started = time.perf_counter()
        new = engine.checkpoint(rnd, self.folder)
        shards = _live([*self.shards, *new])
        glob = global_name(rnd)
        try:
            checksum = None
            if global_state is not None:  # its bytes, checksummed as written (a file put in its place is refused)
                buf = io.BytesIO()
                np.savez(buf, **global_state)
                checksum = zlib.crc32(buf.getbuffer()) & 0xFFFFFFFF
                write_atomic(self.folder / glob, buf.getbuffer(), durable=True)
            if self.data is None and self._fingerprint is not None:
                self.data = self._fingerprint()
            if self.partition is None and self._partition is not None:
                self.partition = self._partition()
            manifest = {"version": VERSION, "round": rnd, "global": glob if global_state is not None else None,
                        "global_crc32": checksum, "config": self.config, "shards": shards,
                        "placement": engine.placement(), "data": self.data, "partition": self.partition}
            manifest["manifest_crc32"] = manifest_checksum(manifest)
            write_atomic(self.folder / MANIFEST, json.dumps(manifest).encode(), durable=True)
            fsync_dir(self.folder)
        except OSError as exc:
            raise ResourceError(cannot_write(f"the checkpoint in {self.folder}", self.folder, exc)) from None
        self.shards = shards
        keep = {MANIFEST, glob, *(s["file"] for s in shards)}
        for p in self.folder.iterdir():  # fmlray's files no manifest names any more: superseded or cut short
            if p.name not in keep and OWN.fullmatch(p.name) and not p.is_dir():
                p.unlink(missing_ok=True)
        written = sum(len(s["cids"]) * s["row_bytes"] for s in new)
        return {"seconds": time.perf_counter() - started, "bytes": written,
                "disk": sum((self.folder / f).stat().st_size for f in keep if (self.folder / f).exists())}


def _live(shards: list[dict]) -> list[dict]:
    """The row files that still hold some client's latest row, oldest first."""
    latest = latest_rows(shards)
    return [s for s in shards if any(latest[int(c)].file == s["file"] for c in s["cids"])]


def manifest_checksum(manifest: dict) -> int:
    """A CRC-32 of a manifest's content but this checksum itself (VERSION 4 on): a manifest edited since it was
    written (a client's id moved to another row, which each row's own checksum still matches) is refused."""
    rest = {k: v for k, v in manifest.items() if k != "manifest_crc32"}
    return zlib.crc32(json.dumps(rest, sort_keys=True).encode()) & 0xFFFFFFFF


def global_name(rnd: int) -> str:
    """The file of round `rnd`'s global model in a checkpoint folder."""
    return f"global-r{rnd:06d}.npz"


def exists(run_dir: Path) -> bool:
    return (Path(run_dir) / FOLDER / MANIFEST).is_file()


def partition_fingerprint(partition) -> str:
    """A CRC-32 of each client's train and test row indices, in order: what a checkpoint records of the partition
    it was trained on (as `Dataset.fingerprint` of the data), so a resume can check the config's against it."""
    crc = 0
    for rows in (*partition.train, *partition.test):
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        crc = zlib.crc32(len(rows).to_bytes(8, "little"), crc)
        crc = zlib.crc32(rows.view(np.uint8), crc)
    return f"{crc:08x}-{len(partition.train)}"


def _unreadable(path: Path, exc: OSError) -> FmlrayError:
    """A checkpoint file that exists but cannot be read: said as such (it need not be damaged)."""
    fix = "make it readable" if exc.errno in (errno.EACCES, errno.EPERM) else "check it"
    return FmlrayError(f"cannot read {path} ({exc.strerror or exc}); the checkpoint was left as it is: {fix}, then "
                       "resume again")


def load(run_dir: Path, cfg: Config | None = None) -> Resume:
    """The last complete checkpoint of `run_dir`, checked against `cfg`; any damage or mismatch is a
    one-line FmlrayError, never an unpickled object. (A run folder's metric rows are `rundir.check_history`'s:
    a checkpoint is also written by callers of `simulate` that keep no metrics, e.g. benchmarks.)"""
    folder = Path(run_dir) / FOLDER
    path = folder / MANIFEST
    try:
        os.stat(path)
    except PermissionError as exc:  # checkpoint/ cannot be searched: the manifest may well be there
        raise _unreadable(folder, exc) from None
    except OSError:
        pass
    if not path.is_file():
        old = " (it was written by an older fmlray, whose checkpoints cannot be resumed)" \
            if (Path(run_dir) / "checkpoint.npz").is_file() else ""
        if not old and cfg is not None and cfg.run.checkpoint_every == 0:
            old = " (it ran with run.checkpoint_every = 0, which keeps none)"
        raise FmlrayError(f"{run_dir} has no complete checkpoint{old}: it is not a resumable fmlray run")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from None
    manifest = None
    try:
        manifest = json.loads(text)
        rnd, shards, glob_name = manifest["round"], manifest["shards"], manifest["global"]
        ok = (manifest.get("version") in READS and isinstance(rnd, int) and rnd >= 1 and isinstance(shards, list)
              and all(isinstance(s, dict) and isinstance(s.get("file"), str) and ROWS_NAME.fullmatch(s["file"])
                      and len(s["cids"]) == len(s["crc32"]) and all(isinstance(c, int) for c in s["cids"])
                      and isinstance(s["layout"], str) and isinstance(s["row_bytes"], int) for s in shards)
              and (glob_name is None or glob_name == global_name(rnd))
              # from VERSION 3 on, the global model's file has a checksum, as each row has
              and (manifest["version"] < 3 or glob_name is None or isinstance(manifest.get("global_crc32"), int))
              and isinstance(manifest.get("partition"), (str, type(None))))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        ok = False
    if not ok:
        newer = isinstance(manifest, dict) and type(manifest.get("version")) is int and manifest["version"] > VERSION
        if newer:  # a good run of a later fmlray: "start again" would throw it away
            raise FmlrayError(f"{path} is a checkpoint of a newer fmlray (VERSION {manifest['version']}; this one reads "
                              f"{READS[0]} to {READS[-1]}); resume it with that fmlray, or upgrade this one")
        raise FmlrayError(f"{path} is damaged or not a checkpoint this fmlray can read; start the run again")
    # VERSION 4 on, and any manifest carrying the checksum: one whose version was lowered by hand checks it too
    if (manifest["version"] >= 4 or "manifest_crc32" in manifest) and \
            manifest.get("manifest_crc32") != manifest_checksum(manifest):
        raise FmlrayError(f"{path} is damaged (it fails its checksum: edited since the checkpoint was written); "
                          "resume from another copy or start the run again")
    if cfg is not None:
        n = cfg.clients.num_clients
        if any(not 0 <= c < n for s in shards for c in s["cids"]) or any(len(set(s["cids"])) < len(s["cids"])
                                                                      for s in shards):
            raise FmlrayError(f"{path} names clients that a run of {n} clients does not have, or one client twice "
                              "in a file; it is damaged: start the run again")
        saved = _with_defaults(manifest.get("config"), fixed_config(Config()))
        diff = differences(saved, fixed_config(cfg))
        if "run.rounds" in diff and not (isinstance(saved, dict) and isinstance(saved.get("run"), dict)
                                         and saved["run"].get("rounds") is not None):
            diff.remove("run.rounds")  # saved without a schedule: whatever else differs says so
        if diff == ["run.rounds"]:
            raise FmlrayError(f"the run in {run_dir} follows a schedule over its {saved['run']['rounds']} rounds "
                              f"({', '.join(cfg.algorithm.schedule_keys())}), so run.rounds cannot change on resume: "
                              f"{cfg.run.rounds} rounds would have trained every round at other values; keep "
                              f"run.rounds = {saved['run']['rounds']}, or start a new run")
        if diff:
            may = [f"run.{k}" for k in MAY_CHANGE["run"][:4] if k != "rounds" or not cfg.algorithm.schedule_keys()]
            raise FmlrayError(f"the checkpoint in {run_dir} belongs to another config (differs in "
                              f"{', '.join(diff[:5])}{', ...' if len(diff) > 5 else ''}); on resume only "
                              f"{', '.join(may)}, engine.* and the groups' num_cpus / num_gpus may change")
    glob = None
    if glob_name is not None:
        glob = _global_state(folder / glob_name, manifest.get("global_crc32"))
    for s in shards:
        f = folder / s["file"]
        if not f.is_file():
            raise FmlrayError(f"checkpoint file {f} is missing; the checkpoint cannot be resumed")
    placement = manifest.get("placement")  # absent before placements were kept; only ever a hint (see restore)
    data = manifest.get("data")
    return Resume(rnd, glob, shards, folder, placement if isinstance(placement, dict) else None,
                  data if isinstance(data, str) else None, manifest.get("partition"))


def _global_state(path: Path, checksum: int | None) -> State:
    """The global model a manifest names, read from its bytes once they match the manifest's `checksum` (None: a
    VERSION 2 checkpoint, which kept none)."""
    if path.exists() and not (path.is_file() or path.is_dir()):  # a FIFO would block the read, /dev/zero never end it
        raise FmlrayError(f"{path} is a special file (a FIFO or a device), not a global model; the checkpoint cannot "
                          "be resumed: put the run's copy back, or start the run again")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FmlrayError(f"{path} is missing; the checkpoint cannot be resumed") from None
    except OSError as exc:
        if exc.errno != errno.EISDIR:
            raise _unreadable(path, exc) from None
        data = b""
    if checksum is not None and zlib.crc32(data) & 0xFFFFFFFF != checksum:
        raise FmlrayError(f"{path} is damaged (it fails its checksum: changed or replaced since the checkpoint was "
                          "written); resume from another copy or start the run again")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except DAMAGED_NPZ as exc:
        raise FmlrayError(f"{path} is missing or damaged ({type(exc).__name__}); the checkpoint cannot be "
                          "resumed") from None


def check_global(run_dir: Path, resume: Resume, cfg: Config, dataset) -> None:
    """Refuse, before the run folder changes, a checkpoint whose global model is not this config's (keys, shapes):
    a checkpoint of VERSION 2, without a checksum, whose global file was replaced, was refused only in training."""
    from fmlray.engine.host import initial_global_state

    want = initial_global_state(cfg, dataset)
    have = resume.global_state
    if (want is None) != (have is None) or want is not None and (
            set(want) != set(have) or any(np.shape(have[k]) != np.shape(v) for k, v in want.items())):
        where = resume.folder / (global_name(resume.round) if have is not None else MANIFEST)
        raise FmlrayError(f"{where} does not hold the global state of model {cfg.model.meme!r} that algorithm "
                          f"{cfg.algorithm.name!r} shares: the checkpoint is damaged or of another config; resume from "
                          "another copy or start the run again")


def check_same_data(run_dir: Path, resume: Resume, dataset, partition) -> None:
    """Refuse to resume on other data than the run started with: the dataset's files changed (its fingerprint),
    or the partition the config gives now (data.partition_file replaced, or a relative one read from another
    folder) is not the one the checkpoint was trained on (its fingerprint) nor the run's partition.npz."""
    from fmlray.data import load_partition
    from fmlray.rundir import PARTITION_FILE

    how = "put the run's data back as it was, or start a new run (another run.name) on the new data"
    if resume.data is not None and dataset.fingerprint() != resume.data:
        raise FmlrayError(f"{run_dir} was checkpointed on other {dataset.name} data than data.root holds now (its "
                          f"files changed since: fingerprint {dataset.fingerprint()}, was {resume.data}); {how}")
    if resume.partition is not None and partition_fingerprint(partition) != resume.partition:
        raise FmlrayError(f"the config's partition differs from the one {run_dir} was checkpointed on (fingerprint "
                          f"{partition_fingerprint(partition)}, was {resume.partition}): data.partition_file or the "
                          f"dataset changed since; {how}")
    saved = Path(run_dir) / PARTITION_FILE
    if not os.path.lexists(saved):
        # Deleted: with the checkpoint's fingerprint of the partition, the config's is the run's, and is written
        # back (`put_back_partition`); an older checkpoint keeps none, and nothing else vouches for it: refused.
        if resume.partition is None:
            raise FmlrayError(f"{saved}, the partition the run started with, is missing, and the checkpoint (of an "
                              "earlier fmlray) keeps no fingerprint to check the config's partition against; put the "
                              "run's copy back, or start a new run")
        return
    try:
        with np.load(saved, allow_pickle=False) as z:
            [z[k] for k in z.files]
    except DAMAGED_NPZ as exc:
        raise FmlrayError(f"{saved}, the partition the run started with, is damaged ({type(exc).__name__}); put "
                          "the run's copy back, or start a new run") from None
    try:
        was = load_partition(saved, dataset, len(partition.train))
    except FmlrayError:
        was = None
    if was is None or not all(np.array_equal(a, b) for old, new in ((was.train, partition.train),
                                                                     (was.test, partition.test))
                              for a, b in zip(old, new, strict=True)):
        raise FmlrayError(f"the config's partition differs from the one {run_dir} started with ({saved}): "
                          f"data.partition_file or the dataset changed since; {how}")


def put_back_partition(run_dir: Path, dataset, partition) -> None:
    """Write a resumed run's deleted partition.npz (and partition.csv, its client × class counts) back from the
    config's partition, which `check_same_data` found to be the one the checkpoint was trained on; a file there
    (put back meanwhile) is never replaced."""
    from fmlray.rundir import PARTITION, PARTITION_FILE, partition_files, write_new

    missing = [name for name in (PARTITION_FILE, PARTITION) if not os.path.lexists(Path(run_dir) / name)]
    files = partition_files(dataset, partition) if missing else {}
    for name in missing:
        try:
            write_new(Path(run_dir) / name, files[name])
        except FileExistsError:
            pass
