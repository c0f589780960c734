"""Where a host computes: its clients' rows on the device, mixed precision, CUDA's determinism switches, and
how the process's malloc keeps memory the batched steps free.

On the CPU a host reads its clients' rows straight from the dataset's arrays (zero-copy views of Ray's
object store) and gathers a client's rows when it trains. On a GPU that gather would be a host→device
copy per client per round, so an actor there copies every hosted client's rows to the device once
(`Rows(resident=True)`); batches are then gathered on the device. It costs the hosted clients' share of
the dataset in GPU memory (Fashion-MNIST: 188 MiB for all 60,000 training images), once per actor.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


class Rows:
    """One split (train or test) of a host's clients' rows, read by client id."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, device: torch.device, resident: bool):
        self.x, self.y, self.device, self.resident = x, y, device, resident
        self.rows: dict[int, torch.Tensor] = {}  # by client: its row indices into the dataset's arrays
        self._x = self._y = None  # resident: the hosted clients' rows, client after client, on the device
        self._at: dict[int, tuple[int, int]] = {}  # resident: each client's [start, end) in them

    def add(self, cid: int, rows: torch.Tensor) -> None:
        self.rows[cid] = rows
        self._x = None  # gathered again (with the new client) at the next read

    def _place(self) -> None:
        order = sorted(self.rows)
        start = 0
        for cid in order:
            self._at[cid] = (start, start + len(self.rows[cid]))
            start += len(self.rows[cid])
        every = torch.cat([self.rows[c] for c in order]) if order else torch.zeros(0, dtype=torch.long)
        self._x, self._y = self.x[every].to(self.device), self.y[every].to(self.device)

    def get(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The client's rows (x, y) on the device (resident: views, no copy)."""
        if not self.resident:
            rows = self.rows[cid]
            return self.x[rows].to(self.device), self.y[rows].to(self.device)
        if self._x is None:
            self._place()
        start, end = self._at[cid]
        return self._x[start:end], self._y[start:end]

    def source(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The arrays `index` points into: the resident copy, or the dataset's own."""
        if not self.resident:
            return self.x, self.y
        if self._x is None:
            self._place()
        return self._x, self._y

    def index(self, cid: int) -> torch.Tensor:
        """The client's rows as indices into `source()` (on the CPU)."""
        if not self.resident:
            return self.rows[cid]
        if self._x is None:
            self._place()
        start, end = self._at[cid]
        return torch.arange(start, end)


def autocast(device: torch.device, precision: str, cache: bool = True):
    """The context that runs forward passes and losses at `precision` ("fp32": none); `cache`: autocast's cache of
    cast weights (off for a step captured as a CUDA graph)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def check_precision(device: torch.device, precision: str) -> str | None:
    """Why `precision` cannot run on `device` (None when it can)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return (f"training.precision = 'bf16' needs a GPU with bfloat16 ({torch.cuda.get_device_name(device)} has "
                "none); set training.precision = 'fp32'")
    return None


def cuda_determinism() -> None:
    """Make CUDA kernels reproducible from run to run (called by every host on a GPU, before it computes):
    cuBLAS gets a fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when its handle is made), cuDNN picks
    deterministic algorithms and no benchmark-timed ones, and torch warns (does not fail) on an op that has
    no deterministic kernel. TF32 is left at torch's defaults (cuDNN convolutions in TF32, matmuls in fp32):
    it changes precision, not reproducibility; benchmarks/gpu_check.py measures both."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


# glibc's malloc, left to itself, gives a block above 128 KiB (a threshold that rises, to at most 32 MiB, as such
# blocks are freed) a mapping of its own, returned to the OS when freed, and trims the heap's top beyond twice that.
# So the batched path's per-step tensors (20 Fashion-MNIST MLP clients: the first layer's stacked gradient alone is
# 12.5 MB) were faulted in and zeroed anew at every step, and such a round took 1.2-1.3x as long (benchmarks/
# README.md, "The batched steps' memory"). With both thresholds at this size, smaller blocks come from the heap and
# up to this much freed memory stays with the process for the next step.
KEEP_FREED_BYTES = 256 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Have this process's malloc keep up to `KEEP_FREED_BYTES` of freed memory for reuse (process-wide, once; called
    by a host before its first batched step on the CPU). A run's peak memory measured the same; between rounds the
    process stays nearer its peak. Whether it took effect: False off glibc (musl, macOS), where nothing is changed."""
    global _kept
    if _kept is None:
        _kept = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return _kept
            # setting either turns glibc's own adjustment of both off, so both are set
            _kept = all(mallopt(option, KEEP_FREED_BYTES) == 1 for option in (_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD))
    return _kept
