"""A group's clients trained as one batched model: their models stacked, one vmapped step for all of them.

For the small models federated simulations mostly use, one client's SGD step is tiny and much of it is
per-step overhead (on a CPU thread) or a sliver of a GPU. So a host trains the clients of a round that
share a workspace (the same architectures) together: each parameter and its momentum is stacked over the
K clients (a leading dimension), the forward pass is `torch.func.vmap` over `functional_call` of the
algorithm's own models, one backward gives every client's gradients, and SGD (momentum, weight decay, as
torch.optim.SGD computes it) is a few fused ops on the stacked tensors.

- Each client keeps its own batch order, drawn from (seed, round, client) exactly as the sequential loop
  draws it, and its own number of steps. Clients are sorted by their number of steps, longest first, so
  the clients still training at a step are a prefix of the stack: the step computes on that prefix and
  updates its parameters *and* momentum, and the clients that have finished are masked out of both
  (a slice, so neither their compute nor a `where` is paid).
- On a GPU the steps run on the whole stack instead, every step at the same shapes (finished clients and
  padding weigh 0 and keep their parameters and momentum), reading its batch and its step number from the
  device, so one CUDA graph, captured after the first step, replays every later one: a step becomes one
  launch instead of hundreds (`Batcher._whole_steps`; on an H200 a 20-client lenet5 round ran 3.3-3.5x
  faster than with the prefix steps launched op by op).
- Within a step, a client whose batch is shorter (the last of an epoch) is padded to the longest and its
  padded samples weigh 0 in its loss: the loss is taken per sample (the algorithm's loss on batches of one,
  vmapped) and averaged over the real samples. That is exact for a loss that is the batch mean of
  per-sample terms, as every algorithm's is; a host checks it once per workspace and falls back otherwise.
- What is not batched falls back to the sequential loop (`fmlray.algorithms.base.train_client`), saying
  why once per host: Adam, algorithms with their own forward or private scalars (APFL) or frozen layers
  (FedRep), and models with buffers (BatchNorm's running statistics).

The result equals the sequential loop's up to float rounding (batched matrix products sum in another
order); tests/unit/test_batched.py holds every algorithm that batches to it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fmlray.algorithms.base import Algorithm, batch_sizes, convolves
from fmlray.engine.device import autocast, keep_freed_memory
from fmlray.engine.state import _copy
from fmlray.seeding import BATCH_ORDER, derive_seed

if TYPE_CHECKING:
    from fmlray.engine.host import Client, ClientHost, Received

# `training.batching = "auto"` (benchmarks/results/batched-clients-2cpu-2026-11-26.md: 1 thread, FedAvg, batch 32):
# on the CPU a vmapped Linear is one batched matmul and wins (digits mlp: 2.0x at 20 clients, 2.9x at 100, but
# 0.8x at 2 and 1.0x at 4), while a vmapped convolution becomes a grouped one, slower than the loop on 28x28
# images (fmnist lenet5, cnn, cnn5: 0.66-0.90x) though not on 8x8 ones (digits lenet5 1.9x, cnn 1.4x).
# On a CUDA GPU one client's step is launch-bound whatever the model, so a batched step wins for convolutions too:
# one actor on a whole H100, 20 Fashion-MNIST clients, batched vs one after another: lenet5 FML 4.5x, FedAvg 4.9x,
# cnn5 FML 2.8x (benchmarks/results/gpu-batched-h100-2026-11-26.md; measured before the sequential loop stopped
# reading losses every step, which may take up to ~1.5x off its side; since the batched steps replay a CUDA
# graph, an H200 gave lenet5 FML 18.8x, FedAvg 15.2x, cnn5 FML 3.5x: results/gpu-check-h200-graphs-2026-11-28.md).
# Other devices: sequential.
AUTO_MIN_CLIENTS = 8
AUTO_MAX_CONV_PIXELS = 8 * 8
# Devices whose batched steps run on the whole stack at a fixed shape (`Batcher._whole_steps`): on a GPU that is
# what lets one CUDA graph replay every step; on the CPU the prefix is cheaper (finished clients cost nothing).
WHOLE_STACK = ("cuda",)


def auto_batches(models: list[nn.Module], input_shape: tuple[int, ...], device: torch.device, clients: int) -> bool:
    """Whether `training.batching = "auto"` trains `clients` clients of these models as one batched model."""
    if device.type not in ("cpu", "cuda") or clients < AUTO_MIN_CLIENTS:
        return False
    if device.type == "cuda":
        return True
    return not convolves(models) or (len(input_shape) == 3 and input_shape[1] * input_shape[2] <= AUTO_MAX_CONV_PIXELS)


class Outcome(NamedTuple):
    """What training one client gave: its metrics and shared tensors, or why it was left out."""

    metrics: dict | None
    sent: list[Tensor] | None  # the shared model's shared tensors (in the received state's key order)
    error: str | None
    share: float  # of its unit's time (batched clients split it by their steps)


class Summed(NamedTuple):
    """A batched unit's clients' shared tensors, summed with their weights."""

    tensors: list[Tensor]  # in the received state's key order
    weight: float
    count: int


NOT_FINITE = "the shared model {!r}'s parameters are not finite (or beyond ~1e19)"


class _Models(nn.Module):
    """An algorithm's models as one module, for functional_call: its forward gives their logits and penalties."""

    def __init__(self, algo: Algorithm, models: dict[str, nn.Module]):
        super().__init__()
        self.algo = algo
        self.models = nn.ModuleDict({n: models[n] for n in algo.trains})

    def forward(self, x: Tensor, anchor: list[Tensor] | None):
        logits = {n: self.models[n](x) for n in self.algo.trains}
        penalties = {n: p(self.models[n], anchor) for n, p in self.algo.penalties.items()}
        return logits, penalties


