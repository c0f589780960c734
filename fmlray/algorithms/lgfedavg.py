"""LG-FedAvg (Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, arXiv 2001.01523): the
opposite split of FedPer: each client keeps its own representation (the lower layers) and only the top
`global_layers` layers are averaged.

As the authors' code (pliang279/LG-FedAvg, `num_layers_keep`) does, the global part is the last layer(s);
every client's representation starts as the round-0 global model's. Their code first trains the whole
model with FedAvg for some rounds and starts LG-FedAvg from there; here it starts from round 1.
"""

from __future__ import annotations

from fmlray.aggregate import Server
from fmlray.algorithms import fedavg, fedper
from fmlray.algorithms.base import Algorithm, last_layers


def make(*, global_layers: int, server: Server = Server()) -> Algorithm:
    return Algorithm(name="lgfedavg", models=(fedper.PERSONAL,), loss=fedper.loss, shares="local",
                     shared_keys=last_layers(global_layers), evaluates=("local",), server=server)


def from_config(cfg, rounds: int) -> Algorithm:
    return make(global_layers=cfg.lgfedavg.global_layers, server=fedavg.server_of(cfg))
