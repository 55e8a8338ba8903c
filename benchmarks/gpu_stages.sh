# Sourced by gpu_suite.sh, gpu_quick.sh and gpu_variants.sh: `stage NAME SECONDS COMMAND...` runs a command
# under a time cap, logs it to $out/NAME.log, appends "NAME exit-code" to $out/status.txt
# (124: the cap was hit) and prints the log's tail. Needs $out set.
mkdir -p "$out"
: > "$out/status.txt"
export PYTHONUNBUFFERED=1
stage() {
    local name=$1 cap=$2; shift 2
    echo "== $name: $*"
    timeout "$cap" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name $rc" >> "$out/status.txt"
    tail -n 20 "$out/$name.log"
}

# Triton 3.6's interpreter needs numpy < 2.4 and the GPU machine's is newer: the test of the
# compiled kernel against the interpreter (tests/test_determinism.py) runs the interpreter
# with the numpy from wheels/ (benchmarks/gpu_wheels.sh downloads it here; carry wheels/ with
# the run), installed in a folder of its own, never over the machine's packages.
pin_interpreter_numpy() {
    local dir=/tmp/linalign-interpreter-numpy
    python -m pip install --no-deps --quiet --target "$dir" wheels/numpy-2.2.*.whl &&
        export LINALIGN_INTERPRETER_PATH="$dir"
}
