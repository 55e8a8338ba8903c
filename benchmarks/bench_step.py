"""Benchmark of one Linear Alignment step: linalign's backends against the authors' step.

As a script (prints a table of medians and speed ratios measured side by side in one run,
and appends one row per measurement to a CSV under benchmarks/results/):

    python benchmarks/bench_step.py                  # B in {1, 8, 64}, V in {32000, 49152, 128256}
    python benchmarks/bench_step.py --quick          # B = 8, V = 49152 only
    python benchmarks/bench_step.py --quick --steepness 1.0,1.0   # flat rows
    python benchmarks/bench_step.py --report benchmarks/results/step_cpu.csv  # as markdown

As pytest-benchmark tests (CPU grid: B = 1 and 8, V = 49152):

    pytest benchmarks/bench_step.py --benchmark-enable

Inputs: synthetic Zipf-like rows (linalign.testing.two_branch), drawn so that a 0.8
nucleus at T = 0.5 holds 3 to about 450 tokens, like real next-token rows; never uniform
noise. Settings: the authors' HH step (r = 3, T = 0.5, top_p = 0.8), greedy and sampled.
Providers: "torch" (linalign's torch path), "reference" (linalign.reference, a per-row
loop), "authors" (the authors' sort-based step, linalign.authors); on a GPU also "triton"
(the fused kernel) and "authors-compiled" (torch.compile of the authors' step, the
vectorised form of the reference that the compiler can take whole).
CPU timings: torch threads fixed (default 1), median of at least 5 runs and 0.5 s after one
warm-up run; spread = interquartile range. GPU timings: triton.testing.do_bench medians.
"""
import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time

import torch

import linalign
from linalign.authors import authors_step
from linalign.testing import two_branch

SETTING = dict(ratio=3.0, temperature=0.5, top_p=0.8)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FIELDS = ["op", "B", "V", "dtype", "rows", "mode", "provider", "median_ms", "spread_ms",
          "device", "threads", "versions", "date"]


def providers(device):
    greedy_kw = lambda mode: dict(SETTING, greedy=(mode == "greedy"))  # noqa: E731
    table = {
        "torch": lambda zp, z0, mode: linalign.step(zp, z0, backend="torch", seed=0,
                                                    **greedy_kw(mode)),
        "reference": lambda zp, z0, mode: linalign.step(zp, z0, backend="reference", seed=0,
                                                        **greedy_kw(mode)),
        "authors": lambda zp, z0, mode: authors_step(zp, z0, **greedy_kw(mode)),
    }
    if device.type == "cuda":
        compiled = torch.compile(authors_step, dynamic=True)
        table["triton"] = lambda zp, z0, mode: linalign.step(zp, z0, backend="triton", seed=0,
                                                             **greedy_kw(mode))
        table["authors-compiled"] = lambda zp, z0, mode: compiled(zp, z0, **greedy_kw(mode))
    return table


def time_cpu(fn, min_runs=5, min_seconds=0.5, max_runs=50):
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < min_seconds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    q = statistics.quantiles(times, n=4)
    return statistics.median(times) * 1e3, (q[2] - q[0]) * 1e3


def time_gpu(fn):
    import triton

    lo, med, hi = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.25, 0.5, 0.75])
    return med, hi - lo


def versions():
    import importlib.metadata as md

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"linalign {linalign.__version__}"]
    try:
        parts.append(f"triton {md.version('triton')}")
    except md.PackageNotFoundError:
        pass
    return "; ".join(parts)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def run(sizes, modes, device, threads, out_csv, dtype=torch.float32, steepness=(1.2, 2.0)):
    torch.set_num_threads(threads)
    table = providers(device)
    timer = time_gpu if device.type == "cuda" else time_cpu
    rows = []
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info = dict(device=device_name(device), threads=threads, versions=versions(), date=stamp)
    print(f"# {info['device']}, {threads} torch thread(s), {info['versions']}")
    header = f"{'B':>4} {'V':>7} {'mode':>6} " + " ".join(f"{p:>17}" for p in table)
    base = "triton" if "triton" in table else "torch"  # the fastest linalign path here
    print(header + f"   authors/{base}  reference/{base}")
    os.makedirs(os.path.dirname(os.path.abspath(out_csv)), exist_ok=True)
    new = not os.path.exists(out_csv)
    with open(out_csv, "a", newline="") as f:  # rows written as measured: a cut run keeps them
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for B, V in sizes:
            rows += _measure_size(B, V, modes, table, timer, info, device, dtype, steepness)
            w.writerows(rows[-len(modes) * len(table):])
            f.flush()
    print(f"# {len(rows)} rows appended to {out_csv}")
    return rows


