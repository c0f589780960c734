"""Typed, frozen experiment config: TOML in, --set overrides, validation with actionable errors.

Every section is a keyword-only frozen dataclass that checks itself in ``__post_init__`` and
names the key to change. Each key's one-line description lives on its field (``_key``): it is
the only one, and `fmlray config` prints it. The defaults are the embedded default experiment
(digits, 20 clients, Dirichlet(0.5), FML with two local architectures), shipped as
``presets/digits.toml`` too.

Validation is complete here: a config that loads can be run, short of what only the data, the
files or the cluster can tell (a missing dataset, a full disk, too few CPUs). So every size has
an upper bound, every number is finite and every text is printable.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmlray.errors import ConfigError
from fmlray.tasks import resolve as resolve_task

DATASETS = ("digits", "synthetic", "fmnist", "mnist", "cifar10", "cifar100", "emnist")
PARTITIONS = ("iid", "dirichlet", "shards", "quantity", "natural", "file")
MODELS = ("mlp", "lenet5", "cnn", "cnn5", "resnet8", "resnet18")
# The algorithm registry: each name is a module fmlray/algorithms/<name>.py (its hyper-parameters, if any, are
# a section of AlgorithmConfig below, so that a bad value fails here, before torch is imported).
ALGORITHMS = ("fml", "fedavg", "fedprox", "local", "ditto", "fedper", "fedrep", "fedbn", "apfl", "lgfedavg", "dml")
# The built-in algorithms that never read algorithm.fml: an α/β schedule set there is unused by them. Any other
# follows it (fml, dml, and one added to ALGORITHMS, which may be a copy of fml.py), so its length is kept.
IGNORE_FML = ("fedavg", "fedprox", "local", "ditto", "fedper", "fedrep", "fedbn", "apfl", "lgfedavg")
ENGINES = ("serial", "ray")
EMNIST_SPLITS = {"balanced": 47, "byclass": 62, "bymerge": 47, "digits": 10, "letters": 26, "mnist": 10}  # classes
FIXED_CLASSES = {"digits": 10, "mnist": 10, "fmnist": 10, "cifar10": 10, "cifar100": 100}  # the loaders check it
PRESETS_DIR = Path(__file__).parent / "presets"

INT32_MAX = 2**31 - 1  # metrics.parquet stores rounds and client ids as int32
MAX_CLIENTS = 1_000_000  # 100x the design's 10,000-client target: more is a typo
MAX_NAME_BYTES = 200  # a folder name holds 255 bytes; compare, sweeps and temporary names add suffixes
MAX_SYNTHETIC_DIM = 10_000  # the paper's 60; CIFAR's 3,072 pixels for scale
MAX_SYNTHETIC_CLASSES = 1_000


def _got(value) -> str:
    """A wrong value as the user wrote it: TOML's true/false, not Python's True/False."""
    return str(value).lower() if isinstance(value, bool) else repr(value)


def ascii_digits(text: str) -> bool:
    """Whether `text` is a whole number written in ASCII digits: what `int(text)` is about to read. `str.isdigit`
    alone also passes '²', on which `int` raises (a traceback where a list index, a port, a round was read)."""
    return text.isascii() and text.isdigit()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: str, choices: typing.Iterable[str]) -> None:
    _check(value in choices, f"{key} = {value!r} is unknown; choose one of {', '.join(choices)}")


def _unit(key: str, value: float, *, open_low: bool = False) -> None:
    low_ok = value > 0 if open_low else value >= 0
    bound = "(0, 1]" if open_low else "[0, 1]"
    _check(low_ok and value <= 1 and math.isfinite(value), f"{key} must be in {bound}, got {value}")


RESOURCE_UNIT = 1e-4  # Ray refuses a nonzero resource amount below it (ray_option_utils: "precision ... 0.0001")


def _positive(key: str, value: float) -> None:
    _check(value > 0 and math.isfinite(value), f"{key} must be > 0, got {value}")


def _at_least(key: str, value: float, low: float) -> None:
    _check(value >= low and math.isfinite(value), f"{key} must be a finite number >= {low:g}, got {value}")


def _within(key: str, value: float, low: float, high: float, why: str) -> None:
    """Bounds on a float that torch holds as float32: beyond them a run turns NaN (or overflows) in round 1."""
    _check(low <= value <= high, f"{key} must be in [{low:g}, {high:g}] ({why}), got {value:g}")


def _between(key: str, value: int, low: int, high: int, why: str = "") -> None:
    _check(value >= low, f"{key} must be >= {low}, got {value}")
    _check(value <= high, f"{key} must be <= {high:,}{why}, got {value:,}")


def folder_name(key: str, value: str) -> None:
    """ConfigError unless `value` can be one folder's name on any disk fmlray writes to."""
    _check(bool(value) and value not in (".", "..") and not value.startswith(".") and "/" not in value
           and "\\" not in value and value.strip() == value and value.isprintable(),
           f"{key} = {value!r} must be a plain folder name (no '/' or '\\', not starting with '.', "
           "no surrounding spaces or control characters)")
    size = len(value.encode())
    _check(size <= MAX_NAME_BYTES, f"{key} is {size} bytes long; folder names hold at most {MAX_NAME_BYTES} here")


