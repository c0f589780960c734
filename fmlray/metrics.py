"""Run records: one row per round × client × model (plus round-level rows), and their summaries.

Columns (the Parquet schema, also in the README):
  round     int32   1-based round
  client    int32   client id; -1 on round-level rows
  group     string  the client's group; "" on round-level rows
  model     string  a model the algorithm declares (fml: "local", "meme", the trained copy of the global
                    model; dml: "local", "peer"; ...; "local" is always the client's personalised model),
                    "global" (the global model) or "" (round, excluded and recovered rows)
  split     string  "train" | "test" (the client's own test split) | "global_test" | "round" |
                    "group_test" (runs with tasks: per client group and model, the mean over its clients'
                    test rows; client -1, samples: their test rows, note: "task <the group's task>"; NaN
                    over 0 samples for a group none of whose clients was tested that round) |
                    "excluded" (a client's update left out of the average; samples: its training rows,
                    note: why) | "recovered" (a client re-run elsewhere after its actor was lost; note: how)
  loss      double  mean cross-entropy (train rows: the mean of the model's whole training loss over its steps,
                    e.g. FML's α·CE + (1−α)·KL, FedProx's CE + penalty); a client's rows are in its
                    group's task space (fmlray.tasks), global_test rows in the dataset's classes
  accuracy  double  (train rows: over every batch of every local epoch, as the model was while it trained)
  samples   int64   rows the figure is over; train rows: the client's training rows (their loss and
                    accuracy cover training.epochs passes over them); round row: clients sampled
  seconds   double  client update time (train rows), round wall time (round row)
  note      string  why a client's update was "excluded" (NaN/Inf), or how it was "recovered"
                    after its actor was lost; "" otherwise
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

SCHEMA = pa.schema([
    ("round", pa.int32()), ("client", pa.int32()), ("group", pa.string()), ("model", pa.string()),
    ("split", pa.string()), ("loss", pa.float64()), ("accuracy", pa.float64()), ("samples", pa.int64()),
    ("seconds", pa.float64()), ("note", pa.string()),
])
NAN = float("nan")


def row(rnd: int, client: int = -1, group: str = "", model: str = "", split: str = "round", *,
        loss: float = NAN, accuracy: float = NAN, samples: int = 0, seconds: float = NAN, note: str = "") -> dict:
    return dict(round=rnd, client=client, group=group, model=model, split=split, loss=loss,
                accuracy=accuracy, samples=samples, seconds=seconds, note=note)


def models_in(result: dict) -> list[str]:
    """The models a host's result dict has figures for (its `<model>_loss` keys), in its order."""
    return [k.removesuffix("_loss") for k in result if k.endswith("_loss")]


def train_rows(rnd: int, results: list[dict], groups: list[str]) -> list[dict]:
    """Rows for the clients trained this round, one per model they trained."""
    out = []
    for r in results:
        if "excluded" in r:
            out.append(row(rnd, r["client"], groups[r["client"]], split="excluded", samples=r["samples"],
                           seconds=r["seconds"], note=r["excluded"]))
        for model in models_in(r):
            out.append(row(rnd, r["client"], groups[r["client"]], model, "train", loss=r[f"{model}_loss"],
                           accuracy=r[f"{model}_accuracy"], samples=r["samples"], seconds=r["seconds"]))
    return out


def eval_rows(rnd: int, clients: list[dict], global_test: tuple[float, float] | None,
              test_samples: int, groups: list[str]) -> list[dict]:
    """Rows for an evaluation: every client's models (as the algorithm names them) and the global model on its
    split, and the global model on the global test set."""
    out = []
    for r in clients:
        for model in models_in(r):
            out.append(row(rnd, r["client"], groups[r["client"]], model, "test", loss=r[f"{model}_loss"],
                           accuracy=r[f"{model}_accuracy"], samples=r["test_samples"]))
    if global_test is not None:
        out.append(row(rnd, model="global", split="global_test", loss=global_test[0], accuracy=global_test[1],
                       samples=test_samples))
    return out


