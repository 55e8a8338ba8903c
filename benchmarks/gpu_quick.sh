#!/usr/bin/env bash
# A short GPU run (about 4 minutes) for when little device time is left: install, the step
# grid on bf16 (B in {1, 8, 64, 256}, V in {128256, 32000}; linalign's kernel eager and
# captured in a CUDA graph, against the authors' eager step), each launch of the kernel timed
# on its own with the rows' paths (benchmarks/kernel_paths.py), the CUDA-graph / no-sync tests,
# the decode benchmark on the 1B shape (plain and Linear Alignment, eager and fast=True),
# then the kernel's tests against the reference. Same stage/caps/status.txt conventions as
# gpu_suite.sh (the full run); the CSVs are in the one results schema
# (benchmarks/common.py), and `python benchmarks/bench_step.py --report OUTDIR/step_cuda.csv`
# (bench_decode.py for decode_cuda.csv) prints their tables. Usage: bash benchmarks/gpu_quick.sh OUTDIR
set -u
out=${1:?usage: bash benchmarks/gpu_quick.sh OUTDIR}
source "$(dirname "$0")/gpu_stages.sh"
stage install 25 python -m pip install --no-deps --no-build-isolation -e .
stage step 75 python benchmarks/bench_step.py --grid --dtypes bfloat16 --B 1,8,64,256 \
    --V 128256,32000 --providers triton,triton-graph,authors --time-limit 60 \
    --out "$out/step_cuda.csv"
stage paths 40 python benchmarks/kernel_paths.py --B 1,8,64,256 --V 128256 --modes sample \
    --reps 30
stage graph 40 python -m pytest -q -x tests/test_graph.py tests/test_penalties.py \
    -k "capture or zero_dim or captures_without_host_sync"
stage decode 55 python benchmarks/bench_decode.py --device cuda --shapes 1b --batch 1,8 \
    --repeats 1 --new-tokens 32 --providers plain,stacked,plain-fast,stacked-fast \
    --out "$out/decode_cuda.csv"
stage tests 40 python -m pytest -q -x tests/test_step.py -k "triton and (matches_reference or realistic or largest or hostile)"
cat "$out/status.txt"