def _path(config: Any, key: str) -> None:
    """Path `key` of `config` with a leading `~` (or `~user`) expanded, as a shell would (else every writer would
    make a folder named "~" here, and pyarrow alone would read it as home); a ConfigError unless every folder
    name in it fits a file system's 255 bytes."""
    attr = key.rsplit(".", 1)[1]
    value = os.path.expanduser(getattr(config, attr))
    object.__setattr__(config, attr, value)
    longest = max((len(part.encode()) for part in Path(value).parts), default=0)
    _check(longest <= 255, f"{key} holds a name of {longest} bytes; file systems allow 255")


def _key(doc: str, default: Any = dataclasses.MISSING) -> Any:
    """A config key's field and its one-line description (the only one: `fmlray config` prints it)."""
    return field(default=default, metadata={"doc": doc})


def keys(cfg: Any, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(dotted key, value, default, description) of every key of config `cfg`, groups' keys included.

    A key's default is its value when left out of its table (a group's name has none: MISSING).
    """
    out = []
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += keys(value, f"{key}.")
            continue
        out.append((key, value, f.default, f.metadata["doc"]))
        if f.name == "groups":
            for i, group in enumerate(value):
                out += keys(group, f"{key}.{i}.")
    return out


def apportion(total: int, weights: list[float]) -> list[int]:
    """Split `total` in proportion to `weights` (largest remainder; ties to the first)."""
    wsum = sum(weights)
    exact = [total * w / wsum if wsum else 0.0 for w in weights]
    out = [int(math.floor(e)) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: (out[i] - exact[i], i))[: total - sum(out)]:
        out[i] += 1
    return out


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = _key("the run's folder, <output_dir>/<name>/", "digits-fml")
    seed: int = _key("every random draw derives from (seed, round, client)", 0)
    rounds: int = _key("federated rounds", 10)
    output_dir: str = _key("folder that holds the run folders", "runs")
    eval_every: int = _key("evaluate every N rounds (and always after the last one)", 1)
    eval_clients: int | str = _key("whose models an evaluation tests: \"all\", \"sampled\" (the round's trained "
                                   "clients), or N (those plus a seeded sample of N others; all when fewer)", "all")
    checkpoint_every: int = _key("checkpoint every N rounds (0: only when stopped by a signal); actors write only "
                                 "the private-state rows changed since the last one", 1)

    def __post_init__(self):
        folder_name("run.name", self.name)
        _check(bool(self.output_dir), "run.output_dir is empty; give the folder that holds the run folders "
               "(\"runs\", or \".\" for this one)")
        _path(self, "run.output_dir")
        _between("run.seed", self.seed, 0, 2**63 - 1)
        _between("run.rounds", self.rounds, 1, INT32_MAX)
        _between("run.eval_every", self.eval_every, 1, INT32_MAX)
        _between("run.checkpoint_every", self.checkpoint_every, 0, INT32_MAX)
        _check(self.eval_clients in ("all", "sampled") or (isinstance(self.eval_clients, int) and self.eval_clients >= 1),
               f"run.eval_clients must be \"all\", \"sampled\" or a number >= 1, got {self.eval_clients!r}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    dataset: str = _key(" | ".join(DATASETS), "digits")
    root: str = _key("where the dataset's files are; \"\": its usual place (Debian's folder for fmnist, else ./data)", "")
    download: bool = _key("only then may torchvision fetch a missing dataset", False)
    partition: str = _key(" | ".join(PARTITIONS) + " (natural: synthetic only; file: data.partition_file)", "dirichlet")
    dirichlet_alpha: float = _key("label skew of partition = \"dirichlet\": smaller is more skewed", 0.5)
    classes_per_client: int = _key("classes each client holds, for partition = \"shards\"", 2)
    quantity_alpha: float = _key("size skew of partition = \"quantity\": smaller is more skewed", 1.0)
    partition_file: str = _key("for partition = \"file\": an .npz with train_<c> / test_<c> row indices "
                               "(every run saves one as partition.npz)", "")
    test_fraction: float = _key("held out where the dataset has no official test split", 0.2)
    min_samples: int = _key("fewest training samples a client may be left with", 10)
    max_train_samples: int = _key("stratified subsample of the training set; 0 keeps all", 0)
    max_test_samples: int = _key("stratified subsample of the test set; 0 keeps all", 0)
    emnist_split: str = _key(" | ".join(EMNIST_SPLITS) + " (dataset = \"emnist\")", "balanced")
    synthetic_alpha: float = _key("FedProx Synthetic(alpha, beta)'s alpha; as in the authors' generator it changes "
                                  "no label (it shifts every class's logit alike): the data depend on beta", 1.0)
    synthetic_beta: float = _key("... and how much their inputs differ", 1.0)
    synthetic_dim: int = _key("features of the synthetic dataset", 60)
    synthetic_classes: int = _key("classes of the synthetic dataset", 10)

    def __post_init__(self):
        _one_of("data.dataset", self.dataset, DATASETS)
        _one_of("data.partition", self.partition, PARTITIONS)
        _path(self, "data.root")
        _path(self, "data.partition_file")
        _check(self.partition != "natural" or self.dataset == "synthetic",
               "data.partition = 'natural' needs data.dataset = 'synthetic' (only it has natural clients)")
        _check((self.partition == "file") == bool(self.partition_file),
               "data.partition = 'file' goes with data.partition_file = <path.npz> (and only then)")
        _positive("data.dirichlet_alpha", self.dirichlet_alpha)
        _positive("data.quantity_alpha", self.quantity_alpha)
        _one_of("data.emnist_split", self.emnist_split, EMNIST_SPLITS)
        _between("data.synthetic_classes", self.synthetic_classes, 2, MAX_SYNTHETIC_CLASSES)
        _between("data.classes_per_client", self.classes_per_client, 1,  # read by partition = "shards" only
                 self.num_classes if self.partition == "shards" else INT32_MAX, f" (the {self.dataset} classes)")
        _check(0 < self.test_fraction < 1, f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
        _between("data.min_samples", self.min_samples, 1, INT32_MAX)
        _between("data.max_train_samples", self.max_train_samples, 0, INT32_MAX)
        _between("data.max_test_samples", self.max_test_samples, 0, INT32_MAX)
        _within("data.synthetic_alpha", self.synthetic_alpha, 0, 100, "the paper uses 0 to 1")
        _within("data.synthetic_beta", self.synthetic_beta, 0, 100, "the paper uses 0 to 1")
        _between("data.synthetic_dim", self.synthetic_dim, 1, MAX_SYNTHETIC_DIM)

    @property
    def num_classes(self) -> int:
        """The dataset's (global) classes, known before it is loaded."""
        if self.dataset == "synthetic":
            return self.synthetic_classes
        return EMNIST_SPLITS[self.emnist_split] if self.dataset == "emnist" else FIXED_CLASSES[self.dataset]


