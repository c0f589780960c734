"""The round loop: sample → broadcast → update → aggregate → evaluate → record.

It knows nothing of how updates run (that is the engine) nor of what they compute (that is the
algorithm); it only decides who trains when, and writes down what came back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fmlray import metrics, signals
from fmlray.aggregate import State
from fmlray.config import Config
from fmlray.data import Dataset, Partition
from fmlray.engine import Engine
from fmlray.errors import ConfigError, DataError, FmlrayError, TrainingError
from fmlray.progress import Console
from fmlray.seeding import EVAL_SAMPLE, SAMPLING, derive_seed

if TYPE_CHECKING:  # torch comes with these: imported when a run starts, after its first line
    from fmlray.checkpoint import Resume


@dataclass(frozen=True)
class Result:
    rows: list[dict]  # see fmlray.metrics for the columns; empty when they went to a `record` sink
    global_state: State | None


def sample_clients(cfg: Config, rnd: int) -> list[int]:
    """The clients trained in round `rnd`: a seeded sample of `fraction` of them (at least one)."""
    k = cfg.clients.num_clients
    m = max(1, round(cfg.clients.fraction * k))
    if m >= k:
        return list(range(k))
    rng = np.random.default_rng(derive_seed(cfg.run.seed, SAMPLING, rnd))
    return sorted(int(i) for i in rng.choice(k, size=m, replace=False))


def eval_clients(cfg: Config, rnd: int, trained: list[int]) -> list[int] | None:
    """The clients an evaluation round tests (None: all): run.eval_clients."""
    how = cfg.run.eval_clients
    if how == "all":
        return None
    if how == "sampled":
        return list(trained)
    k = cfg.clients.num_clients
    chosen = np.zeros(k, dtype=bool)
    chosen[trained] = True
    others = np.flatnonzero(~chosen)
    rng = np.random.default_rng(derive_seed(cfg.run.seed, EVAL_SAMPLE, rnd))
    chosen[rng.choice(others, size=min(how, len(others)), replace=False)] = True
    return [int(c) for c in np.flatnonzero(chosen)]


class RunInterrupted(Exception):
    """A signal stopped the run after `round`; its checkpoint was written."""

    def __init__(self, rnd: int):
        super().__init__(f"stopped after round {rnd}")
        self.round = rnd


class RunDropped(Exception):
    """A signal stopped a run meant to replace an earlier one (`--overwrite`) before it had taken the name: the
    earlier run stays as it was and nothing of this one is kept (a Ctrl-C there is most likely a change of mind,
    and the earlier run cannot come back once replaced)."""

    def __init__(self, rnd: int, kept: Path):
        super().__init__(f"stopped in round {rnd}, before replacing {kept}")
        self.round, self.kept = rnd, kept


def simulate(cfg: Config, dataset: Dataset, partition: Partition, engine: Engine,
             on_round: Callable[[dict], None] | None = None, *, resume: Resume | None = None,
             save: Callable | None = None, record: Callable[[int, list[dict]], None] | None = None,
             stop: Callable[[], bool] = lambda: False, console: Console | None = None, restored: bool = False) -> Result:
    """Run rounds on a started engine (from `resume` on, if given); call `on_round(summary)` after each,
    `record(round, rows)` with each round's rows (else they are kept in the result), and
    `save(round, engine, global_state)` every run.checkpoint_every rounds and when `stop()` turns true.
    A `console` shows the progress of long rounds. `restored`: the engine already holds `resume`'s rows."""
    from fmlray.engine.host import initial_global_state
    from fmlray.tasks import of_group

    groups = [cfg.clients.groups[g].name for g in cfg.clients.group_of_clients()]
    tasks = {g.name: of_group(cfg, g) for g in cfg.clients.groups}  # per-group rows only in runs with tasks
    by_task = {} if all(t.identity for t in tasks.values()) else {name: t.describe() for name, t in tasks.items()}
    state, kept, first = initial_global_state(cfg, dataset), [], 1
    if resume is not None:
        state, first = resume.global_state, resume.round + 1
        if not restored:
            engine.restore(resume.folder, resume.refs(), resume.placement)
    rounds, every = cfg.run.rounds, cfg.run.checkpoint_every
    for rnd in range(first, rounds + 1):
        started = time.perf_counter()
        ids = sample_clients(cfg, rnd)
        tag = f"round {rnd}/{rounds}"  # a status line leads with what runs: a `round` line is a finished round
        result = engine.train_round(rnd, ids, state, progress=console and console.phase(f"  training {tag}", len(ids)))
        bad = [c["excluded"] for c in result.clients if "excluded" in c]
        if bad and len(bad) == len(result.clients):
            hint = "lower training.lr or check the data"
            first = bad[0].removesuffix(f"; {hint}")  # the client's own reason may end with the same advice
            raise TrainingError(f"round {rnd}: every client's update was NaN/Inf, nothing to average "
                                f"(first: {first}); {hint}")
        state = result.global_state
        new = metrics.train_rows(rnd, result.clients, groups) + metrics.recovery_rows(rnd, result.failures, groups)
        if rnd % cfg.run.eval_every == 0 or rnd == rounds:
            tested = eval_clients(cfg, rnd, ids)
            ev = engine.evaluate(state, tested, progress=console and console.phase(
                f"  evaluating {tag}", cfg.clients.num_clients if tested is None else len(tested)))
            evaluated = metrics.eval_rows(rnd, ev.clients, ev.global_test, len(dataset.y_test), groups)
            new += (evaluated + (metrics.group_rows(rnd, evaluated, by_task) if by_task else [])
                    + metrics.recovery_rows(rnd, ev.failures, groups))
        new.append(metrics.row(rnd, samples=len(ids), seconds=time.perf_counter() - started))
        if record is None:
            kept += new
        else:
            record(rnd, new)
        summary = metrics.round_summary(new)
        stopping = stop()
        if save is not None and (stopping or (every and (rnd % every == 0 or rnd == rounds))):
            summary["checkpoint"] = save(rnd, engine, engine.fetch(state))
            stopping = stopping or stop()  # asked while the checkpoint was written: it serves the stop
            if (stopping or rnd == rounds) and (late := engine.take_failures()):  # no next round to say them
                more = metrics.recovery_rows(rnd, late, groups)
                if record is None:
                    kept += more
                else:
                    record(rnd, new + more)  # the round's file again, whole
        if on_round is not None:
            on_round(summary)
        if stopping and rnd < rounds:
            raise RunInterrupted(rnd)
    return Result(kept, engine.fetch(state))


