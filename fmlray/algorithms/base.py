"""What an algorithm is, and the one client training loop every algorithm shares.

An `Algorithm` is whole: it declares the models each client trains (`Model`: which architecture,
how a never-trained client's copy starts), which of them receives the global state and which of
its keys it shares (the rest stay with the client), its per-batch losses and hooks, and its server
half (`fmlray.aggregate.Server`: the weighting and the server update). The engines read these
declarations and never an algorithm's name.

Pure PyTorch: no Ray, no files, no config objects beyond plain numbers, so a client update can
be called in a unit test with two tensors and a learning rate of 1.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fmlray.aggregate import Server
from fmlray.errors import AlgorithmError, ConfigError, TrainingError
from fmlray.optim import Optimizer

# logits of each trained model, labels, round (1-based) -> one loss per trained model
LossFn = Callable[[dict[str, Tensor], Tensor, int], dict[str, Tensor]]
# a model being trained, the parameters of the global model it was sent this round -> a penalty on it
PenaltyFn = Callable[[nn.Module, list[Tensor]], Tensor]
# the client's models, its private scalars, a batch, the models wanted -> their logits
ForwardFn = Callable[[dict[str, nn.Module], dict[str, Tensor], Tensor, tuple[str, ...]], dict[str, Tensor]]
# a module -> the state_dict keys it shares with the server
KeysFn = Callable[[nn.Module], list[str]]


@dataclass(frozen=True)
class Model:
    """One model a client trains every round."""

    name: str  # its name in metrics and checkpoints; "local" is the client's personalised model
    arch: str = "client"  # "client": its group's local_model; "global": model.meme (the global architecture)
    # what a client's copy holds before its first round: "seed" draws it from (seed, client); "global" is
    # the round-0 global model (the same for every client). Keys it receives are the global's every round.
    init: str = "seed"

    def __post_init__(self):  # a typo ("Global") was taken as the other value, silently
        for key, allowed in (("arch", ("client", "global")), ("init", ("seed", "global"))):
            if getattr(self, key) not in allowed:
                raise AlgorithmError(f"Model({self.name!r}): {key} = {getattr(self, key)!r} is not one of "
                                     f"{', '.join(map(repr, allowed))}")


def all_keys(module: nn.Module) -> list[str]:
    return list(module.state_dict())


def layers(module: nn.Module) -> list[list[str]]:
    """The module's state_dict keys grouped by the layer (submodule) that holds them, in order."""
    groups: dict[str, list[str]] = {}
    for key in module.state_dict():
        groups.setdefault(key.rpartition(".")[0], []).append(key)
    return list(groups.values())


def last_layers(k: int) -> KeysFn:
    """The keys of the module's last `k` layers (0: none); more layers than the module has is a ConfigError,
    never clipped to all of them (which for LG-FedAvg would be FedAvg)."""
    def keys(module: nn.Module) -> list[str]:
        groups = layers(module)
        if k > len(groups):
            raise ConfigError(f"asks for the last {k} layers of a model that has {len(groups)}")
        return [key for group in (groups[-k:] if k else []) for key in group]
    return keys


def all_but_last_layers(k: int) -> KeysFn:
    """Every key except those of the module's last `k` layers."""
    def keys(module: nn.Module) -> list[str]:
        last = set(last_layers(k)(module))
        return [key for key in module.state_dict() if key not in last]
    return keys