@dataclass(frozen=True, kw_only=True)
class GroupConfig:
    """Clients that share a local-model architecture and a resource request."""

    name: str = _key("the group's name (metrics' group column)")
    local_model: str = _key("the clients' private architecture: " + " | ".join(MODELS), "mlp")
    count: int = _key("exact number of clients; 0: take `share` of those left by counts", 0)
    share: float = _key("share of the clients left by counts (give count or share)", 0.0)
    num_cpus: float = _key("CPUs per client actor (Ray engine)", 1.0)
    num_gpus: float = _key("GPUs per client actor; fractions share a GPU: 0.25 packs four actors on one", 0.0)
    task: str | tuple[int, ...] = _key("what its local models predict: identity, a named task (fmlray/tasks.py), or "
                                       "one task label per class (-1: dropped from its clients)", "identity")

    def __post_init__(self):
        key = f"clients.groups[{self.name}]"
        _check(bool(self.name.strip()) and self.name.isprintable(), "clients.groups: every group needs a name")
        _check(self.name.strip() == self.name, f"clients.groups: the name {self.name!r} has surrounding spaces; drop "
               "them (tables and plots would show the group as another)")
        _one_of(f"{key}.local_model", self.local_model, MODELS)
        _between(f"{key}.count", self.count, 0, MAX_CLIENTS)
        _at_least(f"{key}.share", self.share, 0)
        _check((self.count > 0) != (self.share > 0), f"{key}: give exactly one of count (> 0) or share (> 0)" + (
            f"; it has count = {self.count} and share = {self.share:g}: set the other to 0" if self.count else ""))
        _positive(f"{key}.num_cpus", self.num_cpus)
        _at_least(f"{key}.num_gpus", self.num_gpus, 0)
        _check(self.num_gpus <= 1 or self.num_gpus == int(self.num_gpus),
               f"{key}.num_gpus must be a fraction <= 1 or a whole number, got {self.num_gpus}")
        for what, amount in (("num_cpus", self.num_cpus), ("num_gpus", self.num_gpus)):  # Ray's resource unit
            _check(amount == 0 or amount >= RESOURCE_UNIT, f"{key}.{what} = {amount:g} is below Ray's smallest share "
                   f"of a resource ({RESOURCE_UNIT:g}); raise it" + (" (or 0: on CPUs)" if what == "num_gpus" else ""))
        _check(bool(self.task), f"{key}.task is empty; give \"identity\", a named task or a list")


