"""Local training: each client trains its private model alone; nothing is shared or averaged."""

from __future__ import annotations

from torch import Tensor

from fmlray.algorithms.base import Algorithm, Model, cross_entropy


def loss(logits: dict[str, Tensor], y: Tensor, rnd: int) -> dict[str, Tensor]:
    return {"local": cross_entropy(logits["local"], y)}


def make() -> Algorithm:
    return Algorithm(name="local", models=(Model("local"),), loss=loss)


def from_config(cfg, rounds: int) -> Algorithm:
    return make()
