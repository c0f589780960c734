"""Federated Mutual Learning (Shen et al., arXiv 2006.16765).

Each client trains a private local model and a meme (a fork of the global model) on the same
batches, each learning from the label and from the other's detached output (deep mutual
learning, Zhang et al., arXiv 1706.00384). Only the meme is averaged. The local model may have its own
architecture (the client group's); the meme has the global one.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fmlray.aggregate import Server
from fmlray.algorithms import fedavg
from fmlray.algorithms.base import Algorithm, Model, cross_entropy


def distill(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(p_teacher ‖ p_student) at temperature T, batch mean, times T² (Hinton et al.)."""
    t = temperature
    log_q = F.log_softmax(student / t, dim=1)
    log_p = F.log_softmax(teacher.detach() / t, dim=1)  # the peer teaches; no gradient reaches it
    # F.kl_div(log_q, log_p, reduction="batchmean", log_target=True), written out: torch.func.vmap (the
    # batched client update) has no batching rule for kl_div and would loop over the clients instead.
    return (log_p.exp() * (log_p - log_q)).sum() / student.shape[0] * (t * t)


def mutual_losses(z_local: Tensor, z_meme: Tensor, y: Tensor, *, alpha: float, beta: float,
                  temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(L_local, L_meme) of DESIGN.md §1: α·CE + (1−α)·KL(p_meme‖p_local), and β likewise."""
    l_local = alpha * cross_entropy(z_local, y) + (1 - alpha) * distill(z_local, z_meme, temperature)
    l_meme = beta * cross_entropy(z_meme, y) + (1 - beta) * distill(z_meme, z_local, temperature)
    return l_local, l_meme


def losses_of(names: tuple[str, str], *, alpha: float, beta: float, temperature: float = 1.0, schedule=None):
    """The per-batch loss of two models learning from each other (first: α, second: β); `schedule(rnd) ->
    (alpha, beta)` overrides the constants (dynamic balancing)."""
    first, second = names

    def loss(logits: dict[str, Tensor], y: Tensor, rnd: int) -> dict[str, Tensor]:
        a, b = schedule(rnd) if schedule else (alpha, beta)
        l1, l2 = mutual_losses(logits[first], logits[second], y, alpha=a, beta=b, temperature=temperature)
        return {first: l1, second: l2}
    return loss


def make(*, alpha: float, beta: float, temperature: float = 1.0, schedule=None, server: Server = Server()) -> Algorithm:
    """FML; `schedule(rnd) -> (alpha, beta)` overrides the constants (dynamic balancing)."""
    return Algorithm(name="fml", models=(Model("local"), fedavg.MEME), shares="meme", evaluates=("local",),
                     loss=losses_of(("local", "meme"), alpha=alpha, beta=beta, temperature=temperature,
                                    schedule=schedule), server=server)


def from_config(cfg, rounds: int) -> Algorithm:
    f = cfg.fml
    return make(alpha=f.alpha, beta=f.beta, temperature=f.temperature, schedule=lambda rnd: f.at_round(rnd, rounds),
                server=fedavg.server_of(cfg))
