"""Federated Averaging (McMahan et al., arXiv 1602.05629): one model, received whole from the server
each round, trained on the labels alone and averaged back."""

from __future__ import annotations

from torch import Tensor

from fmlray.aggregate import Server
from fmlray.algorithms.base import Algorithm, Model, cross_entropy

MEME = Model("meme", arch="global", init="global")  # the client's copy of the global model


def loss(logits: dict[str, Tensor], y: Tensor, rnd: int) -> dict[str, Tensor]:
    return {"meme": cross_entropy(logits["meme"], y)}


def make(server: Server = Server()) -> Algorithm:
    return Algorithm(name="fedavg", models=(MEME,), loss=loss, shares="meme", evaluates=(), server=server)


def from_config(cfg, rounds: int) -> Algorithm:
    return make(server_of(cfg))


def server_of(cfg) -> Server:
    """The server half every algorithm that shares takes from the config: weighting and server learning rate."""
    return Server(weighting=cfg.weighting, lr=cfg.server_lr)
