"""Deep Mutual Learning (Zhang, Xiang, Hospedales, Lu, arXiv 1706.00384) on each client alone: FML without
the server, its ablation. Each client's local model learns with a private peer, each from the label and
from the other's detached output (FML's losses, with algorithm.fml's α, β and temperature); nothing is
shared or averaged.

The peer has the global architecture and starts as the round-0 global model, as FML's meme does, so in
a round where every client trains for the first time DML and FML compute the same updates. Unlike the
meme, the peer keeps its weights and optimiser from round to round, as DML's two networks do.
"""

from __future__ import annotations

from fmlray.algorithms import fml
from fmlray.algorithms.base import Algorithm, Model


def make(*, alpha: float, beta: float, temperature: float = 1.0, schedule=None) -> Algorithm:
    loss = fml.losses_of(("local", "peer"), alpha=alpha, beta=beta, temperature=temperature, schedule=schedule)
    return Algorithm(name="dml", models=(Model("local"), Model("peer", arch="global", init="global")), loss=loss,
                     evaluates=("local", "peer"))


def from_config(cfg, rounds: int) -> Algorithm:
    f = cfg.fml
    return make(alpha=f.alpha, beta=f.beta, temperature=f.temperature, schedule=lambda rnd: f.at_round(rnd, rounds))