@dataclass(frozen=True, kw_only=True)
class ClientsConfig:
    num_clients: int = _key("clients in the federation", 20)
    fraction: float = _key("share of clients sampled each round: round(fraction × num_clients), halves to even "
                           "(Python's round), at least 1", 1.0)
    groups: tuple[GroupConfig, ...] = _key(
        "client groups ([[clients.groups]] tables): local architecture, size and resources",
        (GroupConfig(name="mlp", local_model="mlp", share=0.5), GroupConfig(name="lenet5", local_model="lenet5", share=0.5)))

    def __post_init__(self):
        _between("clients.num_clients", self.num_clients, 1, MAX_CLIENTS)
        _unit("clients.fraction", self.fraction, open_low=True)
        _check(len(self.groups) >= 1, "clients.groups must list at least one group")
        names = [g.name for g in self.groups]
        _check(len(set(names)) == len(names), f"clients.groups: group names must be unique, got {names}")
        counted = sum(g.count for g in self.groups)
        _check(counted <= self.num_clients,
               f"clients.groups: counts add up to {counted} > clients.num_clients = {self.num_clients}")
        _check(any(g.share > 0 for g in self.groups) or counted == self.num_clients,
               f"clients.groups: counts add up to {counted} but clients.num_clients = {self.num_clients}; "
               "fix the counts or give a group a share")
        empty = next((g for g, size in zip(self.groups, self.group_sizes()) if size == 0), None)
        if empty is not None:  # it would be listed, and silently train nobody
            raise ConfigError(f"clients.groups[{empty.name}] gets no client (share {empty.share:g} of the "
                              f"{self.num_clients - counted} left by counts, of clients.num_clients = "
                              f"{self.num_clients}); raise its share or clients.num_clients, give it a count, or "
                              "remove the group")

    def group_sizes(self) -> tuple[int, ...]:
        """Clients per group: counts as given, the rest split by share."""
        rest = self.num_clients - sum(g.count for g in self.groups)
        by_share = apportion(rest, [g.share for g in self.groups])
        return tuple(g.count + s for g, s in zip(self.groups, by_share))

    def group_of_clients(self) -> tuple[int, ...]:
        """Group index of every client id; ids are given out group by group."""
        return tuple(i for i, size in enumerate(self.group_sizes()) for _ in range(size))


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    meme: str = _key("architecture of the shared (meme / global) model: " + " | ".join(MODELS), "mlp")

    def __post_init__(self):
        _one_of("model.meme", self.meme, MODELS)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    epochs: int = _key("local epochs per round", 5)
    batch_size: int = _key("minibatch size", 16)
    optimizer: str = _key("sgd | adam", "sgd")
    lr: float = _key("learning rate (the authors' code: SGD, lr 0.01, momentum 0.9, weight decay 5e-4)", 0.01)
    momentum: float = _key("SGD momentum", 0.9)
    weight_decay: float = _key("L2 weight decay", 5e-4)
    batching: str = _key("a group's clients on an actor: \"sequential\", \"vmap\" (one batched model) or \"auto\" "
                         "(vmap where measured faster)", "auto")
    max_batched_clients: int = _key("most clients one batched step trains (each adds its models, momentum, gradients "
                                    "and activations)", 128)
    precision: str = _key("fp32, or bf16: forward passes and losses under autocast (GPUs with bfloat16, CPUs)", "fp32")

    def __post_init__(self):
        _between("training.epochs", self.epochs, 1, INT32_MAX)
        _between("training.batch_size", self.batch_size, 1, INT32_MAX)
        _one_of("training.optimizer", self.optimizer, ("sgd", "adam"))
        _check(0 < self.lr <= 10 and math.isfinite(self.lr), f"training.lr must be in (0, 10], got {self.lr}")
        _check(0 <= self.momentum < 1, f"training.momentum must be in [0, 1), got {self.momentum}")
        _within("training.weight_decay", self.weight_decay, 0, 1, "usually 1e-4 to 1e-2")
        _one_of("training.batching", self.batching, ("auto", "sequential", "vmap"))
        _between("training.max_batched_clients", self.max_batched_clients, 1, MAX_CLIENTS)
        _one_of("training.precision", self.precision, ("fp32", "bf16"))


