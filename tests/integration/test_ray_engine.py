"""The Ray engine against the serial reference, on a real local Ray: parity, placement, scale, resources."""

import numpy as np
import pytest

from fmlray.cli import main
from fmlray.config import load_config
from fmlray.engine.ray_engine import RayEngine
from fmlray.engine.serial import SerialEngine
from fmlray.errors import ResourceError
from fmlray.simulation import prepare, simulate

pytestmark = pytest.mark.integration

ONE_GROUP = "clients.groups=[{name='all', share=1.0, local_model='mlp', num_cpus=0.5}]"
QUICK = ["run.rounds=3", "training.epochs=1"]


def simulate_with(engine, overrides):
    cfg = load_config(None, overrides)
    prepared = prepare(cfg)
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        return simulate(cfg, prepared.dataset, prepared.partition, engine), engine
    finally:
        engine.close()


def assert_same(a, b):
    for k in a.global_state:
        np.testing.assert_allclose(a.global_state[k], b.global_state[k], rtol=0, atol=1e-6, err_msg=k)
    key = lambda r: (r["round"], r["client"], r["model"], r["split"])  # noqa: E731
    ra, rb = sorted(a.rows, key=key), sorted(b.rows, key=key)
    assert [key(r) for r in ra] == [key(r) for r in rb]
    acc_a = np.array([r["accuracy"] for r in ra])
    acc_b = np.array([r["accuracy"] for r in rb])
    np.testing.assert_allclose(acc_a, acc_b, atol=1e-6)


@pytest.fixture(scope="module")
def serial_one_group():
    return simulate_with(SerialEngine(), [*QUICK, ONE_GROUP])[0]


@pytest.mark.parametrize("actors", [1, 2, 3])
def test_ray_matches_serial_whatever_the_number_of_actors(ray_session, serial_one_group, actors):
    result, engine = simulate_with(RayEngine(), [*QUICK, ONE_GROUP, "engine.kind=ray", f"engine.num_actors={actors}"])
    assert len(engine.specs) == actors
    assert_same(serial_one_group, result)


def test_heterogeneous_groups_and_partial_participation_match_serial(ray_session):
    overrides = [*QUICK, "clients.fraction=0.5"]
    serial = simulate_with(SerialEngine(), overrides)[0]
    result, engine = simulate_with(RayEngine(), [*overrides, "engine.kind=ray"])
    assert [s.group for s in engine.specs] == ["mlp", "lenet5"]
    assert_same(serial, result)


def test_many_clients_are_multiplexed_on_few_actors(ray_session):
    overrides = ["data.dataset=synthetic", "data.partition=natural", "clients.num_clients=200", "run.rounds=2",
                 "training.epochs=1", "training.batch_size=64", "clients.fraction=1.0",
                 "clients.groups=[{name='all', share=1.0, local_model='mlp', num_cpus=1}]", "engine.kind=ray"]
    result, engine = simulate_with(RayEngine(), overrides)
    assert len(engine.specs) == 2 and sum(len(s.client_ids) for s in engine.specs) == 200
    for rnd in (1, 2):
        trained = {r["client"] for r in result.rows if r["round"] == rnd and r["split"] == "train"}
        assert trained == set(range(200))
    assert sum(1 for r in result.rows if r["split"] == "test" and r["round"] == 2 and r["model"] == "local") == 200


def test_fractional_gpus_are_packed_four_per_gpu(ray_session):
    overrides = ["clients.num_clients=8", "run.rounds=1", "training.epochs=1", "engine.kind=ray",
                 "clients.groups=[{name='gpu', share=1.0, local_model='mlp', num_cpus=0.25, num_gpus=0.25}]"]
    result, engine = simulate_with(RayEngine(), overrides)
    gpus = [tuple(i["gpu_ids"]) for i in engine.infos]
    assert len(gpus) == 8 and all(len(g) == 1 for g in gpus)
    assert sorted(gpus.count(g) for g in set(gpus)) == [4, 4]
    assert {i["device"] for i in engine.infos} == {"cpu"}  # no CUDA here: the actors fell back to the CPU
    assert {r["client"] for r in result.rows if r["split"] == "train"} == set(range(8))


def test_a_group_too_big_for_the_cluster_fails_at_once(ray_session):
    cfg = load_config(None, ["engine.kind=ray", "clients.groups=[{name='big', share=1.0, num_cpus=4}]"])
    prepared = prepare(cfg)
    with pytest.raises(ResourceError, match=r"clients.groups\[big\].num_cpus = 4.0 but the largest node has 2 CPUs"):
        RayEngine().start(cfg, prepared.dataset, prepared.partition)
    cfg = load_config(None, ["engine.kind=ray", "engine.num_actors=8"])
    with pytest.raises(ResourceError, match="lower engine.num_actors"):
        RayEngine().start(cfg, prepared.dataset, prepared.partition)



def test_fmlray_run_uses_the_ray_engine_by_default(ray_session, tmp_path, capsys):
    assert main(["run", "--set", "run.rounds=2", "--set", "training.epochs=1", "--set", f"run.output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "ray engine" in out and "round 2/2" in out
    assert (tmp_path / "digits-fml" / "metrics.parquet").is_file()


def test_an_unreachable_address_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "fmlray", "run", "--address", "127.0.0.1:9",
                           "--set", f"run.output_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [(
        "fmlray: error: no Ray cluster answers at 127.0.0.1:9; check engine.address / RAY_ADDRESS, "
        "or leave both empty for a local Ray")]
    assert list(tmp_path.iterdir()) == []
