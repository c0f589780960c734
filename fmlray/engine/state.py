"""Clients' private state (local model and optimiser) as plain rows of bytes, in memory or on disk.

FML's clients each keep a local model and its optimiser across rounds. Kept as live modules, that
costs every client that exists; kept as rows, it costs the clients that have trained, and a host
needs only one workspace model per architecture, loaded from a client's row before training or
evaluation and stored back after. A `Layout` says where each tensor sits in a row; a store keeps
rows by client id, in RAM (`MemoryStore`) or in a memory-mapped file of fixed-size rows on the
node's local disk (`DiskStore`). A client without a row has never trained: it is recreated from
(seed, client), exactly as it was.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import mmap
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fmlray.errors import ResourceError

ALIGN = 64  # every tensor starts on a 64-byte boundary of its row (any dtype may be viewed there)
PAGE = mmap.PAGESIZE


def _up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class Slot:
    name: str  # "local/<state_dict key>" or "opt/<param index>/<optimiser state name>"
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _optimizer_slots(optimizer: str, momentum: float) -> list[tuple[str, bool]]:
    """The per-parameter state an optimiser keeps: (name, shaped like the parameter?)."""
    if optimizer == "adam":
        return [("step", False), ("exp_avg", True), ("exp_avg_sq", True)]
    return [("momentum_buffer", True)] if momentum > 0 else []


class Layout:
    """Where each tensor of one architecture's private state sits in a client's row of bytes."""

    def __init__(self, arch: str, model: nn.Module, optimizer: str, momentum: float):
        specs: list[tuple[str, tuple[int, ...], str]] = [
            (f"local/{k}", tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
        for i, p in enumerate(model.parameters()):
            for name, like in _optimizer_slots(optimizer, momentum):
                specs.append((f"opt/{i}/{name}", tuple(p.shape) if like else (),
                              str(p.dtype).removeprefix("torch.") if like else "float32"))
        self.slots, offset = [], 0
        for name, shape, dtype in specs:
            self.slots.append(Slot(name, shape, dtype, offset))
            offset = _up(offset + self.slots[-1].nbytes, ALIGN)
        self.nbytes = max(offset, ALIGN)
        digest = hashlib.sha256(repr([(s.name, s.shape, s.dtype) for s in self.slots]).encode()).hexdigest()[:10]
        self.name = f"{arch}-{digest}"  # names the architecture and the exact layout (checked on resume)
        self.model_slots = [s for s in self.slots if s.name.startswith("local/")]
        self.opt_slots = [s for s in self.slots if s.name.startswith("opt/")]

    def unpack(self, row: np.ndarray) -> dict[str, np.ndarray]:
        """A row as named arrays ('local/<key>', 'opt/<i>/<name>'), copied: for inspection and tests."""
        return {s.name: np.array(row[s.offset:s.offset + s.nbytes].view(np.dtype(s.dtype)).reshape(s.shape))
                for s in self.slots}

    def view(self, row: np.ndarray, slot: Slot) -> torch.Tensor:
        """A tensor over `slot`'s bytes of `row` (no copy; writes go to the row)."""
        a = row[slot.offset:slot.offset + slot.nbytes].view(np.dtype(slot.dtype)).reshape(slot.shape)
        return torch.from_numpy(a)