@dataclass
class _Plan:
    """How a workspace's parameters stack: names for functional_call, shapes, where each comes from, and the
    memory order each is stored in."""

    wrapper: _Models
    names: list[str]  # "models.<model>.<parameter>", every parameter of every trained model
    shapes: list[tuple[int, ...]]
    from_global: list[int]  # per received key (in its order): the parameter it fills
    from_row: list[int]  # per model slot of the row layout: the parameter it fills
    momentum_row: list[int]  # per optimiser slot of the row layout: the parameter whose momentum it is
    orders: list[tuple[int, ...]] = None  # per parameter: its dimensions in the order its stack stores them

    def __post_init__(self):
        self.orders = self.orders or [tuple(range(len(s))) for s in self.shapes]


def plan_of(algo: Algorithm, ws, shared: list[str] | None) -> _Plan:
    """The stacking plan of workspace `ws` (`shared`: the shared model's received keys, None if none)."""
    wrapper = _Models(algo, ws.models)
    flat = {(n, k): i for i, (n, k) in enumerate((n, k) for n in algo.trains
                                                   for k, _ in ws.models[n].named_parameters())}
    shapes = [tuple(p.shape) for n in algo.trains for p in ws.models[n].parameters()]
    from_row = [flat[(part.name, k)] for part in ws.layout.parts for k in part.keys]
    momentum_row = [flat[(part.name, k)] for part in ws.layout.parts if part.optimizer
                    for k, _ in part.model.named_parameters()]
    from_global = [flat[(algo.shares, k)] for k in shared or []]
    if sorted(from_row + from_global) != list(range(len(flat))):
        raise AssertionError("the batched path cannot place every parameter")  # a layout change missed here
    return _Plan(wrapper, [f"models.{n}.{k}" for n, k in flat], shapes, from_global, from_row, momentum_row)


class _Stack:
    """K clients' copies of every parameter of a plan (or of its momentum). Each is stored contiguous in the
    memory order its gradient comes in (a vmapped Linear's weight gradient is transposed), so that the fused
    SGD step reads parameter, gradient and momentum without copying them."""

    def __init__(self, plan: _Plan, k: int, device: torch.device, zero: bool = False):
        make = torch.zeros if zero else torch.empty
        self.store = [make((k, *(s[d] for d in o)), device=device) for s, o in zip(plan.shapes, plan.orders)]
        self.back = [tuple(sorted(range(len(o)), key=o.__getitem__)) for o in plan.orders]  # store → parameter

    def client(self, j: int, i: int) -> Tensor:
        """Parameter j of client i, shaped as the model's (a view)."""
        return self.store[j][i].permute(self.back[j])

    def shaped(self, j: int, t: Tensor) -> Tensor:
        """`t`, stored as parameter j's stack (leading client dimension), shaped as the parameter."""
        return t.permute(0, *(1 + d for d in self.back[j]))

    def first(self, k: int) -> "_Stack":
        """The first k clients' (views: a stack kept from round to round is reused, not allocated again,
        which on the CPU would fault in its pages anew every round)."""
        out = object.__new__(_Stack)
        out.store, out.back = [t[:k] for t in self.store], self.back
        return out

    def finite(self, js: list[int]) -> list[bool]:
        """Per client: whether parameters `js` are all finite (a fused L2 norm per stacked tensor, as
        host._finite does per client; beyond ~1e19 counts as not finite too)."""
        norms = torch.stack([torch.linalg.vector_norm(self.store[j].flatten(1), dim=1) for j in js])
        return norms.isfinite().all(0).tolist()


