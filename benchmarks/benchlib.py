"""Shared pieces of the benchmark scripts: environment facts, a private Ray, memory sampling, output files."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
MIB = 1 << 20


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hardware() -> dict:
    """CPU model, logical and physical cores, RAM, OS."""
    return {"cpu_model": cpu_model(), "logical_cores": os.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "os": f"{platform.system()} {platform.release()}"}


def git_commit() -> str:
    """HEAD of the repository, with '+dirty' when the work tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    """Versions of the libraries that set the numbers."""
    import numpy
    import ray
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "numpy": numpy.__version__, "pyarrow": pa.__version__, "fmlray_commit": git_commit()}


def start_ray(num_cpus: float, num_gpus: float | None = None) -> float:
    """Start a private Ray on loopback, as `fmlray run` does (never one a `ray start` left behind, nor a
    stale address file of one); return the seconds it took."""
    from fmlray.engine.connect import start_private_ray
    os.environ.pop("RAY_ADDRESS", None)  # start_private_ray ignores it, but fmlray's connect() would not
    started = time.perf_counter()
    start_private_ray(num_cpus=num_cpus, num_gpus=num_gpus)
    return time.perf_counter() - started


def comma_list(kind: type) -> Callable[[str], list]:
    """An argparse type for a comma-separated list of `kind` (e.g. '1,2,4')."""
    def parse(text: str) -> list:
        try:
            items = [kind(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}s") from None
        if not items:
            raise argparse.ArgumentTypeError("the list is empty")
        return items
    return parse


def check_out(p: argparse.ArgumentParser, out: Path, flag: str = "--out") -> None:
    """Refuse (exit 2) a results folder that cannot be made or written: `out`, or the nearest of its parents that
    exists, is not a folder, or no folder can be made in it (tried: a read-only place, /proc). Called at parse
    time, before anything slow starts; it makes nothing that stays."""
    for path in (out, *Path(out).absolute().parents):
        if path.exists():
            if not path.is_dir():
                p.error(f"{flag}: {path} exists and is not a folder" if path == out else
                        f"{flag}: {out} cannot be made: {path} is not a folder")
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=path))
            except OSError as exc:
                p.error(f"{flag}: {out} cannot be written: nothing can be made in {path} ({exc.strerror or exc})")
            return


def exit_with(main: Callable[[], int | None]) -> None:
    """Run a script's `main` and exit with its code; a setting fmlray refuses (an FmlrayError: e.g. too few rows
    for the clients asked for, a seed below 0) is one line and exit 2, as fmlray's own commands say it."""
    from fmlray.errors import FmlrayError
    try:
        code = main()
    except FmlrayError as exc:
        print(f"{Path(sys.argv[0]).name}: error: fmlray refuses the run these options make: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


def check_at_least(p: argparse.ArgumentParser, flag: str, value, low) -> None:
    """Refuse (exit 2) `flag` below `low` (a number, or each number of a list), naming both."""
    if not isinstance(value, list):
        if value < low:
            p.error(f"{flag} must be >= {low}; got {value}")
    elif bad := [v for v in value if v < low]:
        p.error(f"{flag}: each must be >= {low}; got {bad[0]}")


def check_fractions(p: argparse.ArgumentParser, flag: str, values: list[float]) -> None:
    """Refuse (exit 2) a share of `flag` outside (0, 1]."""
    if bad := [f for f in values if not 0 < f <= 1]:
        p.error(f"{flag}: each share must be in (0, 1]; got {bad[0]:g}")


MAX_TAG = 64


def check_tag(p: argparse.ArgumentParser, tag: str) -> None:
    """Refuse (exit 2) a --tag that cannot be a word in a file name: a '/', a control character (a newline), or
    more than MAX_TAG characters (the names it goes into must fit a file system's 255 bytes)."""
    if "/" in tag or any(not c.isprintable() for c in tag) or len(tag) > MAX_TAG:
        p.error(f"--tag is a word in the output names: at most {MAX_TAG} printable characters, no '/'; got {tag!r}"
                if len(tag) <= MAX_TAG else f"--tag is a word in the output names: at most {MAX_TAG} characters; got "
                f"{len(tag)}")


def result_stem(script: str, workload: str, variant: str, out: Path) -> str:
    """'<script>-<workload>[-<variant>]-<N>cpu-<date>', the name every output of a run shares; '-2', '-3', ...
    after it when `out` holds a record of that name already (a second run that day never replaces the first).
    The name is claimed at once, by making its `.md` exclusively (a placeholder the run's report replaces), so
    two runs started together take two names."""
    tag = f"-{variant}" if variant else ""
    stem = f"{script}-{workload}{tag}-{os.cpu_count()}cpu-{datetime.date.today().isoformat()}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    taken = lambda name: any(out.glob(f"{glob.escape(name)}.*")) or any(out.glob(f"{glob.escape(name)}-*"))  # noqa: E731
    n = 1
    while True:
        name = stem if n == 1 else f"{stem}-{n}"
        if not taken(name):
            with contextlib.suppress(FileExistsError):  # another run took it meanwhile: try the next
                with open(out / f"{name}.md", "x") as f:
                    f.write(f"# {name}\n\nThe run of this record has not finished (or it died): nothing here yet.\n")
                return name
        n += 1


def write_parquet(rows: list[dict], path: Path, meta: dict) -> None:
    """Rows as Parquet, with `meta` (hardware, versions, config) as JSON in the schema metadata."""
    columns = list(dict.fromkeys(k for r in rows for k in r))  # every row's keys (from_pylist takes the first's)
    table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows])
    table = table.replace_schema_metadata({b"fmlray_benchmark": json.dumps(meta, default=str).encode()})
    pq.write_table(table, path)


