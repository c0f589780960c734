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


def format_partition(table: pa.Table) -> str:
    """Right-aligned text table with a header, the clients' rows and a total row."""
    names = table.column_names
    rows = [[str(v) for v in row.values()] for row in table.to_pylist()]
    totals = ["total"] + [str(sum(table.column(n).to_pylist())) for n in names[1:]]
    widths = [max(len(n), len(t), *(len(r[i]) for r in rows)) for i, (n, t) in enumerate(zip(names, totals))]

    def line(cells: list[str]) -> str:
        """One row, each cell right-aligned to its column's width."""
        return "  ".join(cell.rjust(w) for cell, w in zip(cells, widths))

    rule = "-" * len(line(names))
    return "\n".join([line(names), rule, *(line(r) for r in rows), rule, line(totals)])
