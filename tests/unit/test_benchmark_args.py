"""The benchmark scripts refuse a bad argument at parse time: argparse's usage and one line naming the option,
exit 2, before any data, Ray or training. Each script's parse function runs here in-process (nothing slow
starts); gpu_check.sh in a subprocess."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import benchlib, overhead, scaling as siblings


def refusal(capsys, script: str, argv: list[str]) -> str:
    """The one error line of `script`'s parser on `argv`, after checking it exited 2 with its usage."""
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(script).parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("usage: ") and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert ": error: " in lines[-1], err
    return lines[-1].split(": error: ", 1)[1]


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("")
    return path


BAD = [  # script, arguments (FILE: an existing regular file), what the error line says
    ("batched", ["--rounds", "0"], "--rounds must be >= 1; got 0"),
    ("batched", ["--warmup", "-1"], "--warmup must be >= 0; got -1"),
    ("batched", ["--smoke", "--out", "FILE"], "--out: FILE exists and is not a folder"),
    ("contention", ["--smoke", "--out", "FILE"], "--out: FILE exists and is not a folder"),
    ("overhead", ["--smoke", "--out", "FILE"], "--out: FILE exists and is not a folder"),
    ("scaling", ["--smoke", "--out", "FILE/sub"], "--out: FILE/sub cannot be made: FILE is not a folder"),
    ("wholerun", ["--smoke", "--out", "FILE"], "--out: FILE exists and is not a folder"),
    ("wholerun", ["--tag", "a/b"], "--tag is a word in the output names: at most 64 printable characters, no '/'"),
    ("batched", ["--tag", "a/b"], "--tag is a word in the output names: at most 64 printable characters, no '/'"),
    ("batched", ["--tag", "a\nb"], "at most 64 printable characters, no '/'; got 'a\\nb'"),  # a name with a newline
    ("batched", ["--tag", "a" * 300], "at most 64 characters; got 300"),  # pyarrow failed on it after the run
    ("batched", ["--seed", "-1"], "--seed must be >= 0; got -1"),  # fmlray refused it inside the run: tracebacks
    ("overhead", ["--seed", "-1"], "--seed must be >= 0; got -1"),
    ("scaling", ["--seed", "-1"], "--seed must be >= 0; got -1"),
    ("scaling", ["--base-actors", "0"], "--base-actors must be >= 1"),  # it ran the whole default sweep (audit 42)
    ("batched", ["--out", "/proc/bench"], "--out: /proc/bench cannot be written: nothing can be made in /proc"),
    ("moves", ["--points", "digits:0:0.5"], "'digits:0:0.5': clients must be >= 1"),
    ("moves", ["--points", "digits:20:2"], "'digits:20:2': fraction must be in (0, 1]"),
    ("moves", ["--points", "synthetic:40:0.5,nope:20:0.5"], "'nope:20:0.5': dataset must be one of"),
    ("moves", ["--points", "digits:20"], "'digits:20' is not a comma-separated list of points"),
    ("moves", ["--rounds", "0"], "--rounds must be >= 1; got 0"),
    ("moves", ["--smoke", "--out", "FILE"], "--out: FILE exists and is not a folder"),
    ("state_scale", ["--clients", "10", "--rounds", "1"], "--clients: each count must be >= --per-round (50)"),
    ("state_scale", ["--clients", "0"], "--clients: each count must be >= --per-round (50)"),
    ("state_scale", ["--clients", "100", "--per-round", "0"], "--per-round must be >= 1; got 0"),
    ("state_scale", ["--rounds", "0"], "--rounds must be >= 1; got 0"),
    ("state_scale", ["--rounds", "1"], "--rounds must be >= 2 with --resume-check"),
    ("state_scale", ["--resume-check", "10"], "--resume-check: each count must be >= --per-round (50)"),
    ("state_scale", ["--quick", "--per-round", "200"], "--clients: each count must be >= --per-round (200)"),
    ("state_scale", ["--against", "no-such-commit-xyz"], "--against: 'no-such-commit-xyz' is not a commit"),
    ("state_scale", ["--out", "FILE"], "--out: FILE exists and is not a folder"),
    ("sweeps", ["--rounds", "0"], "--rounds must be >= 1; got 0"),
    ("sweeps", ["--seeds", "0"], "--seeds must be >= 1; got 0"),
    ("sweeps", ["--epochs", "0"], "--epochs must be >= 1; got 0"),
    ("sweeps", ["--out", "FILE"], "--out: FILE exists and is not a folder"),
    ("plain_fml", ["--rounds", "0"], "--rounds must be >= 1; got 0"),
    ("gpu_check", ["bench", "--models", "nope", "--cpu-dry-run"], "--models: unknown nope; choose from mlp,"),
    ("gpu_check", ["bench", "--algorithms", "fml,nope"], "--algorithms: unknown nope; choose from fml,"),
    ("gpu_check", ["bench", "--rounds", "0"], "--rounds must be >= 1; got 0"),
    ("gpu_check", ["bench", "--warmup", "-1"], "--warmup must be >= 0; got -1"),
    ("gpu_check", ["bench", "--train-samples", "-1"], "--train-samples must be >= 0; got -1"),
    ("gpu_check", ["bench", "--fractions", "1,0"], "--fractions: each share must be in (0, 1]; got 0"),
    ("gpu_check", ["bench", "--fractions", "1.5"], "--fractions: each share must be in (0, 1]; got 1.5"),
    ("gpu_check", ["bench", "--budget-s", "0"], "--budget-s must be > 0; got 0"),
    ("gpu_check", ["check", "--cpu-dry-run", "--smoke", "--out", "FILE"], "--out: FILE exists and is not a folder"),
    ("gpu_state_check", ["--device", "nope"], "--device must be a CUDA device, cuda:N; got 'nope'"),
    ("gpu_state_check", ["--device", "cpu"], "--device must be a CUDA device, cuda:N; got 'cpu'"),
]