@dataclass(frozen=True)
class Algorithm:
    """A federated algorithm: the client half (models, losses, hooks) and the server half."""

    name: str
    models: tuple[Model, ...]  # trained on the same batches, in this order
    loss: LossFn
    shares: str | None = None  # the model that receives the global state and sends its shared keys back
    shared_keys: KeysFn = all_keys  # which keys of `shares` are global; the others stay with the client
    penalties: dict[str, PenaltyFn] = field(default_factory=dict)  # by model: a term against the received global
    forward: ForwardFn | None = None  # how logits are computed (default: each model on the batch)
    frozen: Callable[[int, int], dict[str, KeysFn]] | None = None  # (epoch, epochs) -> keys not stepped, by model
    scalars: dict[str, float] = field(default_factory=dict)  # private numbers each client keeps, initial values
    scalar_step: Callable[[dict[str, Tensor]], None] | None = None  # updates them after each step (grads set)
    evaluates: tuple[str, ...] = ("local",)  # models tested on each client's own split (besides the global)
    server: Server = Server()

    def __post_init__(self):
        names = [m.name for m in self.models]
        if len(set(names)) != len(names) or "global" in names:
            raise AlgorithmError(f"{self.name}: model names must be unique and not 'global', got {names}")
        unknown = ({self.shares} - {None}) | set(self.penalties) | (set(self.evaluates) - {"global"})
        if not unknown <= set(names):
            raise AlgorithmError(f"{self.name}: names {sorted(unknown - set(names))} are not among its models {names}")
        if self.shares is not None and self.model(self.shares).arch != "global":
            raise AlgorithmError(f"{self.name}: the model that receives the global state must have arch 'global'")
        if any(m.init == "global" and m.arch != "global" for m in self.models):
            raise AlgorithmError(f"{self.name}: only a model of arch 'global' can start as the round-0 global model")

    @property
    def stateless(self) -> bool:
        """Whether a client keeps nothing between rounds: it trains one model, receives all of it from the
        server with a fresh optimiser, and keeps no scalars (FedAvg, FedProx). Then no row of it is left on
        any host, and any host may train it (see RayEngine's dealing of each round's clients)."""
        return (not self.scalars and len(self.models) == 1 and self.models[0].name == self.shares
                and self.shared_keys is all_keys)

    @property
    def trains(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    def model(self, name: str) -> Model:
        return next(m for m in self.models if m.name == name)

    def logits(self, models: dict[str, nn.Module], scalars: dict[str, Tensor], x: Tensor,
               names: tuple[str, ...], task: Tensor | None = None) -> dict[str, Tensor]:
        """Each named model's logits on `x`; with a `task` (see `task_logits`), those of the models of the global
        architecture are carried into the task's space (the others were built with the task's outputs)."""
        out = self.forward(models, scalars, x, names) if self.forward is not None else \
            {name: models[name](x) for name in names}
        if task is not None:
            out = {n: task_logits(z, task) if self.model(n).arch == "global" else z for n, z in out.items()}
        return out


def check_loss(algo: Algorithm, models: dict[str, nn.Module], x: Tensor, y: Tensor,
               task: Tensor | None = None) -> None:
    """`algo.loss` keeps its contract on a probe batch: `models` (a client's, as its group builds them) on a few of
    the run's rows `x`, `y` (in the group's `task` space), through `algo.logits` as training calls it: one loss per
    trained model, keyed by its name, each a scalar float tensor. A new algorithm's slip is then one line before
    round 1; it was a traceback mid-round, or, for a key that names no model it trains, a term that sequential
    training added to the backward pass and batched training dropped."""
    scalars = {name: torch.tensor(float(v), requires_grad=True) for name, v in algo.scalars.items()}
    where = f"algorithm {algo.name!r}: its loss(logits, y, rnd)"
    try:
        losses = algo.loss(algo.logits(models, scalars, x, algo.trains, task), y, 1)
    except Exception as exc:  # noqa: BLE001 - the author's code: said in one line, with where it failed
        said = (str(exc).strip().splitlines() or [""])[0][:200]
        raise AlgorithmError(f"{where} failed on a probe batch of {len(y)} of the run's rows ({type(exc).__name__}"
                             f"{': ' + said if said else ''})") from None
    if not isinstance(losses, dict) or set(losses) != set(algo.trains):
        got = sorted(map(str, losses)) if isinstance(losses, dict) else f"a {type(losses).__name__}"
        raise AlgorithmError(f"{where} must return a dict with one loss per model it trains, keyed "
                             f"{list(algo.trains)}; it returned {got}")
    for name, value in losses.items():
        if not (isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point()):
            what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else \
                f"a {type(value).__name__}"
            raise AlgorithmError(f"{where} gives {name!r} {what}; each loss must be a scalar float tensor (reduce "
                                 "the batch, e.g. with a mean, and keep it a tensor: no .item())")


def task_logits(z: Tensor, members: Tensor) -> Tensor:
    """Log-probabilities over a task's labels from logits `z` over the global classes: log Σ_{c→k} softmax(z)_c,
    renormalised over the task's classes. `members` (labels × classes, bool) says which classes map to each
    label; a class in no row is outside the task. They are the task-space logits every loss takes: CE on them
    is the marginal's CE, and softmax(them / T) is the marginal, sharpened or softened by T (exact at T = 1)."""
    grouped = z.unsqueeze(1).masked_fill(~members, float("-inf"))  # (N, labels, classes)
    return torch.log_softmax(torch.logsumexp(grouped, dim=2), dim=1)


def cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    """`F.cross_entropy(z, y)`, the batch mean, bit for bit (values and gradients). Under `torch.func.vmap` (the
    batched client update) it is written out as the ops vmap decomposes it into, without the decomposition's
    `torch._check`, which imports sympy: ~0.65 s of CPU and ~35 MiB in every process's first batched round."""
    if torch._C._functorch.is_functorch_wrapped_tensor(z):
        return -torch.log_softmax(z, 1).gather(1, y.unsqueeze(1)).squeeze(1).sum() / y.shape[0]
    return nn.functional.cross_entropy(z, y)


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """The sizes of an epoch's batches of `n` rows: `batch_size` each, the rest last; a last batch of one
    joins the one before (BatchNorm needs two)."""
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2:] = [sizes[-2] + 1]
    return sizes


