"""One Ray instance for the whole integration session (2 CPUs, 2 logical GPUs, on loopback)."""

import logging

import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="session")
def ray_session():
    # Logical GPUs let the scheduler pack fractional-GPU actors on this CPU-only machine.
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()
