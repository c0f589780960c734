"""FedProx (Li et al., arXiv 1812.06127): FedAvg plus (μ/2)·‖w − w_global‖² on the client.

With μ = 0 it is FedAvg exactly: the same loss, and a zero penalty.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from fmlray.aggregate import Server
from fmlray.algorithms import fedavg
from fmlray.algorithms.base import Algorithm


def proximal(mu: float):
    """The penalty (μ/2)·Σ‖w − w₀‖² over a model's parameters, w₀ the global model it was sent."""
    def penalty(model: nn.Module, anchor: list[Tensor]) -> Tensor:
        sq = sum(torch.sum((w - w0) ** 2) for w, w0 in zip(model.parameters(), anchor))
        return 0.5 * mu * sq
    return penalty


def make(*, mu: float, server: Server = Server()) -> Algorithm:
    return dataclasses.replace(fedavg.make(server), name="fedprox", penalties={"meme": proximal(mu)})


def from_config(cfg, rounds: int) -> Algorithm:
    return make(mu=cfg.fedprox.mu, server=fedavg.server_of(cfg))