@pytest.mark.parametrize("script, argv, says", BAD, ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD])
def test_a_bad_argument_is_refused_at_parse_time_naming_the_option(capsys, a_file, script, argv, says):
    argv = [a.replace("FILE", str(a_file)) for a in argv]
    assert says.replace("FILE", str(a_file)) in refusal(capsys, script, argv)


def test_good_arguments_parse_and_make_nothing(tmp_path):
    out = tmp_path / "out"
    assert importlib.import_module("batched").parse_args(["--smoke", "--out", str(out)]).rounds == 5
    assert importlib.import_module("moves").parse_args(["--points", "digits:20:0.5,fmnist:20:1"]).points == [
        ("digits", 20, 0.5), ("fmnist", 20, 1.0)]
    quick = importlib.import_module("state_scale").parse_args(["--quick", "--out", str(out)])
    assert (quick.clients, quick.rounds, quick.resume_check) == ([100, 1000], 3, [100])
    assert importlib.import_module("state_scale").parse_args(["--rounds", "1", "--resume-check", ""]).rounds == 1
    assert importlib.import_module("sweeps").parse_args(["--out", str(out)]).seeds == 1
    assert importlib.import_module("wholerun").parse_args(["--smoke", "--out", str(out)]).variant == "smoke"
    assert importlib.import_module("plain_fml").parse_args(["--rounds", "1"]).rounds == 1
    gpu_check = importlib.import_module("gpu_check")
    argv = ["bench", "--check-args", "--cpu-dry-run", "--out", str(out), "--models", "lenet5", "--fractions", "1,0.25"]
    assert gpu_check.main(argv) == 0  # --check-args: checked, nothing run
    assert not out.exists()


