"""APFL (Deng, Kamani, Mahdavi, arXiv 2003.13461): each client trains its copy w of the global model as in
FedAvg and a personal model v, and predicts with the mixture v̄ = α·v + (1 − α)·w of the two models'
*parameters* (the paper's Algorithm 1). Per batch: w steps on CE(w); v steps on CE(v̄), whose gradient
in v is α·∇f(v̄); with `adaptive`, α steps on the same loss, ∂/∂α = ⟨v − w, ∇f(v̄)⟩, and is kept in [0, 1].

Choices: v has the global architecture (the mixture needs it) and starts as the round-0 global model;
α is each client's own number, kept from round to round; BatchNorm statistics, if any, are v's. A
client's personalised model is evaluated as the mixture with the *current* global model (the paper's
client mixes with its own last copy of w, which the server does not keep).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fmlray.aggregate import Server
from fmlray.algorithms import fedavg
from fmlray.algorithms.base import Algorithm, Model, cross_entropy


def mixed_logits(v: nn.Module, w: nn.Module, alpha: Tensor, x: Tensor) -> Tensor:
    """v's forward with parameters α·v + (1 − α)·w; w is detached (its own loss trains it)."""
    params = {k: alpha * p + (1 - alpha) * q.detach() for (k, p), q in zip(v.named_parameters(), w.parameters())}
    return torch.func.functional_call(v, params, (x,))


def forward(models: dict[str, nn.Module], scalars: dict[str, Tensor], x: Tensor, names) -> dict[str, Tensor]:
    out = {}
    if "local" in names:
        out["local"] = mixed_logits(models["local"], models["meme"], scalars["alpha"], x)
    if "meme" in names:
        out["meme"] = models["meme"](x)
    return out


def loss(logits: dict[str, Tensor], y: Tensor, rnd: int) -> dict[str, Tensor]:
    return {"local": cross_entropy(logits["local"], y), "meme": cross_entropy(logits["meme"], y)}


def make(*, alpha: float, adaptive: bool = True, alpha_lr: float = 0.01, server: Server = Server()) -> Algorithm:
    def step(scalars: dict[str, Tensor]) -> None:
        a = scalars["alpha"]
        if adaptive and a.grad is not None:
            a.sub_(alpha_lr * a.grad).clamp_(0.0, 1.0)

    personal = Model("local", arch="global", init="global")
    return Algorithm(name="apfl", models=(personal, fedavg.MEME), loss=loss, shares="meme", forward=forward,
                     scalars={"alpha": alpha}, scalar_step=step, evaluates=("local",), server=server)


def from_config(cfg, rounds: int) -> Algorithm:
    a = cfg.apfl
    return make(alpha=a.alpha, adaptive=a.adaptive, alpha_lr=a.alpha_lr, server=fedavg.server_of(cfg))
