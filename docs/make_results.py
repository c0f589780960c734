"""Regenerate docs/RESULTS.md and its plots from the sweeps' saved Parquet tables.

    python docs/make_results.py [--runs runs/sweeps] [--only SWEEP]

Every table and plot comes from runs/sweeps/<sweep>/results.parquet (written by `fmlray sweep`);
the plain-language reading of each experiment comes from docs/readings.toml, written by a person.
An experiment whose table is not under --runs keeps its section of the existing RESULTS.md as recorded
(listed as not run where it has none); no table at all, or none for --only's experiment, is an error
that leaves RESULTS.md as it is. With --only, only that experiment's section is regenerated.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from fmlray.metrics import SCHEMA  # noqa: E402

DOCS = Path(__file__).parent
EXPERIMENTS = [  # (sweep name, title)
    ("fmnist-heterogeneity", "1. Data heterogeneity (Fashion-MNIST)"),
    ("fmnist-participation", "2. Partial participation at scale (Fashion-MNIST)"),
    ("fmnist-models", "3. Model heterogeneity and the catfish (Fashion-MNIST)"),
    ("fmnist-alpha-beta", "4. The balance α / β (Fashion-MNIST)"),
    ("digits", "5. The heterogeneity grid on digits"),
    ("digits-baselines", "6. Personalised-FL baselines beside FML (digits: Dirichlet(0.5) and shards)"),
    ("fmnist-tasks", "7. Task heterogeneity: fine, coarse and binary clients (Fashion-MNIST)"),
    ("fmnist-baselines", "8. Personalised-FL baselines beside FML (Fashion-MNIST: experiment 1's Dirichlet(0.5) "
                         "and shards)"),
]
FIGURES = ("local", "local_p10", "global_clients", "global_test")
# Sweeps whose client groups differ between variants get a per-group table; the named variant's
# accuracies on the *same clients* (same data: the partition depends on the seed only) are the baseline.
GROUP_BASELINE = {"fmnist-models": ("locals", "homogeneous")}
# Sweeps with tasks get a per-group table from their group_test rows (each group in its own task's space),
# beside the named variant's local models on the same clients.
TASK_BASELINE = {"fmnist-tasks": ("algorithm", "local")}


def per_run(rows: list[dict], axes: list[str]) -> dict[str, dict]:
    """Final evaluated round of each run: client-mean figures, and the per-client accuracies."""
    out: dict[str, dict] = {}
    last = {}
    for r in rows:
        if r["split"] in ("test", "global_test"):
            last[r["run"]] = max(last.get(r["run"], 0), r["round"])
    for r in rows:
        if r["round"] != last.get(r["run"]) or r["split"] not in ("test", "global_test"):
            continue
        run = out.setdefault(r["run"], {"labels": tuple(r[a] for a in axes), "local": [], "global": [], "test": None})
        if r["split"] == "global_test":
            run["test"] = r["accuracy"]
        else:  # "local" (the personalised model), "global", and any other model an algorithm names (dml's "peer")
            run.setdefault(r["model"], []).append(r["accuracy"])
    return out


def curves(rows: list[dict], axes: list[str]) -> dict[tuple, dict[str, dict[int, list[float]]]]:
    """Per variant: round → client-mean local accuracy and global test accuracy, one value per seed."""
    by_run: dict[str, dict] = {}
    for r in rows:
        if r["split"] not in ("test", "global_test"):
            continue
        d = by_run.setdefault(r["run"], {"labels": tuple(r[a] for a in axes), "local": {}, "test": {}})
        if r["split"] == "global_test":
            d["test"][r["round"]] = r["accuracy"]
        elif r["model"] == "local":
            d["local"].setdefault(r["round"], []).append(r["accuracy"])
    out: dict[tuple, dict] = {}
    for d in by_run.values():
        v = out.setdefault(d["labels"], {"local": {}, "test": {}})
        for rnd, accs in d["local"].items():
            v["local"].setdefault(rnd, []).append(float(np.mean(accs)))
        for rnd, acc in d["test"].items():
            v["test"].setdefault(rnd, []).append(acc)
    return out


def cell(xs: list[float]) -> str:
    """Mean ± std, or a dash for nothing."""
    return "–" if not xs else f"{np.mean(xs):.3f} ± {np.std(xs):.3f}"


def last_rounds(rows: list[dict]) -> dict[str, int]:
    """Each run's last evaluated round."""
    last: dict[str, int] = {}
    for r in rows:
        if r["split"] == "test":
            last[r["run"]] = max(last.get(r["run"], 0), r["round"])
    return last


