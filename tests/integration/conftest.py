"""One Ray instance for the whole integration session (2 CPUs, 2 logical GPUs, on loopback)."""

import pytest

ray = pytest.importorskip("ray")

from raynodes import start_session_ray  # noqa: E402  (after the skip: it imports ray)


@pytest.fixture(scope="session")
def ray_session():
    start_session_ray()
    yield ray
    ray.shutdown()
