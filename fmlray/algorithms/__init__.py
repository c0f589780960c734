"""Algorithms by name: `fmlray.config.ALGORITHMS` lists them, and each name is a module here whose
`from_config(cfg, rounds)` builds its `Algorithm` (see base.py). Adding one touches only its module and
that list (and config.py's AlgorithmConfig, if it has hyper-parameters)."""

from __future__ import annotations

import importlib

from fmlray.algorithms.base import Algorithm, Model, convolves, evaluate, train_client

__all__ = ["Algorithm", "Model", "build_algorithm", "convolves", "evaluate", "train_client"]


def build_algorithm(cfg, rounds: int) -> Algorithm:
    """The algorithm named by `cfg` (an AlgorithmConfig) for a run of `rounds` rounds."""
    return importlib.import_module(f"fmlray.algorithms.{cfg.name}").from_config(cfg, rounds)
