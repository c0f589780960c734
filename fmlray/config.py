"""Typed, frozen experiment config: TOML in, --set overrides, validation with actionable errors.

Every section is a keyword-only frozen dataclass that checks itself in ``__post_init__`` and
names the key to change. The defaults are the embedded default experiment (digits, 20 clients,
Dirichlet(0.5), FML with two local architectures), shipped as ``presets/digits.toml`` too.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmlray.errors import ConfigError

DATASETS = ("digits", "synthetic", "fmnist", "mnist", "cifar10", "cifar100", "emnist")
PARTITIONS = ("iid", "dirichlet", "shards", "quantity", "natural", "file")
MODELS = ("mlp", "lenet5", "cnn", "cnn5", "resnet8", "resnet18")
ALGORITHMS = ("fml", "fedavg", "fedprox", "local")
ENGINES = ("serial", "ray")
PRESETS_DIR = Path(__file__).parent / "presets"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{key} = {value!r} is unknown; choose one of {', '.join(choices)}")


def _unit(key: str, value: float, *, open_low: bool = False) -> None:
    low_ok = value > 0 if open_low else value >= 0
    bound = "(0, 1]" if open_low else "[0, 1]"
    _check(low_ok and value <= 1 and math.isfinite(value), f"{key} must be in {bound}, got {value}")


def _positive(key: str, value: float) -> None:
    _check(value > 0 and math.isfinite(value), f"{key} must be > 0, got {value}")


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
    name: str = "digits-fml"
    seed: int = 0
    rounds: int = 10
    output_dir: str = "runs"
    eval_every: int = 1  # evaluate every N rounds (and always after the last one)
    # which clients' models an evaluation round tests: "all", "sampled" (the round's trained
    # clients), or N: the round's trained clients plus a seeded sample of N of the others
    eval_clients: int | str = "all"
    # checkpoint every N rounds (0: only when stopped by a signal); each actor writes the rows
    # of private state changed since the last one, so the cost follows the sampled clients
    checkpoint_every: int = 1

    def __post_init__(self):
        _check(bool(self.name) and "/" not in self.name and not self.name.startswith("."),
               f"run.name = {self.name!r} must be a plain folder name (no '/', not starting with '.')")
        _check(self.seed >= 0, f"run.seed must be >= 0, got {self.seed}")
        _check(self.rounds >= 1, f"run.rounds must be >= 1, got {self.rounds}")
        _check(self.eval_every >= 1, f"run.eval_every must be >= 1, got {self.eval_every}")
        _check(self.checkpoint_every >= 0, f"run.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        _check(self.eval_clients in ("all", "sampled") or (isinstance(self.eval_clients, int) and self.eval_clients >= 1),
               f"run.eval_clients must be \"all\", \"sampled\" or a number >= 1, got {self.eval_clients!r}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    dataset: str = "digits"
    root: str = ""  # "" → the dataset's usual place (Debian's folder for fmnist, else ./data)
    download: bool = False  # only then may torchvision fetch a missing dataset
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5  # label skew: smaller is more skewed
    classes_per_client: int = 2  # for partition = "shards"
    quantity_alpha: float = 1.0  # size skew for partition = "quantity": smaller is more skewed
    partition_file: str = ""  # for partition = "file": an .npz with train_<c> / test_<c> indices
    test_fraction: float = 0.2  # held out where the dataset has no official test split
    min_samples: int = 10  # fewest training samples a client may be left with
    max_train_samples: int = 0  # stratified subsample of the training set; 0 keeps all
    max_test_samples: int = 0
    emnist_split: str = "balanced"
    synthetic_alpha: float = 1.0  # FedProx Synthetic(alpha, beta): model heterogeneity
    synthetic_beta: float = 1.0  # ... and feature heterogeneity
    synthetic_dim: int = 60
    synthetic_classes: int = 10

    def __post_init__(self):
        _one_of("data.dataset", self.dataset, DATASETS)
        _one_of("data.partition", self.partition, PARTITIONS)
        _check(self.partition != "natural" or self.dataset == "synthetic",
               "data.partition = 'natural' needs data.dataset = 'synthetic' (only it has natural clients)")
        _check((self.partition == "file") == bool(self.partition_file),
               "data.partition = 'file' goes with data.partition_file = <path.npz> (and only then)")
        _positive("data.dirichlet_alpha", self.dirichlet_alpha)
        _positive("data.quantity_alpha", self.quantity_alpha)
        _check(self.classes_per_client >= 1, f"data.classes_per_client must be >= 1, got {self.classes_per_client}")
        _check(0 < self.test_fraction < 1, f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
        _check(self.min_samples >= 1, f"data.min_samples must be >= 1, got {self.min_samples}")
        _check(self.max_train_samples >= 0, f"data.max_train_samples must be >= 0, got {self.max_train_samples}")
        _check(self.max_test_samples >= 0, f"data.max_test_samples must be >= 0, got {self.max_test_samples}")
        _one_of("data.emnist_split", self.emnist_split, ("balanced", "byclass", "bymerge", "digits", "letters", "mnist"))
        _check(self.synthetic_alpha >= 0, f"data.synthetic_alpha must be >= 0, got {self.synthetic_alpha}")
        _check(self.synthetic_beta >= 0, f"data.synthetic_beta must be >= 0, got {self.synthetic_beta}")
        _check(self.synthetic_dim >= 1, f"data.synthetic_dim must be >= 1, got {self.synthetic_dim}")
        _check(self.synthetic_classes >= 2, f"data.synthetic_classes must be >= 2, got {self.synthetic_classes}")


@dataclass(frozen=True, kw_only=True)
class GroupConfig:
    """Clients that share a local-model architecture and a resource request."""

    name: str
    local_model: str = "mlp"
    count: int = 0  # exact number of clients; 0 → take `share` of those left by counts
    share: float = 0.0
    num_cpus: float = 1.0  # per client actor (Ray engine)
    num_gpus: float = 0.0  # fractions share a GPU: 0.25 packs four actors on one

    def __post_init__(self):
        key = f"clients.groups[{self.name}]"
        _check(bool(self.name), "clients.groups: every group needs a name")
        _one_of(f"{key}.local_model", self.local_model, MODELS)
        _check(self.count >= 0, f"{key}.count must be >= 0, got {self.count}")
        _check(self.share >= 0 and math.isfinite(self.share), f"{key}.share must be >= 0, got {self.share}")
        _check((self.count > 0) != (self.share > 0), f"{key}: give exactly one of count (> 0) or share (> 0)")
        _check(self.num_cpus > 0, f"{key}.num_cpus must be > 0, got {self.num_cpus}")
        _check(self.num_gpus >= 0, f"{key}.num_gpus must be >= 0, got {self.num_gpus}")
        _check(self.num_gpus <= 1 or self.num_gpus == int(self.num_gpus),
               f"{key}.num_gpus must be a fraction <= 1 or a whole number, got {self.num_gpus}")


@dataclass(frozen=True, kw_only=True)
class ClientsConfig:
    num_clients: int = 20
    fraction: float = 1.0  # share of clients sampled each round
    groups: tuple[GroupConfig, ...] = (
        GroupConfig(name="mlp", local_model="mlp", share=0.5),
        GroupConfig(name="lenet5", local_model="lenet5", share=0.5),
    )

    def __post_init__(self):
        _check(self.num_clients >= 1, f"clients.num_clients must be >= 1, got {self.num_clients}")
        _unit("clients.fraction", self.fraction, open_low=True)
        _check(len(self.groups) >= 1, "clients.groups must list at least one group")
        names = [g.name for g in self.groups]
        _check(len(set(names)) == len(names), f"clients.groups: group names must be unique, got {names}")
        counted = sum(g.count for g in self.groups)
        _check(counted <= self.num_clients,
               f"clients.groups: counts add up to {counted} > clients.num_clients = {self.num_clients}")
        has_share = any(g.share > 0 for g in self.groups)
        _check(has_share or counted == self.num_clients,
               f"clients.groups: counts add up to {counted} but clients.num_clients = {self.num_clients}; "
               "fix the counts or give a group a share")

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
    meme: str = "mlp"  # architecture of the shared (meme / global) model

    def __post_init__(self):
        _one_of("model.meme", self.meme, MODELS)


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    epochs: int = 5
    batch_size: int = 16
    optimizer: str = "sgd"
    lr: float = 0.01  # authors' code: SGD, lr 0.01, momentum 0.9, weight decay 5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self):
        _check(self.epochs >= 1, f"training.epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"training.batch_size must be >= 1, got {self.batch_size}")
        _one_of("training.optimizer", self.optimizer, ("sgd", "adam"))
        _check(0 < self.lr <= 10 and math.isfinite(self.lr), f"training.lr must be in (0, 10], got {self.lr}")
        _check(0 <= self.momentum < 1, f"training.momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"training.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True, kw_only=True)
class FMLConfig:
    alpha: float = 0.5  # weight of the label in the local model's loss (1 - alpha: the meme's)
    beta: float = 0.5  # weight of the label in the meme's loss (1 - beta: the local model's)
    temperature: float = 1.0
    alpha_end: float | None = None  # linear schedule from alpha (round 1) to alpha_end (last round)
    beta_end: float | None = None

    def __post_init__(self):
        _unit("algorithm.fml.alpha", self.alpha)
        _unit("algorithm.fml.beta", self.beta)
        _positive("algorithm.fml.temperature", self.temperature)
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
    mu: float = 0.01  # proximal weight; 0 is FedAvg

    def __post_init__(self):
        _check(self.mu >= 0 and math.isfinite(self.mu), f"algorithm.fedprox.mu must be >= 0, got {self.mu}")


@dataclass(frozen=True, kw_only=True)
class AlgorithmConfig:
    name: str = "fml"
    weighting: str = "samples"  # how memes are averaged: by clients' sample counts, or uniform
    fml: FMLConfig = field(default_factory=FMLConfig)
    fedprox: FedProxConfig = field(default_factory=FedProxConfig)

    def __post_init__(self):
        _one_of("algorithm.name", self.name, ALGORITHMS)
        _one_of("algorithm.weighting", self.weighting, ("samples", "uniform"))


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    kind: str = "ray"  # "serial" runs every client in-process: the debugging reference
    num_actors: int = 0  # 0 → as many as the cluster's resources allow (at most one per client)
    address: str = ""  # Ray cluster to join ("auto", "ray://..."); "" → RAY_ADDRESS or a local Ray
    # where clients' private state (local models, optimisers) lives between rounds: "memory",
    # "disk" (memory-mapped files under state_dir, one row per client that has trained), or
    # "auto": memory while the estimate fits in a quarter of the node's memory, else disk
    state_store: str = "auto"
    state_dir: str = ""  # node-local folder for the disk store; "" → a scratch folder removed at the end

    def __post_init__(self):
        _one_of("engine.kind", self.kind, ENGINES)
        _one_of("engine.state_store", self.state_store, ("auto", "memory", "disk"))
        _check(self.num_actors >= 0, f"engine.num_actors must be >= 0, got {self.num_actors}")


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
        if self.data.partition == "shards":
            _check(self.data.classes_per_client >= 1, "data.classes_per_client must be >= 1")
        if self.data.dataset == "synthetic":
            _check(self.data.classes_per_client <= self.data.synthetic_classes,
                   f"data.classes_per_client = {self.data.classes_per_client} exceeds "
                   f"data.synthetic_classes = {self.data.synthetic_classes}")

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


# ---------------------------------------------------------------------------------------------
# Building configs from plain data (TOML tables and --set overrides)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner[:-1]:  # e.g. int | str: the first type the value is
            try:
                return _coerce(value, candidate, key)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        _check(isinstance(value, (list, tuple)), f"{key} must be a list of tables, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), f"{key} must be a table, got {value!r}")
        return from_dict(tp, value, key)
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{key} must be an integer, got {value!r}")
        return value
    _check(isinstance(value, tp), f"{key} must be a {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in hints:
            raise ConfigError(f"unknown key '{path}'; valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without a default, e.g. a group's name
        raise ConfigError(f"{prefix or 'config'}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config, without None values (TOML has no null)."""
    def clean(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return clean(dataclasses.asdict(cfg))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'training.lr=0.05' → (['training', 'lr'], 0.05); values parse as TOML, else as a bare string."""
    key, sep, raw = text.partition("=")
    _check(bool(sep) and bool(key.strip()), f"--set {text!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def _apply(tree: dict[str, Any], path: list[str], value: Any, full: str) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            _check(part.isdigit() and int(part) < len(node),
                   f"--set {full}: '{part}' is not an index of the {len(node)} entries there")
            node = node[int(part)]
        else:
            _check(isinstance(node, dict), f"--set {full}: '{'.'.join(path[:i])}' is not a table")
            node = node.setdefault(part, {})
    last = path[-1]
    if isinstance(node, list):
        _check(last.isdigit() and int(last) < len(node), f"--set {full}: '{last}' is not an index there")
        node[int(last)] = value
    else:
        node[last] = value


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; give a TOML file (see fmlray/presets/)")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the TOML file (its tables replace the defaults key by key), then --set's."""
    tree = to_dict(Config())
    if path is not None:
        for section, table in load_toml(path).items():
            if isinstance(table, dict) and isinstance(tree.get(section), dict):
                _merge(tree[section], table)
            else:
                tree[section] = table
    for text in overrides:
        keys, value = parse_override(text)
        _apply(tree, keys, value, text.partition("=")[0])
    return from_dict(Config, tree)


def _merge(base: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value  # lists (client groups) replace, they do not merge
