#!/usr/bin/env bash
# The GPU run for kl mode and several principles, plus the bf16 step grid of the
# current kernel. Two parts, each under the device tool's 10-minute limit per call:
#   bash benchmarks/gpu_variants.sh OUTDIR tests   # install; the tests of kl mode,
#       composition, graph capture and the Hugging Face integration on CUDA; the compiled
#       kernel against the interpreter (skipped where Triton 3.6 meets numpy >= 2.4)
#   bash benchmarks/gpu_variants.sh OUTDIR bench   # install; step variants (kl, K = 2, 3
#       against K = 1, eager and in a CUDA graph); decoding with the variants (random-weight
#       Llama 1B shape, bf16); the bf16 step grid with its report table last
# Same stage/caps/status.txt conventions as gpu_suite.sh. Timing on an H100 (2026-11-27):
# every new kernel variant compiles and autotunes once per process (several seconds each),
# which dominates: the first tries with caps of 100 s (tests), 70 s (variants) and 90 s
# (decode) were cut at a third to a half of their work; the caps below are sized from that
# and not yet verified whole.
set -u
out=${1:?usage: bash benchmarks/gpu_variants.sh OUTDIR tests|bench}
part=${2:?usage: bash benchmarks/gpu_variants.sh OUTDIR tests|bench}
source "$(dirname "$0")/gpu_stages.sh"
stage device 10 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
stage install 40 bash -c 'python -m pip install --no-deps --no-build-isolation -e . &&
    (cd /tmp && python -c "import linalign.kernels, linalign; print(linalign.__file__)")'
if [ "$part" = tests ]; then
    stage tests 420 python -m pytest -q -p no:cacheprovider tests/test_kl.py \
        tests/test_principles.py tests/test_graph.py tests/test_hf.py -k "not readme_example"
    pin_interpreter_numpy
    stage determinism 60 python -m pytest -q -p no:cacheprovider tests/test_determinism.py \
        -k compiled -rs
else
    stage variants 150 python benchmarks/bench_step.py --variants --B 1,8,64 \
        --V 49152,128256 --dtype bfloat16 --out "$out/step_variants_cuda.csv"
    stage decode 220 python benchmarks/bench_decode.py --device cuda --shapes 1b --batch 1,8 \
        --repeats 2 --new-tokens 32 --providers plain,stacked,plain-fast,stacked-fast \
        --variants --out "$out/decode_variants_cuda.csv"
    stage grid 120 python benchmarks/bench_step.py --grid --dtypes bfloat16 --B 1,8,64,256 \
        --V 128256,32000 --providers triton,triton-graph,authors,reference-compiled \
        --time-limit 90 --out "$out/step_cuda.csv"
    stage report 10 python benchmarks/bench_step.py --report "$out/step_cuda.csv"
fi
cat "$out/status.txt"
