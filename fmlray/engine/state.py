"""Clients' private state (private models, optimisers, scalars) as plain rows of bytes, in memory or on disk.

FML's clients each keep a local model and its optimiser across rounds (Ditto a personal model, FedPer
its head, FedBN its BatchNorm layers, DML two models, APFL a model and its mixing weight). Kept as live modules, that
costs every client that exists; kept as rows, it costs the clients that have trained, and a host
needs only one workspace model per architecture, loaded from a client's row before training or
evaluation and stored back after. A `Layout` says where each tensor sits in a row; a store keeps
rows by client id, in RAM (`MemoryStore`) or in a file of fixed-size rows on the node's local
disk, read and written whole with direct I/O (`DiskStore`). A client without a row has never trained: it is recreated from
(seed, client), exactly as it was.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import glob
import hashlib
import mmap
import os
import re
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fmlray.errors import ResourceError
from fmlray.optim import Optimizer

ALIGN = 64  # every tensor starts on a 64-byte boundary of its row (any dtype may be viewed there)
PAGE = mmap.PAGESIZE


def _up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class Slot:
    name: str  # "<model>/<state_dict key>", "opt/<param index>/<optimiser state name>" or "scalar/<name>"
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


@dataclass(frozen=True)
class Part:
    """One model's share of a client's row: the keys it keeps privately, and whether its optimiser state
    is kept too (a model that receives nothing from the server keeps it; one that does starts each round
    with a fresh optimiser, as FedAvg's clients do)."""

    name: str
    model: nn.Module
    keys: tuple[str, ...]
    optimizer: bool


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class Layout:
    """Where each tensor of a client's private state sits in its row of bytes: the private keys of each
    `Part`, the optimiser state of the parts that keep it, and the algorithm's private scalars.

    `Layout(arch, model, ...)` with one module is the common case: a "local" model kept whole, with its
    optimiser (FML's and Local's rows; the slot names, and so the layout names, predate the other parts)."""

    def __init__(self, arch: str, parts: nn.Module | list[Part], optimizer: str, momentum: float,
                 scalars: tuple[str, ...] = ()):
        if isinstance(parts, nn.Module):
            parts = [Part("local", parts, tuple(parts.state_dict()), True)]
        self.parts = list(parts)
        specs: list[tuple[str, tuple[int, ...], str]] = []
        for part in self.parts:
            state = part.model.state_dict()
            specs += [(f"{part.name}/{k}", tuple(state[k].shape), _dtype(state[k])) for k in part.keys]
        params = [p for part in self.parts if part.optimizer for p in part.model.parameters()]
        for i, p in enumerate(params):
            for name, like in _optimizer_slots(optimizer, momentum):
                specs.append((f"opt/{i}/{name}", tuple(p.shape) if like else (), _dtype(p) if like else "float32"))
        specs += [(f"scalar/{name}", (), "float32") for name in scalars]
        self.slots, offset = [], 0
        for name, shape, dtype in specs:
            self.slots.append(Slot(name, shape, dtype, offset))
            offset = _up(offset + self.slots[-1].nbytes, ALIGN)
        self.nbytes = max(offset, ALIGN)
        self.padded = _up(self.nbytes, PAGE)  # a row in whole pages, as direct I/O writes it
        digest = hashlib.sha256(repr([(s.name, s.shape, s.dtype) for s in self.slots]).encode()).hexdigest()[:10]
        self.name = f"{arch}-{digest}"  # names the architecture(s) and the exact layout (checked on resume)
        self.opt_slots = [s for s in self.slots if s.name.startswith("opt/")]
        self.scalar_slots = [s for s in self.slots if s.name.startswith("scalar/")]
        self.model_slots = [s for s in self.slots if s not in self.opt_slots and s not in self.scalar_slots]

    def unpack(self, row: np.ndarray) -> dict[str, np.ndarray]:
        """A row as named arrays ('local/<key>', 'opt/<i>/<name>', ...), copied: for inspection and tests."""
        return {s.name: np.array(row[s.offset:s.offset + s.nbytes].view(np.dtype(s.dtype)).reshape(s.shape))
                for s in self.slots}

    def view(self, row: np.ndarray, slot: Slot) -> torch.Tensor:
        """A tensor over `slot`'s bytes of `row` (no copy; writes go to the row)."""
        a = row[slot.offset:slot.offset + slot.nbytes].view(np.dtype(slot.dtype)).reshape(slot.shape)
        return torch.from_numpy(a)


class Workspace:
    """A client's models and optimisers (one set per layout on a host), into which clients' rows are
    loaded in turn. Models outside the layout's parts (one that receives the whole global state) are
    held here too but never touched by a row."""

    def __init__(self, layout: Layout, models: nn.Module | dict[str, nn.Module],
                 opts: Optimizer | dict[str, Optimizer] | None, device: torch.device):
        if isinstance(models, nn.Module):
            models, opts = {"local": models}, {"local": opts}
        self.layout, self.models, self.opts, self.device = layout, models, opts, device
        state = {p.name: models[p.name].state_dict() for p in layout.parts}  # detached views of the live tensors
        self.tensors = [state[p.name][k] for p in layout.parts for k in p.keys]
        self.params = [(prm, p.name) for p in layout.parts if p.optimizer for prm in models[p.name].parameters()]
        self.scalars = {s.name.removeprefix("scalar/"): torch.zeros((), device=device, requires_grad=True)
                        for s in layout.scalar_slots}
        self.client: int | None = None  # whose state the workspace holds now
        self._buffers: dict[str, torch.Tensor] = {}  # the optimiser's state of a loaded row, by slot name
        # Initial models are drawn on the CPU whatever the device: a GPU's generator gives other numbers
        # than the CPU's for the same seed, and a client's first model must not depend on where it trains.
        self._cpu_twins = {p.name: models[p.name] for p in layout.parts if device.type == "cpu"}
        self.bound: np.ndarray | None = None  # the row the private tensors are views of (`bind`), if any
        self._home: np.ndarray | None = None  # the workspace's own row, bound between clients

    def bindable(self) -> bool:
        """Whether the private tensors can be views of a row: on the CPU, with no tensor under two keys."""
        ptrs = [t.data_ptr() for t in self.tensors]
        return self.device.type == "cpu" and len(set(ptrs)) == len(ptrs) and bool(self.layout.slots)

    def bind(self, row: np.ndarray) -> None:
        """Make the private parameters and buffers views of `row` (no copy): training then updates the row in
        place. The parameters stay the same objects (their optimisers keep them); only their storage moves."""
        lay = self.layout
        if self._home is None:  # first bind: the models' present values move to a row of the workspace's own
            self._home = np.zeros(lay.nbytes, np.uint8)
            _copy([lay.view(self._home, s) for s in lay.model_slots], self.tensors)
            self._owners = []
            for part in lay.parts:
                for key in part.keys:
                    prefix, _, attr = key.rpartition(".")
                    self._owners.append((self.models[part.name].get_submodule(prefix), attr))
        views = [lay.view(row, s) for s in lay.model_slots]
        for (module, attr), v in zip(self._owners, views):
            if attr in module._parameters:
                module._parameters[attr].data = v
            else:
                module._buffers[attr] = v
        self.tensors, self.bound = views, row

    def unbind(self) -> None:
        """Let go of the bound row (its owner may reuse it now): back to the workspace's own row, holding
        nobody's state."""
        for p in self.layout.parts:
            self.opts[p.name].state.clear()  # its tensors were views of the row
        self.bind(self._home)
        self.client = None

    def adopt(self, row: np.ndarray, filled: bool, seeds: int | dict[str, int], cid: int,
              scalars: dict[str, float] | None = None) -> None:
        """`load` without copies: bind `row` and train in it. A `filled` row holds the client's state; any other
        is filled with the client's initial models and zeroed optimiser state (as a fresh optimiser starts:
        SGD's first momentum, 0·m + g, equals the g it would copy; Adam starts from zeros anyway)."""
        self.bind(row)
        lay = self.layout
        if not filled:
            self.load(None, seeds, cid, scalars)  # draws the initial models into the row's views
            for s in lay.opt_slots:
                lay.view(row, s).zero_()
        for p in lay.parts:
            self.opts[p.name].state.clear()
        for s in lay.opt_slots:
            _, i, name = s.name.split("/", 2)
            p, part = self.params[int(i)]
            self.opts[part].state[p][name] = lay.view(row, s)
        if filled:
            with torch.no_grad():
                for s in lay.scalar_slots:
                    self.scalars[s.name.removeprefix("scalar/")].copy_(lay.view(row, s))
        self.client = cid

    @property
    def model(self) -> nn.Module:
        return self.models[self.layout.parts[0].name]

    @property
    def opt(self) -> Optimizer:
        return self.opts[self.layout.parts[0].name]

    def load(self, row: np.ndarray | None, seeds: int | dict[str, int] | None, cid: int,
             scalars: dict[str, float] | None = None) -> None:
        """Put a client's row in place or, when it has none, its initial models (each drawn from its seed in
        `seeds`, by part name), fresh optimisers and the scalars' initial values."""
        for p in self.layout.parts:
            self.opts[p.name].state.clear()  # as a new optimiser would be; a row fills it back below
        if row is None:
            seeds = seeds if isinstance(seeds, dict) else {p.name: seeds for p in self.layout.parts}
            for p in self.layout.parts:
                twin = self._cpu_twins.get(p.name)
                if twin is None:
                    twin = self._cpu_twins[p.name] = copy.deepcopy(self.models[p.name]).cpu()
                initialise(twin, seeds[p.name])
                if twin is not self.models[p.name]:
                    live, drawn = self.models[p.name].state_dict(), twin.state_dict()
                    _copy([live[k] for k in p.keys], [drawn[k] for k in p.keys])
            with torch.no_grad():
                for name, t in self.scalars.items():
                    t.fill_((scalars or {})[name])
        else:
            lay = self.layout
            # The optimiser's state goes into tensors the workspace keeps from client to client: a fresh
            # allocation per client (megabytes for cnn5) costs the kernel's page faults every time.
            # Adam's step counter stays a CPU scalar, as torch keeps it; the rest lives with the parameter.
            dst = [self._opt_buffer(s) for s in lay.opt_slots]
            _copy(self.tensors + dst, [lay.view(row, s) for s in lay.model_slots + lay.opt_slots])
            for s, t in zip(lay.opt_slots, dst):
                _, i, name = s.name.split("/", 2)
                p, part = self.params[int(i)]
                self.opts[part].state[p][name] = t
            with torch.no_grad():
                for s in lay.scalar_slots:
                    self.scalars[s.name.removeprefix("scalar/")].copy_(lay.view(row, s))
        self.client = cid

    def _opt_buffer(self, slot: Slot) -> torch.Tensor:
        t = self._buffers.get(slot.name)
        if t is None:
            device = torch.device("cpu") if slot.name.endswith("/step") else self.device
            t = self._buffers[slot.name] = torch.zeros(slot.shape, dtype=getattr(torch, slot.dtype), device=device)
        return t

    def store(self, row: np.ndarray) -> None:
        """Write the workspace's private state (models, optimisers, scalars) into `row` (into the bound row:
        only what is not already a view of it)."""
        lay = self.layout
        if row is not self.bound:
            _copy([lay.view(row, s) for s in lay.model_slots], self.tensors)
        for s in lay.opt_slots:
            _, i, name = s.name.split("/", 2)
            p, part = self.params[int(i)]
            t = self.opts[part].state.get(p, {}).get(name)
            dst = lay.view(row, s)
            if t is None:  # no step taken for this parameter: zeros are the fresh state (SGD and Adam alike)
                dst.zero_()
            elif t.data_ptr() != dst.data_ptr():
                dst.copy_(t.detach())
        for s in lay.scalar_slots:
            lay.view(row, s).copy_(self.scalars[s.name.removeprefix("scalar/")].detach())


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

    def prefetch(self, cid: int) -> None:
        """`cid`'s row is likely the next one `get` is asked for (nothing to do in RAM)."""

    def drop(self, cid: int) -> None:
        """Forget `cid`'s row (its client moved to another host)."""
        self.rows.pop(cid, None)

    def close(self) -> None:
        self.rows.clear()


class DiskStore:
    """Rows in one file per architecture on the node's disk, a row per client that has trained, placed on
    first store. Rows are read and written whole, with direct I/O where the file system has it, through
    three page-aligned buffers the store reuses: rows go between them and the disk without the kernel's page
    cache, so neither the host's memory nor the node's page cache grows with the clients trained. (On the
    VM this was measured on, memory the guest has not touched lately costs ~2.5 s/GiB the first time: a
    store through the page cache cost ~33 ms per 13 MiB `cnn5` row, a direct write ~7 ms.) One thread does
    the disk work while the host computes: a stored row is written while the next client trains, and the
    row `prefetch` names is read ahead; its jobs run in the order given, so a read never overtakes a write.

    `get` and `put` return one of those buffers: a caller uses a row, then calls `done`, before the next.
    `lend` hands one out until `release`: a workspace on the CPU trains in it (its tensors are views of the
    buffer), so a row is neither copied in on load nor out on store; the store's thread reads and writes it."""

    kind = "disk"

    def __init__(self, layout: Layout, folder: Path):
        self.layout = layout
        self.stride = layout.padded
        self.path = Path(folder) / f"{layout.name}.rows"
        self.slot: dict[int, int] = {}
        self._spare: list[int] = []  # slots of rows dropped (clients moved away), reused first
        self._bufs = [mmap.mmap(-1, self.stride) for _ in range(3)]  # page-aligned, as direct I/O needs
        self._rows = [np.frombuffer(b, np.uint8)[:layout.nbytes] for b in self._bufs]
        self._held: int | None = None  # the buffer handed out by `get` or `put`, until `done`
        self._writing: int | None = None  # the client whose row `put` handed out, written by `done`
        self._flight: tuple[int, int, Future] | None = None  # (buffer, client, write) under way
        self._ahead: tuple[int, int, Future] | None = None  # (buffer, client, read) asked for by `prefetch`
        self._io = ThreadPoolExecutor(1, thread_name_prefix="fmlray-rows")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = _open_direct(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # held while this process lives: see `tidy_rows`
        except OSError as exc:
            raise ResourceError(f"cannot write client state under {folder} ({exc.strerror}); "
                                "set engine.state_dir to a writable node-local folder") from None

    def __contains__(self, cid: int) -> bool:
        return cid in self.slot

    def __len__(self) -> int:
        return len(self.slot)

    def _free(self) -> int:
        """A buffer that is not handed out, being written, or holding a read-ahead row."""
        busy = {self._held} | {job[0] for job in (self._flight, self._ahead) if job is not None}
        return next(b for b in range(len(self._bufs)) if b not in busy)

    def _settle(self) -> None:
        """Wait for the write under way, if any."""
        if self._flight is None:
            return
        _, _, write = self._flight
        self._flight = None
        try:
            write.result()
        except OSError as exc:
            raise ResourceError(f"cannot write client state to {self.path} ({exc.strerror}); free disk space there "
                                "or set engine.state_dir elsewhere") from None

    def _read(self, b: int, cid: int) -> None:
        if os.preadv(self._fd, [self._bufs[b]], self.slot[cid] * self.stride) != self.stride:
            raise ResourceError(f"{self.path} was cut short under this run (client {cid}'s row is missing); "
                                "set engine.state_dir to a folder nothing else cleans")

    def _take_ahead(self, cid: int | None) -> int | None:
        """Finish the read-ahead; its buffer if it read `cid`'s row (else it is dropped)."""
        if self._ahead is None:
            return None
        b, got, read = self._ahead
        self._ahead = None
        try:
            read.result()
        except OSError as exc:
            if got != cid:
                return None  # a row nobody asked for after all; a real fault shows again on the next read
            raise ResourceError(f"cannot read client state from {self.path} ({exc.strerror})") from None
        return b if got == cid else None

    def prefetch(self, cid: int) -> None:
        if cid not in self.slot or (self._ahead is not None and self._ahead[1] == cid):
            return
        self._take_ahead(None)
        b = self._free()
        self._ahead = (b, cid, self._io.submit(self._read, b, cid))

    def get(self, cid: int) -> np.ndarray | None:
        if cid not in self.slot:
            return None
        if self._flight is not None and self._flight[1] == cid:
            # its write first: a read queued after a write that failed (a full disk) read the row before it, which
            # a checkpoint then kept as the client's latest, its checksum good
            self._settle()
        b = self._take_ahead(cid)
        if b is None:
            b = self._free()
            self._read(b, cid)
        self._held = b
        return self._rows[b]

    def lend(self, cid: int) -> tuple[np.ndarray, bool]:
        """A buffer the caller keeps until `release`, to train or evaluate `cid` in: holding `cid`'s row
        (True), or, for a client without one, free (False)."""
        row = self.get(cid)
        if row is not None:
            return row, True
        self._held = self._free()
        return self._rows[self._held], False

    def release(self, cid: int, write: bool) -> None:
        """Take back the lent buffer; with `write`, it is `cid`'s new row (written in the store's thread)."""
        if write:
            self.put(cid, self._held)
        self.done(cid)

    def page_buffer(self) -> mmap.mmap:
        """The handed-out row's whole buffer (page-aligned, padded to whole pages with zeros): what direct I/O
        can write as it is."""
        return self._bufs[self._held]

    def put(self, cid: int, buffer: int | None = None) -> np.ndarray:
        if self._ahead is not None and self._ahead[1] == cid:
            self._take_ahead(None)  # about to be overwritten: a later `get` must read the new row
        if cid not in self.slot:
            self.slot[cid] = self._spare.pop() if self._spare else len(self.slot)
        self._writing = cid
        self._held = self._free() if buffer is None else buffer
        return self._rows[self._held]

    def done(self, cid: int) -> None:
        b, self._held = self._held, None
        if self._writing != cid:
            return
        self._writing = None
        self._settle()
        self._flight = (b, cid, self._io.submit(_pwrite, self._fd, self._bufs[b], self.slot[cid] * self.stride))

    def drop(self, cid: int) -> None:
        """Forget `cid`'s row (its client moved to another host); its slot is reused."""
        if self._ahead is not None and self._ahead[1] == cid:
            self._take_ahead(None)
        if self._flight is not None and self._flight[1] == cid:
            self._settle()  # the slot must not be written after it is given to another row
        if (slot := self.slot.pop(cid, None)) is not None:
            self._spare.append(slot)

    def close(self) -> None:
        try:
            self._take_ahead(None)
            self._settle()
        finally:
            self._io.shutdown()
            os.close(self._fd)
            self.path.unlink(missing_ok=True)
            for folder in (self.path.parent, self.path.parent.parent):  # the host's, then the run's (state_folder)
                try:
                    folder.rmdir()  # only once empty: another store's file, or another host's folder, keeps it
                except OSError:
                    break


def _pwrite(fd: int, buf, offset: int) -> None:
    """Write all of `buf` at `offset`. Where direct I/O refuses a write (EINVAL: a file-size limit met mid-page,
    a file system's own alignment), the file goes on buffered, so the error a caller sees is the real one."""
    view = memoryview(buf)
    while view:
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as exc:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if exc.errno != errno.EINVAL or not flags & getattr(os, "O_DIRECT", 0):
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            continue
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


def _open_direct(path: Path, flags: int, mode: int = 0o600) -> int:
    """Open `path` for direct I/O where its file system allows it (not tmpfs on older kernels, for one); a file
    it makes gets `mode` (less the umask): private scratch by default, a run's file as any other (0o666)."""
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, mode)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, mode)


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
    """Write `cids`' rows of `store` as one `.npy` table of uint8 rows at `path` (through a temporary name,
    flushed to disk); return each row's checksum. Its header fills one page and each row is padded to whole
    pages, so the file is written with direct I/O where the file system has it (see `DiskStore`)."""
    tmp = path.with_name(f".{path.name}.tmp")
    width = store.layout.padded
    buf = mmap.mmap(-1, width)
    out = np.frombuffer(buf, np.uint8)
    crcs = []
    fd = None
    try:
        if isinstance(store, DiskStore):
            store._settle()  # a store write that failed says so now, before any row of this file is taken
        fd = _open_direct(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # a run's file, as readable as the rest
        buf[:PAGE] = _npy_header((len(cids), width))  # direct I/O writes from page-aligned memory only
        _pwrite(fd, memoryview(buf)[:PAGE], 0)
        for i, cid in enumerate(cids):
            row = store.get(cid)
            if i + 1 < len(cids):
                store.prefetch(cids[i + 1])
            crcs.append(crc(row))
            if isinstance(store, DiskStore):  # written from the buffer the row was read into: no copy
                _pwrite(fd, store.page_buffer(), PAGE + i * width)
                store.done(cid)
            else:
                out[:len(row)] = row
                store.done(cid)
                _pwrite(fd, buf, PAGE + i * width)
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, path)
    except BaseException as exc:  # the store's own errors too (ResourceError): they left the file open and behind
        if fd is not None:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ResourceError(cannot_write(f"checkpoint file {path}", path.parent, exc)) from None
        raise
    return crcs