@dataclass(frozen=True)
class Prepared:
    dataset: Dataset
    partition: Partition


def prepare(cfg: Config) -> Prepared:
    """Load the data, partition it, and check every model fits it, and that the algorithm shares something of
    the global model if it shares at all — before anything is written."""
    from fmlray.data import load_dataset, partition_dataset
    from fmlray.models import build_model

    dataset = load_dataset(cfg.data, num_clients=cfg.clients.num_clients, seed=cfg.run.seed)
    partition = partition_dataset(dataset, cfg.data, num_clients=cfg.clients.num_clients, seed=cfg.run.seed)
    partition = keep_task_classes(cfg, dataset, partition)
    keys = {cfg.model.meme: ["model.meme"]}
    for g in cfg.clients.groups:
        keys.setdefault(g.local_model, []).append(f"clients.groups[{g.name}].local_model")
    for name, where in keys.items():
        try:
            build_model(name, dataset.input_shape, dataset.num_classes)
        except ConfigError as exc:  # a misfit: said with the keys that chose this model
            raise ConfigError(f"{' and '.join(where)} = {name!r}: {exc}") from None
    check_algorithm(cfg, dataset)
    return Prepared(dataset, partition)


def check_algorithm(cfg: Config, dataset: Dataset) -> None:
    """The algorithm builds, its loss keeps its contract (`check_loss`), and it shares something of the global
    model if it shares at all (e.g. FedPer's head is not the whole model): else one line."""
    from fmlray.algorithms import build_algorithm
    from fmlray.algorithms.base import check_loss, layers
    from fmlray.models import build_model

    algo, name = build_algorithm(cfg.algorithm, cfg.run.rounds), cfg.algorithm.name
    check_loss(algo, *_probe(cfg, algo, dataset))
    if algo.shares is not None:
        meme = build_model(cfg.model.meme, dataset.input_shape, dataset.num_classes)
        try:
            shared = algo.shared_keys(meme)
        except ConfigError as exc:
            raise ConfigError(f"algorithm {name!r} {exc} (model.meme {cfg.model.meme!r}); give at most "
                              f"{len(layers(meme))} in algorithm.{name}.*") from None
        if not shared:
            raise ConfigError(f"algorithm {name!r} shares no part of model.meme {cfg.model.meme!r} "
                              f"({len(layers(meme))} layers) with these settings; change the layers it keeps or "
                              f"shares (algorithm.{name}.*) or use algorithm.name = \"local\"")