def fmt(value, spec: str = ".3f") -> str:
    """A table cell: floats formatted, None / NaN as '-'."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table of `rows`; columns are (key, header, format spec)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k), spec) for k, _, spec in columns) + " |" for r in rows]
    return "\n".join(lines)


def environment_markdown(meta: dict) -> str:
    """The hardware and versions as a Markdown bullet list."""
    hw, ver = meta["hardware"], meta["versions"]
    return "\n".join([
        f"- CPU: {hw['cpu_model']}, {hw['logical_cores']} logical cores ({hw['physical_cores']} physical), "
        f"{hw['ram_gib']} GiB RAM, {hw['os']}",
        "- " + ", ".join(f"{k} {v}" for k, v in ver.items()),
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        "- load average (1, 5, 15 min) before: " + ", ".join(f"{x:.2f}" for x in meta["load_before"])
        + "; after: " + ", ".join(f"{x:.2f}" for x in meta.get("load_after", ())),
    ])


def _flat(tree, prefix: str = "") -> dict:
    """A config dict as dotted keys (a list's entries by index: clients.groups.0.name)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        return {prefix: tree}
    return {k: v for key, value in items for k, v in _flat(value, f"{prefix}.{key}" if prefix else str(key)).items()}


def configs_markdown(configs: dict[str, dict]) -> str:
    """The fmlray configs the numbers were measured with (label -> `to_dict` of a Config): the first whole, as
    TOML, each other as the keys in which it differs from the first."""
    import tomli_w

    if not configs:
        return ""
    (first_label, first), *others = configs.items()
    base = _flat(first)
    lines = [f"Config of `{first_label}`" + (" (the others differ only where listed below)" if others else "") + ":",
             "", "```toml", tomli_w.dumps(first).strip(), "```"]
    if others:
        lines.append("")
    for label, cfg in others:
        diff = {k: v for k, v in _flat(cfg).items() if base.get(k, object()) != v}
        lines.append(f"- `{label}`: " + (", ".join(f"{k} = {json.dumps(v)}" for k, v in sorted(diff.items()))
                                         or "the same"))
    return "\n".join(lines)


def run_meta(args: argparse.Namespace) -> dict:
    """What every output records beside the numbers."""
    return {"hardware": hardware(), "versions": versions(), "args": vars(args),
            "command": "python " + " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds")}


def pss(pid: int) -> tuple[int, int]:
    """(PSS, peak RSS) of a process in bytes; (0, 0) once it has gone."""
    try:
        p = psutil.Process(pid)
        return p.memory_full_info().pss, _peak_rss(pid)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0, 0


def _peak_rss(pid: int) -> int:
    """The kernel's high-water mark of resident memory (VmHWM): a true peak, unlike sampled PSS."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemorySampler:
    """Samples the PSS of this process tree in a thread; keeps the peak of each category's sum.

    Categories: the driver, the pids `actor_pids()` names (client actors, aggregator), and the
    rest of the tree (Ray's gcs/raylet/agents and idle workers). PSS splits shared pages (the
    object store, shared libraries) among the processes mapping them, so the sums do not double count.
    """

    def __init__(self, actor_pids: Callable[[], set[int]] = set, interval_s: float | None = 0.25,
                 root: int | None = None):
        self.actor_pids, self.interval_s = actor_pids, interval_s
        self.me = psutil.Process(root)  # the "driver": this process unless another root is named
        self.lock = threading.Lock()
        self.reset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "MemorySampler":
        if self.interval_s is not None:  # None: read only when asked (keeps timed windows unperturbed)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def reset(self) -> None:
        """Start a new window for `peak()`."""
        with self.lock:
            self._readings: list[dict[int, int]] = []

    def sample(self) -> None:
        """One reading of every process in the tree (pid -> PSS), kept for `peak()`."""
        self.actor_pids()  # lets a title-based lookup see actors while they live
        now = {self.me.pid: pss(self.me.pid)[0]}
        try:
            children = self.me.children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            now[child.pid] = pss(child.pid)[0]
        with self.lock:
            self._readings.append(now)

    def peak(self) -> dict[str, int]:
        """Per category, the peak of its sum since the last reset, after one more reading. Readings are
        sorted into categories only now, by the actor pids known at the end: a worker process is an
        actor from its start, though Ray names it one only once its class is loaded."""
        self.sample()
        actors = self.actor_pids()
        with self.lock:
            readings = list(self._readings)
        peak = {"driver": 0, "actors": 0, "ray_system": 0, "total": 0}
        for reading in readings:
            now = {"driver": reading.get(self.me.pid, 0), "actors": 0, "ray_system": 0}
            for pid, value in reading.items():
                if pid != self.me.pid:
                    now["actors" if pid in actors else "ray_system"] += value
            now["total"] = sum(now.values())
            peak = {k: max(v, now[k]) for k, v in peak.items()}
        return peak

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()


def actor_pids(engine) -> set[int]:
    """Pids of a Ray engine's client actors and its aggregator."""
    import ray
    pids = {int(i["pid"]) for i in getattr(engine, "infos", [])}
    agg = getattr(engine, "aggregator", None)
    if agg is not None:
        pids.add(ray.get(agg.__ray_call__.remote(lambda self: os.getpid())))
    return pids


