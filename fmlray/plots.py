"""PNG plots of accuracy over rounds (matplotlib, no display needed)."""

from __future__ import annotations

import logging
import textwrap
import warnings
from pathlib import Path
from typing import BinaryIO

# With a HOME it cannot write, matplotlib's import logs two lines about the temporary cache it uses instead,
# on every run; nothing of fmlray's depends on that cache, so its import is kept quiet below errors.
_log = logging.getLogger("matplotlib")
_level = _log.level
_log.setLevel(logging.ERROR)
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker  # noqa: E402
    import matplotlib.pyplot as plt  # noqa: E402
finally:
    _log.setLevel(_level)


def accuracy_plot(summary: list[dict], title: str, path: Path | BinaryIO) -> None:
    """Mean accuracy across clients with its p10 as a dashed line, and the global test accuracy."""
    fig, ax = plt.subplots(figsize=(7, 4.8), layout="constrained")
    rounds = [s["round"] for s in summary]
    for key, label, color in (("local", "local models (own test split)", "tab:blue"),
                              ("global_clients", "global model (client test splits)", "tab:orange")):
        if summary and summary[0][key]:
            mean = [s[key]["mean"] for s in summary]
            ax.plot(rounds, mean, marker="o", color=color, label=f"{label}, mean")
            ax.plot(rounds, [s[key]["p10"] for s in summary], ls="--", color=color, alpha=0.7, label=f"{label}, p10")
    if summary and summary[0]["global_test"] is not None:
        ax.plot(rounds, [s["global_test"] for s in summary], marker="s", color="tab:green", label="global model (global test set)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_title("\n".join(textwrap.wrap(title, 85)), fontsize=9)
    ax.grid(alpha=0.3)
    # below the axes: inside, wherever it went, it hid some curve's points (the p10 lines sit low early on)
    fig.legend(fontsize=8, loc="outside lower center", ncols=2, frameon=False)
    with warnings.catch_warnings():  # a run name in a script the font lacks (名前) draws as boxes: one warning a
        warnings.filterwarnings("ignore", message="Glyph .* missing from")  # glyph and step was noise
        fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
