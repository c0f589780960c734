"""`fmlray sweep FILE`: a grid of runs (axes × seeds) from one TOML file, into one folder and one
combined Parquet table. Re-running a sweep skips finished runs and resumes interrupted ones.

    [sweep]
    name = "digits-heterogeneity"
    base = "../fmlray/presets/digits.toml"    # optional, relative to this file
    output_dir = "runs/sweeps"
    seeds = [0, 1, 2]
    set = ["engine.kind=serial", "run.rounds=20"]
    executor = "tune"                          # optional: "loop" (one run after another, the default) or
    parallel = "auto"                          # "tune" (runs as Ray Tune trials, `parallel` at once; fmlray.trials)

    [[axis]]
    name = "partition"
    values = ["data.partition=iid", {label = "dir0.1", set = ["data.dirichlet_alpha=0.1"]}]
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fmlray.config import Config, folder_name, load_config, load_toml
from fmlray.errors import ConfigError, FmlrayError
from fmlray.metrics import SCHEMA

RESULTS = "results.parquet"
RESERVED = ("run", "seed", *SCHEMA.names)  # columns of the combined table


EXECUTORS = ("loop", "tune")


@dataclass(frozen=True)
class Sweep:
    folder: Path
    runs: list["Run"]
    executor: str  # "loop" | "tune"
    parallel: int | str  # trials at once for the tune executor: a number >= 1 or "auto"


@dataclass(frozen=True)
class Run:
    name: str
    labels: dict[str, str]  # axis name -> variant label, plus "seed"
    cfg: Config


def _variant(v, where: str) -> tuple[str, list[str]]:
    """(label, overrides) of one axis value: "key=value" or {label = ..., set = [...]}."""
    if isinstance(v, str):
        return v.partition("=")[2] or v, [v]
    if isinstance(v, dict) and set(v) <= {"label", "set"} and isinstance(v.get("label"), str) and v["label"] \
            and _strings(v.get("set")):
        return v["label"], v["set"]
    raise ConfigError(f"{where}: each value is \"section.key=value\" or {{label = \"...\", set = [\"...\"]}}, got {v!r}")


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label)


def _text(s: dict, key: str, path: Path, default: str | None = None) -> str:
    """[sweep].key as a non-empty string (or `default` when absent)."""
    value = s.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: sweep.{key} must be a non-empty string (in quotes), got {value!r}")
    return value


def _axes(spec: dict, path: Path) -> list[tuple[str, list[tuple[str, list[str]]]]]:
    """Every [[axis]] as (name, [(label, overrides)]), with unique names and labels."""
    axes = spec.get("axis", [])
    if not isinstance(axes, list):
        raise ConfigError(f"{path}: axes are [[axis]] tables (a list), got axis = {axes!r}")
    out = []
    for i, axis in enumerate(axes):
        if not isinstance(axis, dict) or set(axis) != {"name", "values"} or not isinstance(axis["values"], list) \
                or not axis["values"]:
            raise ConfigError(f"{path}: [[axis]] {i} needs exactly a name and a non-empty list of values")
        name = axis["name"]
        if not isinstance(name, str) or not name or name in RESERVED or name in (n for n, _ in out):
            raise ConfigError(f"{path}: [[axis]] {i}: name must be a string, unique, and none of "
                              f"{', '.join(RESERVED)}; got {name!r}")
        variants = [_variant(v, f"{path}: axis {name}") for v in axis["values"]]
        labels = [_safe(label) for label, _ in variants]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ConfigError(f"{path}: axis {name}: two values get the label {twice[0]!r} (run names would clash); "
                              f"give each a distinct label with {{label = \"...\", set = [...]}}")
        out.append((name, variants))
    return out


def parallel_value(value, where: str) -> int | str:
    """`parallel` as given: a number of trials at once (>= 1) or "auto"."""
    if value == "auto" or (type(value) is int and 1 <= value <= 10_000):
        return value
    if isinstance(value, str) and value.isdigit() and 1 <= int(value) <= 10_000:
        return int(value)
    raise ConfigError(f"{where} must be a number of trials at once (1 to 10,000) or \"auto\", got {value!r}")


def plan(path: str | Path) -> tuple[Path, list[Run]]:
    """The sweep's folder and every run of its grid, each config validated before anything runs."""
    sweep = plan_sweep(path)
    return sweep.folder, sweep.runs


