"""Tasks on a host (fmlray.tasks): the tensors a client's task needs on its device, and the names of
workspaces whose local models predict a task's labels rather than the dataset's classes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fmlray.data import Dataset
from fmlray.models import build_model
from fmlray.tasks import Task


def arch_name(arch: str, outputs: int) -> str:
    """A workspace's name for `arch` predicting a task's `outputs` labels, e.g. "lenet5-4way" (model names
    hold no "-"); plain `arch` predicts the dataset's classes."""
    return f"{arch}-{outputs}way"


def build_arch(name: str, dataset: Dataset) -> nn.Module:
    """`build_model` for a workspace's architecture name (`arch_name`'s or a plain one)."""
    arch, _, outputs = name.rpartition("-")
    if arch and outputs.endswith("way"):
        return build_model(arch, dataset.input_shape, int(outputs.removesuffix("way")))
    return build_model(name, dataset.input_shape, dataset.num_classes)


@dataclass
class ClientTask:
    """A client's task on its host's device: None for the dataset's own classes."""

    task: Task
    members: torch.Tensor  # (labels, classes) bool: the classes that map to each label (for task_logits)
    label_of: torch.Tensor  # the task label of each global class (its rows hold only the task's classes)

    @classmethod
    def of(cls, task: Task, device: torch.device) -> "ClientTask | None":
        if task.identity:
            return None
        return cls(task, task_members(task, device), torch.tensor(task.of_class, device=device))


def task_members(task: Task, device: torch.device) -> torch.Tensor:
    """The (labels, classes) bool matrix of a task: which global classes map to each of its labels."""
    of_class = torch.tensor(task.of_class, device=device)
    return of_class.unsqueeze(0) == torch.arange(task.num_labels, device=device).unsqueeze(1)
