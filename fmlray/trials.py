"""Runs as Ray Tune trials: the parallel executor of `fmlray sweep` and the trials of `fmlray tune`.

Each run is one trial. A trial reserves a placement group sized to its own simulation
(`resources.trial_bundles`: its driver's bundle, then one bundle per client actor), and the Ray engine
inside it puts its actors into those bundles; the serial engine trains in the trial's driver, on the one
CPU of its bundle. A trial runs `run_experiment` exactly as `fmlray run` does (same run folder, same
checkpoints, same metrics), and reports every round's summary to Tune. Trials never call `ray.init` or
`ray.shutdown`, and never read the whole cluster's resources.

Stopping: SIGINT / SIGTERM reach the sweep's process only. It tells the trials through a small
`Control` actor, which each trial asks once a round; a trial then checkpoints and ends its run after
the round it is in (a rerun resumes it), and trials not started yet end at once. The first failed run
stops the others the same way, as the sequential loop stops at it; but a search's trial whose values
diverge or make no valid run fails alone (reported as "failed": the search explores ranges). A search's stopped trials end as
errored in Tune's records (`LeftUnfinished`), so `fmlray tune --resume` restores the experiment
(`Tuner.restore`) and runs them again, each from its run's checkpoint.

Tune's own experiment state goes under `<folder>/.tune/` (never ~/ray_results), and its console output
is silenced: fmlray prints one line per finished run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fmlray import signals
from fmlray.config import Config
from fmlray.errors import ConfigError, DataError, FmlrayError, TrainingError
from fmlray.rundir import finished

STATS = ("mean", "std", "min", "p10")


def figures(summary: dict) -> dict:
    """A round summary as flat numbers for Tune (NaN where a round was not evaluated): round, local_mean,
    local_std, local_min, local_p10, the same for global_clients_*, global_test, round_seconds."""
    out = {"round": summary["round"]}
    for key in ("local", "global_clients"):
        for stat in STATS:
            out[f"{key}_{stat}"] = summary[key][stat] if summary[key] else math.nan
    out["global_test"] = math.nan if summary["global_test"] is None else summary["global_test"]
    out["round_seconds"] = math.nan if summary["seconds"] is None else summary["seconds"]
    return out


METRICS = tuple(figures({"round": 0, "local": None, "global_clients": None, "global_test": None,
                         "seconds": None}))[1:]


def unreported(cfg: Config, metric: str) -> str | None:
    """Why a run of `cfg` never reports `metric` (every round NaN), or None where it may: local_* need an
    algorithm that tests local models, global_* one with a global model. (A global state that is only part of
    a model, e.g. FedPer's body, is not tested either; that needs the model built, so the CLI warns after.)"""
    from fmlray.algorithms import build_algorithm
    algo = build_algorithm(cfg.algorithm, cfg.run.rounds)
    if metric.startswith("local_") and "local" not in algo.evaluates:
        return f"{algo.name} tests no local models"
    if metric.startswith("global_") and algo.shares is None:
        return f"{algo.name} has no global model"
    return None


class TrialsStopped(Exception):
    """A signal stopped the trials; `unfinished` runs keep their checkpoints for a rerun."""

    def __init__(self, unfinished: list[str]):
        super().__init__(f"stopped with {len(unfinished)} run(s) unfinished")
        self.unfinished = unfinished


class LeftUnfinished(Exception):
    """Ends a search's trial that a signal stopped (or that never started), or whose error stops the search:
    Tune then records it as errored, not finished, and `fmlray tune --resume`
    (`Tuner.restore(resume_errored=True)`) runs it again, from its run's checkpoint. A sweep's trial just
    returns: a sweep's rerun finds its unfinished runs by their folders."""


class Control:
    """A Ray actor (no CPU) the trials ask, once a round, whether the sweep is stopping."""

    def __init__(self):
        signals.redeliver_lost_sigterm()
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True

    def asked(self) -> bool:
        return self.stopping


@dataclass(frozen=True)
class Trial:
    name: str
    cfg: Config
    bundles: list[dict[str, float]]


def plan_trials(runs: dict[str, Config], parallel: int | str) -> list[Trial]:
    """Each run's placement group on the connected cluster, `parallel` trials at once (an int, or "auto":
    each at its smallest); a trial the cluster could never place is a one-line ResourceError now."""
    import ray

    from fmlray.engine.ray_engine import capacity
    from fmlray.engine.resources import check_trial_fits, trial_actors, trial_bundles
    from fmlray.errors import ResourceError

    cap = capacity()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    out = []
    for name, cfg in runs.items():
        try:
            specs = trial_actors(cfg, cap, None if parallel == "auto" else parallel) if cfg.engine.kind == "ray" else []
        except ResourceError as exc:
            raise ResourceError(f"run {name} cannot be a trial on this cluster: {exc}") from None
        bundles = trial_bundles(cfg, specs)
        check_trial_fits(name, bundles, nodes)
        out.append(Trial(name, cfg, bundles))
    return out


def _trial(config: dict, trials: dict[str, Trial], control, launch_dir: str, build=None) -> None:
    """The trainable: one run, in this trial's placement group, resumed from its checkpoint if it has one.
    A sweep's trial names its run (config["run"]); a search's builds it (`build(config, trial_id)`)."""
    import ray
    from ray import tune

    from fmlray import checkpoint
    from fmlray.simulation import RunInterrupted, run_experiment

    signals.redeliver_lost_sigterm()  # Tune's trial worker: ended by SIGTERM when the search no longer needs it
    node = ray.get_runtime_context().get_node_id()
    asked = lambda: ray.get(control.asked.remote())  # noqa: E731
    if asked():
        tune.report({"status": "skipped", "node": node, **{k: math.nan for k in METRICS}})
        if build is not None:
            raise LeftUnfinished("not started: the search was stopping")
        return

    def ends(status: str, error: str) -> None:
        """Report a trial that ends before its run trains: "failed" alone (a search's trial), or with an "error"
        that stops the sweep or search; a search's trial then ends as errored in Tune's records, so that --resume
        runs it again (one returning normally is finished for good)."""
        tune.report({**{k: math.nan for k in METRICS}, "round": 0, "node": node, "status": status, "error": error})
        if build is not None and status == "error":
            raise LeftUnfinished(error)

    try:
        # Tune starts a trial in a folder of its own; the run's relative paths are the sweep's
        os.chdir(launch_dir)
    except OSError:
        ends("error", f"this node has no folder {launch_dir} (where the sweep was started); on a cluster give the "
             "sweep an absolute output_dir on storage every node shares")
        return
    if build is None:
        name, cfg = config["run"], trials[config["run"]].cfg
    else:
        try:
            name, cfg = build(config, tune.get_context().get_trial_id())
        except FmlrayError as exc:  # values drawn together that no check before the search could try
            ends("failed", " ".join(str(exc).splitlines()))
            return
    run_dir = Path(cfg.run.output_dir) / name
    if build is not None and os.path.lexists(run_dir) and not finished(run_dir) and not checkpoint.exists(run_dir):
        ends("error", f"{run_dir} is in the way of this trial's run (it holds no run of this search); move it away, "
             "then continue the search with fmlray tune FILE --resume")
        return
    if build is not None and finished(run_dir):
        from fmlray.search import replaced
        why = replaced(run_dir, cfg)  # by `fmlray run --overwrite`, since this trial began
        if why:
            ends("error", why)
            return
        # finished after the last state Tune wrote before a crash: its figures, not a second run
        from fmlray.metrics import summaries
        from fmlray.rundir import read_run
        tune.report({**figures(summaries(read_run(run_dir)[0])[-1]), "run": name, "node": node, "resumed": True,
                     "status": "done"})
        return
    resume = run_dir if checkpoint.exists(run_dir) else None
    started, began = time.perf_counter(), time.time()
    status = {"status": "done"}
    log: list[str] = []  # what `fmlray run` would print before its rounds: the title, the engine's notes
    last: dict = {}  # the last round's figures, repeated in the final report (Tune reads a metric from each)

    def report(summary: dict) -> None:
        last.update(figures(summary))
        if summary["round"] < cfg.run.rounds:  # the last round goes with the final report, once the run's
            tune.report({**last, "status": "running", "node": node, "run": name})  # outputs are written:
            # a scheduler that stops a trial does so in tune.report (SystemExit), leaving it resumable

    def echo(line: str) -> None:
        if not line.startswith("round "):
            log.append(line)

    try:
        run_experiment(cfg, echo=echo, resume_dir=resume, stop=asked, report=report)
    except RunInterrupted:
        status = {"status": "stopped"}
    except FmlrayError as exc:
        # a search's trial whose values diverge or make no valid run fails alone (a search explores ranges; its
        # other trials go on, and a resume keeps it as failed); anything else stops the sweep or search
        own = build is not None and isinstance(exc, (TrainingError, ConfigError, DataError))
        status = {"status": "failed" if own else "error", "error": " ".join(str(exc).splitlines())}
    tune.report({**{k: math.nan for k in METRICS}, "round": 0, **last,  # NaN figures: failed before round 1
                 "run": name, "node": node, "resumed": resume is not None, "run_seconds": time.perf_counter() - started,
                 "began": began, "ended": time.time(), "log": " | ".join(log), **status})
    if build is not None and status["status"] == "stopped":
        raise LeftUnfinished(f"stopped after round {last.get('round', 0)}; its checkpoint is in {run_dir}")
    if build is not None and status["status"] == "error":  # it stops the search; --resume runs it again
        raise LeftUnfinished(status["error"])


def search_run_name(trial_id: str) -> str:
    """A search's trial's run folder: trial-<Tune's trial index>, e.g. trial-00003."""
    return f"trial-{trial_id.rsplit('_', 1)[-1]}"


def _progress_callback(echo: Callable[[str], None], order: Callable[[str], int], total: int, control, signalled,
                       name_of: Callable):
    from ray import tune

    class Progress(tune.Callback):
        """One line per finished run; tells the trials to stop on a signal or at the first failed run."""

        def __init__(self):
            self.results: dict[str, dict] = {}
            self.errors: dict[str, str] = {}
            self.started: dict[str, float] = {}
            self.stop_sent = False

        def stop(self) -> None:
            if not self.stop_sent:
                self.stop_sent = True
                control.stop.remote()

        def on_step_begin(self, iteration, trials, **info):
            if signalled():
                self.stop()

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[name_of(trial)] = time.perf_counter()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            name = name_of(trial)
            self.results[name] = result
            if result.get("status") == "error":
                self.errors[name] = result["error"]
                self.stop()

        def on_trial_complete(self, iteration, trials, trial, **info):
            name = name_of(trial)
            r = self.results.get(name, {})
            if r.get("status") not in ("done", "stopped", "running", "failed"):
                return
            status = f"stopped early by the scheduler after round {r['round']}" if r["status"] == "running" else \
                f"failed {'after round %d' % r['round'] if r['round'] else 'before round 1'} ({r['error']})" \
                if r["status"] == "failed" else r["status"]
            took = time.perf_counter() - self.started.get(name, time.perf_counter())
            last = self.last_figures(name)
            echo(f"[{order(name)}/{total}] {name}: {status}{' (resumed)' if r.get('resumed') else ''} "
                 f"in {took:.1f}s" + (f", {last}" if last else "") + f" (node {r.get('node', '?')[:8]})")

        def last_figures(self, name: str) -> str:
            r = self.results.get(name, {})  # the final report repeats the last round's figures
            parts = []
            if not math.isnan(r.get("local_mean", math.nan)):
                parts.append(f"local {r['local_mean']:.3f}")
            if not math.isnan(r.get("global_test", math.nan)):
                parts.append(f"global/test {r['global_test']:.3f}")
            return ", ".join(parts)

        def on_trial_error(self, iteration, trials, trial, **info):
            name = name_of(trial)
            if self.results.get(name, {}).get("status") in ("stopped", "skipped"):  # left for a resume
                self.on_trial_complete(iteration, trials, trial, **info)
                return
            if self.results.get(name, {}).get("status") == "error":  # said already, by its report
                return
            where = getattr(trial, "error_file", None) or "Tune's trial folder"
            self.errors[name] = f"the trial failed ({_last_line(where)}); its traceback is in {where}"
            self.stop()

    return Progress()


def _last_line(path) -> str:
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError:
        return "no error file"
    return lines[-1] if lines else "no message"


class _Unfinished(logging.Filter):
    """Drops Tune's error logs (a traceback each, then "Trials did not complete") about a search's trials
    left unfinished on purpose: a stop is one line, and --resume continues them; and its "Trials did not
    complete" after a failed run, which fmlray names in its own line."""

    def __init__(self, stopping: Callable[[], bool]):
        super().__init__()
        self.stopping = stopping

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None  # Ray's error is also an instance of its cause
        return not isinstance(exc, LeftUnfinished) and not (
            self.stopping() and str(record.msg).startswith("Trials did not complete")) and not (
            # restoring a search: the trials that had not reported when it stopped, which now run again
            str(record.msg).startswith("Failed to fetch metrics for"))


@contextlib.contextmanager
def _quiet_unfinished(stopping: Callable[[], bool]):
    loggers = [logging.getLogger(n) for n in ("ray.tune.execution.tune_controller", "ray.tune.tune",
                                              "ray.tune.analysis.experiment_analysis")]
    quiet = _Unfinished(stopping)
    for one in loggers:
        one.addFilter(quiet)
    try:
        yield
    finally:
        for one in loggers:
            one.removeFilter(quiet)


def tune_run(trials: list[Trial], parallel: int | str, storage: Path, echo: Callable[[str], None], *,
             order: dict[str, int] | None = None, total: int | None = None, search=None,
             restore: Path | None = None):
    """Run `trials` (one per run of a sweep), or `search` (a SearchSpec-like object: param_space,
    tune_config, build(config, trial_id) -> (name, cfg), bundles(cfg), total), on the connected Ray;
    or, with `restore` (a search's Tune experiment folder), continue that search: its finished trials
    kept, the others run again (each from its run's checkpoint), its searcher drawing the rest.
    Return (Tune's results, {name: last result}). Raises the first failed run's error, or
    TrialsStopped on a signal."""
    import ray
    from ray import tune

    from fmlray.engine.connect import _environ
    from fmlray.relay import Relay, listening
    from fmlray.simulation import StopOnSignal

    by_name = {t.name: t for t in trials}
    control = ray.remote(num_cpus=0)(Control).remote()
    with StopOnSignal(echo) as signalled:
        if search is None:
            order = order or {t.name: i for i, t in enumerate(trials, 1)}
            progress = _progress_callback(echo, order.__getitem__, total or len(trials), control, signalled,
                                          lambda trial: trial.config["run"])
            trainable = tune.with_parameters(_trial, trials=by_name, control=control, launch_dir=os.getcwd())
            trainable = tune.with_resources(trainable, lambda config: tune.PlacementGroupFactory(
                by_name[config["run"]].bundles))
            param_space, extra = {"run": tune.grid_search(list(by_name))}, {}
        else:
            name_of = lambda trial: search_run_name(trial.trial_id)  # noqa: E731
            progress = _progress_callback(echo, lambda name: int(name.rsplit("-", 1)[1]) + 1, search.total, control,
                                          signalled, name_of)
            trainable = tune.with_parameters(_trial, trials={}, control=control, launch_dir=os.getcwd(),
                                             build=search.build)
            trainable = tune.with_resources(trainable, lambda config: tune.PlacementGroupFactory(
                search.bundles(config)))
            param_space, extra = search.param_space, search.tune_config(parallel)
        with _quiet_unfinished(lambda: signalled() or bool(progress.errors)):  # then fmlray says why itself
            if restore is not None:  # the scheduler, searcher and RunConfig come back from Tune's records
                tuner = tune.Tuner.restore(str(restore), trainable, resume_unfinished=True, resume_errored=True,
                                           param_space=param_space)
            else:
                tuner = tune.Tuner(
                    trainable,
                    param_space=param_space,
                    tune_config=tune.TuneConfig(max_concurrent_trials=None if parallel == "auto" or search else parallel,
                                                reuse_actors=True, **extra),
                    run_config=tune.RunConfig(name=time.strftime("%Y%m%d-%H%M%S"),
                                              storage_path=str(storage.resolve()), verbose=0, callbacks=[Relay()]))
            # our handlers, not Tune's; Tune's old console output, which verbose=0 silences wholly
            with _environ(TUNE_DISABLE_SIGINT_HANDLER="1", RAY_AIR_NEW_OUTPUT="0"), listening(progress):
                grid = tuner.fit()
        stopping = signalled()
    ray.kill(control)
    if progress.errors:
        name, message = next(iter(progress.errors.items()))
        raise FmlrayError(f"run {name}: {message}")
    unfinished = [n for n, r in progress.results.items() if r.get("status") in ("stopped", "skipped")]
    unfinished += [n for n in by_name if n not in progress.results]
    if stopping and (unfinished or search is not None):
        raise TrialsStopped(unfinished)
    return grid, progress.results


def check_data(runs: dict[str, Config]) -> None:
    """Each run's data loads and partitions, and its models fit it, here in the driver before Tune starts:
    a trial failing there would leave Tune's records behind for nothing. A data setup is loaded once."""
    from fmlray.simulation import check_algorithm, prepare

    loaded: dict[str, object] = {}
    for name, cfg in runs.items():
        key = repr((cfg.data, cfg.clients, cfg.model, cfg.run.seed))
        try:
            if key in loaded:
                check_algorithm(cfg, loaded[key])
            else:
                loaded[key] = prepare(cfg).dataset
        except FmlrayError as exc:
            raise type(exc)(f"run {name}: {exc}") from None


def run_trials(sweep, parallel: int | str, echo: Callable[[str], None] = print) -> dict[str, dict]:
    """Run the sweep's unfinished runs as Tune trials, `parallel` at once ("auto": as many as fit);
    return each run's last result (its status, node, start and end times)."""
    from fmlray import checkpoint
    from fmlray.engine.connect import connect, shut_down

    todo = {}
    for i, run in enumerate(sweep.runs, 1):
        if finished(sweep.folder / run.name):
            echo(f"[{i}/{len(sweep.runs)}] {run.name}: done")
        else:
            todo[run.name] = run.cfg
    if not todo:
        return {}
    check_data(todo)
    started = connect(sweep.runs[0].cfg.engine.address)
    try:
        trials = plan_trials(todo, parallel)
        resuming = sum(checkpoint.exists(sweep.folder / name) for name in todo)
        at_once = "as many as fit" if parallel == "auto" else f"up to {parallel}"
        echo(f"{len(trials)} run(s) as Ray Tune trials, {at_once} at once"
             + (f", {resuming} resuming" if resuming else "") + f"; Tune's records in {sweep.folder / '.tune'}")
        return tune_run(trials, parallel, sweep.folder / ".tune", echo, total=len(sweep.runs),
                        order={run.name: i for i, run in enumerate(sweep.runs, 1)})[1]
    finally:
        if started:
            shut_down()
