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
from fmlray.algorithms import Algorithm, build_algorithm, convolves, evaluate, train_client
from fmlray.config import Config
from fmlray.data import Dataset, Partition
from fmlray.engine.batched import NOT_FINITE, Batcher, Outcome
from fmlray.engine.device import Rows, autocast, check_precision, cuda_determinism
from fmlray.engine.state import (STORES, DiskStore, Layout, MemoryStore, Part, RowRef, Workspace, crc, open_rows,
                                 write_rows)
from fmlray.engine.tasks import ClientTask, arch_name, build_arch
from fmlray.errors import FmlrayError, ResourceError, TrainingError
from fmlray.models import build_model
from fmlray.optim import Optimizer, make_optimizer
from fmlray.seeding import BATCH_ORDER, GLOBAL_INIT, LOCAL_INIT, derive_seed
from fmlray.tasks import of_group


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
    """The round-0 global state: the keys the algorithm shares of the seeded global model, or None for
    algorithms that share nothing."""
    algo = build_algorithm(cfg.algorithm, cfg.run.rounds)
    if algo.shares is None:
        return None
    model = seeded_model(cfg.model.meme, dataset, derive_seed(cfg.run.seed, GLOBAL_INIT))
    state = state_of(model)
    return {k: state[k] for k in algo.shared_keys(model)}


def evaluate_global(cfg: Config, dataset: Dataset, state: State | None) -> tuple[float, float] | None:
    """(loss, accuracy) of the global model on the global test set; None when there is no global model, or
    when it is only part of a model (FedPer's body, FedBN's non-BatchNorm layers, ...)."""
    if state is None:
        return None
    model = build_model(cfg.model.meme, dataset.input_shape, dataset.num_classes)
    if set(state) != set(model.state_dict()):
        return None
    load_state(model, state)
    return evaluate(model, shared_tensor(dataset.x_test), shared_tensor(dataset.y_test))


@dataclass
class Received:
    """The global state as tensors on a host's device, in the shared model's key order (checked once a round)."""

    keys: list[str]
    tensors: list[torch.Tensor]
    anchor: list[torch.Tensor] | None  # the global model's parameters in order, for penalties


@dataclass
class GlobalSpec:
    """What the global state holds for this algorithm: its keys and shapes, and whether it is a whole model."""

    shapes: dict[str, tuple[int, ...]]
    params: list[str]  # the global architecture's parameter keys, in order
    complete: bool

    @classmethod
    def of(cls, algo: Algorithm, model: nn.Module) -> "GlobalSpec":
        state = model.state_dict()
        keys = algo.shared_keys(model)
        return cls({k: tuple(state[k].shape) for k in keys}, [k for k, _ in model.named_parameters()],
                   len(keys) == len(state))


def private_layout(cfg: Config, algo: Algorithm, models: dict[str, nn.Module], archs: tuple[str, ...]) -> Layout:
    """Where a client's private state sits in its row: each of `algo`'s models (built as `models`, of
    architectures `archs`) keeps the keys it does not share and, if it receives nothing, its optimiser."""
    parts = []
    for m, arch in zip(algo.models, archs):
        keys = list(models[m.name].state_dict())
        if m.name == algo.shares:
            shared = set(algo.shared_keys(models[m.name]))
            keys = [k for k in keys if k not in shared]
        if keys:
            parts.append((arch, Part(m.name, models[m.name], tuple(keys), m.name != algo.shares)))
    name = "+".join(dict.fromkeys(arch for arch, _ in parts)) or "none"
    t = cfg.training
    return Layout(name, [p for _, p in parts], t.optimizer, t.momentum, tuple(algo.scalars))


def client_archs(cfg: Config, algo: Algorithm, local_model: str, outputs: int | None = None) -> tuple[str, ...]:
    """The architecture of each of `algo`'s models on a client whose group's local model is `local_model`, with
    `outputs` labels when its task has other than the dataset's classes (see `arch_name`)."""
    local = local_model if outputs is None or outputs == cfg.data.num_classes else arch_name(local_model, outputs)
    return tuple(local if m.arch == "client" else cfg.model.meme for m in algo.models)


