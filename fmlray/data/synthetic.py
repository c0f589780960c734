"""FedProx's Synthetic(alpha, beta) (Li et al., arXiv 1812.06127, section 5.1): natural clients.

Client k draws its own softmax model and its own feature mean; the paper has alpha control how much the
clients' models differ and beta how much their inputs differ. As in the authors' generator, N(m, s) takes s
as the standard deviation, and alpha sets u_k ~ N(0, alpha), the mean of *every* entry of W_k and b_k: that
adds u_k (sum(x) + 1) to every class's logit alike, so the labels, and the data, do not depend on alpha at all
(the same draws follow for any alpha; tests/unit/test_data.py checks it). Kept as the authors wrote it, so that
Synthetic(alpha, beta) means their data: in it only beta (and the per-client draws) make clients differ.
"""

from __future__ import annotations

import numpy as np
import psutil

from fmlray.data.dataset import Dataset
from fmlray.errors import DataError

MAX_SAMPLES_PER_CLIENT = 1000  # the paper's lognormal(4, 2) tail reaches 10^5; keep runs small


def _client_sizes(num_clients: int, rng: np.random.Generator) -> np.ndarray:
    """Rows per client: lognormal(4, 2) + 50 as in the paper, capped."""
    sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
    return np.minimum(sizes, MAX_SAMPLES_PER_CLIENT)


def _client_rows(n: int, *, alpha: float, beta: float, dim: int, classes: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one client: its own model W, b ~ N(u, 1) and feature mean v ~ N(B, 1)."""
    u = rng.normal(0, alpha)
    w = rng.normal(u, 1, (classes, dim))
    b = rng.normal(u, 1, classes)
    v = rng.normal(rng.normal(0, beta), 1, dim)
    sd = np.arange(1, dim + 1, dtype=np.float64) ** -0.6  # sqrt of the diagonal j^-1.2
    x = v + rng.standard_normal((n, dim)) * sd
    y = np.argmax(x @ w.T + b, axis=1)  # softmax is monotone: its argmax is the logits' argmax
    return x.astype(np.float32), y.astype(np.int64)


def make_synthetic(*, num_clients: int, alpha: float, beta: float, dim: int, classes: int,
                   test_fraction: float, seed: int) -> Dataset:
    """Synthetic(alpha, beta) with `num_clients` natural clients, each split train/test."""
    rng = np.random.default_rng((seed, 0x5E7))
    sizes = _client_sizes(num_clients, rng)
    need = 2 * int(sizes.sum()) * dim * 4  # float32 rows, held twice while they are concatenated
    free = psutil.virtual_memory().available
    if need > free:  # say so before filling memory row by row
        raise DataError(f"data.synthetic_dim = {dim} for clients.num_clients = {num_clients} needs about "
                        f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free here; lower one of them")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("xtr", "ytr", "otr", "xte", "yte", "ote")}
    for k, n in enumerate(sizes):
        x, y = _client_rows(int(n), alpha=alpha, beta=beta, dim=dim, classes=classes, rng=rng)
        n_test = int(np.clip(round(n * test_fraction), 1, n - 1))  # every client keeps both splits
        order = rng.permutation(int(n))
        test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
        for key, rows in (("xtr", x[train]), ("ytr", y[train]), ("xte", x[test]), ("yte", y[test])):
            parts[key].append(rows)
        parts["otr"].append(np.full(len(train), k, dtype=np.int64))
        parts["ote"].append(np.full(len(test), k, dtype=np.int64))
    cat = {key: np.concatenate(rows) for key, rows in parts.items()}
    return Dataset(name="synthetic", x_train=cat["xtr"], y_train=cat["ytr"], x_test=cat["xte"],
                   y_test=cat["yte"], num_classes=classes, train_owner=cat["otr"], test_owner=cat["ote"])
