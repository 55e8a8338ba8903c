#!/usr/bin/env bash
# The GPU run: install without network, run the test suite on CUDA (compiled kernels), and
# benchmark the step. Every stage runs even if an earlier one failed; their exit codes are
# in OUTDIR/status.txt. Usage (on the GPU machine, from the repository root):
#     bash benchmarks/gpu_suite.sh OUTDIR
set -u
out=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$out"
: > "$out/status.txt"
stage() {  # stage NAME COMMAND...: run, log to OUTDIR/NAME.log, record the exit code
    local name=$1; shift
    echo "== $name: $*"
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name $rc" >> "$out/status.txt"
    tail -n 25 "$out/$name.log"
}
stage device nvidia-smi
stage install pip install --no-deps --no-build-isolation -e .
stage tests python -m pytest -q -x tests/
stage bench_bf16 python benchmarks/bench_step.py --dtype bfloat16 --out "$out/step_cuda.csv"
stage bench_fp32_quick python benchmarks/bench_step.py --quick --out "$out/step_cuda.csv"
cat "$out/status.txt"