def _slots(lay, plan: _Plan, params: _Stack, moms: _Stack | None):
    """(row slot, parameter index, stack) of every tensor a client's row holds."""
    out = list(zip(lay.model_slots, plan.from_row, repeat(params)))
    if moms is not None:
        out += zip(lay.opt_slots, plan.momentum_row, repeat(moms))
    return out


def _index(at: list[int], device: torch.device) -> slice | Tensor:
    """Positions `at` in a stack: a slice when they are 0..n-1 (every client), else an index tensor."""
    return slice(0, len(at)) if at == list(range(len(at))) else torch.tensor(at, device=device)


def _column(table: Tensor, slot) -> Tensor:
    """Slot `slot` of every row of `table` (clients' rows of bytes, one per line) as a (clients, *shape) view."""
    k = len(table)
    return table[:, slot.offset:slot.offset + slot.nbytes].view(getattr(torch, slot.dtype)).view(k, *slot.shape)


def loss_is_sample_mean(algo: Algorithm, classes: int) -> bool:
    """Whether `algo`'s loss on a batch is the mean of its losses on each sample alone (the padding needs it)."""
    gen = torch.Generator().manual_seed(0)
    z = {n: torch.randn(3, classes, generator=gen) for n in algo.trains}
    y = torch.randint(classes, (3,), generator=gen)
    try:
        whole = algo.loss(z, y, 1)
        each = [algo.loss({n: v[i:i + 1] for n, v in z.items()}, y[i:i + 1], 1) for i in range(3)]
    except Exception:  # noqa: BLE001 - a loss that cannot take this probe is not batched, not a failed run
        return False
    return all(torch.allclose(whole[n], sum(e[n] for e in each) / 3, rtol=1e-5, atol=1e-6) for n in whole)


def sgd(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None, lr: float, momentum: float,
        decay: float) -> None:
    """torch.optim.SGD's step (dampening 0, no Nesterov) on stacked tensors, in place; a momentum buffer of
    zeros is a fresh one (None: momentum 0). torch's fused kernel (as `fmlray.optim.SGD` on the CPU) makes one
    pass over each tensor, 3x faster here than the four passes of foreach ops: stacked over clients, these
    tensors outgrow the CPU's caches."""
    torch._fused_sgd_(params, grads, [] if bufs is None else bufs, weight_decay=decay, momentum=momentum, lr=lr,
                      dampening=0.0, nesterov=False, maximize=False, is_first_step=False)


def masked_sgd(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None, live: Tensor, lr: float,
               momentum: float, decay: float) -> None:
    """`sgd` for the clients where `live` (a (K,) bool over the stacks' first dimension); the others keep their
    parameters and momentum. Every client is computed, so the shapes are the same at every step."""
    for i, (p, g) in enumerate(zip(params, grads)):
        keep = live.view(-1, *(1,) * (p.dim() - 1))
        d = g.add(p, alpha=decay) if decay else g
        if bufs is not None:
            d = bufs[i].mul(momentum).add_(d)
            bufs[i].copy_(torch.where(keep, d, bufs[i]))
        p.copy_(torch.where(keep, p.add(d, alpha=-lr), p))