def cpu_layout(x: Tensor) -> Tensor:
    """A batch of images on the CPU as channels-last (NHWC in memory, same shape and values): oneDNN's CPU
    convolutions run faster on it, and the activations stay in it layer to layer (1 thread, batch 32, one
    FedAvg step: cnn5 -22 %, resnet8 -25 %, lenet5 -8 %; see benchmarks/README.md). The parameters keep their
    layout; only the batch's changes. Other tensors and devices are returned as they are (a GPU's speed on
    it is not measured). A one-channel batch is both layouts at once and convolutions would take it as NCHW,
    so it gets channels-last strides as a view, without a copy. Only for models that convolve (`convolves`):
    a model that flattens the images first would pay a copy back (an MLP on 32x32x3: evaluation 1.3-1.7x)."""
    if x.dim() != 4 or x.device.type != "cpu":
        return x
    n, c, h, w = x.shape
    if c == 1:
        return x.reshape(n, h, w, 1).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


def convolves(models: Iterable[nn.Module]) -> bool:
    """Whether any of these models has a 2-D convolution: the batches they share then go in `cpu_layout`."""
    return any(isinstance(m, nn.Conv2d) for model in models for m in model.modules())


def batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device | None = None) -> Iterator[Tensor]:
    """Shuffled index batches of `batch_sizes(n, batch_size)` (on `device`: the permutation crosses to it
    once, not once a batch)."""
    order = torch.randperm(n, generator=generator)
    if device is not None:  # non_blocking: a blocking copy to a GPU would make the host wait for it, once an epoch
        order = order.to(device, non_blocking=True)
    start = 0
    for size in batch_sizes(n, batch_size):
        yield order[start:start + size]
        start += size


