"""Per-client partition statistics as an Arrow table, and as aligned text for the terminal."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from fmlray.data.dataset import Dataset
from fmlray.data.partition import Partition


def partition_counts(dataset: Dataset, partition: Partition) -> pa.Table:
    """One row per client: client, train_samples, test_samples, class_0.. (train counts)."""
    per_class = np.stack([np.bincount(dataset.y_train[t], minlength=dataset.num_classes)
                          for t in partition.train]) if partition.num_clients else \
        np.zeros((0, dataset.num_classes), dtype=np.int64)
    columns = {
        "client": pa.array(np.arange(partition.num_clients, dtype=np.int64)),
        "train_samples": pa.array(np.array([len(t) for t in partition.train], dtype=np.int64)),
        "test_samples": pa.array(np.array([len(t) for t in partition.test], dtype=np.int64)),
    }
    for c in range(dataset.num_classes):
        columns[f"class_{c}"] = pa.array(per_class[:, c].astype(np.int64))
    return pa.table(columns)


WHOLE, SHOWN = 50, (20, 10)  # a partition of more clients prints its first and last ones (10,000 printed 10,004 lines)


def format_partition(table: pa.Table) -> str:
    """Right-aligned text table with a header, the clients' rows and a total row; of more than 50 clients the first
    20 and the last 10, a line saying how many are left out, and the fewest / median / most of each column."""
    names = table.column_names
    n, (head, tail) = table.num_rows, SHOWN
    shown = range(n) if n <= WHOLE else [*range(head), *range(n - tail, n)]
    rows = [[str(table.column(c)[i].as_py()) for c in names] for i in shown]
    totals = ["total"] + [str(sum(table.column(c).to_pylist())) for c in names[1:]]
    spread = [] if n <= WHOLE else [[what] + [f"{f(table.column(c).to_numpy()):g}" for c in names[1:]]
                                 for what, f in (("fewest", np.min), ("median", np.median), ("most", np.max))]
    widths = [max(len(c), *(len(r[i]) for r in (totals, *rows, *spread))) for i, c in enumerate(names)]

    def line(cells: list[str]) -> str:
        """One row, each cell right-aligned to its column's width."""
        return "  ".join(cell.rjust(w) for cell, w in zip(cells, widths))

    rule = "-" * len(line(names))
    body = [line(r) for r in rows]
    if spread:
        body.insert(head, f"... {n - head - tail} more clients (--save F.csv writes every row)")
    return "\n".join([line(names), rule, *body, rule, line(totals), *(line(r) for r in spread)])