class Batcher:
    """A host's batched path: which of a round's clients train together, and their training."""

    def __init__(self, host: ClientHost):
        self.host = host
        self.why: dict[tuple[str, ...], str | None] = {}  # by workspace: why it cannot batch (None: it can)
        self.plans: dict[tuple[str, ...], _Plan] = {}
        self.stacks: dict[tuple[str, ...], tuple[_Stack, _Stack | None]] = {}  # by workspace: the largest used
        self.tables: dict[tuple[str, ...], Tensor] = {}  # the same, for rows
        self.noted: set[str] = set()
        self.graphs = True  # CUDA graphs for the whole-stack steps (off once a capture failed)
        self.replays = 0  # steps run by replaying a CUDA graph
        self.side = None  # the CUDA stream each unit's first (warm-up) step runs on

    def units(self, cids: list[int], received: bool) -> list[tuple[list[int], bool]]:
        """`cids` (sorted) as units of work in order: (clients, batched?). A batched unit is a run of
        consecutive clients of one workspace, at most `training.max_batched_clients` long."""
        host, out, run = self.host, [], []
        for cid in cids:
            if run and (host._archs(host.clients[cid]) != host._archs(host.clients[run[-1]])
                        or host.clients[cid].task is not host.clients[run[-1]].task):
                out += self._split(run, received)
                run = []
            run.append(cid)
        return out + (self._split(run, received) if run else [])

    def _split(self, run: list[int], received: bool) -> list[tuple[list[int], bool]]:
        # Clients with a task train one after another: the batched losses are the dataset's classes'.
        first = self.host.clients[run[0]]
        if first.task is not None or not self._batches(self.host._archs(first), len(run), received):
            return [([cid], False) for cid in run]
        cap = self.host.cfg.training.max_batched_clients
        chunks = [run[i:i + cap] for i in range(0, len(run), cap)]
        return [(chunk, len(chunk) > 1) for chunk in chunks]

    def _batches(self, key: tuple[str, ...], n: int, received: bool) -> bool:
        host, mode = self.host, self.host.cfg.training.batching
        if mode == "sequential" or n < 2:
            return False
        if mode == "auto" and not auto_batches(list(host._workspace(key).models.values()), host.dataset.input_shape,
                                               host.device, min(n, host.cfg.training.max_batched_clients)):
            return False
        why = self._why(key) or (None if received or self.host.algo.shares is None else "no global state received")
        if why is not None:
            if mode == "vmap" and why not in self.noted:  # asked for: say once why not (auto's choices are quiet)
                self.noted.add(why)
                warnings.warn(f"training.batching = {mode!r}: clients with models {'+'.join(key)} train one after "
                              f"another: {why}", stacklevel=2)
            return False
        return True

    def _why(self, key: tuple[str, ...]) -> str | None:
        if key not in self.why:
            self.why[key] = self._reason(key)
        return self.why[key]

    def _reason(self, key: tuple[str, ...]) -> str | None:
        algo, t = self.host.algo, self.host.cfg.training
        if t.optimizer != "sgd":
            return f"the batched step is SGD's (training.optimizer = {t.optimizer!r})"
        if algo.forward is not None or algo.scalars:
            return f"{algo.name} computes its logits with its own forward or private scalars"
        if algo.frozen is not None:
            return f"{algo.name} freezes layers epoch by epoch"
        ws = self.host._workspace(key)
        if any(True for m in ws.models.values() for _ in m.buffers()):
            return "a model keeps buffers (BatchNorm's running statistics), which vmap does not update"
        if not loss_is_sample_mean(algo, self.host.dataset.num_classes):
            return f"{algo.name}'s loss is not the batch mean of per-sample terms, so shorter batches cannot be padded"
        return None

    def _table(self, key: tuple[str, ...], nbytes: int, k: int) -> Tensor:
        """A (k, nbytes) table of rows on the CPU, kept from round to round: bytes between a row's tensors are
        zero (as in a fresh row) and stay so, and its pages are not faulted in anew every round."""
        table = self.tables.get(key)
        if table is None or len(table) < k:
            table = self.tables[key] = torch.zeros((k, nbytes), dtype=torch.uint8)
        return table[:k]

    def _plan(self, key: tuple[str, ...], glob: Received | None, rnd: int) -> _Plan:
        if key not in self.plans:
            plan = plan_of(self.host.algo, self.host._workspace(key), None if glob is None else glob.keys)
            plan.orders = self._grad_orders(plan, rnd, None if glob is None else glob.anchor)
            self.plans[key] = plan
        return self.plans[key]

    def _grad_orders(self, plan: _Plan, rnd: int, anchor: list[Tensor] | None) -> list[tuple[int, ...]]:
        """The memory order each parameter's gradient comes in, from one step of two clients on random data."""
        host = self.host
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((2, 2, *host.dataset.input_shape), generator=gen).to(host.device)
        y = torch.zeros((2, 2), dtype=torch.long, device=host.device)
        stack = _Stack(plan, 2, host.device)
        leaves = [torch.randn(t.shape, generator=gen).to(host.device).requires_grad_() for t in stack.store]
        losses, _ = self._client_fn(plan, rnd, anchor, uniform=True)(
            dict(zip(plan.names, (stack.shaped(j, t) for j, t in enumerate(leaves)))), x, y, None)
        grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        orders = []
        for j, g in enumerate(grads):
            g = None if g is None else stack.shaped(j, g)  # in the parameter's shape, with the gradient's strides
            strides = [1] * len(plan.shapes[j]) if g is None else g.stride()[1:]
            orders.append(tuple(sorted(range(len(plan.shapes[j])), key=lambda d: -strides[d])))
        return orders

    def _client_fn(self, plan: _Plan, rnd: int, anchor: list[Tensor] | None, uniform: bool):
        """One client's step, vmapped over clients: (losses (client, model), correct predictions (client, model))
        of parameters, a batch and, where batches differ in length (not `uniform`), per-sample weights."""
        algo, names = self.host.algo, self.host.algo.trains

        def client(p: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor | None):
            logits, penalties = functional_call(plan.wrapper, p, (x, anchor))
            if w is None:
                losses = algo.loss(logits, y, rnd)
            else:  # per sample, weighted by 1/(real samples) or 0 (padding)
                each = vmap(lambda z, yy: algo.loss({n: v[None] for n, v in z.items()}, yy[None], rnd))(logits, y)
                losses = {n: (v * w).sum() for n, v in each.items()}
            losses = {n: losses[n] + penalties[n] if n in penalties else losses[n] for n in names}
            hits = {n: logits[n].argmax(1) == y for n in names}
            if w is not None:
                hits = {n: h & (w > 0) for n, h in hits.items()}
            return torch.stack([losses[n] for n in names]), torch.stack([h.sum() for h in hits.values()])

        return vmap(client, in_dims=(0, 0, 0, None if uniform else 0))

    def _order(self, c: Client, rnd: int) -> tuple[np.ndarray, list[int]]:
        """The client's rows this round in the order its batches take them (as indices into its host's training
        rows), and its batches' sizes: the same draws, from the same seed, as the sequential loop's."""
        host, t = self.host, self.host.cfg.training
        gen = torch.Generator().manual_seed(derive_seed(host.cfg.run.seed, BATCH_ORDER, rnd, c.cid))
        index = host.train_rows.index(c.cid).numpy()
        n = len(c.train_rows)
        taken = [index[torch.randperm(n, generator=gen).numpy()] for _ in range(t.epochs)]  # as `batches` draws
        return np.concatenate(taken), batch_sizes(n, t.batch_size) * t.epochs

    def train(self, clients: list[Client], rnd: int, glob: Received | None) -> tuple[list[Outcome], Summed | None]:
        """Train `clients` (one workspace's, in id order) for round `rnd` together: their outcomes in that order
        (no `sent`: the shared tensors of those kept come summed, weighted by the server's weights)."""
        host, algo = self.host, self.host.algo
        if host.device.type == "cpu":
            keep_freed_memory()  # the steps' large tensors, reused from step to step instead of faulted in anew
        key = host._archs(clients[0])
        ws, plan = host._workspace(key), self._plan(key, glob, rnd)
        steps = [self._order(c, rnd) for c in clients]
        rank = sorted(range(len(clients)), key=lambda k: -len(steps[k][1]))  # longest first: the active are a prefix
        ranked = [clients[k] for k in rank]
        params, moms = self._load(key, ranked, ws, plan, glob)
        stats = self._steps(plan, params, moms, [steps[k] for k in rank], rnd,
                            None if glob is None else glob.anchor)
        finite = params.finite(plan.from_global) if glob is not None else [True] * len(ranked)
        bad = self._store(key, ranked, ws, plan, params, moms, stats, finite)
        total = sum(len(s) for _, s in steps)
        out: list[Outcome | None] = [None] * len(clients)
        kept = []  # positions in the stack of the clients whose shared tensors are summed
        for i, k in enumerate(rank):
            share = len(steps[k][1]) / total
            if bad[i] is not None:
                out[k] = Outcome(None, None, bad[i], share)
                continue
            seen = stats["seen"][i]
            metrics = {}
            for n in algo.trains:
                metrics[f"{n}_loss"] = stats["loss"][n][i] / seen
                metrics[f"{n}_accuracy"] = stats["correct"][n][i] / seen
            out[k] = Outcome(metrics, None, None, share)
            if glob is not None:
                kept.append(i)
        return out, (self._sum(plan, params, [ranked[i] for i in kept], kept) if kept else None)

    def _sum(self, plan: _Plan, params: _Stack, clients: list[Client], at: list[int]) -> Summed:
        """Σ weightᵢ · shared tensorsᵢ of the clients at positions `at` of the stack: one matrix-vector product per
        tensor instead of an add per client and tensor (summed in float32, then added to the host's float64 sum:
        within float rounding of adding client by client)."""
        dev = self.host.device
        weights = [float(self.host.algo.server.weight(len(c.train_rows))) for c in clients]
        w = torch.tensor(weights, dtype=torch.float32, device=dev)
        index = _index(at, dev)
        tensors = []
        for j in plan.from_global:
            stored = params.store[j][index]
            tensors.append((w @ stored.reshape(len(at), -1)).view(stored.shape[1:]).permute(params.back[j]))
        return Summed(tensors, sum(weights), len(at))

    def _load(self, key: tuple[str, ...], ranked: list[Client], ws, plan: _Plan, glob: Received | None):
        """The clients' parameters and momentum, stacked in `ranked` order: private ones from their rows (or
        their initial models), received ones from the global state; the shared model's momentum starts at 0."""
        host, dev = self.host, self.host.device
        started, drawn = time.perf_counter(), 0.0
        k = len(ranked)
        kept = self.stacks.get(key)
        if kept is None or len(kept[0].store[0]) < k:
            kept = self.stacks[key] = (_Stack(plan, k, dev),
                                       _Stack(plan, k, dev) if host.cfg.training.momentum > 0 else None)
        params, moms = (None if s is None else s.first(k) for s in kept)
        if moms is not None:
            torch._foreach_zero_(moms.store)
        store, lay = host.stores.get(key), ws.layout
        if store is not None:
            # one copy per client into a table of rows (as each is read: a store's row is valid until `done`),
            # then one copy per tensor for every client
            table, old = self._table(key, lay.nbytes, k), []
            rows = table.numpy()
            beyond = host._then.get(max(c.cid for c in ranked))  # the round's next client after this unit
            for i, c in enumerate(ranked):
                row = store.get(c.cid)
                after = ranked[i + 1].cid if i + 1 < len(ranked) else beyond
                if after is not None:
                    host.prefetch(after)
                if row is not None:
                    rows[len(old)] = row
                    old.append(i)
                else:  # never trained: its initial models, drawn as the sequential path does
                    drawing = time.perf_counter()
                    ws.load(None, host._seeds(c), c.cid, host.algo.scalars)
                    _copy([params.client(j, i) for j in plan.from_row], ws.tensors)
                    drawn += time.perf_counter() - drawing
                store.done(c.cid)
            if old:
                table = table[:len(old)].to(dev)
                at = _index(old, dev)
                for slot, j, stack in _slots(lay, plan, params, moms):
                    stack.shaped(j, stack.store[j])[at] = _column(table, slot)
            ws.client = None  # the workspace holds no one client's state now
        if glob is not None:
            for j, g in zip(plan.from_global, glob.tensors):
                stacked = params.shaped(j, params.store[j])
                stacked.copy_(g.expand_as(stacked))
        host.state_seconds += time.perf_counter() - started - drawn  # as the sequential path counts them
        host.init_seconds += drawn
        return params, moms

    def _steps(self, plan: _Plan, params: _Stack, moms: _Stack | None, steps: list[tuple[np.ndarray, list[int]]],
               rnd: int, anchor: list[Tensor] | None) -> dict:
        """Every client's steps (see the module's docstring); their loss and accuracy sums."""
        host, names = self.host, self.host.algo.trains
        dev, k_all = host.device, len(steps)
        x_all, _ = host.train_rows.source()
        sizes = [s for _, s in steps]
        table = np.zeros((len(sizes[0]), k_all, max(max(s) for s in sizes)), dtype=np.int64)
        count = np.zeros((len(sizes[0]), k_all), dtype=np.float32)
        for i, (rows, s) in enumerate(steps):
            count[:len(s), i] = s
            start = 0
            for j, size in enumerate(s):
                table[j, i, :size] = rows[start:start + size]
                start += size
        table, count = torch.from_numpy(table).to(x_all.device), torch.from_numpy(count).to(dev)
        # every step's losses and hits, kept on the device and summed after the last step (one copy a step each,
        # not a dozen small ops: on a GPU each is a kernel launch); clients that have finished keep zeros
        losses_at = torch.zeros((len(sizes[0]), len(names), k_all), device=dev)
        hits_at = torch.zeros((len(sizes[0]), len(names), k_all), dtype=torch.long, device=dev)
        if dev.type in WHOLE_STACK and x_all.device.type == dev.type:
            self._whole_steps(plan, params, moms, table, count, losses_at, hits_at, rnd, anchor)
        else:
            self._prefix_steps(plan, params, moms, sizes, table, count, losses_at, hits_at, rnd, anchor)
        with torch.no_grad():
            loss_sum = (losses_at.double() * count.double()[:, None]).sum(0)  # as the loop sums loss x batch size
            went_bad = ~torch.isfinite(losses_at.sum(1))  # (step, client)
            first = went_bad.int().argmax(0)  # each client's first step with a non-finite loss (0 if none)
            bad_losses = losses_at[first, :, torch.arange(k_all, device=dev)]  # (client, model)
            correct = hits_at.sum(0)
        return {"loss": dict(zip(names, loss_sum.tolist())), "correct": dict(zip(names, correct.tolist())),
                "seen": [float(sum(s)) for s in sizes], "bad": went_bad.any(0).tolist(),
                "bad_losses": bad_losses.tolist()}

    def _prefix_steps(self, plan: _Plan, params: _Stack, moms: _Stack | None, sizes: list[list[int]], table: Tensor,
                      count: Tensor, losses_at: Tensor, hits_at: Tensor, rnd: int, anchor: list[Tensor] | None):
        """Step after step on the clients still training (a prefix of the stack), each step's batch as wide as
        its longest; clients whose batch is shorter have their padding weighed out."""
        host, t = self.host, self.host.cfg.training
        dev = host.device
        x_all, y_all = host.train_rows.source()
        step = {u: self._client_fn(plan, rnd, anchor, u) for u in (True, False)}
        mixed = autocast(dev, t.precision)
        for j in range(len(sizes[0])):
            k = sum(1 for s in sizes if len(s) > j)  # the clients still training: a prefix
            width = max(s[j] for s in sizes[:k])
            uniform = all(s[j] == width for s in sizes[:k])
            idx = table[j, :k, :width]
            x, y = x_all[idx].to(dev), y_all[idx].to(dev)
            n = count[j, :k]
            w = None if uniform else (torch.arange(width, device=dev) < n[:, None]) / n[:, None]
            views = [p[:k] for p in params.store]
            leaves = [v.detach().requires_grad_() for v in views]
            with mixed:
                losses, hits = step[uniform](
                    dict(zip(plan.names, (params.shaped(i, v) for i, v in enumerate(leaves)))), x, y, w)
            grads = torch.autograd.grad(losses.float().sum(), leaves)
            with torch.no_grad():
                sgd(views, list(grads), None if moms is None else [m[:k] for m in moms.store], t.lr, t.momentum,
                    t.weight_decay)
                losses_at[j, :, :k] = losses.detach().T  # (model, client)
                hits_at[j, :, :k] = hits.T

    def _whole_steps(self, plan: _Plan, params: _Stack, moms: _Stack | None, table: Tensor, count: Tensor,
                     losses_at: Tensor, hits_at: Tensor, rnd: int, anchor: list[Tensor] | None):
        """Every step on the whole stack, at the full batch width: clients that have finished, and padding, weigh
        0 in the loss, and finished clients keep their parameters and momentum (`masked_sgd`). Each step has the
        same shapes and reads its batch and its step number from the device, so on a GPU, after the first step,
        a step is captured as a CUDA graph and replayed for the rest: one launch a step instead of hundreds."""
        host, t = self.host, self.host.cfg.training
        dev = host.device
        x_all, y_all = host.train_rows.source()
        n_steps, k, width = table.shape
        weights = (torch.arange(width, device=dev) < count[..., None]) / count.clamp(min=1)[..., None]
        live_at = count > 0  # (step, client)
        at = torch.zeros(1, dtype=torch.long, device=dev)  # the step, advanced by the step itself
        fn = self._client_fn(plan, rnd, anchor, uniform=False)
        bufs = None if moms is None else moms.store
        # autocast's cache of cast weights cannot live in a CUDA graph; each weight is cast once a step anyway
        mixed = autocast(dev, t.precision, cache=False)

        def step():
            idx = table.index_select(0, at)[0].flatten()
            x = x_all.index_select(0, idx).view(k, width, *x_all.shape[1:])
            y = y_all.index_select(0, idx).view(k, width)
            w = weights.index_select(0, at)[0]
            live = live_at.index_select(0, at)[0]
            leaves = [p.detach().requires_grad_() for p in params.store]
            with mixed:
                losses, hits = fn(dict(zip(plan.names, (params.shaped(i, v) for i, v in enumerate(leaves)))), x, y, w)
            grads = torch.autograd.grad(losses.float().sum(), leaves)
            with torch.no_grad():
                masked_sgd(params.store, grads, bufs, live, t.lr, t.momentum, t.weight_decay)
                losses_at.index_copy_(0, at, torch.where(live, losses.detach().T.to(losses_at.dtype), 0)[None])
                hits_at.index_copy_(0, at, hits.T[None])  # a finished client's hits are 0 (its weights are)
                at.add_(1)

        graph = None
        if dev.type == "cuda" and n_steps > 1 and self.graphs:
            # the first step for real on a side stream (as CUDA graph capture wants its warm-up), then capture
            if self.side is None:  # one for the host's life: the caching allocator keeps what a stream freed for it
                self.side = torch.cuda.Stream(dev)
            side = self.side
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = self._capture(step)
        else:
            step()
        for _ in range(n_steps - 1):
            if graph is not None:
                graph.replay()
                self.replays += 1
            else:
                step()

    def _capture(self, step) -> torch.cuda.CUDAGraph | None:
        """`step` captured as a CUDA graph (recorded, not run), or None, saying why once, where it cannot be."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                step()
        except RuntimeError as exc:  # an op that cannot be captured: every later step runs eagerly
            self.graphs = False
            warnings.warn(f"batched clients: their steps run one launch at a time; a CUDA graph could not capture "
                          f"them: {str(exc).splitlines()[0]}", stacklevel=2)
            return None
        return graph

    def _store(self, key: tuple[str, ...], ranked: list[Client], ws, plan: _Plan, params, moms,
               stats, finite: list[bool]) -> list[str | None]:
        """Write each client's private state back to its row, except where its loss went non-finite or its
        shared tensors did (not `finite`): its row stays as it was, as in the sequential path; per client, why
        it is left out (None: it is not)."""
        host = self.host
        started = time.perf_counter()
        store, lay = host.stores.get(key), ws.layout
        out = []
        for i, c in enumerate(ranked):
            if stats["bad"][i]:
                bad = ", ".join(f"{n}={v:.4g}" for n, v in zip(host.algo.trains, stats["bad_losses"][i]))
                out.append(f"loss is not finite ({bad}); lower training.lr or check the data")
            elif not finite[i]:
                out.append(NOT_FINITE.format(host.algo.shares))
            else:
                out.append(None)
        good = [i for i, why in enumerate(out) if why is None]
        if store is not None and good:
            # each tensor of every client into a table of rows (zeros between tensors, as a fresh row has),
            # then one copy per client into its row
            cpu = self._table(key, lay.nbytes, len(good))
            table = cpu.to(host.device)
            at = _index(good, host.device)
            for slot, j, stack in _slots(lay, plan, params, moms):
                _column(table, slot).copy_(stack.shaped(j, stack.store[j])[at])
            rows = table.cpu().numpy()
            for n, i in enumerate(good):
                c = ranked[i]
                store.put(c.cid)[:] = rows[n]
                store.done(c.cid)
                host.dirty.add(c.cid)
        host.state_seconds += time.perf_counter() - started
        return out
