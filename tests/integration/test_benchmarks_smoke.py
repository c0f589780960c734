"""The benchmark scripts run end to end at a tiny size and write what their READMEs promise (no timing checks)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import struct

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT_S = 180  # each run takes well under 60 s on 2 cores; this only stops a hang


def run_script(name: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run benchmarks/<name> --smoke into `out` in a fresh process (it starts its own private Ray)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), "--smoke", "--out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def only(out: Path, pattern: str) -> Path:
    found = sorted(out.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {out}, found {[p.name for p in found]}"
    return found[0]


def a_png(path: Path) -> Path:
    """`path` is a whole, non-empty PNG: its signature, an image header of positive size, the end chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0 and data[-8:-4] == b"IEND", f"{path.name}: {width}x{height}, or cut short"
    return path


def no_nan(values) -> bool:
    return all(v is not None and not math.isnan(v) for v in values)


def test_overhead_smoke_writes_parquet_and_markdown(tmp_path):
    # a way of each kind (the others differ only in their configs): half the Ray engines to start
    run_script("overhead.py", tmp_path, "--workload", "digits", "--ways", "serial,serial-vmap,ray-1-vmap")
    table = pq.read_table(only(tmp_path, "overhead-digits-smoke-*.parquet"))
    assert {"phase", "algorithm", "way", "kind", "actors", "threads", "round", "warmup", "seconds",
            "client_seconds"} <= set(table.column_names)
    rows = table.to_pylist()
    assert {r["way"] for r in rows} == {"floor-1t", "serial", "serial-vmap", "ray-1-vmap"}
    assert {r["algorithm"] for r in rows} == {"fedavg", "fml"}
    assert no_nan(r["seconds"] for r in rows) and all(r["seconds"] > 0 for r in rows)
    assert b"fmlray_benchmark" in table.schema.metadata  # hardware, versions and config ride along
    report = only(tmp_path, "overhead-digits-smoke-*.md").read_text()
    assert "× floor(a)" in report and "## Targets" in report and "## Config" in report
    png = a_png(only(tmp_path, "overhead-digits-smoke-*.png"))
    assert f"]({png.name})" in report and png.stem == only(tmp_path, "overhead-*.md").stem


def test_scaling_smoke_writes_parquet_markdown_and_plots(tmp_path):
    # 100000 actors cannot be placed (a share below Ray's smallest): that point is skipped and listed, and the
    # points measured before it keep their rows (its refusal ended the script and lost them)
    proc = run_script("scaling.py", tmp_path, "--actors", "2,100000")
    assert "skipped synthetic × 20 clients, 100000 actors, fraction 1 (clients.groups[all].num_cpus" in proc.stdout
    table = pq.read_table(only(tmp_path, "scaling-synthetic-smoke-*[0-9].parquet"))
    assert {"dataset", "clients", "actors", "fraction", "round", "warmup", "sampled", "wall_s", "compute_s",
            "overhead_s", "overhead_ms_per_client", "aggregate_s", "bytes_round", "pss_driver_mib",
            "pss_actors_mib", "pss_ray_system_mib", "pss_total_mib"} <= set(table.column_names)
    rows = table.to_pylist()
    assert {r["clients"] for r in rows} == {10, 20}
    assert no_nan(r["wall_s"] for r in rows) and no_nan(r["aggregate_s"] for r in rows)
    assert all(r["pss_actors_mib"] > 0 and r["bytes_round"] > 0 for r in rows)
    startup = pq.read_table(only(tmp_path, "scaling-synthetic-smoke-*-startup.parquet"))
    assert {"data_put_s", "actors_ready_s", "engine_start_s", "dataset_bytes"} <= set(startup.column_names)
    for plot in ("time", "overhead", "memory"):
        assert only(tmp_path, f"scaling-*-{plot}.png").stat().st_size > 0
    report = only(tmp_path, "scaling-*.md").read_text()
    assert "## Start-up" in report and "Skipped (fmlray refused them): synthetic × 20 clients, 100000 actors" in report


