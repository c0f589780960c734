"""FedPer (Arivazhagan, Aggarwal, Singh, Choudhary, arXiv 1912.00818): base layers averaged as in FedAvg,
the last `head_layers` layers (the personalisation layers) kept by each client.

Choices the paper leaves open: a layer is a submodule holding parameters or buffers (a Linear, a Conv,
a BatchNorm), counted from the output; the head starts, on every client, as the round-0 global model's
head; the client's optimiser starts fresh each round, as FedAvg's. With no head it is FedAvg.
"""

from __future__ import annotations

from torch import Tensor

from fmlray.aggregate import Server
from fmlray.algorithms import fedavg
from fmlray.algorithms.base import Algorithm, Model, all_but_last_layers, cross_entropy

# the client's model: the global architecture, part received each round, part its own
PERSONAL = Model("local", arch="global", init="global")


def loss(logits: dict[str, Tensor], y: Tensor, rnd: int) -> dict[str, Tensor]:
    return {"local": cross_entropy(logits["local"], y)}


def make(*, head_layers: int, server: Server = Server()) -> Algorithm:
    return Algorithm(name="fedper", models=(PERSONAL,), loss=loss, shares="local",
                     shared_keys=all_but_last_layers(head_layers), evaluates=("local",), server=server)


def from_config(cfg, rounds: int) -> Algorithm:
    return make(head_layers=cfg.fedper.head_layers, server=fedavg.server_of(cfg))