def _probe(cfg: Config, algo, dataset: Dataset) -> tuple:
    """What `check_loss` probes the loss with: a client of the first group's models, built as its host builds
    them, and four of the run's training rows in the group's task space (with the task's members, if any)."""
    import torch

    from fmlray.engine.host import client_archs, client_models
    from fmlray.engine.tasks import task_members
    from fmlray.tasks import of_group

    group = cfg.clients.groups[0]
    task = of_group(cfg, group)
    models = client_models(algo, client_archs(cfg, algo, group.local_model, task.num_labels), dataset)
    label = np.asarray(task.of_class)[dataset.y_train]
    rows = np.flatnonzero(label >= 0)[:4]  # a task's classes only, as its clients hold
    x, y = torch.as_tensor(dataset.x_train[rows]), torch.as_tensor(label[rows])
    return models, x, y, None if task.identity else task_members(task, torch.device("cpu"))


def keep_task_classes(cfg: Config, dataset: Dataset, partition: Partition) -> Partition:
    """The partition without the rows of classes outside each client's task (fmlray.tasks: they are dropped);
    a client left with fewer than data.min_samples training rows, or no test rows, is an error."""
    from fmlray.tasks import of_group

    tasks = [of_group(cfg, g) for g in cfg.clients.groups]
    if not any(t.dropped for t in tasks):
        return partition
    train, test = list(partition.train), list(partition.test)
    for cid, gi in enumerate(cfg.clients.group_of_clients()):
        task = tasks[gi]
        if not task.dropped:
            continue
        dropped = np.asarray(task.dropped)
        train[cid] = train[cid][~np.isin(dataset.y_train[train[cid]], dropped)]
        kept = test[cid][~np.isin(dataset.y_test[test[cid]], dropped)]
        where = f"client {cid} (group {cfg.clients.groups[gi].name}, task {task.describe()})"
        if len(train[cid]) < cfg.data.min_samples:  # each fix offered only where that key can still move
            lower = "lower data.min_samples, " if cfg.data.min_samples > 1 else ""
            raise DataError(f"{where} keeps {len(train[cid])} training rows of its task's classes, fewer than "
                            f"data.min_samples = {cfg.data.min_samples}; {lower}map fewer classes to -1, or use "
                            "another partition")
        if len(kept) == 0 and len(test[cid]):
            raise_max = "raise data.max_test_samples, " if cfg.data.max_test_samples else ""
            raise DataError(f"{where} keeps no test rows of its task's classes; map fewer classes to -1, {raise_max}"
                            "or use another partition")
        test[cid] = kept
    return Partition(tuple(train), tuple(test))


def title(cfg: Config) -> str:
    groups = ", ".join(f"{g.name}:{g.local_model}" + ("" if g.task == "identity" else f"/{_task_text(g.task)}")
                       for g in cfg.clients.groups)
    return (f"{cfg.run.name}: {cfg.algorithm.name} on {cfg.data.dataset} ({cfg.data.partition}), "
            f"{cfg.clients.num_clients} clients [{groups}], meme {cfg.model.meme}, seed {cfg.run.seed}, "
            f"{cfg.engine.kind} engine")


