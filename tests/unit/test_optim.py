"""fmlray's SGD and Adam give torch.optim's numbers bit for bit, and never import Dynamo (why they exist)."""

import subprocess
import sys

import pytest
import torch

from fmlray.optim import SGD, Adam, make_optimizer


def _steps(make, n: int = 5, frozen_at: int = 2, width: int = 5) -> list[torch.Tensor]:
    """Parameters after `n` steps of a small net on seeded data; one parameter has no gradient at step
    `frozen_at` (an optimiser must skip it: no step, no decay, its state untouched; at step 0, its first
    step comes after the others')."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.ReLU(), torch.nn.Linear(width, 3))
    opt = make(net.parameters())
    gen = torch.Generator().manual_seed(1)
    for i in range(n):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        if i == frozen_at:
            net[0].bias.grad = None
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("frozen_at, width", [(2, 5), (2, 100), (0, 100)])  # 100: the kernel's vector loop too
@pytest.mark.parametrize("momentum, decay", [(0.0, 0.0), (0.9, 0.0), (0.5, 5e-4)])
def test_sgd_is_torchs_fused_sgd_bit_for_bit_and_its_default_within_rounding(momentum, decay, frozen_at, width):
    def steps(make):
        return _steps(make, frozen_at=frozen_at, width=width)
    ours = steps(lambda ps: SGD(ps, lr=0.1, momentum=momentum, weight_decay=decay))
    if frozen_at > 0:  # torch's fused SGD cannot take a parameter whose first step comes after the others': it
        # asks only the first parameter whether this is a first step (a missing buffer fails, or all are reset)
        _same(ours, steps(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum, weight_decay=decay, fused=True)))
    default = steps(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum, weight_decay=decay))
    for x, y in zip(ours, default):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("decay", [0.0, 1e-3])
def test_adam_is_torch_adam_bit_for_bit(decay):
    ours = _steps(lambda ps: Adam(ps, lr=0.01, weight_decay=decay))
    theirs = _steps(lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=decay))
    _same(ours, theirs)


def test_the_multi_tensor_sgd_of_other_devices_is_torchs():
    # run here on the CPU: the foreach path a GPU takes, against torch's
    class Foreach(SGD):
        def step(self):
            with torch.no_grad():
                self._foreach(self._with_grad())
    ours = _steps(lambda ps: Foreach(ps, lr=0.1, momentum=0.9, weight_decay=5e-4))
    _same(ours, _steps(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True)))


def test_state_keeps_torchs_names_and_a_stored_state_resumes_exactly():
    # a client's row holds the optimiser's state under torch's names; putting it into a new optimiser (as a
    # client's next round does) continues exactly where the old one stopped
    for make, names in ((lambda ps: make_optimizer(ps, name="sgd", lr=0.1, momentum=0.9, weight_decay=0.0),
                         {"momentum_buffer"}),
                        (lambda ps: make_optimizer(ps, name="adam", lr=0.01, momentum=0.0, weight_decay=0.0),
                         {"step", "exp_avg", "exp_avg_sq"})):
        p = torch.nn.Parameter(torch.ones(3))
        opt = make([p])
        for g in (0.5, -0.25):
            p.grad = torch.full((3,), g)
            opt.step()
        assert set(opt.state[p]) == names
        q = torch.nn.Parameter(p.detach().clone())
        again = make([q])
        again.state[q] = {k: v.clone() for k, v in opt.state[p].items()}
        for o, t in ((opt, p), (again, q)):
            t.grad = torch.full((3,), 0.75)
            o.step()
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_training_never_imports_dynamo_nor_sympy():
    # a torch.optim optimiser imports torch._dynamo on first use: ~2 s of CPU and ~150 MiB in every actor; under
    # vmap, F.cross_entropy's decomposition imports sympy (algorithms.base.cross_entropy): ~0.65 s and ~35 MiB
    code = """
import sys
from fmlray.config import load_config
from fmlray.engine.serial import SerialEngine
from fmlray.simulation import prepare, simulate
for batching in ("sequential", "vmap"):
    cfg = load_config(None, ["run.rounds=1", "clients.num_clients=4", f"training.batching='{batching}'"])
    prepared = prepare(cfg)
    engine = SerialEngine()
    engine.start(cfg, prepared.dataset, prepared.partition)
    simulate(cfg, prepared.dataset, prepared.partition, engine)
print(sorted(m for m in sys.modules if m.startswith(("torch._dynamo", "sympy"))))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