MANIFEST = "manifest.json"  # a checkpoint folder's index (fmlray.checkpoint): its checkpoint is whole once it is there


def kept_checkpoint(folder: Path) -> str:
    """What is left when a checkpoint into `folder` fails: the one before, or none (a new run's first)."""
    return ("the previous checkpoint is still resumable" if (folder / MANIFEST).is_file() else
            "this run has no checkpoint yet, so none is kept")


def cannot_write(what: str, folder: Path, exc: OSError) -> str:
    """One line for a checkpoint write into `folder` that failed: the cause (its errno), the remedy that fits it,
    and what is left. A run that has a checkpoint goes on in its folder (`--resume` cannot move it), so its
    remedy is there; only a run without one may as well start again elsewhere (run.output_dir)."""
    kept = (folder / MANIFEST).is_file()
    then = f", then continue with: fmlray run --resume {folder.parent}" if kept else ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {folder} writable{then}" if kept else "set run.output_dir to a writable folder"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free space there{then}" if kept else "free space there or set run.output_dir elsewhere"
    elif exc.errno == errno.EFBIG:  # a file-size limit (ulimit -f, a quota) or the file system's largest file
        fix = f"lift the file-size limit there{then}" if kept else "lift the file-size limit there or set " \
            "run.output_dir elsewhere"
    else:
        fix = f"check {folder}{then}" if kept else "check it or set run.output_dir elsewhere"
    return f"cannot write {what} ({exc.strerror or exc}); {fix} ({kept_checkpoint(folder)})"