def run_experiment(cfg: Config, prepared: Prepared | None = None, echo: Callable[[str], None] = print,
                   resume_dir: Path | None = None, overwrite: bool = False, *,
                   report: Callable[[dict], None] | None = None, stop: Callable[[], bool] = lambda: False):
    """Prepare, simulate on the configured engine, write runs/<name>/; return (folder, final summary).
    `report(summary)` gets each round's summary (a Tune trial hands it to Tune); `stop()` asks, besides
    SIGINT / SIGTERM, to stop after the round with a checkpoint (RunInterrupted).

    The name is claimed first (`rundir.RunFolder`: locked; an existing folder refused unless
    `overwrite`), before any data is loaded or the engine started. A new run is written into a hidden
    sibling, renamed into place at its first checkpoint (or at its end, without checkpoints); while the
    run goes on it holds the config, the partition, the latest checkpoint and each finished round's
    metric rows (metrics/); metrics.parquet, the summary and the plot come when it ends. A run that
    fails before its first checkpoint leaves the folder as it was before it started.
    """
    from fmlray import rundir

    with rundir.RunFolder(cfg.run.output_dir, cfg.run.name, overwrite=overwrite,
                          resume=resume_dir is not None) as folder:
        return _run_in(folder, cfg, prepared, echo, resume_dir is not None, report, stop)


