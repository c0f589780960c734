"""`ClientHost`: a set of clients with their data and private state, and what they do in a round.

Both engines run this same class — the serial engine as one host of every client, the Ray
engine as one host per client actor — so their results can only differ by float rounding.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fmlray.aggregate import PartialSum, State
from fmlray.algorithms import build_algorithm, evaluate, make_optimizer, train_client
from fmlray.config import Config
from fmlray.data import Dataset, Partition
from fmlray.errors import FmlrayError, ResourceError, TrainingError
from fmlray.engine.state import STORES, DiskStore, Layout, MemoryStore, RowRef, Workspace, crc, open_rows, write_rows
from fmlray.models import build_model
from fmlray.seeding import BATCH_ORDER, GLOBAL_INIT, LOCAL_INIT, derive_seed


def state_of(model: nn.Module) -> State:
    """A module's state as numpy arrays (copies: the module goes on training)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_state(model: nn.Module, state: State) -> None:
    """Copy numpy arrays (possibly read-only views of Ray's object store) into a module."""
    model.load_state_dict({k: shared_tensor(v) for k, v in state.items()})


def seeded_model(name: str, dataset: Dataset, seed: int) -> nn.Module:
    """`build_model` with its initial weights drawn from `seed` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(name, dataset.input_shape, dataset.num_classes)


def initial_global_state(cfg: Config, dataset: Dataset) -> State | None:
    """The round-0 global (meme) model, or None for algorithms that share nothing."""
    if not build_algorithm(cfg.algorithm, cfg.run.rounds).shares_meme:
        return None
    return state_of(seeded_model(cfg.model.meme, dataset, derive_seed(cfg.run.seed, GLOBAL_INIT)))


def evaluate_global(cfg: Config, dataset: Dataset, state: State | None) -> tuple[float, float] | None:
    """(loss, accuracy) of the global model on the global test set."""
    if state is None:
        return None
    model = build_model(cfg.model.meme, dataset.input_shape, dataset.num_classes)
    load_state(model, state)
    return evaluate(model, shared_tensor(dataset.x_test), shared_tensor(dataset.y_test))


@dataclass
class Client:
    cid: int
    group: str
    local_model: str
    train_rows: torch.Tensor  # indices into the host's (shared, read-only) dataset arrays
    test_rows: torch.Tensor


def shared_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor view of a numpy array without copying, even when Ray's object store made it read-only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "array is not writable": nothing writes to it
        return torch.from_numpy(a)


class ClientHost:
    """Owns clients' rows and private state; trains and evaluates them in client-id order.

    Private state (local model and optimiser) lives in a state store as one row per client that has
    trained (see fmlray.engine.state); one workspace model per architecture is loaded from a row to
    train or evaluate a client and stored back after, so memory follows the clients that trained."""

    def __init__(self, cfg: Config, dataset: Dataset, partition: Partition, client_ids: list[int],
                 device: str = "cpu", store: str = "memory", state_dir: str | Path | None = None):
        self.cfg = cfg
        self.dataset = dataset
        self.device = torch.device(device)
        self.algo = build_algorithm(cfg.algorithm, cfg.run.rounds)
        # Zero-copy views of the dataset; a client's rows are gathered when it trains or is evaluated.
        self.x, self.y = shared_tensor(dataset.x_train), shared_tensor(dataset.y_train)
        self.x_test, self.y_test = shared_tensor(dataset.x_test), shared_tensor(dataset.y_test)
        self.partition = partition
        self.clients: dict[int, Client] = {}
        self.store_kind = store
        self.state_dir = Path(state_dir) if state_dir is not None else None
        if store == "disk" and self.state_dir is None:
            raise ValueError("a disk state store needs a state_dir")
        self.workspaces: dict[str, Workspace] = {}  # by architecture
        self.stores: dict[str, MemoryStore | DiskStore] = {}
        self.dirty: set[int] = set()  # clients whose row changed since the last checkpoint
        self.state_seconds = 0.0  # spent loading and storing rows (reported per client, for benchmarks)
        if store == "disk":
            try:  # here, not at the first store: an unusable folder is an error at start
                self.state_dir.mkdir(parents=True, exist_ok=True)
                (self.state_dir / ".writable").touch()
            except OSError as exc:
                raise ResourceError(f"cannot write client state under {self.state_dir} ({exc.strerror}); "
                                    "set engine.state_dir to a writable node-local folder") from None
        self.add_clients(client_ids)
        self._meme: nn.Module | None = None  # one workspace, loaded with the global state per client

    def add_clients(self, client_ids: list[int], folder: Path | None = None, refs: dict | None = None) -> None:
        """Host these clients (e.g. adopted from a lost actor), with their rows from a checkpoint if given."""
        groups, group_of = self.cfg.clients.groups, self.cfg.clients.group_of_clients()
        for cid in sorted(client_ids):
            g = groups[group_of[cid]]
            self.clients[cid] = Client(cid, g.name, g.local_model, torch.from_numpy(self.partition.train[cid]),
                                       torch.from_numpy(self.partition.test[cid]))
        if refs:
            self.restore_rows(folder, refs)

    # -- private state: workspaces and stores ------------------------------------------------------

    def _workspace(self, arch: str) -> Workspace:
        ws = self.workspaces.get(arch)
        if ws is None:
            model = build_model(arch, self.dataset.input_shape, self.dataset.num_classes).to(self.device)
            t = self.cfg.training
            ws = self.workspaces[arch] = Workspace(Layout(arch, model, t.optimizer, t.momentum), model,
                                                   self._optimizer(model), self.device)
            self.stores[arch] = STORES[self.store_kind](ws.layout, self.state_dir)
        return ws

    def _local(self, c: Client) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The workspace of `c`'s architecture holding `c`'s private state."""
        ws = self._workspace(c.local_model)
        if ws.client != c.cid:
            started = time.perf_counter()
            store = self.stores[c.local_model]
            ws.load(store.get(c.cid), derive_seed(self.cfg.run.seed, LOCAL_INIT, c.cid), c.cid)
            store.done(c.cid)
            self.state_seconds += time.perf_counter() - started
        return ws.model, ws.opt

    def _keep(self, c: Client) -> None:
        """Store the workspace's state (just trained) as `c`'s row."""
        started = time.perf_counter()
        store = self.stores[c.local_model]
        self.workspaces[c.local_model].store(store.put(c.cid))
        store.done(c.cid)
        self.dirty.add(c.cid)
        self.state_seconds += time.perf_counter() - started

    def _forget_workspaces(self) -> None:
        for ws in self.workspaces.values():
            ws.client = None

    def stored(self) -> int:
        """How many clients have a row (have trained) on this host."""
        return sum(len(s) for s in self.stores.values())

    def write_checkpoint(self, folder: Path, tag: str) -> list[dict]:
        """Write the rows changed since the last checkpoint, one `.npy` per architecture, into `folder`
        (under a temporary name, then renamed); return their manifest entries."""
        entries = []
        for arch, store in sorted(self.stores.items()):
            cids = sorted(c for c in self.dirty if c in store and self.clients[c].local_model == arch)
            if not cids:
                continue
            name = f"{tag}-{store.layout.name}.npy"
            crcs = write_rows(Path(folder) / name, store, cids)
            entries.append({"file": name, "layout": store.layout.name, "row_bytes": store.layout.nbytes,
                            "cids": cids, "crc32": crcs})
        self.dirty.clear()
        return entries

    def restore_rows(self, folder: Path, refs: dict[int, RowRef]) -> None:
        """Load these clients' rows from checkpoint files in `folder` (checking each row's checksum)."""
        by_file: dict[str, list[tuple[int, RowRef]]] = {}
        for cid, ref in refs.items():
            if cid in self.clients:
                by_file.setdefault(ref.file, []).append((cid, ref))
        for file, items in sorted(by_file.items()):
            rows = open_rows(Path(folder) / file)
            for cid, ref in items:
                arch = self.clients[cid].local_model
                self._workspace(arch)
                store = self.stores[arch]
                if ref.row >= len(rows):
                    raise FmlrayError(f"{Path(folder) / file} is damaged (it has no row {ref.row} for client {cid}); "
                                      "the checkpoint cannot be resumed")
                if ref.layout != store.layout.name or rows.shape[1] != store.layout.nbytes:
                    raise FmlrayError(f"{Path(folder) / file} holds client {cid}'s state for layout {ref.layout}, "
                                      f"but this config's {arch} is {store.layout.name}: the checkpoint belongs "
                                      "to another model or config")
                dst = store.put(cid)
                dst[:] = rows[ref.row]
                if crc(dst) != ref.crc32:
                    raise FmlrayError(f"{Path(folder) / file} is damaged (client {cid}'s row fails its checksum); "
                                      "resume from another copy or start the run again")
                store.done(cid)
            del rows
        self._forget_workspaces()

    def close(self) -> None:
        """Drop every store (a disk store deletes its file)."""
        for store in self.stores.values():
            store.close()
        self.stores.clear()
        self.workspaces.clear()

    def _rows(self, c: Client, test: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if test:
            return self.x_test[c.test_rows].to(self.device), self.y_test[c.test_rows].to(self.device)
        return self.x[c.train_rows].to(self.device), self.y[c.train_rows].to(self.device)

    def _global_tensors(self, state: State) -> list[torch.Tensor]:
        """The global `state` as tensors in the meme workspace's key order (built on first use), on this
        host's device; checked and converted once a round, not once a client."""
        if self._meme is None:
            self._meme = build_model(self.cfg.model.meme, self.dataset.input_shape, self.dataset.num_classes)
            self._meme.to(self.device)
            self._meme_state = self._meme.state_dict()  # detached views of the live parameters and buffers
            self._meme_opt = self._optimizer(self._meme)
        if set(state) != set(self._meme_state):
            raise TrainingError(f"the global state's keys do not match model {self.cfg.model.meme!r}")
        tensors = []
        for k, live in self._meme_state.items():
            if tuple(state[k].shape) != tuple(live.shape):
                raise TrainingError(f"global state entry {k!r} has shape {tuple(state[k].shape)}, "
                                    f"model {self.cfg.model.meme!r} wants {tuple(live.shape)}")
            tensors.append(shared_tensor(state[k]).to(self.device))
        return tensors

    def _load_meme(self, global_tensors: list[torch.Tensor]) -> nn.Module:
        """The meme workspace holding the global model (one fused copy, not load_state_dict)."""
        torch._foreach_copy_(list(self._meme_state.values()), global_tensors)
        return self._meme

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        t = self.cfg.training
        return make_optimizer(model.parameters(), name=t.optimizer, lr=t.lr, momentum=t.momentum,
                              weight_decay=t.weight_decay)

    def train(self, rnd: int, client_ids: list[int], global_state: State | None,
              tick: Callable[[int], None] | None = None) -> tuple[PartialSum | None, list[dict]]:
        """Train the given clients for round `rnd`; return their memes' weighted partial sum and metrics.
        `tick(n)`, if given, hears how many of them are done after each one (progress)."""
        shared = None if global_state is None else self._global_tensors(global_state)
        total, results = None, []
        for cid in sorted(client_ids):
            c = self.clients[cid]
            started, self.state_seconds = time.perf_counter(), 0.0
            try:
                with _stage(c, rnd, "training"):
                    metrics, meme = self._train_one(c, rnd, shared)
                    if meme is not None and not _finite(self._meme_state.values()):
                        raise TrainingError("the meme's parameters are not finite (or beyond ~1e19)")
            except TrainingError as exc:  # a bad update is left out of the average, not fatal
                self._forget_workspaces()  # and out of the client's private state: its row stays as it was
                results.append({"client": cid, "samples": len(c.train_rows), "excluded": str(exc),
                                "seconds": time.perf_counter() - started})
                if tick is not None:
                    tick(len(results))
                continue
            if meme is not None:
                weight = len(c.train_rows) if self.cfg.algorithm.weighting == "samples" else 1.0
                if total is None:
                    total = _Sum(self._meme_state)
                total.add(self._meme_state.values(), weight)
            results.append({"client": cid, "samples": len(c.train_rows), "seconds": time.perf_counter() - started,
                            "state_seconds": self.state_seconds, **metrics})
            if tick is not None:
                tick(len(results))
        return (None if total is None else total.partial()), results

    def _train_one(self, c: Client, rnd: int, shared: list[torch.Tensor] | None) -> tuple[dict, nn.Module | None]:
        models, opts, anchor = {}, {}, None
        if self.algo.has_local:
            models["local"], opts["local"] = self._local(c)
        if self.algo.shares_meme:
            meme = models["meme"] = self._load_meme(shared)
            self._meme_opt.state.clear()  # as a new optimiser would be: the meme's starts fresh every round
            opts["meme"] = self._meme_opt
            if self.algo.penalty is not None:
                anchor = [p.detach().clone() for p in meme.parameters()]
        t = self.cfg.training
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, BATCH_ORDER, rnd, c.cid))
        x, y = self._rows(c)
        metrics = train_client(self.algo, models, opts, x, y, epochs=t.epochs, batch_size=t.batch_size,
                               generator=gen, rnd=rnd, anchor=anchor)
        if "local" in opts:
            opts["local"].zero_grad(set_to_none=True)  # the next client's first step drops them anyway
            self._keep(c)
        return metrics, models.get("meme")

    def evaluate(self, global_state: State | None, client_ids: list[int] | None = None,
                 tick: Callable[[int], None] | None = None) -> list[dict]:
        """Each client's local model and the global model on the client's own test split (`tick` as in train)."""
        rows = []
        meme = None if global_state is None else self._load_meme(self._global_tensors(global_state))
        for cid in sorted(self.clients if client_ids is None else client_ids):
            c = self.clients[cid]
            row = {"client": c.cid, "test_samples": len(c.test_rows)}
            self.state_seconds = 0.0
            with _stage(c, None, "evaluation"):
                x, y = self._rows(c, test=True)
                if self.algo.has_local:
                    row["local_loss"], row["local_accuracy"] = evaluate(self._local(c)[0], x, y)
                if meme is not None:
                    row["global_loss"], row["global_accuracy"] = evaluate(meme, x, y)
            row["state_seconds"] = self.state_seconds
            rows.append(row)
            if tick is not None:
                tick(len(rows))
        return rows


