"""`fmlray tune FILE`: a search over ranges of config keys, as Ray Tune trials (fmlray.trials), with a
Tune scheduler reading a named figure of each round; prints the best configs and writes them as presets.

    [tune]
    name = "digits-alpha-beta"
    base = "../fmlray/presets/digits.toml"   # optional, relative to this file
    output_dir = "runs/tune"
    set = ["engine.kind=serial", "run.rounds=10"]
    metric = "local_mean"      # a figure every round reports (fmlray.trials.METRICS)
    mode = "max"
    samples = 16               # configs drawn (times each grid value)
    search = "random"          # Tune's BasicVariantGenerator, seeded by `seed`
    scheduler = "asha"         # or "fifo": every trial runs all its rounds
    grace_rounds = 2           # ASHA: rounds before a trial may be stopped
    reduction_factor = 2       # ASHA: keep the best 1/reduction_factor at each rung
    parallel = "auto"          # trials at once
    top = 3                    # configs printed and written as presets
    seed = 0

    [[param]]
    key = "algorithm.fml.alpha"
    uniform = [0.1, 0.9]       # or loguniform = [lo, hi], randint = [lo, hi] (both ends included),
                               # choice = [...], grid = [...] (every value, `samples` draws each)
                               # not run.name, run.output_dir, run.rounds or run.eval_every

Outputs, in <output_dir>/<name>/: one run folder per trial (trial-00000, ...: metrics, checkpoint),
trials.parquet (every trial's values and last figures; a failed one's reason), best-1.toml ... (full configs for
`fmlray run --config`), and Tune's own records under .tune/, with the plan the search started with
(.tune/search.json): `fmlray tune FILE --resume` continues a stopped or crashed search only if FILE
still plans the same search.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from fmlray.config import (ABSENT, Config, ascii_digits, folder_name, leaf_keys, load_config, load_toml, quoted,
                           refuse_other_kind, to_dict, value_at)
from fmlray.errors import ConfigError, FmlrayError
from fmlray.rundir import SEARCH_RECORD
from fmlray.sweep import inside, overlap, override_keys, parallel_value

RANDINT_CHECKED = 256  # a randint range up to this wide has each of its values checked (~3 ms a value) before the
# search starts; a wider one its ends, and a trial whose values then make no valid run fails alone
RECORD = SEARCH_RECORD  # in the search's folder: its fingerprint and parallel, for --resume
KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
KEYS = {"name", "base", "output_dir", "set", "metric", "mode", "samples", "search", "scheduler", "grace_rounds",
        "reduction_factor", "parallel", "top", "seed"}
# Keys the search sets for every trial, after tune.set (one there would be ignored): why, and what instead.
PER_TRIAL = {"run.name": "the search names each trial's run trial-NNNNN; name the search with tune.name",
             "run.output_dir": "trials write into tune.output_dir/tune.name; set tune.output_dir"}
# ... and keys no [[param]] may search: the scheduler counts rounds up to one run.rounds (and a trial is
# "complete" at it), and reads the metric every round.
UNSEARCHABLE = {**PER_TRIAL, "run.rounds": "every trial runs the same run.rounds (the scheduler's time axis); "
                                           "set it in tune.set",
                "run.eval_every": "the scheduler reads the metric every round; run.eval_every stays 1"}


@dataclass(frozen=True)
class Param:
    key: str  # a config key, e.g. algorithm.fml.alpha
    kind: str  # one of KINDS
    values: tuple  # [lo, hi] for the ranges, the values for choice / grid


@dataclass(frozen=True)
class Search:
    folder: Path
    name: str
    base: Path | None
    common: tuple[str, ...]
    params: tuple[Param, ...]
    metric: str
    mode: str
    samples: int
    scheduler: str
    grace_rounds: int
    reduction_factor: int
    parallel: int | str
    top: int
    seed: int
    rounds: int
    bundles_of: dict = field(default_factory=dict, compare=False)  # filled on the connected cluster

    @property
    def total(self) -> int:
        grid = math.prod(len(p.values) for p in self.params if p.kind == "grid")
        return self.samples * grid

    def config(self, values: dict, name: str = "trial") -> Config:
        """The base config with the trial's values, writing into the search's folder as run `name`."""
        sets = [f"{k}={literal(v)}" for k, v in values.items()]
        return load_config(self.base, [*self.common, *sets, f"run.name={quoted(name)}",
                                       f"run.output_dir={quoted(str(self.folder))}"])

    def build(self, config: dict, trial_id: str) -> tuple[str, Config]:
        """The trial's run: its name and config; a ConfigError naming the trial's values where they make no valid
        config together (plan_search tries each range's ends and every whole number a randint draws)."""
        from fmlray.trials import search_run_name
        name = search_run_name(trial_id)
        try:
            return name, self.config(config, name)
        except ConfigError as exc:
            given = ", ".join(f"{p.key}={literal(config[p.key])}" for p in self.params)
            raise ConfigError(f"with {given}: {exc}") from None

    def bundles(self, config: dict) -> list[dict]:
        """The placement group of the trial drawing `config`: a driver's bundle alone for values that make no
        valid config (the trial then only reports its failure)."""
        from fmlray.engine.resources import DRIVER_MEMORY
        try:
            cfg = self.build(config, "_0")[1]
        except ConfigError:
            return [{"memory": DRIVER_MEMORY}]
        return self.bundles_of["plan"](cfg)

    @property
    def param_space(self) -> dict:
        from ray import tune
        make = {"uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
                "randint": lambda v: tune.randint(v[0], v[1] + 1), "choice": lambda v: tune.choice(list(v)),
                "grid": lambda v: tune.grid_search(list(v))}
        return {p.key: make[p.kind](p.values) for p in self.params}

    def tune_config(self, parallel: int | str) -> dict:
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
        from ray.tune.search import BasicVariantGenerator
        scheduler = FIFOScheduler() if self.scheduler == "fifo" else ASHAScheduler(
            time_attr="round", max_t=self.rounds, grace_period=self.grace_rounds,
            reduction_factor=self.reduction_factor)
        return {"metric": self.metric, "mode": self.mode, "num_samples": self.samples, "scheduler": scheduler,
                "search_alg": BasicVariantGenerator(random_state=self.seed,
                                                    max_concurrent=0 if parallel == "auto" else parallel)}


def literal(value) -> str:
    """`value` as a TOML value, as --set takes it (a table inline: {lr = 0.1})."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else quoted(k)} = {literal(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):  # on one line (tomli_w writes a list over several)
        return "[" + ", ".join(map(literal, value)) + "]"
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _param(p, i: int, where: str) -> Param:
    kinds = [k for k in KINDS if isinstance(p, dict) and k in p]
    if not isinstance(p, dict) or set(p) != {"key", *kinds} or len(kinds) != 1 or not isinstance(p["key"], str):
        raise ConfigError(f"{where}: [[param]] {i} needs a key and exactly one of {', '.join(KINDS)}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", p["key"]):  # "" or " training.lr ": its column kept the spaces
        raise ConfigError(f"{where}: [[param]] {i}: key must be a config key such as \"training.lr\" (letters, "
                          f"digits, _ and ., no spaces), got {p['key']!r}")
    kind, values = kinds[0], p[kinds[0]]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: param {p['key']}: {kind} must be a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint"):
        lo_hi = len(values) == 2 and all(_number(v) for v in values) and values[0] < values[1]
        if not lo_hi or (kind == "loguniform" and values[0] <= 0) or \
                (kind == "randint" and not all(type(v) is int for v in values)):
            raise ConfigError(f"{where}: param {p['key']}: {kind} takes [low, high] with low < high"
                              + (", both > 0" if kind == "loguniform" else "")
                              + (", both integers" if kind == "randint" else "") + f"; got {values!r}")
    return Param(p["key"], kind, tuple(values))


def _get(s: dict, key: str, default, ok, what: str, where: str):
    value = s.get(key, default)
    if not ok(value):
        raise ConfigError(f"{where}: tune.{key} must be {what}, got {value!r}")
    return value


def plan_search(path: str | Path) -> Search:
    """The search described by a tune file; every key and every end of every range checked now."""
    from fmlray.trials import METRICS, unreported

    path = Path(path)
    spec = load_toml(path, "tune file")
    refuse_other_kind(spec, path, "tune")
    if set(spec) - {"tune", "param"} or not isinstance(spec.get("tune"), dict):
        raise ConfigError(f"{path}: a tune file has a [tune] table and [[param]] tables (found {sorted(spec)})")
    s, where = spec["tune"], str(path)
    bad = set(s) - KEYS
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {sorted(bad)} in [tune]; valid: {', '.join(sorted(KEYS))}")
    name = _get(s, "name", None, lambda v: isinstance(v, str) and v, "a non-empty string", where)
    folder_name(f"{where}: tune.name", name)
    text = lambda v: isinstance(v, str) and bool(v)  # noqa: E731
    count = lambda lo, hi: lambda v: type(v) is int and lo <= v <= hi  # noqa: E731
    base = path.parent / _get(s, "base", "x", text, "a path (in quotes)", where) if "base" in s else None
    common = _get(s, "set", [], lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                  "a list of \"section.key=value\" strings", where)
    metric = _get(s, "metric", "local_mean", lambda v: v in METRICS, "one of " + ", ".join(METRICS), where)
    mode = _get(s, "mode", "max", lambda v: v in ("max", "min"), "\"max\" or \"min\"", where)
    samples = _get(s, "samples", 8, count(1, 100_000), "a number of samples from 1 to 100,000", where)
    _get(s, "search", "random", lambda v: v == "random", "\"random\" (Tune's BasicVariantGenerator; "
         "Tune's other searchers need packages fmlray does not install)", where)
    scheduler = _get(s, "scheduler", "asha", lambda v: v in ("asha", "fifo"), "\"asha\" or \"fifo\"", where)
    grace = _get(s, "grace_rounds", 1, count(1, 2**31 - 1), "a number of rounds >= 1", where)
    factor = _get(s, "reduction_factor", 2, count(2, 1000), "an integer from 2 to 1000", where)
    parallel = parallel_value(s.get("parallel", "auto"), f"{where}: tune.parallel")
    top = _get(s, "top", 3, count(1, 1000), "a number from 1 to 1000", where)
    seed = _get(s, "seed", 0, count(0, 2**32 - 1), "an integer from 0 to 2**32 - 1", where)
    output_dir = _get(s, "output_dir", "runs/tune", text, "a non-empty string", where)
    params = spec.get("param", [])
    if not isinstance(params, list) or not params:
        raise ConfigError(f"{where}: a tune file needs at least one [[param]] table (a key and its range)")
    params = tuple(_param(p, i, where) for i, p in enumerate(params))
    common_keys = override_keys(common, f"{where}: tune.set", PER_TRIAL)
    for i, p in enumerate(params):  # each searched key takes effect, and its column tells the truth
        taken = next((k for k in UNSEARCHABLE if overlap(p.key, k)), None)
        if taken is not None:
            raise ConfigError(f"{where}: param {p.key}: {taken} cannot be searched: {UNSEARCHABLE[taken]}")
        # replaced in every trial: inside a key that every value sets (a table value sets only its own keys)
        hidden = next((c for c in common_keys if all(any(inside(c, leaf) for leaf in leaf_keys(p.key, v))
                                                     for v in p.values)), None)
        if hidden is not None:
            raise ConfigError(f"{where}: tune.set sets {hidden}, but param {p.key} replaces it in every "
                              "trial; drop it from tune.set")
        twice = next((q.key for q in params[:i] if overlap(p.key, q.key)), None)
        if twice is not None:  # the same key, or one inside the other (training, training.lr)
            raise ConfigError(f"{where}: a key is searched twice ({twice}, {p.key}); give each key one [[param]]")
    search = Search(Path(output_dir).expanduser() / name, name, base, tuple(common), params, metric, mode, samples, scheduler,
                    grace, factor, parallel, top, seed, rounds=0)
    real = {p.key for p in params if p.kind in ("uniform", "loguniform")}  # they draw floats, whatever the ends
    ends = [{p.key: float(p.values[i]) if p.key in real else p.values[i] for p in params} for i in (0, -1)]
    ends += [{p.key: v} for p in params if p.kind in ("choice", "grid") for v in p.values]
    for p in params:  # a whole number inside a range can be what is invalid (6 clients over three groups' shares)
        if p.kind == "randint" and p.values[1] - p.values[0] <= RANDINT_CHECKED:
            ends += [{**end, p.key: v} for v in range(p.values[0] + 1, p.values[1]) for end in ends[:2]]
    for values in ends:  # every end of every range must make a valid config, and one that reports the metric
        given = ", ".join(f"{k}={literal(v)}" for k, v in values.items())
        try:
            cfg = search.config(values)
        except ConfigError as exc:
            hint = "; uniform and loguniform draw real numbers: give an integer key randint = [low, high]" \
                if "must be an integer" in str(exc) and real & set(values) else ""
            raise ConfigError(f"{where}: with {given}: {exc}{hint}") from None
        why = unreported(cfg, metric)
        if why is not None:  # every trial would rank as NaN: the "best" configs would be arbitrary
            raise ConfigError(f"{where}: with {given}: tune.metric = {metric!r} is never reported ({why}); "
                              f"choose another metric ({', '.join(m for m in METRICS if not unreported(cfg, m))})")
    for p in params:
        if p.kind == "grid":  # a value listed twice would run the same trials twice, under two rows
            configs = [json.dumps(to_dict(search.config({p.key: v})), sort_keys=True) for v in p.values]
            same = next(((a, b) for j, b in enumerate(p.values) for i, a in enumerate(p.values[:j])
                         if configs[i] == configs[j]), None)
            if same is not None:
                raise ConfigError(f"{where}: param {p.key}: grid values {literal(same[0])} and {literal(same[1])} "
                                  "give the same config; list each value once")
    if cfg.run.eval_every != 1:
        raise ConfigError(f"{where}: the scheduler reads {metric} every round; set run.eval_every = 1")
    if grace > cfg.run.rounds and scheduler == "asha":
        raise ConfigError(f"{where}: tune.grace_rounds = {grace} is more than run.rounds = {cfg.run.rounds}")
    return Search(**{**search.__dict__, "rounds": cfg.run.rounds})


def fingerprint(search: Search) -> dict:
    """What makes two runs of a tune file the same search, as flat dotted keys: each range, the keys that
    draw, schedule and rank the trials, and the trials' config (base file and `set` resolved). Not `top`
    or `parallel`: changing those changes no trial."""
    params = {p.key: [p.kind, list(p.values)] for p in search.params}
    flat = {f"param.{k}": v for k, v in params.items()}
    flat.update({f"tune.{k}": getattr(search, k) for k in ("metric", "mode", "samples", "scheduler",
                                                           "grace_rounds", "reduction_factor", "seed")})
    config = _flatten(to_dict(search.config({p.key: p.values[0] for p in search.params})))
    flat.update((k, v) for k, v in config.items() if k not in params)  # a searched key: its range above
    return json.loads(json.dumps(flat))  # as it reads back from the folder (tuples as lists)


def _flatten(d: dict, prefix: str = "") -> dict:
    """A nested dict's leaves under dotted keys (a list is a leaf)."""
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def changed(old: dict, new: dict) -> list[str]:
    """The keys two fingerprints disagree on (present in one only, or with different values)."""
    return sorted(k for k in old.keys() | new.keys() if k not in old or k not in new or old[k] != new[k])


def check_trial_folders(search: Search) -> None:
    """Each trial's run folder still holds that trial's run (its config one this search plans, with the values
    it drew): Tune keeps a finished trial's figures, and one whose folder was replaced since (`fmlray run
    --overwrite`) would be ranked by figures no folder holds any more."""
    for run_dir in sorted(search.folder.iterdir()):
        saved = run_dir / "config.toml"
        if not re.fullmatch(r"trial-\d{5,}", run_dir.name) or not saved.is_file():
            continue
        try:
            tree = to_dict(load_config(saved))
        except ConfigError as exc:
            raise FmlrayError(f"{saved} cannot be read by this fmlray ({exc}); move {run_dir} away") from None
        values = {p.key: value_at(tree, p.key) for p in search.params}
        try:
            if any(v is ABSENT for v in values.values()):  # e.g. a searched group its config lacks
                raise ConfigError("no such key")
            why = replaced(run_dir, search.config(values, run_dir.name))
        except ConfigError:
            why = (f"{run_dir} holds a run of another config than this search plans; put the trial's own run back "
                   "there, or search again under another tune.name")
        if why:
            raise FmlrayError(why)


def replaced(run_dir: Path, cfg: Config) -> str | None:
    """Why the run in a trial's folder `run_dir` is not that trial's run of config `cfg`, or None."""
    from fmlray.sweep import finished_otherwise

    diff = finished_otherwise(run_dir, cfg)
    return None if not diff else (
        f"{run_dir} holds a run of another config than this search's trial (differs in {', '.join(diff[:5])}"
        f"{', ...' if len(diff) > 5 else ''}): it was replaced or changed since the trial ran; put the trial's own "
        "run back there, or search again under another tune.name")


def resume_point(search: Search, where: str) -> tuple[Path | None, int | str]:
    """The Tune experiment a stopped search continues from (None: no trial started, so the search starts from
    the beginning with the plan it recorded), and the `parallel` it started with; a one-line FmlrayError
    (before Ray starts, nothing written) when the folder holds no search, or another one."""
    from ray import tune

    record = search.folder / RECORD
    if not os.path.lexists(search.folder):
        raise FmlrayError(f"{search.folder} holds no search to resume (it does not exist); start it with "
                          f"fmlray tune {where}, without --resume")
    if not os.path.lexists(record):  # a run's, a sweep's, a user's: a plain start refuses it too
        raise FmlrayError(f"{search.folder} is not a search's folder (no {RECORD}), so there is nothing to resume; "
                          "choose another tune.name or output_dir, or move it away")
    try:
        old = json.loads(record.read_text())
        fp, parallel = old["fingerprint"], old["parallel"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FmlrayError(f"{record} cannot be read as a search's record, so the search in {search.folder} cannot "
                          "be continued; move that folder away and start again, or choose another tune.name") from None
    diff = changed(fp, fingerprint(search))
    if diff:
        raise FmlrayError(f"{where} changed since the search in {search.folder} started ("
                          + ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
                          + "); --resume continues the same search: undo the change, or give the new search "
                          "another tune.name")
    # Tune reads a path without a scheme as a URI (a relative one fails), and started the search with an
    # absolute storage path (trials.tune_run): resolve here, not in search.folder, which the fingerprint holds
    tune_dir = search.folder.resolve() / ".tune"
    runs = sorted(d for d in tune_dir.iterdir() if d.is_dir() and tune.Tuner.can_restore(d))
    if runs:
        check_trial_folders(search)
        return runs[-1], parallel
    # Stopped between recording its plan and Tune's first state: no trial ran, so starting afresh with that plan
    # loses nothing, and also covers a kill -9 there (cleaning up on a signal would not) and deletes nothing.
    others = sorted(p.name for p in search.folder.iterdir() if p.name != ".tune")
    if others:  # trials ran (their run folders) yet Tune's state is gone: not a search --resume can continue
        raise FmlrayError(f"{tune_dir} holds no Ray Tune state to resume, but {search.folder} holds "
                          f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}; move {search.folder} "
                          "away and start again")
    return None, parallel


def _write_record(search: Search, parallel: int | str) -> None:
    from fmlray.rundir import _missing, _remove_empty, write_atomic
    record = search.folder / RECORD
    made = _missing(record.parent)
    record.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(record, json.dumps({"fingerprint": fingerprint(search), "parallel": parallel}, indent=1).encode())
    except BaseException:  # a signal or a full disk: no folder without a record, which neither start nor --resume takes
        _remove_empty(made)
        raise


def run_search(path: str | Path, echo=print, parallel: int | str | None = None,
               resume: bool = False, search: Search | None = None) -> tuple[Path, list[dict]]:
    """Run the search (or, with `resume`, continue it in its folder); write trials.parquet and the best
    configs as presets; return (folder, ranked rows). `search`: `path` planned already."""
    from fmlray.rundir import writing

    search = search or plan_search(path)
    with writing(search.folder, "tune.output_dir"):  # one command at a time on a search's folder and Tune state
        return _run_search(search, path, echo, parallel, resume)


def _run_search(search: Search, path: str | Path, echo, parallel: int | str | None,
                resume: bool) -> tuple[Path, list[dict]]:
    import ray

    from fmlray.engine.connect import connect, shut_down
    from fmlray.engine.ray_engine import capacity
    from fmlray.engine.resources import check_trial_fits, trial_actors, trial_bundles
    from fmlray.trials import check_data, tune_run

    restore = None
    if resume:
        restore, started_with = resume_point(search, str(path))
        if parallel is not None and parallel != started_with:
            raise FmlrayError(f"--resume keeps the parallel the search started with ({started_with}); "
                              "drop --parallel")
        parallel = started_with
        check_outputs(search, "then resume again")  # before Ray, Tune and the trials
    elif (search.folder / RECORD).exists():
        raise FmlrayError(f"{search.folder} exists (an earlier search); continue it with --resume, or choose "
                          "another tune.name or move it away")
    elif os.path.lexists(search.folder):  # a run's, a sweep's, a user's: --resume would not help
        raise FmlrayError(f"{search.folder} exists and is not a search's folder (no {RECORD}); choose another "
                          "tune.name or output_dir, or move it away")
    parallel = search.parallel if parallel is None else parallel
    corners = [{p.key: p.values[i] for p in search.params} for i in (0, -1)]  # each parameter's ends
    # and every value a choice or grid lists (a dataset among them: its files), each data setup loaded once
    values = corners + [{p.key: v} for p in search.params if p.kind in ("choice", "grid") for v in p.values[1:-1]]
    check_data({f"{search.name} at {', '.join(f'{k}={literal(v)}' for k, v in c.items())}": search.config(c)
                for c in values})
    started = connect(search.config(corners[0]).engine.address)
    try:
        cap = capacity()
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        share = None if parallel == "auto" else parallel

        def plan(cfg: Config) -> list[dict]:
            specs = trial_actors(cfg, cap, share) if cfg.engine.kind == "ray" else []
            return trial_bundles(cfg, specs)

        search.bundles_of["plan"] = plan
        for p_values in corners:
            check_trial_fits(search.name, plan(search.config(p_values)), nodes)
        echo(f"{search.total} trial(s) of {search.name}, {search.scheduler.upper()} on {search.metric} "
             f"({search.mode}), {'as many as fit' if parallel == 'auto' else f'up to {parallel}'} at once"
             + (f"; resuming {restore}: finished trials kept, the others continue from their checkpoints"
                if restore else "; no trial had started: from the beginning, with the plan it recorded"
                if resume else ""))
        if restore is None:
            _write_record(search, parallel)
        grid, results = tune_run([], parallel, search.folder / ".tune", echo, search=search, restore=restore)
    finally:
        if started:
            shut_down()
    rows = ranked(search, grid)
    write_outputs(search, rows)
    if rows and not ranks(rows):
        raise FmlrayError(f"every trial of {search.name} failed (their reasons are in {search.folder / 'trials.parquet'}"
                          f"); {failures(rows).partition('; ')[2]}; change the ranges and search again under "
                          f"another tune.name (or move {search.folder} away)")
    return search.folder, rows


def ranked(search: Search, grid) -> list[dict]:
    """One row per trial: its values, rounds run, status and last figures; those that ran every round first,
    each group best first by the metric."""
    from fmlray.trials import METRICS, search_run_name

    rows = []
    for result in grid:
        m = result.metrics or {}
        if "round" not in m:
            continue
        # "error": finished with one in Tune's records, as fmlray before 2026-11-30 reported a diverged trial
        failed = m.get("error", "") or "failed" if m.get("status") in ("failed", "error") else ""
        row = {"trial": search_run_name(m.get("trial_id", "_?")), "rounds": int(m["round"]),
               "complete": int(m["round"]) == search.rounds and not failed,
               **{p.key: result.config[p.key] for p in search.params},
               **{k: float(m.get(k, math.nan)) for k in METRICS}, "error": failed}
        rows.append(row)
    sign = -1 if search.mode == "max" else 1

    def key(r):
        v = r[search.metric]
        return (bool(r["error"]), not r["complete"], math.isnan(v), sign * v if not math.isnan(v) else 0.0, r["trial"])
    return sorted(rows, key=key)


def ranks(rows: list[dict]) -> list[dict]:
    """The ranked trials that did not fail: those a preset can be made of."""
    return [r for r in rows if not r.get("error")]


def failures(rows: list[dict]) -> str | None:
    """A line on the trials that failed (their values diverged or made no valid run), or None."""
    failed = [r for r in rows if r.get("error")]
    if not failed:
        return None
    first = min(failed, key=lambda r: r["trial"])  # the first drawn
    return (f"{len(failed)} of {len(rows)} trial(s) failed and rank last (trials.parquet's error column says why); "
            f"{first['trial']}: {first['error']}")


def _mixed(search: Search, rows: list[dict]) -> list[str]:
    """The searched keys whose values are of more than one kind (grid = ["all", 3]): no parquet column holds
    both, so their column holds each value as TOML writes it ('"all"', '3')."""
    def kind(v):
        return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__
    return [p.key for p in search.params if len({kind(r[p.key]) for r in rows}) > 1]


def check_outputs(search: Search, then: str, ranks: int | None = None) -> None:
    """A one-line FmlrayError where write_outputs would replace what this search did not write: trials.parquet
    other than its table, or best-<k>.toml (k up to `ranks`, default tune.top) other than its preset of rank k. Its
    own presets it rewrites, edited or not: outputs, made again by every resume. `then`: what to do after moving."""
    table = search.folder / "trials.parquet"
    why = _not_our_table(search, table)
    if why:
        raise FmlrayError(f"{table} is {why}, and the search would replace it with its table; move it away, {then}")
    for rank in range(1, (search.top if ranks is None else ranks) + 1):
        path = search.folder / f"best-{rank}.toml"
        why = _not_our_preset(search, path, rank)
        if why:
            raise FmlrayError(f"{path} is {why}, and the search would replace it with its rank-{rank} preset; move it "
                              f"away, {then}")


def _not_our_table(search: Search, path: Path) -> str | None:
    """Why `path` is not a trials.parquet this search wrote (its columns, trial-NNNNN rows), or None (also if absent)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(mode):
        return "a link" if stat.S_ISLNK(mode) else "not a file"
    try:
        with pa.OSFile(os.fsencode(path)) as f:
            found = pq.ParquetFile(f)
            names = set(found.schema_arrow.names)
            trials = found.read(columns=["trial"]).column("trial").to_pylist() if "trial" in names else []
    except (pa.ArrowException, OSError) as exc:
        return f"not a Parquet table fmlray can read ({type(exc).__name__})"
    missing = {"trial", "rounds", "complete", *(p.key for p in search.params)} - names
    if missing or not all(isinstance(t, str) and re.fullmatch(r"trial-\d+", t) for t in trials):
        return "another table" + (f" (no column {sorted(missing)[0]})" if missing else " (rows not trial-NNNNN)")
    return None


def _not_our_preset(search: Search, path: Path, rank: int) -> str | None:
    """Why `path` is not a best-<rank>.toml this search wrote (a plain file whose first line is the header
    write_outputs gives it), or None (also if absent)."""
    head = f"# fmlray tune {search.name}: rank {rank} of "
    try:  # never through a link; a pipe opens without waiting for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:
        return "a link" if os.path.islink(path) else "a file fmlray cannot read"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder, a pipe, a device
            return "not a file"
        ours = os.read(fd, len(head.encode())) == head.encode()  # a file this short is read whole in one call
    except OSError:
        return "a file fmlray cannot read"
    finally:
        os.close(fd)
    return None if ours else f"a file without the first line this search writes ({head}...)"


def write_outputs(search: Search, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fmlray.rundir import write_atomic

    if not rows:
        return
    # again, as the sweep's `combine` checks its table: a file may have come since the resume began
    best = ranks(rows)[: search.top]
    check_outputs(search, "then continue the search with --resume to write its outputs", len(best))
    mixed = _mixed(search, rows)
    table = pa.Table.from_pylist([{**r, **{k: literal(r[k]) for k in mixed}} for r in rows])
    write_atomic(search.folder / "trials.parquet", lambda f: pq.write_table(table, f))
    for rank, row in enumerate(best, 1):
        values = {p.key: row[p.key] for p in search.params}
        cfg = search.config(values, f"{search.name}-best-{rank}")
        head = (f"# fmlray tune {search.name}: rank {rank} of {len(rows)} by {search.metric} ({search.mode}) = "
                f"{row[search.metric]:.4f} after {row['rounds']} of {search.rounds} rounds ({row['trial']}); "
                + ", ".join(f"{k} = {literal(v)}" for k, v in values.items()) + "\n")
        write_atomic(search.folder / f"best-{rank}.toml", (head + tomli_w.dumps(to_dict(cfg))).encode())
    _drop_stale_best(search, len(best))


def _drop_stale_best(search: Search, kept: int) -> None:
    """Remove best-<k>.toml past the `kept` this ranking wrote (a resume with a smaller tune.top), so the folder
    never offers a rank that is no longer one; only files this search wrote (never a link)."""
    for path in search.folder.glob("best-*.toml"):
        rank = path.name[len("best-"):-len(".toml")]
        if ascii_digits(rank) and int(rank) > kept and _not_our_preset(search, path, int(rank)) is None:
            path.unlink(missing_ok=True)


def unranked(search: Search, rows: list[dict]) -> str | None:
    """A warning when no trial reported the metric (every value NaN: the ranking is arbitrary), else None.
    `plan_search` refuses what it can know beforehand; a partial global model (FedPer's body) is only
    known to go untested once the trials ran."""
    rows = ranks(rows)
    if rows and all(math.isnan(r[search.metric]) for r in rows):
        return (f"no trial reported tune.metric = {search.metric!r}, so the ranking is arbitrary; search again "
                "with a metric the trials report")
    return None


def format_best(search_rows: list[dict], search: Search) -> str:
    """The best `top` trials as a table: rank, trial, each searched value, rounds, the metric."""
    keys = [p.key for p in search.params]
    head = ["rank", "trial", *keys, "rounds", search.metric]
    cells = [[str(i), r["trial"], *(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys),
              f"{r['rounds']}/{search.rounds}", f"{r[search.metric]:.4f}"]
             for i, r in enumerate(ranks(search_rows)[: search.top], 1)]
    width = [max(len(x) for x in col) for col in zip(head, *cells)]
    return "\n".join("  ".join(f"{x:<{w}}" for x, w in zip(line, width)) for line in [head, *cells])
