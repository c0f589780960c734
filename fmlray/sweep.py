"""`fmlray sweep FILE`: a grid of runs (axes × seeds) from one TOML file, into one folder and one
combined Parquet table. Re-running a sweep skips finished runs and resumes interrupted ones; a finished run
whose config the file no longer asks for is refused, never counted as done. Every override must take effect:
none of the keys the sweep sets itself (run.name, run.output_dir, run.seed), no key set by two axes or twice
in one place, and no two values of an axis that give one config.

    [sweep]
    name = "digits-heterogeneity"
    base = "../fmlray/presets/digits.toml"    # optional, relative to this file
    output_dir = "runs/sweeps"
    seeds = [0, 1, 2]                          # optional: the base file's run.seed (else 0) when left out
    set = ["engine.kind=serial", "run.rounds=20"]
    executor = "tune"                          # optional: "loop" (one run after another, the default) or
    parallel = "auto"                          # "tune" (runs as Ray Tune trials, `parallel` at once; fmlray.trials)

    [[axis]]
    name = "partition"
    values = ["data.partition=iid", {label = "dir0.1", set = ["data.dirichlet_alpha=0.1"]}]
"""

from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fmlray import signals
from fmlray.config import (Config, ascii_digits, folder_name, leaf_keys, load_config, load_toml, parse_override, quoted,
                           refuse_other_kind, to_dict)
from fmlray.errors import ConfigError, FmlrayError
from fmlray.metrics import SCHEMA
from fmlray.rundir import MARKER, SEARCH_RECORD, SWEEP_TABLE, finished, read_parquet, resumable, write_atomic

RESULTS = SWEEP_TABLE
RESERVED = ("run", "seed", *SCHEMA.names)  # columns of the combined table


EXECUTORS = ("loop", "tune")
# Keys the sweep sets for every run, after the file's overrides (one in the file would be ignored): why,
# and what to write instead.
PER_RUN = {"run.name": "the sweep names each run from its labels and seed; name the sweep with sweep.name",
           "run.output_dir": "the sweep writes its runs into sweep.output_dir/sweep.name; set sweep.output_dir",
           "run.seed": "the sweep runs each config once per seed; list the seeds in sweep.seeds"}


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
        return v.partition("=")[2].strip().strip("'\"") or v, [v]  # the value as typed, without spaces or quotes
    if isinstance(v, dict) and set(v) <= {"label", "set"} and isinstance(v.get("label"), str) and v["label"] \
            and _strings(v.get("set")):
        return v["label"], v["set"]
    raise ConfigError(f"{where}: each value is \"section.key=value\" or {{label = \"...\", set = [\"...\"]}}, got {v!r}")


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _safe(label: str) -> str:
    return re.sub(r"^\.|[^A-Za-z0-9_.+-]+", "_", label)  # a leading dot would make a hidden run folder


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


def override_keys(overrides: list[str], where: str, fixed: dict[str, str] = PER_RUN) -> list[str]:
    """The dotted key each "section.key=value" sets. One that sets a key of `fixed` (key -> why, and what
    to write instead) or a key set before it is a one-line ConfigError naming `where`: it would be ignored."""
    keys: list[str] = []
    for text in overrides:
        try:
            path, value = parse_override(text)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        set_now = leaf_keys(".".join(path), value)
        for key in set_now:
            taken = next((k for k in fixed if overlap(key, k)), None)
            if taken is not None:
                raise ConfigError(f"{where}: {text!r} sets {taken}, which would be ignored: {fixed[taken]}")
            twice = next((k for k in keys if overlap(key, k)), None)
            if twice is not None:
                what = f"sets {key} twice (the earlier value would be ignored)" if twice == key else \
                    f"sets {twice} and then {key}, which overrides it"
                raise ConfigError(f"{where}: {what}; keep one")
        keys += set_now
    return keys


def inside(key: str, holder: str) -> bool:
    """`key` is `holder` or a key within it (run.seed is inside run): setting `holder` replaces it."""
    parts = holder.split(".")
    return key.split(".")[:len(parts)] == parts


def overlap(a: str, b: str) -> bool:
    """Two dotted keys name the same value, or one holds the other (run and run.seed)."""
    a_parts, b_parts = a.split("."), b.split(".")
    n = min(len(a_parts), len(b_parts))
    return a_parts[:n] == b_parts[:n]