ACTOR_TITLES = ("ray::ClientActor", "ray::Aggregator")


def actor_title(cmdline: list[str]) -> str | None:
    """Ray's title of an fmlray actor's process, "ray::ClientActor" or "ray::Aggregator", also while it runs a
    method (then Ray titles it "ray::ClientActor.train", and after the call's reply has gone, not before:
    a reading just after a call returned can still see that); None for any other process."""
    head = cmdline[0].split(".", 1)[0] if cmdline else ""
    return head if head in ACTOR_TITLES else None


def actors_by_title(root: int) -> Callable[[], set[int]]:
    """A lookup of the client actors and aggregator under `root` by Ray's process titles, remembering
    every pid it has seen (an actor that has exited still counts for the readings taken while it lived)."""
    seen: set[int] = set()

    def lookup() -> set[int]:
        try:
            children = psutil.Process(root).children(recursive=True)
        except psutil.Error:
            children = []
        for child in children:
            try:
                if actor_title(child.cmdline()):
                    seen.add(child.pid)
            except psutil.Error:
                pass
        return seen
    return lookup


def wait_state(state) -> None:
    """Block until a Ray engine's new global state exists (aggregation done), without fetching it."""
    import ray
    if isinstance(state, ray.ObjectRef):
        ray.wait([state], fetch_local=False)


# ------------------------------------------------------------------------------------------------- plots

def figure(panels: int = 1, width: float = 6.4, height: float = 4.2):
    """A matplotlib figure of `panels` axes side by side, and the axes (a list). matplotlib is imported here,
    on the Agg backend: only the plots need it, and no display is assumed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    return fig, list(axes[0])


def save_png(fig, path: Path) -> Path:
    """Save a figure from `figure` as a PNG (110 dpi, light grid, nothing clipped) and close it."""
    import matplotlib.pyplot as plt
    for ax in fig.axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.set_axisbelow(True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def number(value) -> float:
    """A value to plot: None as NaN, which matplotlib leaves out."""
    return float("nan") if value is None else float(value)


def bars(ax, groups: list[str], series: dict[str, list], ylabel: str, stacked: bool = False,
         colors: list | None = None, slant: bool | None = None) -> None:
    """Bars of each series over the groups (x axis), side by side or stacked; a missing value (None, NaN)
    draws no bar. The group labels slant when `slant`, or (None) when they are long. A legend when there is
    more than one series."""
    import math
    width = 0.8 if stacked else 0.8 / max(1, len(series))
    bottom = [0.0] * len(groups)
    for i, (name, values) in enumerate(series.items()):
        ys = [number(v) for v in values]
        offset = 0.0 if stacked else (i - (len(series) - 1) / 2) * width
        ax.bar([g + offset for g in range(len(groups))], ys, width, bottom=bottom if stacked else None, label=name,
               color=colors[i] if colors else None)
        if stacked:
            bottom = [b + (0.0 if math.isnan(y) else y) for b, y in zip(bottom, ys)]
    if slant is None:
        slant = max((len(g) for g in groups), default=0) * len(groups) > 60
    ax.set_xticks(range(len(groups)), groups, rotation=30 if slant else 0, ha="right" if slant else "center",
                  fontsize=8)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.set_ylim(top=ax.get_ylim()[1] * 1.2)  # room for the legend above the bars
        ax.legend(fontsize=7, ncols=2 if len(series) > 3 else 1)


def png_link(title: str, path: Path) -> str:
    """The Markdown line that shows a PNG written beside its report."""
    return f"![{title}]({Path(path).name})"