def test_every_benchmark_script_imports_what_it_needs_from_fmlray():
    # the scripts without a smoke run here (state_scale, sweeps, gpu_*) break silently when fmlray moves a name
    scripts = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))
    assert {"state_scale", "sweeps", "gpu_check", "gpu_state_check"} <= set(scripts)
    code = "import importlib, sys; [importlib.import_module(n) for n in sys.argv[1:]]"
    proc = subprocess.run([sys.executable, "-c", code, *scripts], cwd=REPO / "benchmarks",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def records_configs(parquet, report: str, *labels: str) -> None:
    """The record names the fmlray configs its numbers came from, in the Parquet's metadata and the Markdown:
    batched, contention, moves and state_scale recorded none (audit 42)."""
    import json
    meta = json.loads(pq.read_schema(parquet).metadata[b"fmlray_benchmark"])
    assert set(labels) <= set(meta["configs"]) and all("algorithm" in c for c in meta["configs"].values()), meta
    assert f"Config of `{labels[0]}`" in report and "```toml" in report and "[algorithm]" in report, report


def test_batched_smoke_writes_parquet_and_markdown(tmp_path):
    run_script("batched.py", tmp_path)
    rows = pq.read_table(only(tmp_path, "batched-clients-smoke-*.parquet")).to_pylist()
    assert {r["mode"] for r in rows} == {"sequential", "vmap", "auto"} and all(r["seconds"] > 0 for r in rows)
    report = only(tmp_path, "batched-clients-smoke-*.md").read_text()
    assert "vmap speed-up" in report and f"]({a_png(only(tmp_path, 'batched-clients-smoke-*.png')).name})" in report
    records_configs(only(tmp_path, "batched-clients-smoke-*.parquet"), report, *(f"{rows[0]['case']} {m}" for m in
                                                                                ("sequential", "vmap", "auto")))
    assert "training.batching = \"vmap\"" in report, report  # the others: where they differ from the first


def test_wholerun_smoke_writes_parquet_and_markdown(tmp_path):
    run_script("wholerun.py", tmp_path)
    rows = pq.read_table(only(tmp_path, "wholerun-digits-smoke-*.parquet")).to_pylist()
    timed = {r["way"]: r for r in rows if r["kind"] == "timing"}
    assert set(timed) == {"fmlray", "plain"} and all(r["wall_s"] > 0 for r in timed.values())
    assert timed["fmlray"]["ray_up_s"] > 0 and timed["fmlray"]["actors_ready_s"] > 0 and timed["fmlray"]["rounds"] == 1
    # the CPU each part had spent by the ready line: two client actors and an aggregator, and only a driver for the plain
    f, p = timed["fmlray"], timed["plain"]
    assert f["cpu_client_actors_s"] > 0 and f["cpu_aggregator_s"] > 0 and f["cpu_ray_system_s"] > 0
    assert p["cpu_total_s"] == p["cpu_driver_s"] > 0 and p["cpu_client_actors_s"] == 0
    assert f["cpu_bound_s"] == pytest.approx(f["cpu_total_s"] / os.cpu_count())
    memory = {r["way"]: r for r in rows if r["kind"] == "memory"}
    assert memory["fmlray"]["pss_actors_mib"] > 0 and memory["plain"]["pss_total_mib"] > 0
    report = only(tmp_path, "wholerun-digits-smoke-*.md").read_text()
    assert "## Targets" in report and "## Where the time goes" in report and "## Config" in report
    assert f"]({a_png(only(tmp_path, 'wholerun-digits-smoke-*.png')).name})" in report


def test_a_record_keeps_the_columns_of_every_row(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import benchlib
    benchlib.write_parquet([{"way": "floor", "s": 1.0}, {"way": "ray", "s": 2.0, "actors": 2}], tmp_path / "r.parquet",
                           {"cpu": "test"})
    assert pq.read_table(tmp_path / "r.parquet").to_pylist() == [{"way": "floor", "s": 1.0, "actors": None},
                                                                 {"way": "ray", "s": 2.0, "actors": 2}]


def test_a_second_record_of_a_day_never_replaces_the_first(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import benchlib
    first = benchlib.result_stem("overhead", "digits", "quick", tmp_path)
    assert first.startswith("overhead-digits-quick-") and first.endswith("cpu-" + __import__("datetime").date.today()
                                                                         .isoformat())
    (tmp_path / f"{first}-startup.parquet").write_text("")  # any output of that run takes the name
    assert benchlib.result_stem("overhead", "digits", "quick", tmp_path) == f"{first}-2"
    (tmp_path / f"{first}-2.md").write_text("")
    assert benchlib.result_stem("overhead", "digits", "quick", tmp_path) == f"{first}-3"
    assert benchlib.result_stem("overhead", "digits", "", tmp_path) == first.replace("-quick", "")


def test_a_failed_memory_run_is_recorded_not_fatal(monkeypatch):
    from types import SimpleNamespace
    sys.path.insert(0, str(REPO / "benchmarks"))
    import overhead

    def fail(way, rounds=3):
        raise SystemExit(f"the memory run of {way.name} failed: ['GCS gone']")

    monkeypatch.setattr(overhead, "isolated_memory", fail)
    way = SimpleNamespace(kind="ray", name="ray-2/fedavg", actors=2)
    alone = overhead.memory_rows([("cpu", [way])], log=lambda m: None)
    assert alone == [{"phase": "cpu", "way": "ray-2/fedavg", "failed": "the memory run of ray-2/fedavg failed: ['GCS gone']"}]
    assert all("alone" not in c["check"] for c in overhead.targets("digits", [], alone))


def test_contention_smoke_writes_each_clients_update_alone_and_beside_another_actor(tmp_path):
    run_script("contention.py", tmp_path)
    rows = pq.read_table(only(tmp_path, "contention-fmnist-fedavg-smoke-*.parquet")).to_pylist()
    assert [r["client"] for r in rows] == list(range(20)) and {r["actor"] for r in rows} == {0, 1}
    assert no_nan([r["ratio"] for r in rows]) and all(r["alone_s"] > 0 and r["beside_s"] > 0 for r in rows)
    report = only(tmp_path, "contention-fmnist-fedavg-smoke-*.md").read_text()
    assert "beside ÷ alone" in report and f"]({a_png(only(tmp_path, 'contention-*.png')).name})" in report
    records_configs(only(tmp_path, "contention-fmnist-fedavg-smoke-*.parquet"), report, "alone (serial engine)",
                    "beside (Ray engine)")


def test_moves_smoke_times_rounds_with_clients_moving_and_not(tmp_path):
    run_script("moves.py", tmp_path)
    rows = pq.read_table(only(tmp_path, "moves-fml-smoke-*.parquet")).to_pylist()
    assert sorted((r["turn"], r["moving"]) for r in rows) == [(0, False), (0, True)]
    assert no_nan([r["s_per_round"] for r in rows]) and all(r["away"] == 0 for r in rows if not r["moving"])
    report = only(tmp_path, "moves-fml-smoke-*.md").read_text()
    assert "on ÷ off" in report and f"]({a_png(only(tmp_path, 'moves-fml-smoke-*.png')).name})" in report
    records_configs(only(tmp_path, "moves-fml-smoke-*.parquet"), report, "synthetic:40:0.5")


def test_gpu_check_refuses_smoke_size_on_a_real_gpu_run_with_one_line():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "check", "--smoke"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "--smoke is the CI size of --cpu-dry-run; a real GPU check runs at full size")


def test_gpu_check_dry_run_passes_its_checks_and_writes_its_records(tmp_path):
    # issue 14: gpu_check.sh's CPU dry run at CI's size (logical GPU, CUDA-only checks skipped); on a GPU
    # machine the same script runs at full size
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run", "--smoke",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=3 * SMOKE_TIMEOUT_S)  # two steps, each in its own Ray (~70 s on 2 cores)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    checks = report["checks"]
    assert not [c for c in checks if c["ok"] is False] and sum(1 for c in checks if c["ok"]) >= 20, checks
    skipped = {c["check"] for c in checks if c["ok"] is None}
    assert "training waits for the GPU per client, not per step" in skipped  # CUDA-only, said so
    assert set(report["runs"]) == {"quarter", "batched"}  # and "whole" at full size
    assert any(c["check"] == "batched: resumed after round 1 on fresh actors = uninterrupted" and c["ok"] for c in checks)
    rows = pq.read_table(tmp_path / "gpu-bench.parquet").to_pylist()
    assert {r["gpu_fraction"] for r in rows} >= {1.0, 0.25} and all(r["seconds"] > 0 for r in rows)
    assert "](gpu-bench.png)" in (tmp_path / "gpu-bench.md").read_text() and a_png(tmp_path / "gpu-bench.png")
    assert {p.name for p in tmp_path.iterdir()} == {  # gpu_check.sh's header lists them (with --smoke, no TF32 step)
        "env.txt", "run.log", "gpu-check.json", *(f"gpu-bench.{ext}" for ext in ("md", "json", "parquet", "png"))}
    assert (tmp_path / "env.txt").exists() and "step 3 (TF32 report) left out" in (tmp_path / "run.log").read_text()


def test_gpu_check_help_prints_its_usage_and_makes_nothing(tmp_path):
    # it used to start the check, making its results folder, on --help
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--help"], cwd=REPO,
                          env={**os.environ, "OUT": str(tmp_path / "out")}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.startswith("fmlray on a real CUDA GPU"), proc.stderr
    assert "--cpu-dry-run" in proc.stdout and not (tmp_path / "out").exists()


def test_the_plots_of_the_scripts_without_a_smoke_run_draw_what_they_get(tmp_path):
    # state_scale and sweeps take minutes at any size: their plots are drawn here from rows as they write them,
    # a missing value (a sweep without reused actors, a NaN) leaving a gap, not an error
    sys.path.insert(0, str(REPO / "benchmarks"))
    import state_scale
    import sweeps
    parts = {f"{k}_s": 1.0 for k in ("train", "eval", "checkpoint")} | {f"peak_{k}_gib": 0.5 for k in
                                                                        ("driver", "actors", "ray")}
    rows = [{"clients": 100, "checkpoint": True, **parts}, {"clients": 1000, "checkpoint": False, **parts,
                                                            "checkpoint_s": math.nan}]
    a_png(state_scale.plot(rows, tmp_path / "state.png"))
    a_png(sweeps.plot([{"workload": "experiment1", "runs": 16, "tune_how": "auto", "loop_s": 60.0, "tune_s": 50.0,
                        "loop_reusing_s": None},
                       {"workload": "digits", "runs": 3, "tune_how": "1", "loop_s": 50.0, "tune_s": None,
                        "loop_reusing_s": 30.0}], tmp_path / "sweeps.png"))


def test_an_actor_is_told_by_its_title_also_while_it_answers_a_call():
    # Ray titles an actor's process "ray::ClientActor.ready" until the call's reply has gone: a reading taken
    # as the driver says "ready" once counted every client actor as one of Ray's own processes
    sys.path.insert(0, str(REPO / "benchmarks"))
    import benchlib
    assert benchlib.actor_title(["ray::ClientActor", ""]) == benchlib.actor_title(["ray::ClientActor.ready"]) \
        == "ray::ClientActor"
    assert benchlib.actor_title(["ray::Aggregator.__ray_ready__", ""]) == "ray::Aggregator"
    assert [benchlib.actor_title(c) for c in (["ray::IDLE"], ["ray::ClientActorX"], ["/usr/bin/python3"], [])] \
        == [None] * 4
