"""Ditto (Li, Hu, Beirami, Smith, arXiv 2012.04221): FedAvg for the global model, and beside it a personal
model per client trained on its own data with (λ/2)·‖v − w‖², w the global model the client received.

Choices the paper leaves open, as the authors' code (litian96/ditto) makes them: the personal model has
the global architecture and starts as the round-0 global model; it is trained in the same round, for the
same epochs, as the client's copy of the global model (here on the same batches; the two do not touch
each other, so the order does not matter). With λ = 0 the personal model trains as Local's does (from
the round-0 global model, in the global architecture) and the global model is FedAvg's.
"""

from __future__ import annotations

from torch import Tensor

from fmlray.aggregate import Server
from fmlray.algorithms import fedavg, fedprox
from fmlray.algorithms.base import Algorithm, Model, cross_entropy


def loss(logits: dict[str, Tensor], y: Tensor, rnd: int) -> dict[str, Tensor]:
    return {"local": cross_entropy(logits["local"], y), "meme": cross_entropy(logits["meme"], y)}


def make(*, lam: float, server: Server = Server()) -> Algorithm:
    personal = Model("local", arch="global", init="global")
    return Algorithm(name="ditto", models=(personal, fedavg.MEME), loss=loss, shares="meme",
                     penalties={"local": fedprox.proximal(lam)} if lam else {}, evaluates=("local",), server=server)


def from_config(cfg, rounds: int) -> Algorithm:
    return make(lam=cfg.ditto.lam, server=fedavg.server_of(cfg))