def _npy_header(shape: tuple[int, int]) -> bytes:
    """A `.npy` (format 1.0) header for a C-ordered uint8 array of `shape`, padded with spaces to one page."""
    head = repr({"descr": "|u1", "fortran_order": False, "shape": shape}).encode("latin1")
    pre = np.lib.format.magic(1, 0)
    body = head.ljust(PAGE - len(pre) - 2 - 1) + b"\n"
    return pre + len(body).to_bytes(2, "little") + body


def open_rows(path: Path) -> np.ndarray:
    """A checkpoint file's rows, memory-mapped read-only (numpy only, no pickle)."""
    from fmlray.errors import FmlrayError
    try:
        rows = np.lib.format.open_memmap(path, mode="r")  # a .npy header and raw bytes, nothing else
    except PermissionError as exc:  # there, and maybe whole: said as such
        raise FmlrayError(f"cannot read checkpoint file {path} ({exc.strerror}); the checkpoint was left as it is: "
                          "make it readable, then resume again") from None
    except (OSError, ValueError, EOFError) as exc:
        raise FmlrayError(f"checkpoint file {path} is missing or damaged ({type(exc).__name__}); "
                          "the checkpoint cannot be resumed") from None
    if rows.dtype != np.uint8 or rows.ndim != 2:
        raise FmlrayError(f"checkpoint file {path} is not a table of rows; the checkpoint cannot be resumed")
    return rows