def train_client(
    algo: Algorithm,
    models: dict[str, nn.Module],
    optimizers: dict[str, Optimizer],
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    rnd: int = 1,
    anchor: list[Tensor] | None = None,
    scalars: dict[str, Tensor] | None = None,
    task: Tensor | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, float]:
    """Run `epochs` of `algo` on (x, y); return each trained model's mean train loss and accuracy.

    `anchor`: the parameters of the global model received this round (for `algo.penalties`);
    `scalars`: the client's private numbers, as 0-d tensors that require grad (for `algo.scalars`);
    `task`: the client's task (`task_logits`' members; `y` holds its labels), None for the dataset's classes;
    `autocast`: the context forward passes and losses run in (mixed precision)."""
    names, scalars = algo.trains, scalars or {}
    for name in names:
        models[name].train()
    # Each step's losses and hits stay on the device and are read once at the end: reading them step by step
    # (or indexing a GPU tensor with CPU indices) would make the host wait for the GPU at every step. So a
    # non-finite loss is found after the last step, not at it; the client is left out all the same.
    step_losses, step_hits, sizes = [], [], []
    channels_last = convolves(models[name] for name in names)
    for epoch in range(epochs):
        frozen = _frozen_params(algo, models, epoch, epochs)
        for idx in batches(len(y), batch_size, generator, x.device):
            xb, yb = cpu_layout(x[idx]) if channels_last else x[idx], y[idx]
            with autocast():
                logits = algo.logits(models, scalars, xb, names, task)
                losses = algo.loss(logits, yb, rnd)
                for name, penalty in algo.penalties.items():
                    losses[name] = losses[name] + penalty(models[name], anchor)
            for name in names:
                optimizers[name].zero_grad()
            for s in scalars.values():
                s.grad = None
            # Peers are detached inside the losses, so one backward of the sum gives each model
            # exactly the gradient of its own loss, at the cost of a single backward pass.
            sum(losses.values()).backward()
            for p in frozen:
                p.grad = None  # an optimiser skips a parameter without a gradient: no step, no decay
            for name in names:
                optimizers[name].step()
            if algo.scalar_step is not None:
                with torch.no_grad():
                    algo.scalar_step(scalars)
            with torch.no_grad():
                step_losses.append(torch.stack([losses[name].float() for name in names]))
                step_hits.append(torch.stack([(logits[name].argmax(1) == yb).sum() for name in names]))
            sizes.append(len(yb))
    loss_sum = dict.fromkeys(names, 0.0)
    for n, values in zip(sizes, torch.stack(step_losses).tolist()):
        if not math.isfinite(sum(values)):
            bad = ", ".join(f"{k}={v:.4g}" for k, v in zip(names, values))
            raise TrainingError(f"loss is not finite ({bad}); lower training.lr or check the data")
        for name, v in zip(names, values):
            loss_sum[name] += v * n
    correct = torch.stack(step_hits).sum(0).tolist()
    seen = sum(sizes)
    out = {}
    for name, c in zip(names, correct):
        out[f"{name}_loss"] = loss_sum[name] / seen
        out[f"{name}_accuracy"] = c / seen
    return out


def _frozen_params(algo: Algorithm, models: dict[str, nn.Module], epoch: int, epochs: int) -> list[Tensor]:
    """The parameters `algo` keeps fixed in this epoch (FedRep trains its head, then its body)."""
    if algo.frozen is None:
        return []
    out = []
    for name, keys_fn in algo.frozen(epoch, epochs).items():
        keys = set(keys_fn(models[name]))
        out += [p for k, p in models[name].named_parameters() if k in keys]
    return out


@torch.no_grad()
def evaluate(model: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, batch_size: int = 1024,
             channels_last: bool | None = None) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` (a module, or a function of a batch) on (x, y); batches go in
    `cpu_layout` if `channels_last` (None: if `model` is a module that `convolves`)."""
    if isinstance(model, nn.Module):
        model.eval()
    if channels_last is None:
        channels_last = isinstance(model, nn.Module) and convolves([model])
    losses, hits = [], []  # read once at the end (see train_client)
    for start in range(0, len(y), batch_size):
        xb = x[start:start + batch_size]
        logits = model(cpu_layout(xb) if channels_last else xb)
        yb = y[start:start + batch_size]
        losses.append(nn.functional.cross_entropy(logits, yb, reduction="sum").float())
        hits.append((logits.argmax(1) == yb).sum())
    return sum(torch.stack(losses).tolist()) / len(y), int(torch.stack(hits).sum()) / len(y)
