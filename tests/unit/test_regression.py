"""The canonical short run's accuracy curve, against a recorded one: a change that breaks learning
(or silently changes what a seed means) fails here. Re-record only for an intended change, with
the command in the JSON, and say why in the commit."""

import json
from pathlib import Path

import pytest

from fmlray.config import load_config
from fmlray.engine.serial import SerialEngine
from fmlray.metrics import summaries, to_table
from fmlray.simulation import prepare, simulate

RECORDED = json.loads((Path(__file__).parent / "recorded" / "digits_fml_curve.json").read_text())["curve"]
TOLERANCE = 0.02  # absolute accuracy; the run itself is deterministic on one machine


def test_digits_fml_curve_matches_the_recorded_one():
    cfg = load_config(None, ["engine.kind=serial", "run.rounds=5"])
    prepared = prepare(cfg)
    engine = SerialEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    got = summaries(to_table(simulate(cfg, prepared.dataset, prepared.partition, engine).rows))
    assert [s["round"] for s in got] == [r["round"] for r in RECORDED]
    for s, r in zip(got, RECORDED):
        assert s["local"]["mean"] == pytest.approx(r["local_mean"], abs=TOLERANCE), s["round"]
        assert s["global_clients"]["mean"] == pytest.approx(r["global_clients_mean"], abs=TOLERANCE), s["round"]
        assert s["global_test"] == pytest.approx(r["global_test"], abs=TOLERANCE), s["round"]
    assert got[-1]["local"]["mean"] > got[0]["local"]["mean"] + 0.2  # it learns, both models
    assert got[-1]["global_test"] > got[0]["global_test"] + 0.2