def _run_in(folder, cfg: Config, prepared: Prepared | None, echo: Callable[[str], None], resuming: bool,
            report: Callable[[dict], None] | None, asked: Callable[[], bool]):
    import psutil

    from fmlray import rundir
    from fmlray.engine import make_engine

    began = time.perf_counter()
    console = echo if isinstance(echo, Console) else Console(echo)
    resume = None
    if resuming:
        from fmlray import checkpoint
        resume = checkpoint.load(folder.path, cfg)
        rundir.check_entries(folder.path)
        rundir.check_history(folder.path, resume.round)  # the earlier rounds' metric rows are there too
    if resume is not None and resume.round >= cfg.run.rounds:
        if rundir.finished(folder.path):
            if cfg.algorithm.schedule_keys():  # extending it would bend its schedule (checkpoint.load refuses it)
                raise FmlrayError(f"{folder.path} already ran its {resume.round} rounds, over which "
                                  f"{' and '.join(cfg.algorithm.schedule_keys())} spread a schedule, so it cannot "
                                  "be extended; start a new run with more rounds")
            grid = rundir.grid_of(folder.path)  # its rounds are the grid's: extended, it would leave it
            raise FmlrayError(f"{folder.path} already ran its {resume.round} rounds; " + (
                f"it is a run of {grid}, so to continue it copy the folder (cp -a {folder.path} DEST) and resume "
                f"the copy with --set run.rounds=N (N > {resume.round})" if grid else
                f"add --set run.rounds=N (N > {resume.round}) to continue it"))
        if resume.round > cfg.run.rounds:
            raise ConfigError(f"{folder.path} has a checkpoint of round {resume.round}, past run.rounds = "
                              f"{cfg.run.rounds}; resume with run.rounds >= {resume.round} (a run cannot go back), "
                              "or start a new run")
        # stopped or killed between its last checkpoint and the end of its outputs: they are written now
        console(f"{title(cfg)}: ran its {resume.round} rounds; writing its outputs")
        put_back = resume.partition is not None and not all(os.path.lexists(folder.path / name)
                                                            for name in (rundir.PARTITION_FILE, rundir.PARTITION))
        if put_back:  # deleted: written back, as any resume does (a checkpoint without the partition's fingerprint,
            # of an earlier fmlray, cannot vouch for the config's: its outputs are written without it)
            prepared = prepared or prepare(cfg)
            checkpoint.check_same_data(folder.path, resume, prepared.dataset, prepared.partition)
        with signals.shielded("writing the run's outputs"), \
                _written(folder, "the run's outputs", cfg.run.checkpoint_every):
            if put_back:
                checkpoint.put_back_partition(folder.path, prepared.dataset, prepared.partition)
            summary = rundir.finish(folder.path, rundir.Records(folder.path, upto=resume.round), title(cfg))
        if report is not None:  # a Tune trial: its last round's figures
            report(summary[-1])
        return folder.path, summary[-1]
    console(title(cfg) + (f" (resumed after round {resume.round})" if resume else ""))
    replacing = folder.replacing()
    if replacing:
        console(replacing)
    early = cfg.engine.kind == "ray"
    if early:  # a private Ray comes up in a thread meanwhile (see fmlray.engine.connect)
        from fmlray.engine.connect import abandon_early, start_early
        start_early(cfg.engine.address)
    try:
        from fmlray import checkpoint  # torch, ~1.2 s: after the first line
        if prepared is None:
            loading = time.perf_counter()
            prepared = prepare(cfg)
            d, part = prepared.dataset, prepared.partition
            held = (sum(map(len, part.train)), sum(map(len, part.test)))
            console(f"data: {len(d.y_train)} training and {len(d.y_test)} test rows of {cfg.data.dataset} over "
                    f"{cfg.clients.num_clients} clients" + (f", who hold {held[0]} and {held[1]} of them" if held !=
                    (len(d.y_train), len(d.y_test)) else "") + f" ({time.perf_counter() - loading:.1f}s)")
        if resume is not None:
            checkpoint.check_same_data(folder.path, resume, prepared.dataset, prepared.partition)
            checkpoint.check_global(folder.path, resume, cfg, prepared.dataset)
        engine = make_engine(cfg)
    except BaseException:
        if early:
            abandon_early()
        raise
    try:
        console(f"starting the {cfg.engine.kind} engine")
        engine.start(cfg, prepared.dataset, prepared.partition)
        signals.check()  # a SIGTERM whose raise was lost during start-up (see fmlray.signals)
        for note in getattr(engine, "notes", []):
            console(note)
        split = "".join(f"; {what} {s:.1f}s" for what, s in getattr(engine, "startup", {}).items())
        console(f"ready in {time.perf_counter() - began:.1f}s "
                f"({time.time() - psutil.Process().create_time():.1f}s since the process started{split})")
        if resume is None:
            folder.create(cfg, prepared.dataset, prepared.partition)
        writer = checkpoint.Writer(folder.path, cfg, resume, data=prepared.dataset.fingerprint,
                                   partition=lambda: checkpoint.partition_fingerprint(prepared.partition))
        if resume is not None:  # its rows first: a damaged checkpoint is refused before the folder changes
            engine.restore(resume.folder, resume.refs(), resume.placement)
        engine.check_writable(writer.folder)
        if resume is not None:
            _first_writes(folder.path, writer.folder, cfg, prepared)
        records = rundir.Records(folder.path, upto=resume.round if resume else 0)

        def into_place() -> None:
            """The new run has something worth keeping: it takes its name (replacing an old run only now)."""
            if not folder.promoted:
                folder.promote()
                writer.relocate(folder.path)
                records.relocate(folder.path)
                engine.checkpoint_moved(writer.folder)

        # Whether a stop keeps an earlier run (`--overwrite`) or comes after this run is bound to replace it is
        # settled once, by the first to ask: the signal handler (which says which in its line) or the checkpoint
        # about to take the name. dict.setdefault is one step, which a signal handler cannot cut in two.
        fate: dict[str, str] = {}

        def keeps_earlier() -> bool:
            """Whether a stop now keeps the earlier run in place of this one."""
            return (not folder.promoted and os.path.lexists(folder.final)
                    and fate.setdefault("earlier", "kept") == "kept")

        def save(rnd: int, engine, state) -> dict:
            if signalled() and keeps_earlier():
                raise RunDropped(rnd, folder.final)
            info = writer(rnd, engine, state)
            if not folder.promoted and fate.setdefault("earlier", "replaced") == "kept":
                raise RunDropped(rnd, folder.final)  # the stop came while the checkpoint was being written
            into_place()
            return info

        def record(rnd: int, rows: list[dict]) -> None:
            with _written(folder, f"round {rnd}'s metrics", cfg.run.checkpoint_every):
                records.append(rnd, rows)

        def on_round(summary: dict) -> None:
            console(metrics.progress_line(summary, cfg.run.rounds))
            if report is not None:
                report(summary)

        with StopOnSignal(console, lambda: f"keeping the earlier run {folder.final}, without a checkpoint"
                          if keeps_earlier() else "with a checkpoint") as signalled:
            simulate(cfg, prepared.dataset, prepared.partition, engine, resume=resume, save=save, restored=True,
                     record=record, stop=lambda: signalled() or asked(), on_round=on_round, console=console)
    finally:
        with signals.shielded():
            engine.close()  # a run that fails before into_place() leaves no folder: RunFolder drops its sibling
            if early:
                abandon_early()  # an engine that failed before it took the early Ray up
    with signals.shielded("writing the run's outputs"):
        with _written(folder, "the run's outputs", cfg.run.checkpoint_every):
            summary = rundir.finish(folder.path, records, title(cfg))
        into_place()  # a run without checkpoints (run.checkpoint_every = 0) takes its name when it ends
    return folder.path, summary[-1]


