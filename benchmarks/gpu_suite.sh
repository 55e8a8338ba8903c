#!/usr/bin/env bash
# The GPU run: install without network, run the test suite on CUDA (compiled kernels, the
# decoding loop on the GPU), benchmark decoding (random-weight Llama 1B and 8B shapes, bf16)
# and the step (bench_step.py --grid: B x V x bf16/fp32 x greedy/sample, triton against the
# authors' step, the compiled reference and the torch path, OUTDIR/step_cuda.csv), plot it
# (OUTDIR/step_cuda.png), time each launch of the step kernel on its own with the rows'
# paths on benchmark rows and on flat ones (benchmarks/kernel_paths.py: OUTDIR/paths.log,
# OUTDIR/paths-flat.log) and print the step report table last (triton against the bandwidth
# floor and the baselines, as the README shows it). Every CSV is in the one results schema
# (benchmarks/common.py); `bench_step.py --report FILE` and `bench_decode.py --report FILE`
# print their tables again. The decode stage checks the providers' tokens after timing (one
# more, untimed run of the authors' loop per case) and exits with 1 when a check fails.
# Every stage runs even if an earlier one failed, each under a time cap; exit codes are in
# OUTDIR/status.txt (124: the cap was hit). On an H100 on 2026-11-26 the tests took about
# 2.3 minutes and the decode stage (then 4 providers, 3 repeats of 64 tokens) 2.5; the
# decode stage now runs 6 providers (eager and fast=True), 2 repeats of 32 tokens; the step
# grid stops starting new cells after 100 s (--time-limit).
# The caps add up to 9 minutes; the suite is meant to finish within 8 (not yet timed as a
# whole in this form; gpu_quick.sh is the 4-minute version). Usage (on the GPU machine, from
# the repository root):
#     bash benchmarks/gpu_suite.sh OUTDIR
# The GPU machine has no gguf and no model wheel, so the tests that need the embedded SmolLM2
# (marked embedded_model: tests/test_models.py, tests/test_golden.py, ...) run on CPU
# machines only.
set -u
out=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}
source "$(dirname "$0")/gpu_stages.sh"
stage device 10 nvidia-smi
install() {  # the interpreter's own pip (a bare `pip` may belong to another Python)
    python -m pip install --no-deps --no-build-isolation -e . &&
        (cd /tmp && python -c "import linalign.kernels, linalign; print(linalign.__file__)")
}
export -f install
stage install 40 bash -c install
pin_interpreter_numpy
stage tests 170 python -m pytest -q --maxfail=3 tests/ -m "not embedded_model"
stage decode 150 python benchmarks/bench_decode.py --device cuda --repeats 2 --new-tokens 32 \
    --out "$out/decode_cuda.csv"
stage step 130 python benchmarks/bench_step.py --grid --dtypes bfloat16,float32 \
    --time-limit 100 --out "$out/step_cuda.csv"
stage paths 60 python benchmarks/kernel_paths.py --B 1,8,64,256 --V 32000,128256 --reps 30
stage paths-flat 40 python benchmarks/kernel_paths.py --B 1,64 --V 128256 --steepness 1.0,1.2 \
    --top-p 0.95 --modes sample --reps 30
stage plot 30 python benchmarks/plot_step.py "$out/step_cuda.csv" "$out/step_cuda.png"
stage report 10 python benchmarks/bench_step.py --report "$out/step_cuda.csv"
cat "$out/status.txt"
echo "== step report ($out/report.log)"
cat "$out/report.log"