def group_rows(rnd: int, rows: list[dict], tasks: dict[str, str]) -> list[dict]:
    """Per client group (`tasks`: group -> its task, described; every group, in its order) and model: the mean
    loss and accuracy of its clients' test rows among `rows`, each in the group's task space. A group none of
    whose clients was tested this round (run.eval_clients = "sampled") gets NaN over 0 samples: said, not left out."""
    by: dict[tuple[str, str], list[dict]] = {}
    models: dict[str, None] = {}
    for r in rows:
        if r["split"] == "test":
            by.setdefault((r["group"], r["model"]), []).append(r)
            models[r["model"]] = None

    def mean(rs: list[dict], key: str) -> float:
        return float(np.mean([r[key] for r in rs])) if rs else NAN
    return [row(rnd, -1, group, model, "group_test", loss=mean(rs, "loss"), accuracy=mean(rs, "accuracy"),
                samples=sum(r["samples"] for r in rs), note=f"task {task}")
            for group, task in tasks.items() for model in models for rs in [by.get((group, model), [])]]


def recovery_rows(rnd: int, failures: list[dict], groups: list[str]) -> list[dict]:
    """One row per client whose actor was lost this round and whose work (training, evaluating, checkpointing) was
    done again elsewhere."""
    return [row(rnd, cid, groups[cid], split="recovered", note=f["note"]) for f in failures for cid in f["clients"]]


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def stats(values: list[float]) -> dict[str, float] | None:
    """Mean, std, min and 10th percentile across clients, and how many clients (None when there are none)."""
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "p10": float(np.percentile(a, 10)),
            "clients": len(values)}


def round_summary(rows: list[dict]) -> dict:
    """The accuracy figures FML is judged by, for one round's rows."""
    def acc(model: str, split: str) -> list[float]:
        return [r["accuracy"] for r in rows if r["model"] == model and r["split"] == split]

    test = acc("global", "global_test")
    timing = [r for r in rows if r["split"] == "round"]
    out = {
        "round": rows[0]["round"],
        "local": stats(acc("local", "test")),
        "global_clients": stats(acc("global", "test")),
        "global_test": test[0] if test else None,
        "seconds": timing[0]["seconds"] if timing else None,
    }
    groups = {r["group"]: r["note"].removeprefix("task ") for r in rows if r["split"] == "group_test"}
    if groups:  # a run with tasks: the same figures per group, each in its task's space
        def of(group: str, model: str) -> dict | None:
            return stats([r["accuracy"] for r in rows if r["split"] == "test" and r["group"] == group
                          and r["model"] == model])
        out["groups"] = {g: {"task": t, "local": of(g, "local"), "global_clients": of(g, "global")}
                         for g, t in groups.items()}
    return out


def summaries(table: pa.Table) -> list[dict]:
    """`round_summary` for every evaluated round of a run's table."""
    rows = table.to_pylist()
    by_round: dict[int, list[dict]] = {}
    for r in rows:
        by_round.setdefault(r["round"], []).append(r)
    out = [round_summary(rs) for _, rs in sorted(by_round.items())]
    return [s for s in out if s["local"] or s["global_clients"] or s["global_test"] is not None]


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def progress_line(s: dict, rounds: int) -> str:
    """One line per round for the terminal and job logs."""
    parts = [f"round {s['round']:>{len(str(rounds))}}/{rounds}"]
    if s["local"]:
        parts.append(f"local {s['local']['mean']:.3f}±{s['local']['std']:.3f} (p10 {s['local']['p10']:.3f})")
    if s["global_clients"]:
        parts.append(f"global/clients {s['global_clients']['mean']:.3f} (p10 {s['global_clients']['p10']:.3f})")
    if s["global_test"] is not None:
        parts.append(f"global/test {s['global_test']:.3f}")
    if s["seconds"] is not None:
        parts.append(f"{s['seconds']:.1f}s")
    if s.get("checkpoint"):
        c = s["checkpoint"]
        parts.append(f"checkpoint +{c['bytes'] / 2**20:.0f} MiB in {c['seconds']:.1f}s")
    return "  ".join(parts)