def _measure_size(B, V, modes, table, timer, info, device, dtype, steepness):
    """One (B, V): every mode and provider on the same rows; prints a line per mode."""
    rows = []
    zp, z0 = two_branch(B, V, seed=B * 7 + V, temperature=SETTING["temperature"],
                        steepness=steepness, device=device, dtype=dtype)
    for mode in modes:
        med = {}
        for name, fn in table.items():
            m, s = timer(lambda: fn(zp, z0, mode))
            med[name] = m
            rows.append(dict(op="step", B=B, V=V, dtype=str(dtype).replace("torch.", ""),
                             rows=f"zipf {steepness[0]}-{steepness[1]}", mode=mode,
                             provider=name, median_ms=f"{m:.4f}", spread_ms=f"{s:.4f}",
                             **info))
        base = "triton" if "triton" in med else "torch"
        ratios = f"{med['authors'] / med[base]:>14.1f}x {med['reference'] / med[base]:>15.1f}x"
        print(f"{B:>4} {V:>7} {mode:>6} " + " ".join(f"{med[p]:>14.3f} ms" for p in table)
              + "   " + ratios)
        sys.stdout.flush()
    return rows


def report(csv_path):
    """Markdown tables of a results CSV: for each kind of rows, its latest run."""
    with open(csv_path) as f:
        every = list(csv.DictReader(f))
    for kind in dict.fromkeys(r["rows"] for r in every):
        rows = [r for r in every if r["rows"] == kind]
        latest = max(r["date"] for r in rows)
        rows = [r for r in rows if r["date"] == latest]
        names = list(dict.fromkeys(r["provider"] for r in rows))
        cells = {}
        for r in rows:
            key = (int(r["B"]), int(r["V"]), r["mode"])
            cells.setdefault(key, {})[r["provider"]] = float(r["median_ms"])
        print(f"{kind} rows; {rows[0]['device']}, {rows[0]['threads']} thread(s), "
              f"{rows[0]['versions']}, {latest}\n")
        base = "triton" if "triton" in names else "torch"
        print("| B | V | mode | " + " | ".join(f"{n} (ms)" for n in names) +
              f" | authors / {base} |")
        print("|---" * (4 + len(names)) + "|")
        for (B, V, mode), med in sorted(cells.items()):
            print(f"| {B} | {V} | {mode} | " + " | ".join(f"{med[n]:.2f}" for n in names)
                  + f" | {med['authors'] / med[base]:.1f}x |")
        print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only B = 8, V = 49152")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default=None, help="CSV to append to (default: "
                    "benchmarks/results/step_<device>.csv)")
    ap.add_argument("--steepness", default="1.2,2.0", help="Zipf steepness range of the rows "
                    "(default 1.2,2.0: a 0.8 nucleus of 3 to ~450 tokens; 1.0,1.0: flat rows)")
    ap.add_argument("--report", metavar="CSV", help="print the latest run in CSV as a "
                    "markdown table and exit")
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report)
    device = torch.device(args.device)
    sizes = [(8, 49152)] if args.quick else [(B, V) for V in (32000, 49152, 128256)
                                             for B in (1, 8, 64)]
    out = args.out or os.path.join(RESULTS, f"step_{device.type}.csv")
    steep = tuple(float(x) for x in args.steepness.split(","))
    run(sizes, ("greedy", "sample"), device, args.threads, out, getattr(torch, args.dtype), steep)


# ---- pytest-benchmark entry points (CPU grid) ----
try:
    import pytest
except ImportError:  # running as a script without the test extra
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("provider", ["torch", "authors"])
    @pytest.mark.parametrize("B", [1, 8])
    @pytest.mark.parametrize("mode", ["greedy", "sample"])
    def test_step_benchmark(benchmark, provider, B, mode):
        torch.set_num_threads(1)
        device = torch.device("cpu")
        zp, z0 = two_branch(B, 49152, seed=B, temperature=SETTING["temperature"])
        fn = providers(device)[provider]
        benchmark.extra_info.update(B=B, V=49152, mode=mode, threads=1)
        benchmark(fn, zp, z0, mode)


if __name__ == "__main__":
    main()
