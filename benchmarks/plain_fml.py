"""The floor of `wholerun.py`: the rounds of `fmlray run`'s digits default as a plain single-process PyTorch
script, one thread, no framework. `wholerun.py` spawns it and times it from spawn to exit.

Same data and partition (fmlray's loader), the same models (`build_model`: an `mlp` meme for every
client, each client's local model of its group's architecture), FML's two models per client learning
from `mutual_losses` with one backward of their sum, 5 epochs of batch 16 per round, SGD (a fresh
optimiser for the meme each round, a persistent one for each local model), the memes averaged weighted
by training rows, and each round evaluated as fmlray does (the global model on the global test set and
every client's test split, each local model on its own). No checkpoints, run folder or plot.

    python benchmarks/plain_fml.py --rounds 10
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before torch is imported."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1; got {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)

    import torch

    from fmlray.algorithms.fml import mutual_losses
    from fmlray.config import load_config
    from fmlray.data import load_dataset, partition_dataset
    from fmlray.models import build_model

    torch.set_num_threads(1)
    cfg = load_config(None, [f"run.rounds={args.rounds}"])  # the embedded digits default
    k, seed, t, f = cfg.clients.num_clients, cfg.run.seed, cfg.training, cfg.algorithm.fml
    ds = load_dataset(cfg.data, num_clients=k, seed=seed)
    part = partition_dataset(ds, cfg.data, num_clients=k, seed=seed)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    x_test, y_test = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    train = [(x[torch.from_numpy(r)], y[torch.from_numpy(r)]) for r in part.train]
    test = [(x_test[torch.from_numpy(r)], y_test[torch.from_numpy(r)]) for r in part.test]

    def model(name: str) -> torch.nn.Module:
        return build_model(name, ds.input_shape, ds.num_classes)

    def sgd(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def accuracy(m: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> float:
        with torch.no_grad():
            return (m(xs).argmax(1) == ys).float().mean().item()

    torch.manual_seed(seed)
    meme = model(cfg.model.meme)
    global_state = {name: v.detach().clone() for name, v in meme.state_dict().items()}
    groups = cfg.clients.group_of_clients()
    local = [model(cfg.clients.groups[g].local_model) for g in groups]
    local_opt = [sgd(m) for m in local]
    print(f"ready in {time.perf_counter() - started:.1f}s", flush=True)
    for rnd in range(1, args.rounds + 1):
        began = time.perf_counter()
        total = {name: torch.zeros_like(v) for name, v in global_state.items()}
        weight = 0.0
        for cid, (xc, yc) in enumerate(train):
            meme.load_state_dict(global_state)
            meme_opt = sgd(meme)  # fresh every round, as in fmlray
            gen = torch.Generator().manual_seed(seed * 1_000_003 + rnd * 10_007 + cid)
            for _ in range(t.epochs):
                order = torch.randperm(len(yc), generator=gen)
                for start in range(0, len(yc), t.batch_size):
                    idx = order[start:start + t.batch_size]
                    l_local, l_meme = mutual_losses(local[cid](xc[idx]), meme(xc[idx]), yc[idx], alpha=f.alpha,
                                                    beta=f.beta, temperature=f.temperature)
                    local_opt[cid].zero_grad(set_to_none=True)
                    meme_opt.zero_grad(set_to_none=True)
                    (l_local + l_meme).backward()
                    local_opt[cid].step()
                    meme_opt.step()
            for name, v in meme.state_dict().items():
                total[name].add_(v, alpha=float(len(yc)))
            weight += len(yc)
        global_state = {name: v / weight for name, v in total.items()}
        meme.load_state_dict(global_state)
        global_test = accuracy(meme, x_test, y_test)
        clients = [accuracy(meme, xc, yc) for xc, yc in test]
        locals_ = [accuracy(m, xc, yc) for m, (xc, yc) in zip(local, test)]
        print(f"round {rnd}/{args.rounds}  local {sum(locals_) / k:.3f}  global/clients {sum(clients) / k:.3f}  "
              f"global/test {global_test:.3f}  {time.perf_counter() - began:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