def summary_table(runs: dict[str, dict], axes: list[str]) -> str:
    """Mean ± std across seeds of the final-round client means, one row per variant."""
    variants: dict[tuple, dict[str, list[float]]] = {}
    for run in runs.values():
        v = variants.setdefault(run["labels"], {k: [] for k in FIGURES} | {"seeds": []})
        v["seeds"].append(1)
        if run["local"]:
            v["local"].append(np.mean(run["local"]))
            v["local_p10"].append(np.percentile(run["local"], 10))
        if run["global"]:
            v["global_clients"].append(np.mean(run["global"]))
        if run["test"] is not None:
            v["global_test"].append(run["test"])

    head = [*axes, "seeds", "local (own test)", "local p10", "global (client tests)", "global (global test)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for labels, v in variants.items():
        lines.append("| " + " | ".join([*labels, str(len(v["seeds"])), *(cell(v[k]) for k in FIGURES)]) + " |")
    return "\n".join(lines)


def sizes(sweep_dir: Path) -> str:
    """The sizes every run of a sweep shares, read from one run's saved config.toml."""
    configs = sorted(sweep_dir.glob("*/config.toml"))
    if not configs:
        return ""
    c = tomllib.loads(configs[0].read_text())
    d, cl, t = c["data"], c["clients"], c["training"]
    train = f"{d['max_train_samples']:,}-image training subsample" if d["max_train_samples"] else "all training images"
    test = f"{d['max_test_samples']:,} test images" if d["max_test_samples"] else "all test images"
    sampled = "all sampled every round" if cl["fraction"] >= 1 else f"{cl['fraction']:.0%} sampled per round"
    every = "every round" if c["run"]["eval_every"] == 1 else f"every {c['run']['eval_every']} rounds and at the end"
    return (f"Sizes: {d['dataset']}, {train}, {test}; {cl['num_clients']} clients, {sampled}; "
            f"{c['run']['rounds']} rounds of {t['epochs']} local epochs, batch {t['batch_size']}, "
            f"{t['optimizer'].upper()} lr {t['lr']:g}, momentum {t['momentum']:g}; meme {c['model']['meme']}; "
            f"evaluated {every}. Axes and the rest: the sweep file.\n")


def produced_by(sweep_dir: Path) -> str:
    """Which executor and engine produced a sweep's runs: Ray Tune trials leave Tune's records in .tune/."""
    engines = sorted({tomllib.loads(c.read_text())["engine"]["kind"] for c in sweep_dir.glob("*/config.toml")})
    executor = ("Ray Tune trials (`fmlray sweep --parallel`, one placement group per run)"
                if (sweep_dir / ".tune").is_dir() else "the sequential loop (`fmlray sweep`, one run after another)")
    return f"Produced by {executor}, on the {' and '.join(engines)} engine{'s' if len(engines) > 1 else ''}.\n"


def group_table(rows: list[dict], axes: list[str], baseline: tuple[str, str]) -> str:
    """Final-round local accuracy per variant and client group (mean over the group's clients, then
    mean ± std over seeds), beside the baseline's accuracy on exactly those clients: the variant with
    the same labels except `baseline` = (axis, value)."""
    axis, value = baseline
    at = axes.index(axis)
    last = last_rounds(rows)
    acc: dict[tuple, dict[int, dict]] = {}  # (labels, group) -> seed -> client -> accuracy
    base: dict[tuple, dict[int, float]] = {}  # (other labels, seed) -> client -> baseline accuracy
    for r in rows:
        if r["split"] != "test" or r["model"] != "local" or r["round"] != last[r["run"]]:
            continue
        labels = tuple(r[a] for a in axes)
        acc.setdefault((labels, r["group"]), {}).setdefault(r["seed"], {})[r["client"]] = r["accuracy"]
        others = labels[:at] + labels[at + 1:]
        if labels[at] == value:
            base.setdefault((others, r["seed"]), {})[r["client"]] = r["accuracy"]

    head = [*axes, "group", "clients", "local (own test)", f"same clients, {value}", "difference"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (labels, group), seeds in sorted(acc.items()):
        mine = [float(np.mean(list(c.values()))) for c in seeds.values()]
        key = labels[:at] + labels[at + 1:]
        theirs = [float(np.mean([base[key, s][cid] for cid in c])) for s, c in seeds.items() if (key, s) in base]
        diff = [a - b for a, b in zip(mine, theirs)] if len(theirs) == len(mine) else []
        n = len(next(iter(seeds.values())))
        lines.append("| " + " | ".join([*labels, group, str(n), cell(mine), cell(theirs),
                                        "–" if not diff else f"{np.mean(diff):+.3f} ± {np.std(diff):.3f}"]) + " |")
    return "\n".join(lines)


def task_table(rows: list[dict], axes: list[str], baseline: tuple[str, str]) -> str:
    """Final-round accuracy per variant and client group, each client in its group's task space (the mean over
    the group's clients, then mean ± std over seeds): local models, the baseline's local models on the same
    clients (the variant with the same labels except `baseline` = (axis, value)), and the global model."""
    axis, value = baseline
    at = axes.index(axis)
    last = last_rounds(rows)
    per: dict[tuple, dict[str, dict[int, list[float]]]] = {}  # (labels, group) -> model -> seed -> accuracies
    task: dict[str, str] = {}  # the group's task, from its group_test rows (none: the dataset's classes)
    for r in rows:
        if r["split"] == "group_test":
            task[r["group"]] = r["note"].removeprefix("task ")
        elif r["split"] == "test" and r["round"] == last[r["run"]]:
            models = per.setdefault((tuple(r[a] for a in axes), r["group"]), {})
            models.setdefault(r["model"], {}).setdefault(r["seed"], []).append(r["accuracy"])
    acc = {k: {m: {s: float(np.mean(v)) for s, v in seeds.items()} for m, seeds in models.items()}
           for k, models in per.items()}
    clients = {k: len(next(iter(next(iter(models.values())).values()))) for k, models in per.items()}

    head = [*axes, "group", "task", "clients", "local (own test)", f"{axis} = {value}, same clients", "difference",
            "global (client tests)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (labels, group), models in acc.items():
        mine = models.get("local", {})
        base = acc.get((labels[:at] + (value,) + labels[at + 1:], group), {}).get("local", {})
        diff = [mine[s] - base[s] for s in mine if s in base] if labels[at] != value else []
        lines.append("| " + " | ".join([*labels, group, task.get(group, "identity"), str(clients[labels, group]),
                                        cell(list(mine.values())), cell(list(base.values())) if diff else "–",
                                        "–" if not diff else f"{np.mean(diff):+.3f} ± {np.std(diff):.3f}",
                                        cell(list(models.get("global", {}).values()))]) + " |")
    return "\n".join(lines)


def plot_curves(cv: dict, axes: list[str], title: str, path: Path) -> None:
    """Accuracy over rounds (mean across seeds): solid = local models, dashed = global on the test set."""
    panel_axis = axes[1] if len(axes) > 1 else None
    panels = sorted({k[1] for k in cv}) if panel_axis else [None]
    fig, axs = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False, sharey=True)
    colors = {}
    for ax, panel in zip(axs[0], panels):
        for labels, v in sorted(cv.items()):
            if panel is not None and labels[1] != panel:
                continue
            color = colors.setdefault(labels[0], f"C{len(colors)}")
            for key, style in (("local", "-"), ("test", "--")):
                if v[key]:
                    rounds = sorted(v[key])
                    ax.plot(rounds, [np.mean(v[key][r]) for r in rounds], style, color=color,
                            label=f"{labels[0]} {'local' if key == 'local' else 'global'}")
        ax.set_title(f"{panel_axis} = {panel}" if panel else title, fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axs[0][0].set_ylabel("accuracy")
    axs[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_clients(runs: dict, axes: list[str], path: Path) -> None:
    """Per-client accuracy at the final round, pooled over seeds: local models and the global model."""
    variants: dict[tuple, dict[str, list[float]]] = {}
    for run in runs.values():
        v = variants.setdefault(run["labels"], {"local": [], "global": []})
        v["local"] += run["local"]
        v["global"] += run["global"]
    keys = sorted(variants)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(keys) * 2), 3.8))
    data, names, pos = [], [], []
    for i, k in enumerate(keys):
        for j, model in enumerate(("local", "global")):
            if variants[k][model]:
                data.append(variants[k][model])
                names.append(f"{'/'.join(k)}\n{model}")
                pos.append(3 * i + j)
    ax.boxplot(data, positions=pos, widths=0.8)
    ax.set_xticks(pos, names, fontsize=6, rotation=60)
    ax.set_ylabel("accuracy on the client's test split")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def hardware() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "ray", "numpy", "pyarrow"))
    return f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, {versions}"


