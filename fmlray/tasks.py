"""Tasks: what a client group predicts, as a map from the dataset's (global) classes to its own labels.

The FML paper's third heterogeneity (arXiv 2006.16765: "clients may run different tasks"). The global
model (and every meme) predicts the dataset's classes; a group's local models predict its task's labels.
A task sends each global class to one task label (many-to-one) or to none (-1): a class outside the
task. Choices, where the issue left them open:

- A class outside the task is *dropped* from the group's clients (train and test rows), not mapped to a
  catch-all label: a client that runs "tops vs footwear" has no bag pictures. Dropping is always
  explicit (-1), so a forgotten class is an error, not a silent catch-all. The partition is drawn as
  without tasks and then filtered, so a client's rows under a task are a subset of its rows without.
- The meme's distribution is carried into the task's space by summing the probabilities of the classes
  that map to each label and renormalising over the task's classes (see `task_logits` in
  fmlray.algorithms.base).
- No per-client task ("only the classes this client holds"): its number of outputs would follow the
  partition (and the seed), so every client would be an architecture of its own. A group whose clients
  hold a known set of classes says so with an explicit list.

Plain data, no torch: the config validates a group's task before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

from fmlray.errors import ConfigError

IDENTITY = "identity"  # every dataset: each class its own label (FML as it is without tasks)

_FMNIST = {  # 0 T-shirt/top, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal, 6 shirt, 7 sneaker, 8 bag, 9 ankle boot
    "coarse4": {"tops": (0, 2, 3, 4, 6), "trousers": (1,), "footwear": (5, 7, 9), "bags": (8,)},
    "binary-footwear": {"footwear": (5, 7, 9), "rest": (0, 1, 2, 3, 4, 6, 8)},
}
_DIGITS = {
    "parity": {"even": (0, 2, 4, 6, 8), "odd": (1, 3, 5, 7, 9)},
    "low-high": {"low": (0, 1, 2, 3, 4), "high": (5, 6, 7, 8, 9)},
}
# Named tasks per dataset (label name -> its global classes); "identity" fits every dataset.
PRESETS: dict[str, dict[str, dict[str, tuple[int, ...]]]] = {"fmnist": _FMNIST, "digits": _DIGITS, "mnist": _DIGITS}


@dataclass(frozen=True)
class Task:
    """A group's task: for each global class, its task label (0..k-1), or -1 when it is outside the task."""

    name: str  # a preset's name, "identity", or "custom" for an explicit list
    of_class: tuple[int, ...]

    @property
    def num_labels(self) -> int:
        return max(self.of_class) + 1

    @property
    def identity(self) -> bool:
        """Whether it is the dataset's own classification (then nothing is mapped or marginalised)."""
        return self.of_class == tuple(range(len(self.of_class)))

    @property
    def dropped(self) -> tuple[int, ...]:
        """The global classes outside the task."""
        return tuple(c for c, label in enumerate(self.of_class) if label < 0)

    def describe(self) -> str:
        """E.g. "coarse4 (4 labels)", "custom (3 labels; drops classes 8, 9)", "custom (3 labels; drops 7 classes)"."""
        d = self.dropped
        drops = "" if not d else f"; drops {len(d)} classes" if len(d) > 3 else \
            f"; drops class{'es' if len(d) > 1 else ''} {', '.join(map(str, d))}"
        return f"{self.name} ({self.num_labels} labels{drops})"


def names_for(dataset: str) -> tuple[str, ...]:
    """The task names a group of `dataset` may give."""
    return (IDENTITY, *PRESETS.get(dataset, {}))


def resolve(spec: str | tuple[int, ...], *, dataset: str, num_classes: int, key: str = "task") -> Task:
    """The Task a group's `task` key names (a preset's name, or one task label or -1 per global class), or a
    ConfigError that says what to change."""
    if isinstance(spec, str):
        if spec == IDENTITY:
            return Task(IDENTITY, tuple(range(num_classes)))
        preset = PRESETS.get(dataset, {}).get(spec)
        if preset is None:
            raise ConfigError(f"{key} = {spec!r} is not a task of {dataset}; choose one of "
                              f"{', '.join(names_for(dataset))}, or give a list of one task label (or -1: not in "
                              f"the task) per class")
        of_class = [-1] * num_classes
        for label, classes in enumerate(preset.values()):
            for c in classes:
                of_class[c] = label
        return Task(spec, tuple(of_class))
    return Task("custom", _checked(tuple(spec), num_classes, key))


def _checked(of_class: tuple[int, ...], num_classes: int, key: str) -> tuple[int, ...]:
    """An explicit task list, checked: one entry per class, labels 0..k-1 without gaps, k >= 2."""
    what = "give one task label (0, 1, ...) or -1 (the class is not in the task) per class"
    if len(of_class) != num_classes:
        first, last = len(of_class), num_classes - 1
        unmapped = ("" if first > last else f"; class {last} is unmapped" if first == last
                    else f"; classes {first}..{last} are unmapped")
        raise ConfigError(f"{key} has {len(of_class)} entries but the dataset has {num_classes} classes{unmapped}; "
                          f"{what}")
    bad = [(c, label) for c, label in enumerate(of_class) if label < -1]
    if bad:
        raise ConfigError(f"{key}: class {bad[0][0]} has label {bad[0][1]}; {what}")
    used = sorted({label for label in of_class if label >= 0})
    if not used:
        raise ConfigError(f"{key} drops every class (all -1); {what}")
    if used[-1] != len(used) - 1:  # a gap; found among the first len(used) labels, however big the last one is
        gap = next(i for i in range(len(used)) if used[i] != i)
        raise ConfigError(f"{key}: task label {gap} has no class (labels used: {', '.join(map(str, used))}); "
                          "number the task's labels 0..k-1 without gaps")
    if len(used) < 2:
        raise ConfigError(f"{key} has a single label (every kept class maps to {used[0]}); a task needs at least 2")
    return of_class


def of_group(cfg, group) -> Task:
    """The task of `group` (a GroupConfig) in run config `cfg` (already validated)."""
    return resolve(group.task, dataset=cfg.data.dataset, num_classes=cfg.data.num_classes)