def _check_keys(common: list[str], axes: list, path: Path) -> None:
    """Every override takes effect and every label tells the truth: no key the sweep sets itself, none
    set twice in one place, none of sweep.set that every value of an axis replaces, none set by two axes
    (a run would carry a label the config does not have)."""
    common_keys = override_keys(common, f"{path}: sweep.set")
    owner: dict[str, str] = {}  # a key an axis sets -> that axis
    for name, variants in axes:
        each = [set(override_keys(sets, f"{path}: axis {name}, value {label!r}")) for label, sets in variants]
        keys = set().union(*each)
        always = set.intersection(*each)  # set by every value: what sweep.set gives there is never used
        hidden = next(((c, a) for c in common_keys for a in sorted(always) if inside(c, a)), None)
        if hidden is not None:
            raise ConfigError(f"{path}: sweep.set sets {hidden[0]}, but every value of axis {name} sets {hidden[1]} "
                              "after it, so no run would use it; drop it from sweep.set")
        for key in sorted(keys):
            other = next((a for k, a in owner.items() if a != name and overlap(key, k)), None)
            if other is not None:
                raise ConfigError(f"{path}: axes {other} and {name} both set {key}; a run would get only one "
                                  f"value but both labels: put the values of {key} in one axis")
        owner.update((k, name) for k in keys)


def parallel_value(value, where: str) -> int | str:
    """`parallel` as given: a number of trials at once (>= 1) or "auto"."""
    if value == "auto" or (type(value) is int and 1 <= value <= 10_000):
        return value
    if isinstance(value, str) and ascii_digits(value) and 1 <= int(value) <= 10_000:
        return int(value)
    raise ConfigError(f"{where} must be a number of trials at once (1 to 10,000) or \"auto\", got {value!r}")


def plan(path: str | Path) -> tuple[Path, list[Run]]:
    """The sweep's folder and every run of its grid, each config validated before anything runs."""
    sweep = plan_sweep(path)
    return sweep.folder, sweep.runs


def _base_seed(base: Path | None) -> int:
    """The seed of a sweep without sweep.seeds: its base file's run.seed, as `fmlray run` would use."""
    try:
        return load_config(base).run.seed
    except ConfigError:  # the runs' configs say what is wrong with the file, below
        return 0


def plan_sweep(path: str | Path) -> Sweep:
    """`plan`, with how the sweep file asks to execute it."""
    path = Path(path)
    spec = load_toml(path, "sweep file")
    refuse_other_kind(spec, path, "sweep")
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
    if "name" in s and not isinstance(s["name"], str):
        raise ConfigError(f"{path}: sweep.name must be a string, got {s['name']!r}; quote it: name = \"...\"")
    if not s.get("name"):
        raise ConfigError(f"{path}: [sweep] needs a name")
    folder_name(f"{path}: sweep.name", s["name"])
    base = path.parent / _text(s, "base", path) if "base" in s else None
    seeds = s.get("seeds", [_base_seed(base)])
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) \
            or not all(type(x) is int and 0 <= x < 2**63 for x in seeds):
        raise ConfigError(f"{path}: sweep.seeds must be a non-empty list of distinct integers >= 0")
    common = s.get("set", [])
    if not _strings(common):
        raise ConfigError(f"{path}: sweep.set must be a list of \"section.key=value\" strings, got {common!r}")
    axes = _axes(spec, path)
    _check_keys(common, axes, path)
    folder = Path(_text(s, "output_dir", path, "runs/sweeps")).expanduser() / s["name"]  # as run.output_dir
    runs = []
    seen: dict[str, Run] = {}  # each config (less its name) -> the run that has it
    for combo in itertools.product(*[variants for _, variants in axes]):
        for seed in seeds:
            labels = {name: label for (name, _), (label, _) in zip(axes, combo)}
            name = "-".join([_safe(lbl) for lbl in labels.values()] + [f"s{seed}"])
            clash = next((r for r in runs if r.name == name), None)
            if clash is not None:
                raise ConfigError(f"{path}: runs {clash.labels} and {labels} would both be named {name!r}; "
                                  "give their values distinct labels")
            overrides = [*common, *(o for _, sets in combo for o in sets), f"run.seed={seed}", f"run.name={quoted(name)}",
                         f"run.output_dir={quoted(str(folder))}"]
            try:
                cfg = load_config(base, overrides)
            except ConfigError as exc:
                raise ConfigError(f"{path}: run {name}: {exc}") from None
            run = Run(name, {**labels, "seed": str(seed)}, cfg)
            same = seen.setdefault(_identity(cfg), run)
            if same is not run:
                axis = next(a for a in labels if labels[a] != same.labels[a])
                raise ConfigError(f"{path}: axis {axis}: values {same.labels[axis]!r} and {labels[axis]!r} give the "
                                  f"same config (runs {same.name} and {name} would be one run twice); drop one "
                                  "or make them differ")
            runs.append(run)
    return Sweep(folder, runs, executor, parallel)