@dataclass(frozen=True, kw_only=True)
class FMLConfig:
    alpha: float = _key("weight of the label in the local model's loss (1 - alpha: the meme's)", 0.5)
    beta: float = _key("weight of the label in the meme's loss (1 - beta: the local model's)", 0.5)
    temperature: float = _key("distillation temperature T (T > 1 scales the KL terms by T^2)", 1.0)
    alpha_end: float | None = _key("linear schedule from alpha (round 1) to alpha_end (last round); unset: constant", None)
    beta_end: float | None = _key("the same for beta", None)

    def __post_init__(self):
        _unit("algorithm.fml.alpha", self.alpha)
        _unit("algorithm.fml.beta", self.beta)
        _within("algorithm.fml.temperature", self.temperature, 0.01, 100, "distillation uses 1 to 20")
        if self.alpha_end is not None:
            _unit("algorithm.fml.alpha_end", self.alpha_end)
        if self.beta_end is not None:
            _unit("algorithm.fml.beta_end", self.beta_end)

    def at_round(self, rnd: int, rounds: int) -> tuple[float, float]:
        """(alpha, beta) for round `rnd` (1-based) of `rounds`: the dynamic balancing schedule."""
        t = 0.0 if rounds <= 1 else (rnd - 1) / (rounds - 1)
        alpha_end = self.alpha if self.alpha_end is None else self.alpha_end
        beta_end = self.beta if self.beta_end is None else self.beta_end
        return self.alpha + t * (alpha_end - self.alpha), self.beta + t * (beta_end - self.beta)


@dataclass(frozen=True, kw_only=True)
class FedProxConfig:
    mu: float = _key("proximal weight; 0 is FedAvg", 0.01)

    def __post_init__(self):
        _within("algorithm.fedprox.mu", self.mu, 0, 100, "the FedProx paper uses 0.001 to 1")


@dataclass(frozen=True, kw_only=True)
class DittoConfig:
    lam: float = _key("λ: pull of each personal model toward the global model; 0: no pull (Local's training) "
                      "(the paper tunes it per dataset, from 0.01 to 2)", 0.1)

    def __post_init__(self):
        _within("algorithm.ditto.lam", self.lam, 0, 100, "the Ditto paper uses 0.01 to 2")


@dataclass(frozen=True, kw_only=True)
class FedPerConfig:
    head_layers: int = _key("last layers of the global architecture each client keeps (its head); 0 is FedAvg", 1)

    def __post_init__(self):
        _between("algorithm.fedper.head_layers", self.head_layers, 0, 1000)


@dataclass(frozen=True, kw_only=True)
class FedRepConfig:
    head_layers: int = _key("last layers each client keeps (its head); the rest is the shared representation", 1)
    body_epochs: int = _key("of the training.epochs, the last ones train the representation (head fixed); the "
                            "others the head (representation fixed)", 1)

    def __post_init__(self):
        _between("algorithm.fedrep.head_layers", self.head_layers, 0, 1000)
        _check(self.body_epochs != 0, "algorithm.fedrep.body_epochs = 0 never trains the shared representation (the "
               "global model would stay as it starts); give at least 1")
        _between("algorithm.fedrep.body_epochs", self.body_epochs, 1, INT32_MAX)


@dataclass(frozen=True, kw_only=True)
class APFLConfig:
    alpha: float = _key("initial mixing weight α of each personal model (v̄ = α·v + (1 − α)·w)", 0.5)
    adaptive: bool = _key("learn α on each client by gradient steps (the paper's adaptive α); false keeps it fixed", True)
    alpha_lr: float = _key("learning rate of α's steps", 0.01)

    def __post_init__(self):
        _unit("algorithm.apfl.alpha", self.alpha)
        _check(0 < self.alpha_lr <= 10, f"algorithm.apfl.alpha_lr must be in (0, 10], got {self.alpha_lr}")


@dataclass(frozen=True, kw_only=True)
class LGFedAvgConfig:
    global_layers: int = _key("last layers of the global architecture that are shared (averaged); the rest is each "
                              "client's own representation", 1)

    def __post_init__(self):
        _between("algorithm.lgfedavg.global_layers", self.global_layers, 0, 1000)


@dataclass(frozen=True, kw_only=True)
class AlgorithmConfig:
    name: str = _key(" | ".join(ALGORITHMS) + " (dml reads algorithm.fml's alpha, beta and temperature)", "fml")
    weighting: str = _key("how the shared models are averaged: by the clients' sample counts (samples) or uniform",
                          "samples")
    server_lr: float = _key("server learning rate: global ← global + server_lr·(mean − global); 1 is the mean", 1.0)
    fml: FMLConfig = field(default_factory=FMLConfig)
    fedprox: FedProxConfig = field(default_factory=FedProxConfig)
    ditto: DittoConfig = field(default_factory=DittoConfig)
    fedper: FedPerConfig = field(default_factory=FedPerConfig)
    fedrep: FedRepConfig = field(default_factory=FedRepConfig)
    apfl: APFLConfig = field(default_factory=APFLConfig)
    lgfedavg: LGFedAvgConfig = field(default_factory=LGFedAvgConfig)

    def __post_init__(self):
        _one_of("algorithm.name", self.name, ALGORITHMS)
        _one_of("algorithm.weighting", self.weighting, ("samples", "uniform"))
        _check(0 < self.server_lr <= 10 and math.isfinite(self.server_lr),
               f"algorithm.server_lr must be in (0, 10], got {self.server_lr}")

    def schedule_keys(self) -> list[str]:
        """The keys that spread a hyper-parameter over run.rounds (FML's α/β schedule): where any is set, a run's
        length is part of its experiment (a resumed run cannot be extended)."""
        if self.name in IGNORE_FML:
            return []
        return [f"algorithm.fml.{k}" for k in ("alpha_end", "beta_end") if getattr(self.fml, k) is not None]


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    kind: str = _key("ray, or serial: every client in-process, the debugging reference", "ray")
    num_actors: int = _key("client actors; 0: as many as the cluster's resources allow (at most one per client)", 0)
    address: str = _key("Ray cluster to join (\"auto\", \"ray://...\"); \"\": RAY_ADDRESS or a private local Ray", "")
    state_store: str = _key("where the clients' private state lives: \"memory\", \"disk\" (rows in files "
                            "under state_dir, direct I/O) or \"auto\" (memory while it fits a quarter of the node's)", "auto")
    state_dir: str = _key("node-local folder for the disk store; \"\": a scratch folder removed at the end", "")

    def __post_init__(self):
        _one_of("engine.kind", self.kind, ENGINES)
        _one_of("engine.state_store", self.state_store, ("auto", "memory", "disk"))
        _between("engine.num_actors", self.num_actors, 0, MAX_CLIENTS)
        _path(self, "engine.state_dir")


