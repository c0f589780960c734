#!/usr/bin/env bash
# fmlray on a real CUDA GPU: the fractional-GPU checks, then the GPU benchmark (benchmarks/gpu_check.py).
#
#   benchmarks/gpu_check.sh [--cpu-dry-run [--smoke]] [--out DIR] [bench options, e.g. --data-root DIR --rounds 3]
#
# DIR (default: $OUT if set, else benchmarks/results/gpu-check-<date>, or -2, -3, ... after that day's first;
# a DIR given must not hold an earlier record: it is refused) gets env.txt, run.log,
# gpu-check.json, gpu-check-tf32.json and gpu-bench.{md,json,parquet,png} (8 files; 7 with --smoke).
# Exits non-zero when a check fails,
# when the benchmark fails, or when there is no CUDA GPU (unless --cpu-dry-run, which runs
# everything on the CPU with a logical Ray GPU and skips the CUDA asserts: it tests the script).
# Set PYTHON to choose the interpreter (default python3); fmlray must be importable with it.
set -u -o pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
dry=()
smoke=()
out=${OUT:-$repo/benchmarks/results/gpu-check-$(date +%F)}
given=${OUT:+1}
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-dry-run) dry=(--cpu-dry-run); shift ;;
        --smoke) smoke=(--smoke); shift ;;  # with --cpu-dry-run: CI's size (gpu_check.py --help)
        --out|--out=*)
            if [ "$1" = --out ]; then out=${2-}; shift $(( $# > 1 ? 2 : 1 )); else out=${1#--out=}; shift; fi
            case $out in ""|-*) echo "gpu_check.sh: --out needs a folder" >&2; exit 2 ;; esac
            given=1 ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;  # the header above, before anything is made
        *) break ;;
    esac
done
case $out in /*) ;; *) out=$PWD/$out ;; esac  # as given, before the cd below
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export FMLRAY_READY_TIMEOUT_S=${FMLRAY_READY_TIMEOUT_S:-90}  # actors that cannot be placed fail in 90 s, not 180
cd "$repo" || exit 2
# every option checked before step 1 (argparse's usage and one line, exit 2); another failure (fmlray not
# importable, say) is left to the environment report below, which names every missing piece
checked=$("$py" benchmarks/gpu_check.py bench --check-args "${dry[@]}" "${smoke[@]}" --out "$out" "$@" 2>&1)
if [ $? -eq 2 ]; then
    echo "$checked" >&2
    exit 2
fi
# a record is never replaced: the default folder takes -2, -3, ... after a day's first; a given one must hold none
held() {
    local f
    for f in "$1"/env.txt "$1"/run.log "$1"/gpu-check*.json "$1"/gpu-bench.*; do [ -e "$f" ] && return 0; done
    return 1
}
if [ -z "$given" ]; then
    base=$out; n=1
    while held "$out"; do n=$((n + 1)); out=$base-$n; done
elif held "$out"; then
    echo "gpu_check.sh: $out holds an earlier record (env.txt, run.log, gpu-check.json, gpu-bench.*); give another --out" >&2
    exit 2
fi
mkdir -p "$out"

{
    echo "== $(date -u +%FT%TZ) $(uname -srm)"
    nvidia-smi || echo "nvidia-smi: not found"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) x $(nproc)"
    free -g | head -2
    "$py" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "ray", "numpy", "pyarrow", "sklearn", "tomli_w", "jsonschema", "fmlray"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} {getattr(m, '__file__', '')}")
    except Exception as exc:  # report every missing piece at once, then fail below
        print(f"{name}: IMPORT FAILED: {exc!r}")
import torch
print("cuda available", torch.cuda.is_available(), "torch cuda", torch.version.cuda,
      "devices", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
PY
} 2>&1 | tee "$out/env.txt"
env_rc=$?
if grep -q "IMPORT FAILED" "$out/env.txt" || [ $env_rc -ne 0 ]; then
    echo "gpu_check.sh: the environment is incomplete (see $out/env.txt)" >&2
    exit 2
fi

log=$out/run.log
: > "$log"
# 1. the asserted checks, in fp32 (TF32 off in every actor)
"$py" benchmarks/gpu_check.py check "${dry[@]}" "${smoke[@]}" --out "$out" 2>&1 | tee -a "$log"
check_rc=$?
# 2. the benchmark, at torch's default precision (what a user's run gets)
"$py" benchmarks/gpu_check.py bench "${dry[@]}" "${smoke[@]}" --out "$out" "$@" 2>&1 | tee -a "$log"
bench_rc=$?
# 3. how far cuDNN's default TF32 convolutions move the models from the CPU (reported; looser tolerance)
if [ ${#smoke[@]} -eq 0 ]; then
    "$py" benchmarks/gpu_check.py check --precision default "${dry[@]}" --out "$out" 2>&1 | tee -a "$log"
    tf32_rc=$?
else  # CI's dry run: TF32 means nothing on a CPU, and step 1 ran the same code
    echo "gpu_check.sh: --smoke: step 3 (TF32 report) left out" | tee -a "$log"
    tf32_rc=0
fi
echo "gpu_check.sh: check exit $check_rc, bench exit $bench_rc, TF32 check exit $tf32_rc; results in $out" | tee -a "$log"
[ $check_rc -eq 0 ] && [ $bench_rc -eq 0 ] && [ $tf32_rc -eq 0 ]