class Workspace:
    """One architecture's model and optimiser, into which clients' rows are loaded in turn."""

    def __init__(self, layout: Layout, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device):
        self.layout, self.model, self.opt, self.device = layout, model, optimizer, device
        self.tensors = list(model.state_dict().values())  # detached views of the live parameters and buffers
        self.params = list(model.parameters())
        self.client: int | None = None  # whose state the workspace holds now
        self._buffers: dict[str, torch.Tensor] = {}  # the optimiser's state of a loaded row, by slot name
        # Initial models are drawn on the CPU whatever the device: a GPU's generator gives other numbers
        # than the CPU's for the same seed, and a client's first model must not depend on where it trains.
        self._cpu_twin = model if device.type == "cpu" else None

    def load(self, row: np.ndarray | None, seed: int | None, cid: int) -> None:
        """Put a client's row in place or, when it has none, its initial model (drawn from `seed`) and a
        fresh optimiser."""
        self.opt.state.clear()  # as a new optimiser would be; a row fills it back below
        if row is None:
            if self._cpu_twin is None:
                self._cpu_twin = copy.deepcopy(self.model).cpu()
            initialise(self._cpu_twin, seed)
            if self._cpu_twin is not self.model:
                _copy(self.tensors, list(self._cpu_twin.state_dict().values()))
        else:
            lay = self.layout
            # The optimiser's state goes into tensors the workspace keeps from client to client: a fresh
            # allocation per client (megabytes for cnn5) costs the kernel's page faults every time.
            # Adam's step counter stays a CPU scalar, as torch keeps it; the rest lives with the parameter.
            dst = [self._opt_buffer(s) for s in lay.opt_slots]
            _copy(self.tensors + dst, [lay.view(row, s) for s in lay.model_slots + lay.opt_slots])
            for s, t in zip(lay.opt_slots, dst):
                _, i, name = s.name.split("/", 2)
                self.opt.state[self.params[int(i)]][name] = t
        self.client = cid

    def _opt_buffer(self, slot: Slot) -> torch.Tensor:
        t = self._buffers.get(slot.name)
        if t is None:
            device = torch.device("cpu") if slot.name.endswith("/step") else self.device
            t = self._buffers[slot.name] = torch.zeros(slot.shape, dtype=getattr(torch, slot.dtype), device=device)
        return t

    def store(self, row: np.ndarray) -> None:
        """Write the workspace's model and optimiser state into `row`."""
        lay = self.layout
        _copy([lay.view(row, s) for s in lay.model_slots], self.tensors)
        for s in lay.opt_slots:
            _, i, name = s.name.split("/", 2)
            t = self.opt.state.get(self.params[int(i)], {}).get(name)
            dst = lay.view(row, s)
            if t is None:  # no step taken for this parameter: zeros are the fresh state (SGD and Adam alike)
                dst.zero_()
            else:
                dst.copy_(t.detach())


def initialise(model: nn.Module, seed: int) -> None:
    """Re-draw `model`'s initial parameters in place, exactly as building it after torch.manual_seed(seed)
    would (every registered model draws its parameters layer by layer in construction order, and nothing
    else; a unit test holds each to it): ~5x cheaper than building a new module, which matters when an
    evaluation round tests hundreds of clients that never trained."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i] ← src[i], one fused copy where every tensor is on the CPU."""
    if all(t.device.type == "cpu" for t in dst) and all(t.device.type == "cpu" for t in src):
        torch._foreach_copy_(dst, src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


class MemoryStore:
    """Rows in RAM, one array per client that has trained."""

    kind = "memory"

    def __init__(self, layout: Layout, folder: Path | None = None):
        self.layout, self.rows = layout, {}

    def __contains__(self, cid: int) -> bool:
        return cid in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, cid: int) -> np.ndarray | None:
        return self.rows.get(cid)

    def put(self, cid: int) -> np.ndarray:
        """The row to write `cid`'s state into (made on first use)."""
        row = self.rows.get(cid)
        if row is None:
            row = self.rows[cid] = np.zeros(self.layout.nbytes, np.uint8)
        return row

    def done(self, cid: int) -> None:
        """The caller has finished reading or writing `cid`'s row."""

    def close(self) -> None:
        self.rows.clear()


class DiskStore:
    """Rows in one memory-mapped file per architecture on the node's disk, a row per client that has
    trained, allocated on first store. Rows start on page boundaries, and each row's pages are
    dropped from this process's mapping once used (the kernel's page cache keeps and writes them),
    so a host's resident memory does not grow with the clients it has trained."""

    kind = "disk"

    def __init__(self, layout: Layout, folder: Path):
        self.layout = layout
        self.stride = _up(layout.nbytes, PAGE)
        self.path = Path(folder) / f"{layout.name}.rows"
        self.slot: dict[int, int] = {}
        self.capacity, self._mm, self._rows = 0, None, None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # held while this process lives: see `_tidy_scratch`
        except OSError as exc:
            raise ResourceError(f"cannot write client state under {folder} ({exc.strerror}); "
                                "set engine.state_dir to a writable node-local folder") from None

    def __contains__(self, cid: int) -> bool:
        return cid in self.slot

    def __len__(self) -> int:
        return len(self.slot)

    def _grow(self, need: int) -> None:
        capacity = max(need, 2 * self.capacity, 16)
        # The old mapping is dropped, not closed: a row view a caller still holds keeps it (and its pages,
        # which stay valid: the file only grows) alive until that view goes.
        self._rows = self._mm = None
        try:
            os.ftruncate(self._fd, capacity * self.stride)  # sparse: unwritten rows take no disk
        except OSError as exc:
            raise ResourceError(f"cannot grow {self.path} ({exc.strerror}); free disk space there "
                                "or set engine.state_dir elsewhere") from None
        self._mm = mmap.mmap(self._fd, capacity * self.stride)
        self._rows = np.frombuffer(self._mm, np.uint8).reshape(capacity, self.stride)
        self.capacity = capacity

    def get(self, cid: int) -> np.ndarray | None:
        i = self.slot.get(cid)
        return None if i is None else self._rows[i, :self.layout.nbytes]

    def put(self, cid: int) -> np.ndarray:
        if cid not in self.slot:
            if len(self.slot) >= self.capacity:
                self._grow(len(self.slot) + 1)
            self.slot[cid] = len(self.slot)
        return self._rows[self.slot[cid], :self.layout.nbytes]

    def done(self, cid: int) -> None:
        i = self.slot.get(cid)
        if i is not None:
            self._mm.madvise(mmap.MADV_DONTNEED, i * self.stride, self.stride)

    def close(self) -> None:
        self._rows = self._mm = None  # unmapped once no row view is left
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


