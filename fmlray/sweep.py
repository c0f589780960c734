"""`fmlray sweep FILE`: a grid of runs (axes × seeds) from one TOML file, into one folder and one
combined Parquet table. Re-running a sweep skips finished runs and resumes interrupted ones.

    [sweep]
    name = "digits-heterogeneity"
    base = "../fmlray/presets/digits.toml"    # optional, relative to this file
    output_dir = "runs/sweeps"
    seeds = [0, 1, 2]
    set = ["engine.kind=serial", "run.rounds=20"]

    [[axis]]
    name = "partition"
    values = ["data.partition=iid", {label = "dir0.1", set = ["data.dirichlet_alpha=0.1"]}]
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fmlray.config import Config, load_config, load_toml
from fmlray.errors import ConfigError

RESULTS = "results.parquet"


@dataclass(frozen=True)
class Run:
    name: str
    labels: dict[str, str]  # axis name -> variant label, plus "seed"
    cfg: Config


def _variant(v, where: str) -> tuple[str, list[str]]:
    """(label, overrides) of one axis value: "key=value" or {label = ..., set = [...]}."""
    if isinstance(v, str):
        return v.partition("=")[2] or v, [v]
    if isinstance(v, dict) and set(v) <= {"label", "set"} and isinstance(v.get("label"), str) \
            and isinstance(v.get("set"), list) and all(isinstance(s, str) for s in v["set"]):
        return v["label"], v["set"]
    raise ConfigError(f"{where}: each value is \"section.key=value\" or {{label = \"...\", set = [\"...\"]}}, got {v!r}")


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label)


def plan(path: str | Path) -> tuple[Path, list[Run]]:
    """The sweep's folder and every run of its grid, each config validated before anything runs."""
    path = Path(path)
    spec = load_toml(path)
    unknown = set(spec) - {"sweep", "axis"}
    if unknown or not isinstance(spec.get("sweep"), dict):
        raise ConfigError(f"{path}: a sweep file has a [sweep] table and [[axis]] tables (found {sorted(spec)})")
    s = spec["sweep"]
    bad = set(s) - {"name", "base", "output_dir", "seeds", "set"}
    if bad:
        raise ConfigError(f"{path}: unknown key(s) {sorted(bad)} in [sweep]; valid: name, base, output_dir, seeds, set")
    if not isinstance(s.get("name"), str) or not s["name"]:
        raise ConfigError(f"{path}: [sweep] needs a name")
    seeds = s.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and x >= 0 for x in seeds):
        raise ConfigError(f"{path}: sweep.seeds must be a non-empty list of integers >= 0")
    base = (path.parent / s["base"]) if "base" in s else None
    common = s.get("set", [])
    axes = []
    for i, axis in enumerate(spec.get("axis", [])):
        if not isinstance(axis, dict) or set(axis) != {"name", "values"} or not axis["values"]:
            raise ConfigError(f"{path}: [[axis]] {i} needs exactly a name and a non-empty list of values")
        axes.append((axis["name"], [_variant(v, f"{path}: axis {axis['name']}") for v in axis["values"]]))
    folder = Path(s.get("output_dir", "runs/sweeps")) / s["name"]
    runs = []
    for combo in itertools.product(*[variants for _, variants in axes]):
        for seed in seeds:
            labels = {name: label for (name, _), (label, _) in zip(axes, combo)}
            name = "-".join([_safe(lbl) for lbl in labels.values()] + [f"s{seed}"])
            overrides = [*common, *(o for _, sets in combo for o in sets), f"run.seed={seed}", f"run.name={name!r}",
                         f"run.output_dir={str(folder)!r}"]
            try:
                cfg = load_config(base, overrides)
            except ConfigError as exc:
                raise ConfigError(f"{path}: run {name}: {exc}") from None
            runs.append(Run(name, {**labels, "seed": str(seed)}, cfg))
    return folder, runs


def run_sweep(path: str | Path, echo=print) -> Path:
    """Run (or finish) every run of the sweep, then write the combined table; return its path."""
    from fmlray import checkpoint
    from fmlray.simulation import run_experiment

    folder, runs = plan(path)
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
