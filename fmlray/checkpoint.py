"""Checkpoints: one `.npz` (numpy arrays only, read with allow_pickle=False), replaced atomically.

It holds the round, the global model, every client's private state (local model and optimiser)
and the metric rows so far. There is no RNG state to save: every draw derives from
(seed, round, client), so the round number is the RNG state.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmlray.aggregate import State
from fmlray.errors import FmlrayError

FILE = "checkpoint.npz"
VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    round: int
    global_state: State | None
    private: State  # see ClientHost.private_state
    rows: list[dict]


def _text(obj) -> np.ndarray:
    return np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)


def save(run_dir: Path, ckpt: Checkpoint) -> Path:
    """Write to a temporary name, flush to disk, then rename over the previous checkpoint."""
    path = run_dir / FILE
    tmp = run_dir / f".{FILE}.tmp"
    arrays = {"meta": _text({"version": VERSION, "round": ckpt.round, "has_global": ckpt.global_state is not None}),
              "rows": _text(ckpt.rows)}
    arrays.update({f"global/{k}": v for k, v in (ckpt.global_state or {}).items()})
    arrays.update({f"client/{k}": v for k, v in ckpt.private.items()})
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(run_dir: Path) -> Checkpoint:
    """Read a checkpoint; any damage is a one-line FmlrayError, never an unpickled object."""
    path = Path(run_dir) / FILE
    if not path.is_file():
        raise FmlrayError(f"{run_dir} has no {FILE}: it is not a resumable fmlray run")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            rows = json.loads(z["rows"].tobytes())
            glob = {k[len("global/"):]: z[k] for k in z.files if k.startswith("global/")}
            private = {k[len("client/"):]: z[k] for k in z.files if k.startswith("client/")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as exc:
        raise FmlrayError(f"{path} is damaged ({type(exc).__name__}); delete {run_dir} and run again") from None
    if meta.get("version") != VERSION or not isinstance(meta.get("round"), int):
        raise FmlrayError(f"{path} is not a checkpoint this fmlray can read (version {meta.get('version')})")
    return Checkpoint(meta["round"], glob if meta["has_global"] else None, private, rows)