STORES = {"memory": MemoryStore, "disk": DiskStore}


def crc(row: np.ndarray) -> int:
    """The checksum a checkpoint keeps for each row."""
    return zlib.crc32(row) & 0xFFFFFFFF


@dataclass(frozen=True)
class RowRef:
    """Where a client's latest checkpointed row is: row `row` of `file` in the checkpoint folder."""

    file: str
    row: int
    layout: str
    crc32: int


def latest_rows(shards: list[dict]) -> dict[int, RowRef]:
    """Each client's latest row across row files listed oldest first."""
    out: dict[int, RowRef] = {}
    for s in shards:
        for i, (cid, c) in enumerate(zip(s["cids"], s["crc32"])):
            out[int(cid)] = RowRef(s["file"], i, s["layout"], int(c))
    return out


def write_rows(path: Path, store: MemoryStore | DiskStore, cids: list[int]) -> list[int]:
    """Write `cids`' rows of `store` as one (len(cids), row bytes) uint8 `.npy` at `path` (through a
    temporary name, flushed to disk); return each row's checksum."""
    tmp = path.with_name(f".{path.name}.tmp")
    crcs = []
    try:
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (len(cids), store.layout.nbytes)})
            for cid in cids:
                row = store.get(cid)
                crcs.append(crc(row))
                f.write(row.data)
                store.done(cid)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ResourceError(f"cannot write checkpoint file {path} ({exc.strerror}); free space there or set "
                            "run.output_dir elsewhere (the previous checkpoint is still resumable)") from None
    return crcs


def open_rows(path: Path) -> np.ndarray:
    """A checkpoint file's rows, memory-mapped read-only (numpy only, no pickle)."""
    from fmlray.errors import FmlrayError
    try:
        rows = np.lib.format.open_memmap(path, mode="r")  # a .npy header and raw bytes, nothing else
    except (OSError, ValueError, EOFError) as exc:
        raise FmlrayError(f"checkpoint file {path} is missing or damaged ({type(exc).__name__}); "
                          "the checkpoint cannot be resumed") from None
    if rows.dtype != np.uint8 or rows.ndim != 2:
        raise FmlrayError(f"checkpoint file {path} is not a table of rows; the checkpoint cannot be resumed")
    return rows


def state_folder(state_dir: str, run_token: str, host: str) -> tuple[Path, Path | None]:
    """The node-local folder a host keeps its disk store in, and the folder to remove at the end (None
    when the user chose engine.state_dir: then the rows stay)."""
    import tempfile
    if state_dir:
        return Path(state_dir) / f"fmlray-{run_token}" / host, None
    _tidy_scratch(Path(tempfile.gettempdir()))
    root = Path(tempfile.gettempdir()) / f"fmlray-state-{run_token}"
    return root / host, root


def _tidy_scratch(tmp: Path, min_age_s: float = 60.0) -> None:
    """Delete scratch rows that a killed run left (SIGKILL, a lost node: nothing ran its clean-up).
    A live store holds an flock on its file; a file whose lock can be taken has no owner left.
    (Files younger than `min_age_s` are spared: their owner may not have locked them yet.)"""
    for rows in tmp.glob("fmlray-state-*/*/*.rows"):
        try:
            if time.time() - rows.stat().st_mtime < min_age_s:
                continue
            fd = os.open(rows, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            rows.unlink(missing_ok=True)
        except OSError:
            continue  # a live run's
        finally:
            os.close(fd)
        for folder in (rows.parent, rows.parent.parent):
            try:
                folder.rmdir()  # once empty
            except OSError:
                break
