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