@dataclass(frozen=True, kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self):
        for g in self.clients.groups:  # a task fits one dataset: checked here, where both are known
            resolve_task(g.task, dataset=self.data.dataset, num_classes=self.data.num_classes,
                         key=f"clients.groups[{g.name}].task")
        if self.engine.state_dir:  # its first client rows would make the run's folder before the run could claim it
            run = os.path.abspath(os.path.join(self.run.output_dir, self.run.name))
            state = os.path.abspath(self.engine.state_dir)
            own = [run, *(os.path.join(os.path.dirname(run), f".{self.run.name}.{end}") for end in ("new", "old"))]
            _check(not any(state == f or state.startswith(f + os.sep) for f in own),
                   f"engine.state_dir = {self.engine.state_dir!r} lies inside the run's own folder {run}; put it "
                   "outside (a node-local scratch folder), or leave it empty")
        _check(self.algorithm.name != "fedrep" or self.algorithm.fedrep.body_epochs <= self.training.epochs,
               f"algorithm.fedrep.body_epochs = {self.algorithm.fedrep.body_epochs} is more than training.epochs = "
               f"{self.training.epochs}; lower it or raise training.epochs")
        # the head trains in the epochs before the body's: with none, each client's head stayed the round-0 one
        _check(self.algorithm.name != "fedrep" or self.algorithm.fedrep.body_epochs < self.training.epochs,
               f"algorithm.fedrep.body_epochs = {self.algorithm.fedrep.body_epochs} takes every one of training.epochs "
               f"= {self.training.epochs}, so the clients' heads would never train (FedRep trains the head first, then "
               "the body); raise training.epochs or lower algorithm.fedrep.body_epochs")

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


# ---------------------------------------------------------------------------------------------
# Building configs from plain data (TOML tables and --set overrides)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", tuple: "a list"}
_BASES = {tuple: (list, tuple), float: (int, float)}  # what TOML gives for them
_TOML_KINDS = {bool: "a boolean", int: "an integer", float: "a number", datetime.date: "a date",
               datetime.datetime: "a date-time", datetime.time: "a time"}


