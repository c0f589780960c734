"""The round loop: sample → broadcast → update → aggregate → evaluate → record.

It knows nothing of how updates run (that is the engine) nor of what they compute (that is the
algorithm); it only decides who trains when, and writes down what came back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fmlray import metrics
from fmlray.aggregate import State
from fmlray.config import Config
from fmlray.data import Dataset, Partition
from fmlray.engine import Engine
from fmlray.engine.host import initial_global_state
from fmlray.seeding import SAMPLING, derive_seed


@dataclass(frozen=True)
class Result:
    rows: list[dict]  # see fmlray.metrics for the columns
    global_state: State | None


def sample_clients(cfg: Config, rnd: int) -> list[int]:
    """The clients trained in round `rnd`: a seeded sample of `fraction` of them (at least one)."""
    k = cfg.clients.num_clients
    m = max(1, round(cfg.clients.fraction * k))
    if m >= k:
        return list(range(k))
    rng = np.random.default_rng(derive_seed(cfg.run.seed, SAMPLING, rnd))
    return sorted(int(i) for i in rng.choice(k, size=m, replace=False))


def simulate(cfg: Config, dataset: Dataset, partition: Partition, engine: Engine,
             on_round: Callable[[dict], None] | None = None) -> Result:
    """Run cfg.run.rounds rounds on a started engine; call `on_round(summary)` after each."""
    groups = [cfg.clients.groups[g].name for g in cfg.clients.group_of_clients()]
    state = initial_global_state(cfg, dataset)
    rows: list[dict] = []
    rounds = cfg.run.rounds
    for rnd in range(1, rounds + 1):
        started = time.perf_counter()
        ids = sample_clients(cfg, rnd)
        result = engine.train_round(rnd, ids, state)
        state = result.global_state
        new = metrics.train_rows(rnd, result.clients, groups)
        if rnd % cfg.run.eval_every == 0 or rnd == rounds:
            ev = engine.evaluate(state)
            new += metrics.eval_rows(rnd, ev.clients, ev.global_test, len(dataset.y_test), groups)
        new.append(metrics.row(rnd, samples=len(ids), seconds=time.perf_counter() - started))
        rows += new
        if on_round is not None:
            on_round(metrics.round_summary(new))
    return Result(rows, engine.fetch(state))


@dataclass(frozen=True)
class Prepared:
    dataset: Dataset
    partition: Partition


def prepare(cfg: Config) -> Prepared:
    """Load the data, partition it, and check every model fits it — before anything is written."""
    from fmlray.data import load_dataset, partition_dataset
    from fmlray.models import build_model

    dataset = load_dataset(cfg.data, num_clients=cfg.clients.num_clients, seed=cfg.run.seed)
    partition = partition_dataset(dataset, cfg.data, num_clients=cfg.clients.num_clients, seed=cfg.run.seed)
    for name in {cfg.model.meme, *(g.local_model for g in cfg.clients.groups)}:
        build_model(name, dataset.input_shape, dataset.num_classes)  # raises a ConfigError on a misfit
    return Prepared(dataset, partition)


def title(cfg: Config) -> str:
    groups = ", ".join(f"{g.name}:{g.local_model}" for g in cfg.clients.groups)
    return (f"{cfg.run.name}: {cfg.algorithm.name} on {cfg.data.dataset} ({cfg.data.partition}), "
            f"{cfg.clients.num_clients} clients [{groups}], meme {cfg.model.meme}, seed {cfg.run.seed}, "
            f"{cfg.engine.kind} engine")


def run_experiment(cfg: Config, prepared: Prepared | None = None, echo: Callable[[str], None] = print):
    """Prepare, simulate on the configured engine, write runs/<name>/; return (folder, final summary)."""
    from fmlray.data import partition_counts
    from fmlray.engine import make_engine
    from fmlray.rundir import write_run

    prepared = prepared or prepare(cfg)
    engine = make_engine(cfg)
    echo(title(cfg))
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        result = simulate(cfg, prepared.dataset, prepared.partition, engine,
                          on_round=lambda s: echo(metrics.progress_line(s, cfg.run.rounds)))
    finally:
        engine.close()
    table = metrics.to_table(result.rows)
    path = write_run(cfg, table, partition_counts(prepared.dataset, prepared.partition), title(cfg))
    return path, metrics.summaries(table)[-1]