def section(name: str, title: str, runs_dir: Path, readings: dict, figdir: Path, base: set[str]) -> list[str]:
    """One experiment's part of RESULTS.md (and its plots), from its sweep's results table."""
    parts = [f"## {title}\n",
             f"Command: `fmlray sweep experiments/{name}.toml` (sizes and settings in that file), "
             f"then `python docs/make_results.py`.\n"]
    table_path = runs_dir / name / "results.parquet"
    if not table_path.is_file():
        return parts + ["**Not run yet**: no results table. Run the command above.\n"]
    parts.append(sizes(table_path.parent))
    parts.append(produced_by(table_path.parent))
    table = pq.read_table(table_path)
    axes = [c for c in table.column_names if c not in base]
    rows = table.to_pylist()
    runs = per_run(rows, axes)
    parts.append(summary_table(runs, axes) + "\n")
    if name in GROUP_BASELINE:
        parts.append("Per client group (local models only):\n")
        parts.append(group_table(rows, axes, GROUP_BASELINE[name]) + "\n")
    if name in TASK_BASELINE:
        parts.append("Per client group, each in its own task's space (local models and the global model on the "
                     "group's client test splits):\n")
        parts.append(task_table(rows, axes, TASK_BASELINE[name]) + "\n")
    plot_curves(curves(rows, axes), axes, title, figdir / f"{name}-curves.png")
    plot_clients(runs, axes, figdir / f"{name}-clients.png")
    parts.append(f"![accuracy over rounds](results/{name}-curves.png)\n")
    parts.append(f"![per-client accuracy](results/{name}-clients.png)\n")
    if name in readings:
        parts.append(readings[name]["text"].strip() + "\n")
    return parts


