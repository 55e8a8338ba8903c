#!/usr/bin/env bash
# The GPU run: install without network, run the test suite on CUDA (compiled kernels, the
# decoding loop on the GPU), benchmark decoding (random-weight Llama 1B and 8B shapes, bf16)
# and the step. Every stage runs even if an earlier one failed, each under a time cap; exit
# codes are in OUTDIR/status.txt (124: the cap was hit). The caps add up to under 10
# minutes; on an H100 on 2026-11-26 the stages took about 2.3, 2.5 and 0.7 minutes. Usage (on
# the GPU machine, from the repository root):
#     bash benchmarks/gpu_suite.sh OUTDIR
# The GPU machine has no gguf and no model wheel, so tests/test_models.py (the embedded
# SmolLM2) runs on CPU machines only.
set -u
out=${1:?usage: bash benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$out"
: > "$out/status.txt"
export PYTHONUNBUFFERED=1
stage() {  # stage NAME SECONDS COMMAND...: run under a cap, log to OUTDIR/NAME.log
    local name=$1 cap=$2; shift 2
    echo "== $name: $*"
    timeout "$cap" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name $rc" >> "$out/status.txt"
    tail -n 20 "$out/$name.log"
}
stage device 10 nvidia-smi
install() {  # the interpreter's own pip (a bare `pip` may belong to another Python)
    python -m pip install --no-deps --no-build-isolation -e . &&
        (cd /tmp && python -c "import linalign.kernels, linalign; print(linalign.__file__)")
}
export -f install
stage install 40 bash -c install
stage tests 170 python -m pytest -q --maxfail=3 tests/ --ignore=tests/test_models.py
stage decode 220 python benchmarks/bench_decode.py --device cuda --repeats 3 \
    --out "$out/decode_cuda.csv"
stage step_bf16 140 python benchmarks/bench_step.py --dtype bfloat16 --out "$out/step_cuda.csv"
cat "$out/status.txt"
