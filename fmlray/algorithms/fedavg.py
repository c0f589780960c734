"""Federated Averaging (McMahan et al., arXiv 1602.05629): the meme learns from labels alone."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fmlray.algorithms.base import Algorithm


def loss(logits: dict[str, Tensor], y: Tensor, rnd: int) -> dict[str, Tensor]:
    return {"meme": F.cross_entropy(logits["meme"], y)}


def make() -> Algorithm:
    return Algorithm(name="fedavg", trains=("meme",), loss=loss)
