"""Client updates by name. Each module builds an `Algorithm` from plain numbers."""

from __future__ import annotations

from fmlray.algorithms import fedavg, fedprox, fml, local
from fmlray.algorithms.base import Algorithm, evaluate, make_optimizer, train_client

__all__ = ["Algorithm", "build_algorithm", "evaluate", "make_optimizer", "train_client"]


def build_algorithm(cfg, rounds: int) -> Algorithm:
    """The client update named by `cfg` (an AlgorithmConfig) for a run of `rounds` rounds."""
    builders = {
        "fml": lambda: fml.make(alpha=cfg.fml.alpha, beta=cfg.fml.beta, temperature=cfg.fml.temperature,
                                schedule=lambda rnd: cfg.fml.at_round(rnd, rounds)),
        "fedavg": fedavg.make,
        "fedprox": lambda: fedprox.make(mu=cfg.fedprox.mu),
        "local": local.make,
    }
    return builders[cfg.name]()
