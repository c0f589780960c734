"""Datasets (digits, synthetic, MNIST family, CIFAR) and their split among federated clients."""

from __future__ import annotations

from fmlray.data.dataset import Dataset
from fmlray.data.partition import Partition, partition_dataset
from fmlray.data.partition_file import load_partition, save_partition
from fmlray.data.report import format_partition, partition_counts
from fmlray.data.sources import load_dataset

__all__ = ["Dataset", "Partition", "format_partition", "load_dataset", "load_partition", "partition_counts", "partition_dataset", "save_partition"]