def test_two_records_claimed_at_once_or_with_glob_characters_get_two_names(tmp_path):
    # two runs started together both found the name free and wrote one record; a tag "run[2]" never matched itself
    import benchlib
    first = benchlib.result_stem("batched", "clients", "", tmp_path)
    assert benchlib.result_stem("batched", "clients", "", tmp_path) == f"{first}-2"  # claimed by the first call
    tagged = benchlib.result_stem("batched", "clients", "run[2]", tmp_path)
    assert "run[2]" in tagged and benchlib.result_stem("batched", "clients", "run[2]", tmp_path) == f"{tagged}-2"
    assert "has not finished" in (tmp_path / f"{first}.md").read_text()  # what a run that died leaves


def test_a_setting_fmlray_refuses_is_one_line_and_exit_2():
    # a DataError raised while the script built its configs was a traceback
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "overhead.py"), "--smoke", "--workload", "digits",
                           "--max-train-samples", "30", "--ways", "serial", "--algorithms", "fedavg", "--out",
                           str(REPO / "no-such-out")], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("overhead.py: error: fmlray refuses the run these options make: cannot give 20 clients")
    assert not (REPO / "no-such-out").exists()


def test_gpu_check_sh_never_replaces_a_record(tmp_path):
    # run twice into one folder, it replaced all 7 files (run.log emptied within seconds of the second start)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.log").write_text("an earlier check")
    proc = gpu_check_sh("--cpu-dry-run", "--smoke", "--out", str(out))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"gpu_check.sh: {out} holds an earlier record (env.txt, run.log, gpu-check.json, gpu-bench.*); give another --out"]
    assert [p.name for p in out.iterdir()] == ["run.log"] and (out / "run.log").read_text() == "an earlier check"


@pytest.mark.parametrize("argv, held", [(["check"], "gpu-check.json"),
                                         (["check", "--precision", "default"], "gpu-check-tf32.json"),
                                         (["bench"], "gpu-bench.parquet")])
def test_gpu_check_py_run_by_hand_never_replaces_its_own_record(capsys, tmp_path, argv, held):
    # gpu_check.sh gives each run an empty folder; gpu_check.py run by hand wrote its fixed names over a record
    (tmp_path / held).write_text("an earlier record")
    says = refusal(capsys, "gpu_check", [*argv, "--cpu-dry-run", "--out", str(tmp_path)])
    assert says == f"--out: {tmp_path} already holds {held} from an earlier run; give another folder"
    assert (tmp_path / held).read_text() == "an earlier record"
    # --check-args says so too (it passed them, exit 0, and the run then refused; audit 42)
    says = refusal(capsys, "gpu_check", [*argv, "--cpu-dry-run", "--check-args", "--out", str(tmp_path)])
    assert says == f"--out: {tmp_path} already holds {held} from an earlier run; give another folder"
    other = "gpu-bench.md" if argv[0] == "check" else "gpu-check.json"  # another step's file: the script's next step
    (tmp_path / held).unlink()
    (tmp_path / other).write_text("")
    assert importlib.import_module("gpu_check").parse_args([*argv, "--cpu-dry-run", "--out", str(tmp_path)])


def test_gpu_state_check_without_cuda_says_so_in_one_line(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is usable here")
    with pytest.raises(SystemExit) as stop:
        importlib.import_module("gpu_state_check").parse_args([])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.strip().count("\n") == 0 and "no CUDA device is usable here" in err, err


def gpu_check_sh(*argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHON": sys.executable}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("argv", [["--out"], ["--cpu-dry-run", "--out", "--smoke"], ["--out="]])
def test_gpu_check_sh_refuses_out_without_a_folder_in_one_line(argv):
    proc = gpu_check_sh(*argv, timeout=30)
    assert proc.returncode == 2 and proc.stderr == "gpu_check.sh: --out needs a folder\n" and not proc.stdout, proc


def test_gpu_check_sh_checks_the_bench_options_before_step_one(tmp_path):
    # it ran the whole check step first, and only then step 2 refused --rounds abc
    out = tmp_path / "out"
    proc = gpu_check_sh("--cpu-dry-run", "--smoke", "--out", str(out), "--rounds", "abc")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith("argument --rounds: invalid int value: 'abc'")
    assert not proc.stdout and not out.exists()  # no environment report, no check, no folder