def _first_writes(run_dir: Path, checkpoints: Path, cfg: Config, prepared: Prepared) -> None:
    """A resumed run's first writes, once every check has passed: probes of its checkpoint folder (refused now,
    not after a round) and of its metrics/, its partition.npz if it was deleted (`checkpoint.put_back_partition`),
    its config (e.g. with more rounds than before). One that fails is one line, and leaves the run as it was (but
    for a partition.npz put back: the run's own)."""
    import tempfile

    from fmlray import checkpoint, rundir

    def probe(folder: Path) -> None:
        tempfile.TemporaryFile(dir=folder).close()

    parts = run_dir / rundir.PARTS  # a stopped run's metric rows by round, which `Records` tidies next
    steps = [(checkpoints, lambda: probe(checkpoints)), *([(parts, lambda: probe(parts))] if parts.is_dir() else []),
             (run_dir, lambda: checkpoint.put_back_partition(run_dir, prepared.dataset, prepared.partition)),
             (run_dir, lambda: rundir.write_config(run_dir, cfg))]
    for where, write in steps:
        try:
            write()
        except OSError as exc:
            raise FmlrayError(f"cannot write into {where} ({exc.strerror or exc}); the run was left as it was: "
                              f"{_remedy(exc)} and resume again") from None


def _remedy(exc: OSError) -> str:
    """What to do where a run's folder could not be written, by the error's cause."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space there"
    return "make it writable" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "mend that"


@contextlib.contextmanager
def _written(folder, what: str, every: int):
    """`what` of a run (its outputs, a round's metrics) that cannot be written (a full disk) is one line saying
    how to finish the run. A round's metrics are written before its checkpoint, so the last checkpoint is an
    earlier round's, whose metrics are all there."""
    try:
        yield
    except OSError as exc:
        from fmlray import checkpoint
        where = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        kept = (f"its last checkpoint is kept: {_remedy(exc)} and finish it with: fmlray run --resume "
                f"{folder.final}" if checkpoint.exists(folder.path) else
                "it has no checkpoint yet, so nothing of it is kept" if every else
                "it has no checkpoint (run.checkpoint_every = 0), so nothing of it is kept")
        raise FmlrayError(f"cannot write {what} ({where}); {kept}") from None


def _task_text(task) -> str:
    return task if isinstance(task, str) else "[" + ",".join(map(str, task)) + "]"


class StopOnSignal:
    """SIGINT / SIGTERM ask the run to stop after the current round (and checkpoint); a second
    SIGINT aborts at once. A SIGINT the process was started ignoring stays ignored (`signals.sigint_ignored`)."""

    def __init__(self, echo: Callable[[str], None], how: Callable[[], str] = lambda: "with a checkpoint"):
        self.echo, self.how, self.requested, self.previous = echo, how, False, {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in [signal.SIGTERM] + ([] if signals.sigint_ignored() else [signal.SIGINT]):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        signals.record(signum)
        self.echo(f"{signal.Signals(signum).name}: stopping after this round, {self.how()}")

    def __call__(self) -> bool:
        return self.requested

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
