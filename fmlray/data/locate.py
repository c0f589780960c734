"""Where each file-backed dataset lives on disk, and fetching it with torchvision when allowed."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from fmlray.errors import DataError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist package
DEFAULT_ROOT = Path("data")

_MNIST_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class Layout:
    """The files of one dataset: their names and the folders under a root that may hold them."""

    names: tuple[str, ...]
    folders: tuple[str, ...]  # relative to the root; "" is the root itself
    torchvision: str  # the torchvision.datasets class that downloads it
    hint: str  # how to get the files, for the error message


def layout(dataset: str, emnist_split: str = "balanced") -> Layout:
    """The Layout of `dataset` (one of mnist, fmnist, emnist, cifar10, cifar100)."""
    idx_hint = "set data.root to a folder holding the IDX files, or set data.download = true"
    if dataset == "mnist":
        return Layout(_MNIST_NAMES, ("", "MNIST/raw"), "MNIST", idx_hint)
    if dataset == "fmnist":
        return Layout(_MNIST_NAMES, ("", "FashionMNIST/raw"), "FashionMNIST",
                      "apt-get install dataset-fashion-mnist, or " + idx_hint)
    if dataset == "emnist":
        names = tuple(f"emnist-{emnist_split}-{part}-{kind}-ubyte" for part in ("train", "test")
                      for kind in ("images-idx3", "labels-idx1"))
        return Layout(names, ("EMNIST/raw", ""), "EMNIST", idx_hint)
    pickle_hint = "set data.root to the folder that holds it (as extracted from the official " \
                  "python archive), or set data.download = true"
    if dataset == "cifar10":
        names = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
        return Layout(names, ("cifar-10-batches-py",), "CIFAR10", pickle_hint)
    if dataset == "cifar100":
        return Layout(("train", "test"), ("cifar-100-python",), "CIFAR100", pickle_hint)
    raise ValueError(f"no file layout for dataset {dataset!r}")


def search_roots(dataset: str, root: str) -> tuple[Path, ...]:
    """Roots to search: data.root if given, else the dataset's usual places."""
    if root:
        return (Path(root).expanduser(),)
    if dataset == "fmnist":
        return (DEBIAN_FMNIST, DEFAULT_ROOT)
    return (DEFAULT_ROOT,)


def _existing(path: Path) -> Path | None:
    """`path` or `path.gz`, whichever exists (the plain one first: it reads faster)."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def find(lay: Layout, roots: tuple[Path, ...]) -> list[Path] | None:
    """The dataset's files from the first folder that holds all of them, else None."""
    for root in roots:
        for folder in lay.folders:
            found = [_existing(root / folder / name) for name in lay.names]
            if all(found):
                return found  # type: ignore[return-value]
    return None


def missing_error(dataset: str, lay: Layout, roots: tuple[Path, ...]) -> DataError:
    """One-line DataError saying what was looked for, where, and how to get it."""
    places = ", ".join(str((root / folder).resolve()) for root in roots for folder in lay.folders)
    return DataError(f"{dataset} not found: looked for {', '.join(lay.names)} (plain or .gz) "
                     f"in {places}; {lay.hint}")


def download(dataset: str, lay: Layout, root: Path, emnist_split: str) -> None:
    """Fetch train and test into `root` with torchvision; network failures become a DataError, and the folders
    the attempt made (torchvision's <Name>/raw) are removed again while empty."""
    had = {p for p in root.rglob("*") if p.is_dir()} if root.is_dir() else set()
    made = [p for p in (root, *root.parents) if not p.exists()]
    try:
        from torchvision import datasets  # slow to import, and only needed here

        fetch = getattr(datasets, lay.torchvision)
        extra = {"split": emnist_split} if dataset == "emnist" else {}
        for train in (True, False):
            fetch(str(root), train=train, download=True, **extra)
    except Exception as exc:  # URLError, RuntimeError (checksum), OSError...: all mean "not fetched"
        message = " ".join(str(exc).split()) or type(exc).__name__
        new = [p for p in root.rglob("*") if p.is_dir() and p not in had] if root.is_dir() else []
        for folder in sorted(new, key=lambda p: len(p.parts), reverse=True) + made:  # deepest first
            with contextlib.suppress(OSError):  # not empty (a file came): kept
                folder.rmdir()
        raise DataError(f"could not download {dataset} into {root.resolve()}: {message}; check the "
                        f"network, or fetch the files yourself and set data.root") from None
