"""FedRep (Collins, Hassani, Mokhtari, Shakkottai, arXiv 2102.07078): a shared representation and a head per
client, as FedPer, but trained in turn: first the head with the representation fixed, then the
representation with the head fixed; only the representation is averaged.

Choices as the authors' code (lgcollins/FedRep) makes them: of E local epochs the first E − `body_epochs`
train the head and the last `body_epochs` (their `local_rep_ep`, default 1) the representation; the head
is the last layer; frozen parameters are skipped by the optimiser (no step, no weight decay), while
BatchNorm statistics, if any, still update.
"""

from __future__ import annotations

from fmlray.aggregate import Server
from fmlray.algorithms import fedavg, fedper
from fmlray.algorithms.base import Algorithm, all_but_last_layers, last_layers


def make(*, head_layers: int, body_epochs: int, server: Server = Server()) -> Algorithm:
    head, body = last_layers(head_layers), all_but_last_layers(head_layers)

    def frozen(epoch: int, epochs: int):
        return {"local": body if epoch < epochs - body_epochs else head}

    return Algorithm(name="fedrep", models=(fedper.PERSONAL,), loss=fedper.loss, shares="local", shared_keys=body,
                     frozen=frozen, evaluates=("local",), server=server)


def from_config(cfg, rounds: int) -> Algorithm:
    return make(head_layers=cfg.fedrep.head_layers, body_epochs=cfg.fedrep.body_epochs, server=fedavg.server_of(cfg))
