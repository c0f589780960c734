"""Algorithms by name: `fmlray.config.ALGORITHMS` lists them, and each name is a module here whose
`from_config(cfg, rounds)` builds its `Algorithm` (see base.py). Adding one touches only its module and
that list (and config.py's AlgorithmConfig, if it has hyper-parameters)."""

from __future__ import annotations

import importlib

from fmlray.algorithms.base import Algorithm, Model, convolves, evaluate, train_client
from fmlray.errors import ConfigError

__all__ = ["Algorithm", "Model", "build_algorithm", "convolves", "evaluate", "train_client"]


def build_algorithm(cfg, rounds: int) -> Algorithm:
    """The algorithm named by `cfg` (an AlgorithmConfig) for a run of `rounds` rounds."""
    module = f"fmlray.algorithms.{cfg.name}"
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:  # the module itself imports something missing: its own traceback says what
            raise
        raise ConfigError(f"algorithm.name = {cfg.name!r} is in fmlray.config.ALGORITHMS but has no module "
                          f"fmlray/algorithms/{cfg.name}.py; add the module (README: Adding an algorithm)") from None
    if not callable(getattr(found, "from_config", None)):
        raise ConfigError(f"fmlray/algorithms/{cfg.name}.py has no from_config(cfg, rounds) building its Algorithm "
                          "(README: Adding an algorithm)")
    return found.from_config(cfg, rounds)