def _identity(cfg: Config) -> str:
    """What a run trains, as text: its config without its name."""
    d = to_dict(cfg)
    d["run"].pop("name")
    return json.dumps(d, sort_keys=True)


def run_sweep(path: str | Path, echo=print, parallel: int | str | None = None, sequential: bool = False) -> Path:
    """Run (or finish) every run of the sweep, then write the combined table; return its path.
    One run after another, or, with `parallel` (or executor = "tune" in the file, unless `sequential`),
    as Ray Tune trials."""
    from fmlray.rundir import writing

    sweep = plan_sweep(path)
    with writing(sweep.folder, "sweep.output_dir"):  # one command at a time on a sweep's folder
        return run_planned(sweep, path, echo, parallel, sequential)


def run_planned(sweep: Sweep, path: str | Path, echo, parallel: int | str | None, sequential: bool) -> Path:
    """`run_sweep` for a sweep planned from `path`, whose caller holds its folder (`rundir.writing`)."""
    from fmlray import checkpoint
    from fmlray.simulation import run_experiment

    folder, runs = sweep.folder, sweep.runs
    check_folder(folder, runs)
    for run in runs:  # before any run starts: a folder in the way is the user's, never replaced
        check_found(folder / run.name, run.name, run.cfg, path)
    if parallel is not None or (sweep.executor == "tune" and not sequential):
        from fmlray.trials import run_trials
        run_trials(sweep, sweep.parallel if parallel is None else parallel, echo)
        return combine(folder, runs)
    todo = {run.name: run.cfg for run in runs if not finished(folder / run.name)}
    if todo:  # as the parallel executor does: a run whose data cannot be partitioned fails before the first starts
        from fmlray.trials import check_data
        check_data(todo)
    for i, run in enumerate(runs, 1):
        run_dir = folder / run.name
        check_found(run_dir, run.name, run.cfg, path)  # again: another command may have written there since
        if finished(run_dir):
            echo(f"[{i}/{len(runs)}] {run.name}: done")
            continue
        resume = run_dir if checkpoint.exists(run_dir) else None
        echo(f"[{i}/{len(runs)}] {run.name}" + (" (resuming)" if resume else ""))
        mark = signals.asked()
        try:
            run_experiment(run.cfg, echo=echo, resume_dir=resume)
        except FmlrayError as exc:  # which run failed, as a parallel sweep's trials say
            exc.args = (f"run {run.name}: {exc}",)
            raise
        came = signals.asked_since(mark)
        if came and i < len(runs):  # it came in the run's last round, or while it wrote its outputs
            raise SweepStopped(run.name, came)
    return combine(folder, runs)


class SweepStopped(Exception):
    """A signal came while a run of a sequential sweep finished: the run is done, the sweep stops after it."""

    def __init__(self, run: str, signal: str):
        super().__init__(f"{signal}: stopped after run {run} finished")
        self.run, self.signal = run, signal


SWEEP_ELSEWHERE = "give the sweep another name or output_dir"


def check_found(run_dir: Path, name: str, cfg: Config, asked, elsewhere: str = SWEEP_ELSEWHERE) -> None:
    """What `run_dir` holds is run `name`'s of config `cfg` (finished, or stopped and resumable) or nothing;
    anything else is the user's, and refused. For the message: `asked`, what asks for `cfg` (a sweep file);
    `elsewhere`, how to write the runs somewhere else."""
    from fmlray import checkpoint
    from fmlray.rundir import check_history

    if os.path.lexists(run_dir) and not (run_dir / "metrics.parquet").is_file() and not checkpoint.exists(run_dir):
        raise FmlrayError(f"{run_dir} exists but holds neither a finished run nor a checkpoint of {name}; "
                          f"move it away, or {elsewhere}")
    if resumable(run_dir):
        try:  # a stopped run resumes only with its own config: found now, not after the runs before it
            check_history(run_dir, checkpoint.load(run_dir, cfg).round)
        except FmlrayError as exc:
            raise FmlrayError(f"run {name}: {exc}") from None
    diff = finished_otherwise(run_dir, cfg)
    if diff:
        raise FmlrayError(f"run {name} {'finished' if finished(run_dir) else 'stopped'} in {run_dir} with "
                          f"another config than {asked} now asks for "
                          f"(differs in {', '.join(diff[:5])}{', ...' if len(diff) > 5 else ''}); restore those "
                          f"settings, or {elsewhere} for the new runs")


