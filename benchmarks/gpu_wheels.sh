#!/usr/bin/env bash
# Wheels the GPU machine lacks, downloaded here (it has no network) into wheels/ (ignored by
# git; carry it to the GPU machine with the run). The GPU suite installs them into a folder
# of their own, never over the machine's packages:
#   numpy < 2.4 for Triton 3.6's interpreter, which tests/test_determinism.py runs in a
#   subprocess beside the compiled kernel (LINALIGN_INTERPRETER_PATH).
# Usage, from the repository root: bash benchmarks/gpu_wheels.sh
set -euo pipefail
mkdir -p wheels
python -m pip download "numpy==2.2.6" --python-version 3.12 --only-binary=:all: \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --no-deps -d wheels
