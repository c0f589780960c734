"""FedProx (Li et al., arXiv 1812.06127): FedAvg plus (μ/2)·‖w − w_global‖² on the client.

With μ = 0 it is FedAvg exactly: the same loss, and a zero penalty.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fmlray.algorithms import fedavg
from fmlray.algorithms.base import Algorithm


def proximal(mu: float):
    """The penalty (μ/2)·Σ‖w − w₀‖² over the meme's parameters."""
    def penalty(meme: nn.Module, anchor: list[Tensor]) -> Tensor:
        sq = sum(torch.sum((w - w0) ** 2) for w, w0 in zip(meme.parameters(), anchor))
        return 0.5 * mu * sq
    return penalty


def make(*, mu: float) -> Algorithm:
    return Algorithm(name="fedprox", trains=("meme",), loss=fedavg.loss, penalty=proximal(mu))