def state_folder(state_dir: str, run_token: str, host: str) -> tuple[Path, Path | None]:
    """The node-local folder a host keeps its disk store in, and the folder to remove at the end (None
    when the user chose engine.state_dir: each store removes its file, and the folders it leaves empty)."""
    import tempfile
    if state_dir:
        tidy_rows(Path(state_dir), "fmlray-")
        return Path(state_dir) / f"fmlray-{run_token}" / host, None
    tidy_rows(Path(tempfile.gettempdir()), "fmlray-state-")
    root = Path(tempfile.gettempdir()) / f"fmlray-state-{run_token}"
    return root / host, root


def tidy_rows(base: Path, runs: str | None = None, min_age_s: float = 60.0, wait_s: float = 0.0) -> None:
    """Delete the disk stores' row files under `base` that no live store holds: a killed run's, or a lost actor's
    (SIGKILL, a lost node: nothing ran its clean-up), and the folders they leave empty. `base` is one run's folder
    (`runs` None), or holds runs' folders named `runs` + their token; only files named as `state_folder` and
    `DiskStore` name them (<actor-N or serial>/<layout>.rows below a run's folder) are touched. A live store holds an flock on
    its file; a file whose lock can be taken has no owner left. (Files younger than `min_age_s` are spared: their
    owner may not have locked them yet.) A held file is tried again for up to `wait_s` seconds: a store closing,
    or the process of an actor just killed, lets go of its lock a moment later."""
    names = r"(actor-\d+|serial)/[^/]+-[0-9a-f]{10}\.rows"
    pattern = "*/*.rows"
    if runs is not None:
        names, pattern = re.escape(runs) + r"[0-9a-f]{8}/" + names, f"{glob.escape(runs)}*/{pattern}"
    try:
        found = [rows for rows in base.glob(pattern) if re.fullmatch(names, rows.relative_to(base).as_posix())]
    except OSError:  # a folder another run removed as it was listed (seen in CI): the next run tidies it
        return
    deadline = time.monotonic() + wait_s
    while (found := [rows for rows in found if _held(rows, min_age_s)]) and time.monotonic() < deadline:
        time.sleep(0.1)


def _held(rows: Path, min_age_s: float) -> bool:
    """Delete `rows` (and the folders it leaves empty) unless a live store holds it: whether one does."""
    try:
        if time.time() - rows.stat().st_mtime < min_age_s:
            return False  # spared, not waited for
        fd = os.open(rows, os.O_RDWR)
    except OSError:
        return False  # gone meanwhile
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rows.unlink(missing_ok=True)
    except OSError:
        return True  # a live run's
    finally:
        os.close(fd)
    for folder in (rows.parent, rows.parent.parent):
        try:
            folder.rmdir()  # once empty
        except OSError:
            break
    return False
