"""SGD and Adam, computed as torch.optim computes them, without torch.optim.

Why: a torch.optim optimiser imports Dynamo (`torch._dynamo`, and with it sympy, triton and inductor) the
first time it is built or stepped, to mark its methods as not to be compiled. fmlray compiles nothing, yet
every client actor (and a serial run's driver) paid ~2.2 s of CPU and ~150 MiB of memory for that import
before its first round. fmlray uses two optimisers through three things (`step`, `zero_grad`, `state`), so
these few lines take their place.

The numbers are torch.optim's, bit for bit (tests/unit/test_optim.py). SGD on the CPU is
`torch.optim.SGD(fused=True)`: torch's fused kernel, one pass over each parameter, gradient and buffer instead
of the default single-tensor path's three or four, with the same numbers but for some of a tensor's last few
elements (those its scalar remainder loop computes), which differ in the last bit. SGD on a GPU is torch's
multi-tensor ("foreach") path. Adam is torch's single-tensor path, what torch runs on the CPU by default.
State keeps torch's names (`momentum_buffer`; `step`, `exp_avg`, `exp_avg_sq`) in `state[param]`, as the
client-state rows expect.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
from torch import Tensor


class Optimizer:
    """The parameters and per-parameter state of an optimiser; `step` is the algorithm's."""

    def __init__(self, params: Iterable[Tensor]):
        self.params = list(params)
        self.state: defaultdict[Tensor, dict[str, Tensor]] = defaultdict(dict)

    def zero_grad(self) -> None:
        """Drop the gradients (torch's `set_to_none=True`): a parameter without one is not stepped."""
        for p in self.params:
            p.grad = None

    def _with_grad(self) -> list[Tensor]:
        return [p for p in self.params if p.grad is not None]


class SGD(Optimizer):
    """torch.optim.SGD with dampening 0, no Nesterov: g = ∇ + wd·p; b = m·b + g (b = g at first); p -= lr·b."""

    def __init__(self, params: Iterable[Tensor], *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    @torch.no_grad()
    def step(self) -> None:
        params = self._with_grad()
        if params and params[0].device.type != "cpu":
            return self._foreach(params)
        self._fused(params)

    def _fused(self, params: list[Tensor]) -> None:
        # One pass reads each parameter, its gradient and its buffer once: a `cnn5` step took 0.26 ms instead of
        # the single-tensor path's 0.85 ms, a client's update 1-7 % less (benchmarks/README.md, "Fused SGD").
        if self.momentum == 0:
            return self._fused_group(params, [], first=False)
        first = [p for p in params if "momentum_buffer" not in self.state[p]]
        for p in first:  # a first step sets the buffer to the gradient (after decay), as torch's does
            self.state[p]["momentum_buffer"] = torch.empty_like(p)
        new = set(first)
        later = [p for p in params if p not in new]
        for group, is_first in ((first, True), (later, False)):
            if group:
                self._fused_group(group, [self.state[p]["momentum_buffer"] for p in group], first=is_first)

    def _fused_group(self, params: list[Tensor], bufs: list[Tensor], *, first: bool) -> None:
        torch._fused_sgd_(params, [p.grad for p in params], bufs, weight_decay=self.weight_decay,
                          momentum=self.momentum, lr=self.lr, dampening=0.0, nesterov=False, maximize=False,
                          is_first_step=first)

    def _foreach(self, params: list[Tensor]) -> None:
        grads = [p.grad for p in params]
        if self.weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if self.momentum != 0:
            kept = [(self.state[p]["momentum_buffer"], g) for p, g in zip(params, grads)
                    if "momentum_buffer" in self.state[p]]
            if kept:
                bufs, kept_grads = map(list, zip(*kept))
                torch._foreach_mul_(bufs, self.momentum)
                torch._foreach_add_(bufs, kept_grads, alpha=1)
            for p, g in zip(params, grads):  # a first step's buffer is the gradient itself
                self.state[p].setdefault("momentum_buffer", g.detach().clone())
            grads = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_add_(params, grads, alpha=-self.lr)


class Adam(Optimizer):
    """torch.optim.Adam (no AMSGrad, weight decay added to the gradient): its bias-corrected moments."""

    def __init__(self, params: Iterable[Tensor], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for p in self._with_grad():
            state = self.state[p]
            if not state:  # as torch starts: the step count a CPU float scalar, the moments zeros
                state["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step_t, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
            step_t += 1
            g = p.grad
            if self.weight_decay != 0:
                g = g.add(p, alpha=self.weight_decay)
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            step = step_t.item()
            step_size = self.lr / (1 - beta1 ** step)
            denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)


def make_optimizer(params: Iterable[Tensor], *, name: str, lr: float, momentum: float,
                   weight_decay: float) -> Optimizer:
    """SGD (the authors' choice) or Adam."""
    if name == "adam":
        return Adam(params, lr=lr, weight_decay=weight_decay)
    return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