def _finite(tensors) -> bool:
    """Whether the floating tensors' L2 norms are finite: NaN and inf entries make them NaN or inf.
    (The fused L2 norm is ~10x cheaper here than isfinite per tensor or the max-abs norm; its one
    false alarm, an entry beyond ~1e19 overflowing the float32 norm, is a diverged model too.)"""
    floats = [t for t in tensors if t.is_floating_point()]
    return bool(torch.stack(torch._foreach_norm(floats)).isfinite().all())


class _Sum:
    """A host's running Σ wᵢ·memeᵢ in float64 (max for integer buffers), as tensors on the host's device
    until the round ends: one fused add per client instead of a numpy copy of every entry."""

    def __init__(self, like: dict[str, torch.Tensor]):
        self.keys = list(like)
        self.is_float = [t.is_floating_point() for t in like.values()]
        self.sums = [torch.zeros_like(t, dtype=torch.float64) if f else t.clone()
                     for t, f in zip(like.values(), self.is_float)]
        self.weight, self.count = 0.0, 0

    def add(self, tensors, weight: float) -> None:
        tensors = list(tensors)
        floats = [(s, t) for s, t, f in zip(self.sums, tensors, self.is_float) if f]
        torch._foreach_add_([s for s, _ in floats], [t for _, t in floats], alpha=float(weight))
        for s, t, f in zip(self.sums, tensors, self.is_float):
            if not f:
                torch.maximum(s, t, out=s)
        self.weight += float(weight)
        self.count += 1

    def partial(self) -> PartialSum:
        return PartialSum({k: s.cpu().numpy() for k, s in zip(self.keys, self.sums)}, self.weight, self.count)


class _stage:
    """Name the client, round and stage in any error raised inside (the debug backend's promise)."""

    def __init__(self, c: Client, rnd: int | None, stage: str):
        self.where = f"client {c.cid} (group {c.group}){f', round {rnd}' if rnd else ''}, {stage}"

    def __enter__(self):
        return self

    def __exit__(self, tp, exc, tb):
        if isinstance(exc, FmlrayError):
            raise type(exc)(f"{self.where}: {exc}") from None
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            exc.add_note(f"in {self.where}")
        return False
