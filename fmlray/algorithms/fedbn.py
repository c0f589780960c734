"""FedBN (Li, Jiang, Zhang, Kamp, Dou, arXiv 2102.07623): FedAvg, except that every BatchNorm layer (its
weight, bias and running statistics) stays with its client.

As the authors' code (med-air/FedBN) does, the BatchNorm layers start from the round-0 global model and
are never averaged. On a model without BatchNorm (mlp, lenet5, cnn, cnn5) every key is shared and FedBN
is FedAvg exactly; resnet8 and resnet18 have BatchNorm.
"""

from __future__ import annotations

from torch import nn

from fmlray.aggregate import Server
from fmlray.algorithms import fedavg, fedper
from fmlray.algorithms.base import Algorithm


def not_batchnorm(module: nn.Module) -> list[str]:
    """Every state_dict key except those of BatchNorm layers."""
    bn = {f"{name}." for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    return [k for k in module.state_dict() if not any(k.startswith(prefix) for prefix in bn)]


def make(server: Server = Server()) -> Algorithm:
    return Algorithm(name="fedbn", models=(fedper.PERSONAL,), loss=fedper.loss, shares="local",
                     shared_keys=not_batchnorm, evaluates=("local",), server=server)


def from_config(cfg, rounds: int) -> Algorithm:
    return make(fedavg.server_of(cfg))