def _fail(message: str) -> None:
    print(f"make_results.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _kept(text: str, title: str) -> str | None:
    """The section `title` of an earlier RESULTS.md, as it was, or None."""
    head = f"## {title}\n"
    if head not in text:
        return None
    start = text.index(head)
    end = text.find("\n## ", start + len(head))
    return text[start:end if end >= 0 else len(text)].rstrip("\n") + "\n"


def _only(args, readings: dict, figdir: Path) -> None:
    """Regenerate one experiment's section in place (or add it, in EXPERIMENTS' order, at the end)."""
    titles = dict(EXPERIMENTS)
    if args.only not in titles:
        _fail(f"--only {args.only}: not an experiment; choose one of {', '.join(titles)}")
    if not (Path(args.runs) / args.only / "results.parquet").is_file():
        _fail(f"no table {Path(args.runs) / args.only / 'results.parquet'}: run `fmlray sweep experiments/"
              f"{args.only}.toml` first, or give --runs; RESULTS.md was left as it is")
    path = DOCS / "RESULTS.md"
    text = path.read_text()
    base = {f.name for f in SCHEMA} | {"run", "seed"}
    new = "\n".join(section(args.only, titles[args.only], Path(args.runs), readings, figdir, base))
    head = f"## {titles[args.only]}\n"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + new + (text[nxt:] if nxt >= 0 else "\n")
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    path.write_text(text)
    print(f"wrote the {args.only} section of {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/sweeps", help="where `fmlray sweep` wrote its folders")
    parser.add_argument("--only", metavar="SWEEP", help="regenerate only this experiment's section of RESULTS.md")
    args = parser.parse_args()
    readings = tomllib.loads((DOCS / "readings.toml").read_text()) if (DOCS / "readings.toml").exists() else {}
    figdir = DOCS / "results"
    figdir.mkdir(exist_ok=True)
    base = {f.name for f in SCHEMA} | {"run", "seed"}
    parts = ["# fmlray results\n",
             "Generated by `python docs/make_results.py` from the Parquet tables `fmlray sweep` writes; "
             "the readings are in `docs/readings.toml`. Figures are the final round's accuracy, averaged "
             "over clients, then mean ± std over seeds (the population std, numpy's default: with 3 seeds the sample "
             "std is 1.22 × larger).\n",
             f"Hardware and versions: {hardware()}. "
             + " ".join(readings.get("provenance", {}).get("text", "").split())
             + (" " if "provenance" in readings else "")
             + "The Ray engine gives the serial engine's results to 1e-6, and Ray Tune trials the sequential "
             "loop's (their parity tests are in tests/integration). "
             "Experiment 1 at full size on a GPU has not been run (the GPU machines lent so far ran the GPU "
             "checks in benchmarks/results/gpu-*).\n"]
    if args.only:
        _only(args, readings, figdir)
        return
    # A section whose sweep table is not here (another machine ran it, or a typo in --runs) keeps its recorded
    # text, and so does the header's hardware line, which then describes some sections only; nothing found at
    # all changes nothing.
    path = DOCS / "RESULTS.md"
    old = path.read_text() if path.is_file() else ""
    found = [name for name, _ in EXPERIMENTS if (Path(args.runs) / name / "results.parquet").is_file()]
    if not found:
        _fail(f"no sweep table under {args.runs} (e.g. {Path(args.runs) / EXPERIMENTS[0][0] / 'results.parquet'}); "
              "run the sweeps of experiments/ first, or give --runs; RESULTS.md was left as it is")
    kept = []
    for name, title in EXPERIMENTS:
        recorded = _kept(old, title) if name not in found else None
        if recorded is not None:
            kept.append(name)
            parts.append(recorded)
        else:
            parts += section(name, title, Path(args.runs), readings, figdir, base)
    if kept:
        hw = next((line for line in old.splitlines() if line.startswith("Hardware and versions:")), None)
        parts[2] = hw + "\n" if hw else parts[2]
    path.write_text("\n".join(parts))
    print(f"wrote {path}" + (f" (kept as recorded, no table here: {', '.join(kept)})" if kept else ""))


if __name__ == "__main__":
    main()
