"""One Ray instance for the whole integration session (2 CPUs, 2 logical GPUs, on loopback)."""

import pytest

ray = pytest.importorskip("ray")

from raynodes import start_session_ray  # noqa: E402  (after the skip: it imports ray)


@pytest.fixture(scope="session")
def ray_session():
    start_session_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reused_actors():
    """The module's engines reuse each other's actors where their shapes match, as the runs of a sequential
    sweep do (`reusing_actors`): a new actor imports torch, ~3 s of CPU on two cores. The scope ends (and
    kills what it kept) before another module's tests, e.g. Tune trials that need the CPUs, run here."""
    from fmlray.engine.ray_engine import reusing_actors
    with reusing_actors():
        yield


@pytest.fixture
def fresh_actors(monkeypatch):
    """For a test that needs actors no earlier test used: what the module's scope kept is killed, and this
    test's engines keep nothing."""
    from fmlray.engine import ray_engine
    ray_engine.drain()
    monkeypatch.setattr(ray_engine, "_parked", None)
