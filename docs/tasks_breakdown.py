"""Experiment 7's breakdown of the final global models on the global test set: fine (10-class) accuracy,
coarse4 accuracy (a prediction in the right coarse class), fine accuracy among coarse-right predictions,
and fine accuracy on tops and on footwear; mean over seeds. Reads the sweep's run folders (checkpoints).

    python docs/tasks_breakdown.py [runs/sweeps/fmnist-tasks]
"""

import sys
from pathlib import Path

import numpy as np
import torch

from fmlray.config import load_config
from fmlray.data import load_dataset
from fmlray.engine.host import load_state
from fmlray.models import build_model
from fmlray.tasks import resolve

COARSE = np.array(resolve("coarse4", dataset="fmnist", num_classes=10).of_class)
TOPS, FOOTWEAR = [0, 2, 3, 4, 6], [5, 7, 9]


def figures(run: Path) -> tuple[float, ...]:
    cfg = load_config(run / "config.toml")
    ds = load_dataset(cfg.data, num_clients=cfg.clients.num_clients, seed=cfg.run.seed)
    state = np.load(sorted((run / "checkpoint").glob("global-*.npz"))[-1])
    model = build_model(cfg.model.meme, ds.input_shape, ds.num_classes)
    load_state(model, {k: state[k] for k in state.files})
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(ds.x_test)).argmax(1).numpy()
    y, right = ds.y_test, pred == ds.y_test
    coarse_right = COARSE[pred] == COARSE[y]
    return (right.mean(), coarse_right.mean(), right[coarse_right].mean(), right[np.isin(y, TOPS)].mean(),
            right[np.isin(y, FOOTWEAR)].mean())


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sweeps/fmnist-tasks")
    by: dict[str, list] = {}
    for run in sorted(p for p in root.glob("*-s*") if (p / "checkpoint").is_dir()):
        if not run.name.startswith("local-"):  # Local has no global model
            by.setdefault(run.name.rsplit("-s", 1)[0], []).append(figures(run))
    print("| run | seeds | fine (10 classes) | coarse4 | fine, among coarse-right | fine on tops | fine on footwear |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in by.items():
        print(f"| {name} | {len(rows)} | " + " | ".join(f"{x:.3f}" for x in np.mean(rows, axis=0)) + " |")


if __name__ == "__main__":
    main()