def plan_sweep(path: str | Path) -> Sweep:
    """`plan`, with how the sweep file asks to execute it."""
    path = Path(path)
    spec = load_toml(path)
    unknown = set(spec) - {"sweep", "axis"}
    if unknown or not isinstance(spec.get("sweep"), dict):
        raise ConfigError(f"{path}: a sweep file has a [sweep] table and [[axis]] tables (found {sorted(spec)})")
    s = spec["sweep"]
    bad = set(s) - {"name", "base", "output_dir", "seeds", "set", "executor", "parallel"}
    if bad:
        raise ConfigError(f"{path}: unknown key(s) {sorted(bad)} in [sweep]; valid: name, base, output_dir, seeds, set, "
                          "executor, parallel")
    executor = s.get("executor", "loop")
    if executor not in EXECUTORS:
        raise ConfigError(f"{path}: sweep.executor = {executor!r} is unknown; choose \"loop\" (one run after "
                          "another) or \"tune\" (runs as Ray Tune trials in parallel)")
    parallel = parallel_value(s.get("parallel", "auto"), f"{path}: sweep.parallel")
    if not isinstance(s.get("name"), str) or not s["name"]:
        raise ConfigError(f"{path}: [sweep] needs a name")
    folder_name(f"{path}: sweep.name", s["name"])
    seeds = s.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) \
            or not all(type(x) is int and 0 <= x < 2**63 for x in seeds):
        raise ConfigError(f"{path}: sweep.seeds must be a non-empty list of distinct integers >= 0")
    base = path.parent / _text(s, "base", path) if "base" in s else None
    common = s.get("set", [])
    if not _strings(common):
        raise ConfigError(f"{path}: sweep.set must be a list of \"section.key=value\" strings, got {common!r}")
    axes = _axes(spec, path)
    folder = Path(_text(s, "output_dir", path, "runs/sweeps")) / s["name"]
    runs = []
    for combo in itertools.product(*[variants for _, variants in axes]):
        for seed in seeds:
            labels = {name: label for (name, _), (label, _) in zip(axes, combo)}
            name = "-".join([_safe(lbl) for lbl in labels.values()] + [f"s{seed}"])
            clash = next((r for r in runs if r.name == name), None)
            if clash is not None:
                raise ConfigError(f"{path}: runs {clash.labels} and {labels} would both be named {name!r}; "
                                  "give their values distinct labels")
            overrides = [*common, *(o for _, sets in combo for o in sets), f"run.seed={seed}", f"run.name={name!r}",
                         f"run.output_dir={str(folder)!r}"]
            try:
                cfg = load_config(base, overrides)
            except ConfigError as exc:
                raise ConfigError(f"{path}: run {name}: {exc}") from None
            runs.append(Run(name, {**labels, "seed": str(seed)}, cfg))
    return Sweep(folder, runs, executor, parallel)


def run_sweep(path: str | Path, echo=print, parallel: int | str | None = None, sequential: bool = False) -> Path:
    """Run (or finish) every run of the sweep, then write the combined table; return its path.
    One run after another, or, with `parallel` (or executor = "tune" in the file, unless `sequential`),
    as Ray Tune trials."""
    from fmlray import checkpoint
    from fmlray.simulation import run_experiment

    sweep = plan_sweep(path)
    folder, runs = sweep.folder, sweep.runs
    for run in runs:  # before any run starts: a folder in the way is the user's, never replaced
        run_dir = folder / run.name
        if os.path.lexists(run_dir) and not (run_dir / "metrics.parquet").is_file() and not checkpoint.exists(run_dir):
            raise FmlrayError(f"{run_dir} exists but holds neither a finished run nor a checkpoint of this sweep; "
                              "move it away, or set the sweep's output_dir to another folder")
    if parallel is not None or (sweep.executor == "tune" and not sequential):
        from fmlray.trials import run_trials
        run_trials(sweep, sweep.parallel if parallel is None else parallel, echo)
        return combine(folder, runs)
    for i, run in enumerate(runs, 1):
        run_dir = folder / run.name
        if (run_dir / "metrics.parquet").is_file():
            echo(f"[{i}/{len(runs)}] {run.name}: done")
            continue
        resume = run_dir if checkpoint.exists(run_dir) else None
        echo(f"[{i}/{len(runs)}] {run.name}" + (" (resuming)" if resume else ""))
        run_experiment(run.cfg, echo=echo, resume_dir=resume)
    return combine(folder, runs)


def combine(folder: Path, runs: list[Run]) -> Path:
    """One table: every run's metrics rows plus its run name, seed and axis labels."""
    tables = []
    for run in runs:
        t = pq.read_table(folder / run.name / "metrics.parquet")
        for key, value in {"run": run.name, **run.labels}.items():
            t = t.append_column(key, pa.array([value] * len(t), pa.string()))
        tables.append(t)
    table = pa.concat_tables(tables)
    table = table.set_column(table.schema.get_field_index("seed"), "seed", pc.cast(table["seed"], pa.int32()))
    out = folder / RESULTS
    tmp = folder / f".{RESULTS}.tmp"
    pq.write_table(table, tmp)
    tmp.replace(out)
    return out