def format_summary(s: dict, title: str) -> str:
    """The end-of-run table: mean, std, min and p10 of accuracy across clients."""
    # clients: how many were tested (run.eval_clients: all, the round's sampled ones, or those and N others)
    lines = [title, f"{'accuracy (round ' + str(s['round']) + ')':<34}{'mean':>8}{'std':>8}{'min':>8}{'p10':>8}"
                    f"{'clients':>9}"]
    for label, key in (("local models, own test splits", "local"), ("global model, client test splits", "global_clients")):
        st = s[key]
        if st:
            lines.append(f"{label:<34}" + "".join(f"{_fmt(st[k]):>8}" for k in ("mean", "std", "min", "p10"))
                         + f"{st['clients']:>9}")
    if s["global_test"] is not None:
        lines.append(f"{'global model, global test set':<34}{_fmt(s['global_test']):>8}")
    if s.get("groups"):
        lines.append("by group, own test splits in the group's task space (mean / p10 across its clients):")
        lines += _group_table(s["groups"], [""] * len(s["groups"]))
    return "\n".join(lines)


def _group_table(groups: dict[str, dict], first: list[str], head: str = "") -> list[str]:
    """The per-group table of a run with tasks (`groups`: a summary's), one line per group, each led by its
    `first` cell (e.g. the algorithm in `fmlray compare`; the header's is `head`): a group with no client
    tested shows "-" and 0 clients."""
    wf = max(map(len, [head, *first])) + 2 if head else 2
    wg = max(len("group"), *map(len, groups)) + 2
    wt = max(len(g["task"]) for g in groups.values()) + 2
    out = [f"{head:<{wf}}{'group':<{wg}}{'task':<{wt}}{'local':>8}{'p10':>8}{'global':>8}{'p10':>8}{'clients':>9}"]
    for cell, (group, g) in zip(first, groups.items()):
        loc, glo = g["local"] or {}, g["global_clients"] or {}
        out.append(f"{cell:<{wf}}{group:<{wg}}{g['task']:<{wt}}{_fmt(loc.get('mean')):>8}{_fmt(loc.get('p10')):>8}"
                   f"{_fmt(glo.get('mean')):>8}{_fmt(glo.get('p10')):>8}{loc.get('clients', glo.get('clients', 0)):>9}")
    return out


def format_comparison(results: dict[str, dict]) -> str:
    """One table of final-round figures per algorithm (`fmlray compare`)."""
    head = f"{'algorithm':<10}{'local mean':>12}{'local p10':>11}{'global/clients':>16}{'global p10':>12}{'global/test':>13}"
    lines = [head]
    for name, s in results.items():
        loc, glo = s["local"] or {}, s["global_clients"] or {}
        lines.append(f"{name:<10}{_fmt(loc.get('mean')):>12}{_fmt(loc.get('p10')):>11}{_fmt(glo.get('mean')):>16}"
                     f"{_fmt(glo.get('p10')):>12}{_fmt(s['global_test']):>13}")
    tasked = {name: s["groups"] for name, s in results.items() if s.get("groups")}
    if tasked:  # the global/clients column above mixes the groups' task spaces: each on its own
        lines.append("by group, own test splits in the group's task space (mean / p10 across its clients):")
        w = max(map(len, ["algorithm", *tasked]))
        for i, (name, groups) in enumerate(tasked.items()):
            table = _group_table(groups, [name.ljust(w)] + [""] * (len(groups) - 1), "algorithm")
            lines += table if i == 0 else table[1:]
    return "\n".join(lines)
