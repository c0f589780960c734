"""The round loop on the serial engine: hand-checkable rounds, sampling, determinism, learning."""

import os

import numpy as np
import pytest
import torch

from fmlray.config import load_config
from fmlray.engine.host import seeded_model, state_of
from fmlray.engine.serial import SerialEngine
from fmlray.seeding import GLOBAL_INIT, derive_seed
from fmlray.simulation import prepare, sample_clients, simulate


def run(overrides):
    cfg = load_config(None, overrides)
    prepared = prepare(cfg)
    engine = SerialEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    return cfg, prepared, simulate(cfg, prepared.dataset, prepared.partition, engine)


def test_one_client_one_step_equals_centralised_sgd():
    cfg, prepared, result = run([
        "algorithm.name=fedavg", "clients.num_clients=1", "clients.groups=[{name='all', share=1.0}]",
        "data.partition=iid", "run.rounds=1", "training.epochs=1", "training.batch_size=100000",
        "training.momentum=0.0", "training.weight_decay=0.0", "training.lr=0.5"])
    ds = prepared.dataset
    model = seeded_model(cfg.model.meme, ds, derive_seed(cfg.run.seed, GLOBAL_INIT))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)  # one client holds every row
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for k, v in state_of(model).items():
        np.testing.assert_allclose(result.global_state[k], v, atol=1e-6)


def test_sampling_is_seeded_per_round_and_sized_by_fraction():
    cfg = load_config(None, ["clients.fraction=0.25"])
    picks = [sample_clients(cfg, r) for r in (1, 2, 3)]
    assert all(len(p) == 5 and p == sorted(set(p)) for p in picks)
    assert picks[0] != picks[1]
    assert picks == [sample_clients(cfg, r) for r in (1, 2, 3)]
    assert sample_clients(load_config(None, ["clients.fraction=0.01"]), 1).__len__() == 1


def test_only_sampled_clients_train_but_all_are_evaluated():
    _, _, result = run(["clients.fraction=0.25", "run.rounds=2"])
    for rnd in (1, 2):
        trained = {r["client"] for r in result.rows if r["round"] == rnd and r["split"] == "train"}
        tested = {r["client"] for r in result.rows if r["round"] == rnd and r["split"] == "test"}
        assert len(trained) == 5 and tested == set(range(20))


def test_same_seed_same_rows_other_seed_other_rows():
    _, _, a = run(["run.rounds=2"])
    _, _, b = run(["run.rounds=2"])
    _, _, c = run(["run.rounds=2", "run.seed=1"])
    key = lambda rows: [(r["round"], r["client"], r["model"], r["split"], r["accuracy"]) for r in rows]  # noqa: E731
    assert key(a.rows) == key(b.rows)
    assert key(a.rows) != key(c.rows)


@pytest.mark.parametrize("algo, models", [("fedavg", {"meme", "global"}), ("fedprox", {"meme", "global"}),
                                          ("local", {"local"}), ("fml", {"local", "meme", "global"})])
def test_each_algorithm_records_the_models_it_has(algo, models):
    _, _, result = run([f"algorithm.name={algo}", "run.rounds=1"])
    assert {r["model"] for r in result.rows if r["client"] >= 0} == models
    assert (result.global_state is None) == (algo == "local")


def test_eval_every_skips_rounds_but_not_the_last():
    _, _, result = run(["run.rounds=3", "run.eval_every=2"])
    assert sorted({r["round"] for r in result.rows if r["split"] == "test"}) == [2, 3]


def test_batchnorm_meme_survives_aggregation_rounds():
    _, _, result = run(["model.meme=resnet8", "algorithm.name=fedavg", "run.rounds=2", "training.epochs=1",
                        "clients.num_clients=4"])
    assert result.global_state["0.1.num_batches_tracked"].dtype == np.int64
    assert result.global_state["0.1.num_batches_tracked"].shape == ()
    assert int(result.global_state["0.1.num_batches_tracked"]) > 0


def test_the_serial_engine_uses_no_more_threads_than_cores_and_says_so():
    cfg = load_config(None, ["clients.num_clients=4", "clients.groups.0.num_cpus=1000", "engine.kind=serial"])
    prepared, engine, before = prepare(cfg), SerialEngine(), torch.get_num_threads()
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        cores = len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == cores
        assert f"the groups' num_cpus (1000) capped at the {cores} core(s)" in " ".join(engine.notes)
    finally:
        engine.close()
    assert torch.get_num_threads() == before


def test_the_serial_engine_names_the_settings_it_does_not_read(tmp_path):
    cfg = load_config(None, ["clients.num_clients=4", "engine.kind=serial", "engine.address='auto'",
                             "clients.groups.0.num_gpus=1", f"engine.state_dir='{tmp_path}'"])
    prepared, engine = prepare(cfg), SerialEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        notes = " ".join(engine.notes)
    finally:
        engine.close()
    assert "in this process on the CPU: engine.address, clients.groups[mlp].num_gpus unused" in notes
    assert "kept in memory (engine.state_store = auto) (engine.state_dir unused: the disk store's)" in notes