def _plain(value: Any) -> str:
    """A scalar as the user typed it in TOML (a bool lower-case, a date in ISO form)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value.isoformat() if isinstance(value, (datetime.date, datetime.time)) else str(value)


def _utf8_in_another_locale(value: str) -> bool:
    """`value` (from argv or a path) is UTF-8 text that a locale of another encoding could not decode."""
    if sys.getfilesystemencoding().lower().replace("-", "") == "utf8":
        return False
    try:
        value.encode("utf-8", "surrogateescape").decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _label(item: Any, i: int) -> str:
    """How a message names a list's item: a table by its plain name (clients.groups[parity], as the checks after
    coercion name it), else by its position."""
    name = item.get("name") if isinstance(item, dict) else None  # not one of digits: it would read as an index
    return name if isinstance(name, str) and re.fullmatch(r"[\w-]{1,64}", name) and not name.isdigit() else str(i)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        failed = []
        for candidate in inner:  # e.g. int | str: the first type the value is
            try:
                return _coerce(value, candidate, key)
            except ConfigError as exc:
                failed.append((candidate, exc))
        for candidate, exc in failed:  # of a candidate's type, but a wrong value (a control character...): that
            base = _BASES.get(typing.get_origin(candidate) or candidate, candidate)
            if isinstance(value, base) and not isinstance(value, bool):
                raise exc
        words = [_TYPE_WORDS.get(typing.get_origin(a) or a, _type_name(a)) for a in inner]
        raise ConfigError(f"{key} must be {' or '.join(words)}, got {_got(value)}")
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        what = "a list of tables" if dataclasses.is_dataclass(item_tp) else "a list"
        _check(isinstance(value, (list, tuple)), f"{key} must be {what}, got {_got(value)}")
        return tuple(_coerce(v, item_tp, f"{key}[{_label(v, i)}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), f"{key} must be a table, got {_got(value)}")
        return from_dict(tp, value, key)
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, f"{key} must be a number, got {_got(value)}")
        _check(math.isfinite(value) and abs(value) <= 1e300, f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{key} must be an integer, got {_got(value)}")
        _check(-2**63 <= value < 2**63, f"{key} = {value} does not fit in 64 bits (TOML's integers)")
        return value
    if tp is str and isinstance(value, (bool, int, float, datetime.date, datetime.time)):
        text = _plain(value)  # TOML read a bare word as a number, a boolean or a date
        raise ConfigError(f"{key} must be a string, got {value!r}: TOML reads {text} as {_TOML_KINDS[type(value)]}; "
                          f"quote it: {key.rsplit('.', 1)[-1]} = \"{text}\" in a file, --set '{key}=\"{text}\"'")
    _check(isinstance(value, tp), f"{key} must be {_TYPE_WORDS.get(tp) or 'a ' + _type_name(tp)}, got {_got(value)}")
    if tp is str:
        raw = [c for c in value if "\udc80" <= c <= "\udcff"]  # a path's byte that is not UTF-8 (os.fsdecode's escape)
        if raw and _utf8_in_another_locale(value):
            raise ConfigError(f"{key} = {ascii(value.encode('utf-8', 'surrogateescape').decode())} cannot be read in "
                              f"this locale's encoding ({sys.getfilesystemencoding()}); run fmlray under a UTF-8 "
                              "locale (e.g. LANG=C.UTF-8) or with PYTHONUTF8=1")
        if raw:
            raise ConfigError(f"{key} = {value.encode('utf-8', 'surrogateescape')!r} holds the byte "
                              f"{ord(raw[0]) - 0xdc00:#x}, which is not UTF-8 text, and fmlray keeps its settings as "
                              "UTF-8 (config.toml); rename that folder or file, or give a path relative to it from "
                              "inside")
        _check(value.isprintable(), f"{key} = {value!r} holds a control character (e.g. a NUL, newline or tab); remove it")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in hints:
            exc = ConfigError(f"unknown key '{path}'; valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}")
            exc.key = path
            raise exc
        kwargs[key] = _coerce(value, hints[key], path)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:  # a required key (no default), e.g. a group's name: named as the config names it
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{', '.join(where + m for m in missing)} {'are' if len(missing) > 1 else 'is'} required "
                          f"(no default); add {' and '.join(f'{m} = ...' for m in missing)} to "
                          f"{f'the {prefix} table' if prefix else 'the config'}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config, without None values (TOML has no null)."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return clean(dataclasses.asdict(cfg))


def quoted(text: str) -> str:
    """`text` as a TOML string, for a `section.key=value` override (a Python repr is not one: its 'a\\b' is
    TOML's literal string of two backslashes)."""
    return json.dumps(text, ensure_ascii=False)  # TOML's basic strings escape as JSON does


def leaf_keys(key: str, value: Any) -> list[str]:
    """The dotted keys an override of `key` with `value` sets: a table sets its keys one by one (see _apply)."""
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in leaf_keys(f"{key}.{k}", v)]
    return [] if isinstance(value, dict) else [key]


