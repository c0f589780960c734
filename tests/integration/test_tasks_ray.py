"""Three task groups (fmlray.tasks) on the Ray engine: the same models, metrics and per-group rows as the
serial reference, with the clients spread over actors and their private rows on disk."""

import numpy as np
import pytest

from fmlray.config import load_config
from fmlray.engine.ray_engine import RayEngine
from fmlray.engine.serial import SerialEngine
from fmlray.simulation import prepare, simulate

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("reused_actors")]

THREE = ["clients.num_clients=6", "run.rounds=2", "training.epochs=1",
         "clients.groups=[{name='fine', share=1.0, num_cpus=0.5}, "
         "{name='parity', share=1.0, task='parity', num_cpus=0.5}, "
         "{name='three', share=1.0, local_model='lenet5', task=[0, 1, 2, -1, -1, -1, -1, -1, -1, -1], num_cpus=0.5}]"]


def run(engine, overrides):
    cfg = load_config(None, [*THREE, *overrides])
    prepared = prepare(cfg)
    engine.start(cfg, prepared.dataset, prepared.partition)
    try:
        return simulate(cfg, prepared.dataset, prepared.partition, engine)
    finally:
        engine.close()


def test_three_task_groups_on_ray_match_serial(ray_session):
    serial = run(SerialEngine(), ["engine.kind=serial"])
    ray = run(RayEngine(), ["engine.kind=ray", "engine.num_actors=2", "engine.state_store='disk'"])
    for k, v in serial.global_state.items():
        np.testing.assert_allclose(ray.global_state[k], v, rtol=0, atol=1e-6, err_msg=k)
    key = lambda r: (r["round"], r["client"], r["group"], r["model"], r["split"])  # noqa: E731
    a, b = sorted(serial.rows, key=key), sorted(ray.rows, key=key)
    assert [key(r) for r in a] == [key(r) for r in b]
    np.testing.assert_allclose([r["accuracy"] for r in a], [r["accuracy"] for r in b], atol=1e-6)
    groups = {(r["group"], r["model"]): r["note"] for r in b if r["split"] == "group_test" and r["round"] == 2}
    assert groups == {("fine", "local"): "task identity (10 labels)", ("fine", "global"): "task identity (10 labels)",
                      ("parity", "local"): "task parity (2 labels)", ("parity", "global"): "task parity (2 labels)",
                      ("three", "local"): "task custom (3 labels; drops 7 classes)",
                      ("three", "global"): "task custom (3 labels; drops 7 classes)"}
