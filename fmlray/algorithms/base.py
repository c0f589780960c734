"""The one client training loop every algorithm shares; algorithms differ only in their loss.

Pure PyTorch: no Ray, no files, no config objects beyond plain numbers, so a client update can
be called in a unit test with two tensors and a learning rate of 1.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fmlray.errors import TrainingError

# logits of each trained model, labels, round (1-based) -> one loss per trained model
LossFn = Callable[[dict[str, Tensor], Tensor, int], dict[str, Tensor]]
# the meme being trained, the global parameters it started from -> a penalty on the meme
PenaltyFn = Callable[[nn.Module, list[Tensor]], Tensor]


@dataclass(frozen=True)
class Algorithm:
    """A client update: which models it trains, and the per-batch loss of each."""

    name: str
    trains: tuple[str, ...]  # subset of ("local", "meme"); only the meme is shared
    loss: LossFn
    penalty: PenaltyFn | None = None  # added to the meme's loss (FedProx's proximal term)

    @property
    def shares_meme(self) -> bool:
        return "meme" in self.trains

    @property
    def has_local(self) -> bool:
        return "local" in self.trains


def make_optimizer(params, *, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (the authors' choice) or Adam."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Shuffled index batches; a last batch of one joins the one before (BatchNorm needs two)."""
    order = torch.randperm(n, generator=generator)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else n
        yield order[start:end]


def train_client(
    algo: Algorithm,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    rnd: int = 1,
    anchor: list[Tensor] | None = None,
) -> dict[str, float]:
    """Run `epochs` of `algo` on (x, y); return each trained model's mean train loss and accuracy."""
    for name in algo.trains:
        models[name].train()
    loss_sum = dict.fromkeys(algo.trains, 0.0)
    correct = dict.fromkeys(algo.trains, 0)
    seen = 0
    for _ in range(epochs):
        for idx in batches(len(y), batch_size, generator):
            xb, yb = x[idx], y[idx]
            logits = {name: models[name](xb) for name in algo.trains}
            losses = algo.loss(logits, yb, rnd)
            if algo.penalty is not None:
                losses["meme"] = losses["meme"] + algo.penalty(models["meme"], anchor)
            total = sum(losses.values())
            if not math.isfinite(total.item()):
                bad = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                raise TrainingError(f"loss is not finite ({bad}); lower training.lr or check the data")
            for name in algo.trains:
                optimizers[name].zero_grad(set_to_none=True)
            # Peers are detached inside the losses, so one backward of the sum gives each model
            # exactly the gradient of its own loss, at the cost of a single backward pass.
            total.backward()
            for name in algo.trains:
                optimizers[name].step()
            for name in algo.trains:
                loss_sum[name] += losses[name].item() * len(yb)
                correct[name] += int((logits[name].argmax(1) == yb).sum())
            seen += len(yb)
    out = {}
    for name in algo.trains:
        out[f"{name}_loss"] = loss_sum[name] / seen
        out[f"{name}_accuracy"] = correct[name] / seen
    return out


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` on (x, y)."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        yb = y[start:start + batch_size]
        loss += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return loss / len(y), correct / len(y)