def parse_override(text: str) -> tuple[list[str], Any]:
    """'training.lr=0.05' → (['training', 'lr'], 0.05); values parse as TOML, else as a bare string."""
    key, sep, raw = text.partition("=")
    _check(bool(sep) and bool(key.strip()), f"--set {text!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError as exc:
        # a bare word is a string (run.name=x); one opening as TOML does was meant as TOML: taken as a string,
        # `run.name="x` named a folder '"x' and `training={lr=}` read as "must be a table"
        _check(raw.isprintable(), f"--set {key.strip()}={raw.strip()!r} holds a control character (e.g. a NUL, "
               "newline or tab); remove it")
        _check(not raw.strip().startswith(('"', "'", "[", "{")),
               f"--set {key.strip()}={raw.strip()}: the value is not valid TOML ({str(exc).partition(' (')[0]}); "
               "close its quotes, brackets or braces, e.g. run.name=\"x\" or training={lr = 0.1}")
        value = raw.strip()
    except RecursionError:  # tomllib parses nesting recursively: some hundred levels exhaust Python's stack
        raise ConfigError(f"--set {key.strip()}=...: the value nests lists or tables {_TOO_DEEP}") from None
    keys = key.strip().split(".")
    _check(all(keys), f"--set {text!r}: the key {key.strip()!r} has an empty part; write section.key=value")
    return keys, value


def _apply(tree: dict[str, Any], path: list[str], value: Any, full: str) -> None:
    node: Any = tree
    for i, part in enumerate(path):
        _check(isinstance(node, (dict, list)), f"--set {full}: '{'.'.join(path[:i])}' is a single value, "
               f"not a table; drop '.{'.'.join(path[i:])}'")
        if isinstance(node, list):
            _check(ascii_digits(part) and int(part) < len(node),
                   f"--set {full}: '{part}' is not an index of the {len(node)} entries there")
            part = int(part)
        elif i < len(path) - 1:
            node.setdefault(part, {})
        if i == len(path) - 1:
            old = node[part] if isinstance(node, list) else node.get(part)
            if isinstance(value, dict) and isinstance(old, dict):
                _merge(old, value)  # key by key, as a file's table: `training={lr=0.1}` keeps the other keys
            else:
                node[part] = value
        else:
            node = node[part]


_TOO_DEEP = "hundreds of levels deep; no fmlray setting nests more than a few (see fmlray/presets/)"
MAX_TOML_BYTES = 16 * 2**20  # a config, sweep or tune file is a few kB; more is a wrong file (or /dev/zero)


def load_toml(path: str | Path, kind: str = "config file") -> dict[str, Any]:
    """A TOML file (config, sweep or tune) as a dict; any path but a folder is read, so /dev/stdin and a
    shell's <(...) work too. Every failure is one ConfigError line naming the file as `kind`."""
    path = Path(path)
    see = "fmlray/presets/" if kind == "config file" else "experiments/"
    if path.is_dir() or not os.path.exists(path):
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"{kind} {path} {what}; give a TOML file (see {see})")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOML_BYTES + 1)
        _check(len(data) <= MAX_TOML_BYTES, f"{kind} {path} is larger than {MAX_TOML_BYTES >> 20} MiB; "
               f"give a TOML {kind} (see {see})")
        return tomllib.loads(data.decode("utf-8-sig"))  # a byte-order mark (some Windows editors) is no error
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{kind} {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{kind} {path} is not UTF-8 text (a binary file, or another encoding); save it as UTF-8 "
                          f"text (see {see})") from None
    except RecursionError:  # see parse_override
        raise ConfigError(f"{kind} {path} nests arrays or tables {_TOO_DEEP}") from None
    except OSError as exc:
        raise ConfigError(f"{kind} {path} cannot be read: {exc.strerror}") from None


def refuse_other_kind(spec: dict[str, Any], path: str | Path, kind: str) -> None:
    """A ConfigError naming the command that reads `path`, when it is one of the other files fmlray reads (a
    config, a sweep or a tune file) given where a `kind` goes."""
    found = next((k for k in ("sweep", "tune") if k in spec), None) or \
        ("config" if any(k in spec for k in to_dict(Config())) else None)
    if found is not None and found != kind:
        run = "fmlray run --config" if found == "config" else f"fmlray {found}"
        raise ConfigError(f"{path} is a {found} file, not a {kind} file: run it with {run} {path}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the TOML file (its tables replace the defaults key by key), then --set's."""
    tree, given = to_dict(Config()), {}
    if path is not None:
        given = load_toml(path)
        refuse_other_kind(given, path, "config")
        for section, table in given.items():
            if isinstance(table, dict) and isinstance(tree.get(section), dict):
                _merge(tree[section], table)
            else:
                tree[section] = table
    set_keys = set()
    for text in overrides:
        keys, value = parse_override(text)
        _apply(tree, keys, value, text.partition("=")[0])
        set_keys.add(".".join(keys))
    try:
        return from_dict(Config, tree)
    except ConfigError as exc:
        key = getattr(exc, "key", None)  # an unknown key: say where it was written, when it was the file
        if key is not None and key not in set_keys and _holds(given, key):
            raise ConfigError(f"{path}: {exc}") from None
        raise


ABSENT = object()  # what `value_at` finds where a tree has no such key


def value_at(tree: dict[str, Any], dotted: str) -> Any:
    """The value of key `dotted` (clients.groups[0].name, clients.groups.0.name or, as messages name a table in
    a list, clients.groups[parity].name: into lists too) in `tree`, a config as nested dicts and lists; ABSENT
    where it has none."""
    node: Any = tree
    for part in re.sub(r"\[([\w-]+)\]", r".\1", dotted).split("."):
        named = [v for v in node if isinstance(v, dict) and v.get("name") == part] if isinstance(node, list) else []
        if isinstance(node, list) and ascii_digits(part) and int(part) < len(node):
            node = node[int(part)]
        elif named:
            node = named[0]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return ABSENT
    return node


def _holds(tree: dict[str, Any], dotted: str) -> bool:
    return value_at(tree, dotted) is not ABSENT


def _merge(base: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value  # lists (client groups) replace, they do not merge