# A finished run is "done" only if its config is the one asked for, up to where and on what it ran, and with
# the rounds and evaluations that made its metrics. A grown run.rounds is refused, not extended: FML's alpha/beta
# schedule reads run.rounds, so an extended run would not be the run the sweep starts anew (simplest correct).
RESULT_KEYS = ("rounds", "eval_every", "eval_clients")  # beyond checkpoint.fixed_config


def finished_otherwise(run_dir: Path, cfg: Config) -> list[str]:
    """The keys in which the finished (or stopped, resumable) run in `run_dir`, if any, differs from `cfg`. A
    stopped run counts too: resumed with other rounds it would end as neither the old run nor the new."""
    from fmlray.checkpoint import differences, fixed_config

    saved = run_dir / "config.toml"
    if not ((run_dir / "metrics.parquet").is_file() or resumable(run_dir)) or not saved.is_file():
        return []
    try:
        old = load_config(saved)  # as `fmlray run --resume` reads it: keys added since take their defaults
    except ConfigError as exc:
        raise FmlrayError(f"{saved} cannot be read by this fmlray ({exc}); move {run_dir} away") from None
    diff = differences(fixed_config(old), fixed_config(cfg))
    return diff + [f"run.{k}" for k in RESULT_KEYS if getattr(old.run, k) != getattr(cfg.run, k) and f"run.{k}" not in diff]


def check_folder(folder: Path, runs: list[Run]) -> None:
    """The sweep's folder is new, or a sweep's whose table (if any) holds only runs this sweep plans: never a
    run's or a search's folder, and never a `results.parquet` that `combine` would replace without a word (a
    user's file, or the table of another grid given the same sweep name)."""
    if not os.path.lexists(folder):
        return
    what = ("a file" if not folder.is_dir() else "a run's folder (fmlray run made it)" if (folder / MARKER).exists()
            else "a search's folder (fmlray tune made it)" if (folder / SEARCH_RECORD).exists() else None)
    if what:
        raise FmlrayError(f"{folder} is {what}, not a sweep's; {SWEEP_ELSEWHERE}")
    out = folder / RESULTS
    if not out.is_file():
        return  # none yet, or something in the way: `combine` says so once every run is done
    try:
        found = set(read_parquet(out, columns=["run"]).column("run").to_pylist())
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise FmlrayError(f"{out} is not a table fmlray sweep wrote ({type(exc).__name__}), and the sweep would "
                          f"replace it; move it away, or {SWEEP_ELSEWHERE}") from None
    other = sorted(found - {r.name for r in runs})
    if other:
        raise FmlrayError(f"{out} holds runs this sweep file does not plan ({', '.join(other[:3])}"
                          f"{', ...' if len(other) > 3 else ''}): another grid's table, which the sweep would "
                          f"replace; move it away (the run folders stay), or {SWEEP_ELSEWHERE}")


def combine(folder: Path, runs: list[Run]) -> Path:
    """One table: every run's metrics rows plus its run name, seed and axis labels."""
    check_folder(folder, runs)  # again: another command may have written there since the sweep began
    tables = []
    for run in runs:
        t = read_parquet(folder / run.name / "metrics.parquet")
        for key, value in {"run": run.name, **run.labels}.items():
            t = t.append_column(key, pa.array([value] * len(t), pa.string()))
        tables.append(t)
    table = pa.concat_tables(tables)
    table = table.set_column(table.schema.get_field_index("seed"), "seed", pc.cast(table["seed"], pa.int64()))
    out = folder / RESULTS
    try:
        write_atomic(out, lambda f: pq.write_table(table, f))
    except OSError as exc:  # e.g. a folder where the table goes: every run is done and stays so
        raise FmlrayError(f"cannot write the sweep's table {out} ({exc.strerror}); every run is done, in "
                          f"{folder}: move away what is at {out.name} (or make {folder} writable) and run the same "
                          "sweep again to write it") from None
    return out