def client_models(algo: Algorithm, archs: tuple[str, ...], dataset: Dataset) -> dict[str, nn.Module]:
    """A client's models by name, of the architectures `client_archs` gives (on the CPU, freshly initialised)."""
    return {m.name: build_arch(a, dataset) for m, a in zip(algo.models, archs)}


@dataclass
class Client:
    cid: int
    group: str
    local_model: str
    train_rows: torch.Tensor  # indices into the host's (shared, read-only) dataset arrays
    test_rows: torch.Tensor
    task: ClientTask | None = None  # its group's task; None: the dataset's classes


def shared_tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor view of a numpy array without copying, even when Ray's object store made it read-only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "array is not writable": nothing writes to it
        return torch.from_numpy(a)


class ClientHost:
    """Owns clients' rows and private state; trains and evaluates them in client-id order.

    Private state (what the algorithm keeps on the client: models or parts of them, optimisers, scalars) lives
    in a state store as one row per client that has trained (see fmlray.engine.state); one workspace (the
    algorithm's models) per layout is loaded from a row to train or evaluate a client and stored back after,
    so memory follows the clients that trained. The model that receives the global state gets it per client."""

    def __init__(self, cfg: Config, dataset: Dataset, partition: Partition, client_ids: list[int],
                 device: str = "cpu", store: str = "memory", state_dir: str | Path | None = None,
                 resident: bool | None = None):
        self.cfg = cfg
        self.dataset = dataset
        self.device = torch.device(device)
        if self.device.type == "cuda":
            cuda_determinism()
        if (problem := check_precision(self.device, cfg.training.precision)) is not None:
            raise ResourceError(problem)
        self.algo = build_algorithm(cfg.algorithm, cfg.run.rounds)
        # Zero-copy views of the dataset; a client's rows are gathered when it trains or is evaluated, or
        # (`resident`, the default off the CPU) every hosted client's rows are copied to the device once.
        self.x, self.y = shared_tensor(dataset.x_train), shared_tensor(dataset.y_train)
        self.x_test, self.y_test = shared_tensor(dataset.x_test), shared_tensor(dataset.y_test)
        resident = self.device.type != "cpu" if resident is None else resident
        self.train_rows = Rows(self.x, self.y, self.device, resident)
        self.test_rows = Rows(self.x_test, self.y_test, self.device, resident)
        self.batcher = Batcher(self)
        self.partition = partition
        self.clients: dict[int, Client] = {}
        self.store_kind = store
        self.state_dir = Path(state_dir) if state_dir is not None else None
        if store == "disk" and self.state_dir is None:
            raise ValueError("a disk state store needs a state_dir")
        self.workspaces: dict[tuple[str, ...], Workspace] = {}  # by the architectures of the algorithm's models
        self.stores: dict[tuple[str, ...], MemoryStore | DiskStore] = {}  # the same keys, where a row holds something
        self.dirty: set[int] = set()  # clients whose row changed since the last checkpoint
        self.state_seconds = 0.0  # spent loading and storing rows (reported per client, for benchmarks)
        self.init_seconds = 0.0  # spent drawing the initial models of clients without a row (the same)
        self._then: dict[int, int] = {}  # in the round's order: the client after each (its row is read ahead)
        self._lendable: set[tuple[str, ...]] = set()  # workspaces that train in their store's buffers
        self._lent: dict[tuple[str, ...], int] = {}  # workspace → the client whose lent buffer it is bound to
        if store == "disk":
            try:  # here, not at the first store: an unusable folder is an error at start
                self.state_dir.mkdir(parents=True, exist_ok=True)
                probe = self.state_dir / ".writable"
                probe.touch()
                probe.unlink()  # a user's state_dir keeps the rows, not the probe
            except OSError as exc:
                raise ResourceError(f"cannot write client state under {self.state_dir} ({exc.strerror}); "
                                    "set engine.state_dir to a writable node-local folder") from None
        self.add_clients(client_ids)
        self._spec: GlobalSpec | None = None  # what the global state holds (made on first use)
        self._sent: dict[tuple[str, ...], list[torch.Tensor]] = {}  # per workspace: its shared model's shared tensors

    def add_clients(self, client_ids: list[int], folder: Path | None = None, refs: dict | None = None) -> None:
        """Host these clients (e.g. adopted from a lost actor), with their rows from a checkpoint if given."""
        groups, group_of = self.cfg.clients.groups, self.cfg.clients.group_of_clients()
        tasks = [ClientTask.of(of_group(self.cfg, g), self.device) for g in groups]
        for cid in sorted(client_ids):
            g = groups[group_of[cid]]
            c = self.clients[cid] = Client(cid, g.name, g.local_model, torch.from_numpy(self.partition.train[cid]),
                                           torch.from_numpy(self.partition.test[cid]), tasks[group_of[cid]])
            self.train_rows.add(cid, c.train_rows)
            self.test_rows.add(cid, c.test_rows)
        if refs:
            self.restore_rows(folder, refs)

    # -- private state: workspaces and stores ------------------------------------------------------

    def _archs(self, c: Client) -> tuple[str, ...]:
        """The architecture of each of the algorithm's models for client `c`: its workspace's key."""
        return client_archs(self.cfg, self.algo, c.local_model, c.task and c.task.task.num_labels)

    def _workspace(self, key: tuple[str, ...]) -> Workspace:
        ws = self.workspaces.get(key)
        if ws is None:
            models = {n: m.to(self.device) for n, m in client_models(self.algo, key, self.dataset).items()}
            layout = private_layout(self.cfg, self.algo, models, key)
            ws = self.workspaces[key] = Workspace(layout, models, {n: self._optimizer(m) for n, m in models.items()},
                                                  self.device)
            if layout.slots:
                self.stores[key] = STORES[self.store_kind](layout, self.state_dir)
                if self.store_kind == "disk" and ws.bindable():
                    self._lendable.add(key)
            if self.algo.shares is not None:
                live = models[self.algo.shares].state_dict()  # detached views of the live parameters and buffers
                self._sent[key] = [live[k] for k in self.algo.shared_keys(models[self.algo.shares])]
        return ws

    def _seeds(self, c: Client) -> dict[str, int]:
        """Where each private model of a never-trained client starts: "seed" models from (seed, client) (the
        first as FML's local model always has), "global" ones as the round-0 global model."""
        seed, out, drawn = self.cfg.run.seed, {}, 0
        for m in self.algo.models:
            if m.init == "global":
                out[m.name] = derive_seed(seed, GLOBAL_INIT)
            else:
                out[m.name] = derive_seed(seed, LOCAL_INIT, c.cid, *([drawn] if drawn else []))
                drawn += 1
        return out

    def _private(self, c: Client) -> Workspace:
        """The workspace of `c`'s architectures holding `c`'s private state."""
        key = self._archs(c)
        ws = self._workspace(key)
        store = self.stores.get(key)
        if ws.client != c.cid:
            started = time.perf_counter()
            if key in self._lendable:
                # A disk store on the CPU lends the buffer the row was read (ahead) into, and the workspace
                # trains in it: no copy on load or store (see Workspace.bind); the buffer goes back in `_keep`.
                self._release(key)
                row, filled = store.lend(c.cid)
                ws.adopt(row, filled, self._seeds(c), c.cid, self.algo.scalars)
                self._lent[key] = c.cid
                row = row if filled else None
            else:
                row = None if store is None else store.get(c.cid)
                ws.load(row, self._seeds(c), c.cid, self.algo.scalars)
                if store is not None:
                    store.done(c.cid)
            if (after := self._then.get(c.cid)) is not None:
                self.prefetch(after)
            if row is None:
                self.init_seconds += time.perf_counter() - started
            else:
                self.state_seconds += time.perf_counter() - started
        return ws

    def prefetch(self, cid: int) -> None:
        """Have `cid`'s row read ahead while the host computes (a disk store's rows come from its thread)."""
        store = self.stores.get(self._archs(self.clients[cid]))
        if store is not None:
            store.prefetch(cid)

    def _keep(self, c: Client) -> None:
        """Store the workspace's state (just trained) as `c`'s row."""
        key = self._archs(c)
        store = self.stores.get(key)
        if store is None:
            return
        started = time.perf_counter()
        ws = self.workspaces[key]
        if self._lent.get(key) == c.cid:
            ws.store(ws.bound)
            del self._lent[key]
            store.release(c.cid, write=True)
            ws.unbind()
        else:
            ws.store(store.put(c.cid))
            store.done(c.cid)
        self.dirty.add(c.cid)
        self.state_seconds += time.perf_counter() - started

    def _release(self, key: tuple[str, ...]) -> None:
        """Give back the buffer the workspace of `key` was lent, unwritten (its client's row stays as it was)."""
        cid = self._lent.pop(key, None)
        if cid is not None:
            self.stores[key].release(cid, write=False)
            self.workspaces[key].unbind()

    def _release_all(self) -> None:
        for key in list(self._lent):
            self._release(key)

    def modules(self) -> list[nn.Module]:
        """Every model this host holds (its workspaces'; none before its first round)."""
        return [m for ws in self.workspaces.values() for m in ws.models.values()]

    def _forget_workspaces(self) -> None:
        self._release_all()
        for ws in self.workspaces.values():
            ws.client = None

    def stored(self) -> int:
        """How many clients have a row (have trained) on this host."""
        return sum(len(s) for s in self.stores.values())

    def give(self, client_ids: list[int]) -> dict[int, np.ndarray]:
        """Hand these clients' private state to another host (`take`): their rows, copied, by client (one
        without a row has none), dropped here. The clients stay registered: they may come back."""
        self._forget_workspaces()  # no workspace may think it still holds one of them
        out = {}
        for cid in sorted(client_ids):
            store = self.stores.get(self._archs(self.clients[cid]))
            if store is not None and cid in store:
                out[cid] = np.array(store.get(cid))
                store.done(cid)
                store.drop(cid)
            self.dirty.discard(cid)
        return out

    def take(self, client_ids: list[int], rows: dict[int, np.ndarray]) -> None:
        """Host these clients from now on, with the rows another host gave (`give`); each is written into
        the next checkpoint from here."""
        self._forget_workspaces()
        self.add_clients([c for c in client_ids if c not in self.clients])
        for cid in sorted(rows):
            key = self._archs(self.clients[cid])
            self._workspace(key)
            store = self.stores[key]
            store.put(cid)[:] = rows[cid]
            store.done(cid)
            self.dirty.add(cid)

    def write_checkpoint(self, folder: Path, tag: str) -> list[dict]:
        """Write the rows changed since the last checkpoint, one `.npy` per architecture, into `folder`
        (under a temporary name, then renamed); return their manifest entries."""
        self._release_all()
        entries = []
        for key, store in sorted(self.stores.items()):
            cids = sorted(c for c in self.dirty if c in store and self._archs(self.clients[c]) == key)
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
        self._release_all()
        by_file: dict[str, list[tuple[int, RowRef]]] = {}
        for cid, ref in refs.items():
            if cid in self.clients:
                by_file.setdefault(ref.file, []).append((cid, ref))
        for file, items in sorted(by_file.items()):
            rows = open_rows(Path(folder) / file)
            for cid, ref in items:
                key = self._archs(self.clients[cid])
                self._workspace(key)
                store = self.stores.get(key)
                if store is None:
                    raise FmlrayError(f"{Path(folder) / file} holds private state for client {cid}, but this config's "
                                      f"algorithm keeps none: the checkpoint belongs to another config")
                if ref.row >= len(rows):
                    raise FmlrayError(f"{Path(folder) / file} is damaged (it has no row {ref.row} for client {cid}); "
                                      "the checkpoint cannot be resumed")
                n = store.layout.nbytes  # rows are padded to whole pages (older checkpoints' are not)
                if ref.layout != store.layout.name or rows.shape[1] not in (n, store.layout.padded):
                    raise FmlrayError(f"{Path(folder) / file} holds client {cid}'s state for layout {ref.layout}, "
                                      f"but this config's is {store.layout.name}: the checkpoint belongs "
                                      "to another model or config")
                dst = store.put(cid)
                dst[:] = rows[ref.row, :n]
                if crc(dst) != ref.crc32:
                    raise FmlrayError(f"{Path(folder) / file} is damaged (client {cid}'s row fails its checksum); "
                                      "resume from another copy or start the run again")
                store.done(cid)
            del rows
        self._forget_workspaces()

    def close(self) -> None:
        """Drop every store (a disk store deletes its file)."""
        self._release_all()
        for store in self.stores.values():
            store.close()
        self.stores.clear()
        self.workspaces.clear()

    def _rows(self, c: Client, test: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A client's rows (kept where the host trains), labelled in its task's space."""
        x, y = (self.test_rows if test else self.train_rows).get(c.cid)
        return x, (y if c.task is None else c.task.label_of[y])  # both on the host's device

    def _global_tensors(self, state: State) -> Received:
        """The global `state` as tensors in the shared model's key order, on this host's device; checked and
        converted once a round, not once a client."""
        if self._spec is None:
            self._spec = GlobalSpec.of(self.algo, build_model(self.cfg.model.meme, self.dataset.input_shape,
                                                              self.dataset.num_classes))
        spec, meme = self._spec, self.cfg.model.meme
        if set(state) != set(spec.shapes):
            raise TrainingError(f"the global state's keys do not match model {meme!r}")
        tensors = []
        for k, shape in spec.shapes.items():
            if tuple(state[k].shape) != shape:
                raise TrainingError(f"global state entry {k!r} has shape {tuple(state[k].shape)}, "
                                    f"model {meme!r} wants {shape}")
            tensors.append(shared_tensor(state[k]).to(self.device))
        anchor = None
        if self.algo.penalties:
            at = dict(zip(spec.shapes, tensors))
            anchor = [at[k] for k in spec.params]  # algorithms with penalties share every key
        return Received(list(spec.shapes), tensors, anchor)

    def _receive(self, c: Client, glob: Received) -> None:
        """Put the global state into the shared model of `c`'s workspace (one fused copy, not load_state_dict)."""
        torch._foreach_copy_(self._sent[self._archs(c)], glob.tensors)

    def _optimizer(self, model: nn.Module) -> Optimizer:
        t = self.cfg.training
        return make_optimizer(model.parameters(), name=t.optimizer, lr=t.lr, momentum=t.momentum,
                              weight_decay=t.weight_decay)

    def train(self, rnd: int, client_ids: list[int], global_state: State | None,
              tick: Callable[[int], None] | None = None) -> tuple[PartialSum | None, list[dict]]:
        """Train the given clients for round `rnd`; return the weighted partial sum of what they share, and
        their metrics. `tick(n)`, if given, hears how many of them are done after each one (progress)."""
        glob = None if global_state is None else self._global_tensors(global_state)
        total, results = None, []
        # Units of work in client-id order: one client (sequential), or a run of clients of one workspace
        # trained as one batched model (see fmlray.engine.batched); partial sums still add in client-id order.
        units = self.batcher.units(sorted(client_ids), glob is not None)
        order = [cid for cids, _ in units for cid in cids]
        self._then = dict(zip(order, order[1:]))
        for cids, batched in units:
            clients = [self.clients[cid] for cid in cids]
            started, self.state_seconds, self.init_seconds = time.perf_counter(), 0.0, 0.0
            summed = None
            if batched:
                self._release_all()  # the batched path reads and writes rows through the store itself
                with _stage(clients[0], rnd, f"batched training of clients {cids[0]}..{cids[-1]}"):
                    outcomes, summed = self.batcher.train(clients, rnd, glob)
            else:
                outcomes = [self._attempt(clients[0], rnd, glob)]
            seconds = time.perf_counter() - started
            for c, (metrics, sent, error, share) in zip(clients, outcomes):
                if error is not None:  # a bad update is left out of the average, not fatal
                    self._forget_workspaces()  # and out of the client's private state: its row stays as it was
                    results.append({"client": c.cid, "samples": len(c.train_rows),
                                    "excluded": f"{_stage(c, rnd, 'training').where}: {error}",
                                    "seconds": seconds * share})
                    continue
                if sent is not None:
                    if total is None:
                        total = _Sum(dict(zip(glob.keys, sent)))
                    total.add(sent, self.algo.server.weight(len(c.train_rows)))
                results.append({"client": c.cid, "samples": len(c.train_rows), "seconds": seconds * share,
                                "state_seconds": self.state_seconds * share,
                                "init_seconds": self.init_seconds * share, **metrics})
            if summed is not None:  # a batched unit's kept clients, summed (in id order with the rest: units are runs)
                if total is None:
                    total = _Sum(dict(zip(glob.keys, summed.tensors)))
                total.add(summed.tensors, summed.weight, summed.count)
            if tick is not None:
                tick(len(results))
        return (None if total is None else total.partial()), results

    def _attempt(self, c: Client, rnd: int, glob: Received | None) -> Outcome:
        """Train one client on its own (the sequential path); a TrainingError leaves it out, with why."""
        with _stage(c, rnd, "training"):  # names the client in any other error
            try:
                metrics, sent = self._train_one(c, rnd, glob)
            except TrainingError as exc:
                return Outcome(None, None, str(exc), 1.0)
        return Outcome(metrics, sent, None, 1.0)

    def _train_one(self, c: Client, rnd: int, glob: Received | None) -> tuple[dict, list[torch.Tensor] | None]:
        ws = self._private(c)
        if glob is not None:
            self._receive(c, glob)
            ws.opts[self.algo.shares].state.clear()  # as a new optimiser would be: it starts fresh every round
        t = self.cfg.training
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, BATCH_ORDER, rnd, c.cid))
        x, y = self._rows(c)
        metrics = train_client(self.algo, ws.models, ws.opts, x, y, epochs=t.epochs, batch_size=t.batch_size,
                               generator=gen, rnd=rnd, anchor=None if glob is None else glob.anchor,
                               scalars=ws.scalars, task=c.task and c.task.members,
                               autocast=lambda: autocast(self.device, t.precision))
        for part in ws.layout.parts:
            ws.opts[part.name].zero_grad()  # the next client's first step drops them anyway
        sent = None if glob is None else self._sent[self._archs(c)]
        if sent is not None and not _finite(sent):  # before _keep: a left-out update leaves the row as it was
            raise TrainingError(NOT_FINITE.format(self.algo.shares))
        self._keep(c)
        return metrics, sent

    def evaluate(self, global_state: State | None, client_ids: list[int] | None = None,
                 tick: Callable[[int], None] | None = None) -> list[dict]:
        """Each client's models the algorithm names (its personalised "local" one first) on the client's own
        test split, and the global model there too when the algorithm shares a whole model (`tick` as in train)."""
        glob = None if global_state is None else self._global_tensors(global_state)
        rows = []
        order = sorted(self.clients if client_ids is None else client_ids)
        self._then = dict(zip(order, order[1:]))
        for cid in order:
            c = self.clients[cid]
            row = {"client": c.cid, "test_samples": len(c.test_rows)}
            self.state_seconds = self.init_seconds = 0.0
            with _stage(c, None, "evaluation"):
                x, y = self._rows(c, test=True)
                ws = self._private(c)
                if glob is not None:
                    self._receive(c, glob)
                for m in ws.models.values():
                    m.eval()
                task = c.task and c.task.members  # every model is tested in the client's task space

                def predict(xb, name):
                    return self.algo.logits(ws.models, ws.scalars, xb, (name,), task)[name]

                cl = convolves(ws.models.values())
                for name in self.algo.evaluates:
                    row[f"{name}_loss"], row[f"{name}_accuracy"] = evaluate(lambda xb: predict(xb, name), x, y,
                                                                            channels_last=cl)
                if glob is not None and self._spec.complete:
                    row["global_loss"], row["global_accuracy"] = evaluate(
                        lambda xb: predict(xb, self.algo.shares), x, y, channels_last=cl)
            row["state_seconds"], row["init_seconds"] = self.state_seconds, self.init_seconds
            rows.append(row)
            if tick is not None:
                tick(len(rows))
        self._release_all()
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

    def add(self, tensors, weight: float, count: int | None = None) -> None:
        """One client's tensors, of weight `weight`; or (`count` given) `count` clients' tensors already weighted
        and summed, of weight `weight` together."""
        tensors = list(tensors)
        floats = [(s, t) for s, t, f in zip(self.sums, tensors, self.is_float) if f]
        torch._foreach_add_([s for s, _ in floats], [t for _, t in floats], alpha=1.0 if count else float(weight))
        for s, t, f in zip(self.sums, tensors, self.is_float):
            if not f:
                torch.maximum(s, t, out=s)
        self.weight += float(weight)
        self.count += count or 1

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
