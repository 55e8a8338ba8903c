"""Benchmark of one Linear Alignment step: linalign's backends against the authors' step.

As a script (prints a table of medians and speed ratios measured side by side in one run,
and appends one row per measurement to a CSV under benchmarks/results/):

    python benchmarks/bench_step.py                  # B in {1, 8, 64}, V in {32000, 49152, 128256}
    python benchmarks/bench_step.py --quick          # B = 8, V = 49152 only
    python benchmarks/bench_step.py --quick --steepness 1.0,1.0   # flat rows
    python benchmarks/bench_step.py --report benchmarks/results/step_cpu.csv  # as markdown
    python benchmarks/bench_step.py --grid --out step_cuda.csv --time-limit 140   # the GPU grid
    python benchmarks/bench_step.py --summary step_cuda.csv   # the grid's summary table again
    python benchmarks/bench_step.py --host-overhead           # a call's own Python cost
    python benchmarks/bench_step.py --variants      # kl mode, K = 2 and 3 principles vs K = 1

As pytest-benchmark tests (CPU grid: B = 1 and 8, V = 49152):

    pytest benchmarks/bench_step.py --benchmark-enable

Inputs: synthetic Zipf-like rows (linalign.testing.two_branch), drawn so that a 0.8
nucleus at T = 0.5 holds 3 to about 450 tokens, like real next-token rows; never uniform
noise. Settings: the authors' HH step (r = 3, T = 0.5, top_p = 0.8), greedy and sampled.
Providers: "torch" (linalign's torch path), "reference" (linalign.reference, a per-row
loop), "authors" (the authors' sort-based step, linalign.authors); on a GPU also "triton"
(the fused kernel, ``check=False``: no host sync, the mode for CUDA graphs) and
"reference-compiled" (``torch.compile(linalign.reference.vectorized_step, dynamic=True)``:
the reference's algorithm batched and sort-based, which the compiler takes as one graph;
its sampling uniforms are drawn once per batch size, outside the timed call).
CPU timings: torch threads fixed (default 1), median of at least 5 runs and 0.5 s after one
warm-up run; spread = interquartile range. GPU timings: triton.testing.do_bench medians,
spread = interquartile range. do_bench (triton 3.6) zeroes a 256 MB buffer before every
timed run, which evicts the 50 MB L2, so every run reads its logits from HBM: no rotation of
input buffers is needed.

--grid (for the GPU): B in {1, 8, 32, 64, 256} x V in {32000, 128256, 152064, 262144} x
--dtypes (default bfloat16,float32) x {greedy, sample}; providers triton, triton-graph (the
same call captured once in a CUDA graph and timed by replay: the launches' device time
without Python's), authors (eager), reference-compiled and torch. Short do_bench (warm-up 5 ms, 20 ms of runs) to keep the
whole grid near two minutes on an H100. "torch" (tens of host-synchronising kernels, ms per
call on a GPU) runs only where B * V <= 64 * 128256; the per-row "reference" does not run in
the grid (about 1 ms per row on a GPU). Rows: a pool of 64 rows per V drawn once (seed V) in
fp32 and cast to each dtype; B = 256 repeats the pool four times (rows are independent, and
L2 is flushed between runs). torch.compile compiles one graph per (dtype, mode, B == 1 or
not): 8 graphs for the default grid, each timed as its first call and reported. Every CSV
row carries ``floor_us``, the bandwidth floor ``2 * B * V * bytes / 3.0e12`` s (both
branches read once at the H100's measured 3.0 TB/s). The summary table, printed last (and
by --summary), gives per (dtype, mode, B, V): triton us, triton-graph us, floor us,
triton-graph / floor, authors / triton and reference-compiled / triton. --time-limit stops starting new (B, V)
cells after that many seconds (the cells left out are listed) so the summary is still
printed under an outer cap.
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
          "floor_us", "device", "threads", "versions", "date"]  # floor_us: added with --grid
GRID_B = (1, 8, 32, 64, 256)
GRID_V = (32000, 128256, 152064, 262144)
GRID_PROVIDERS = ("triton", "triton-graph", "authors", "reference-compiled", "torch")
TORCH_MAX_BV = 64 * 128256  # the grid times "torch" only up to this B * V (ms per call on a GPU)
POOL = 64  # distinct rows per V in the grid
HBM_BYTES_PER_S = 3.0e12  # the H100's measured device-to-device bandwidth (PLATFORM.md)


def floor_us(B, V, dtype):
    """The bandwidth floor of one step: both branches read once from HBM."""
    return 2 * B * V * torch.empty((), dtype=dtype).element_size() / HBM_BYTES_PER_S * 1e6


def compiled_reference():
    """``torch.compile(vectorized_step, dynamic=True)`` as a provider; its uniforms (those of
    ``seed=0``, what the other providers draw) are made once per (B, device), untimed."""
    from linalign.random import row_uniforms
    from linalign.reference import vectorized_step

    dyn = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # 8 graphs in the grid: above the
        if hasattr(dyn, name):                           # default limit of 8, fall to eager
            setattr(dyn, name, max(getattr(dyn, name), 64))
    compiled = torch.compile(vectorized_step, dynamic=True)
    uniforms = {}

    def fn(zp, z0, mode):
        key = (zp.shape[0], zp.device)
        if key not in uniforms:
            uniforms[key] = row_uniforms(zp.shape[0], zp.device, seed=0)
        return compiled(zp, z0, SETTING["ratio"], SETTING["temperature"], SETTING["top_p"],
                        greedy=(mode == "greedy"), u=uniforms[key])
    return fn


def graphed_triton(greedy_kw):
    """linalign's step captured in a CUDA graph (check=False, the seed a device tensor), timed
    by replay: the device time of its launches without Python's launch overhead. One graph
    is kept (the latest cell's); compile and autotune happen before the capture."""
    graphs = {}

    def fn(zp, z0, mode):
        key = (zp.data_ptr(), z0.data_ptr(), tuple(zp.shape), zp.dtype, mode)
        if key not in graphs:
            seed = torch.zeros((), dtype=torch.int64, device=zp.device)

            def once():
                return linalign.step(zp, z0, backend="triton", seed=seed, check=False,
                                     **greedy_kw(mode))
            once()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                once()
            graphs.clear()
            graphs[key] = g
        graphs[key].replay()
    return fn


def providers(device, grid=False):
    """name -> fn(zp, z0, mode). The default table: torch, reference, authors (and on a GPU
    triton and reference-compiled); the grid's: GRID_PROVIDERS that run on ``device``."""
    greedy_kw = lambda mode: dict(SETTING, greedy=(mode == "greedy"))  # noqa: E731
    table = {
        "torch": lambda zp, z0, mode: linalign.step(zp, z0, backend="torch", seed=0,
                                                    **greedy_kw(mode)),
        "reference": lambda zp, z0, mode: linalign.step(zp, z0, backend="reference", seed=0,
                                                        **greedy_kw(mode)),
        "authors": lambda zp, z0, mode: authors_step(zp, z0, **greedy_kw(mode)),
    }
    if device.type == "cuda":
        table["triton"] = lambda zp, z0, mode: linalign.step(zp, z0, backend="triton", seed=0,
                                                             check=False, **greedy_kw(mode))
        if grid:
            table["triton-graph"] = graphed_triton(greedy_kw)
    if device.type == "cuda" or grid:  # compiles on first call (inductor; on a CPU, C++)
        table["reference-compiled"] = compiled_reference()
    if grid:
        table = {name: table[name] for name in GRID_PROVIDERS if name in table}
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


def time_gpu(fn, warmup=25, rep=100):
    import triton.testing

    lo, med, hi = triton.testing.do_bench(fn, warmup=warmup, rep=rep,
                                          quantiles=[0.25, 0.5, 0.75])
    return med, hi - lo


def time_gpu_short(fn):
    return time_gpu(fn, warmup=5, rep=20)


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


def open_csv(out_csv):
    """The CSV to append to, as a DictWriter; a file written before a column was added to
    FIELDS is rewritten once with the current header (the new columns left empty)."""
    os.makedirs(os.path.dirname(os.path.abspath(out_csv)), exist_ok=True)
    if os.path.exists(out_csv) and os.path.getsize(out_csv):
        with open(out_csv, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != FIELDS:
                old = list(reader)
                with open(out_csv, "w", newline="") as g:
                    w = csv.DictWriter(g, fieldnames=FIELDS, extrasaction="ignore")
                    w.writeheader()
                    w.writerows(old)
        f = open(out_csv, "a", newline="")
        return f, csv.DictWriter(f, fieldnames=FIELDS)
    f = open(out_csv, "w", newline="")
    w = csv.DictWriter(f, fieldnames=FIELDS)
    w.writeheader()
    return f, w


def run_info(device, threads):
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return dict(device=device_name(device), threads=threads, versions=versions(), date=stamp)


def run(sizes, modes, device, threads, out_csv, dtype=torch.float32, steepness=(1.2, 2.0)):
    torch.set_num_threads(threads)
    table = providers(device)
    timer = time_gpu if device.type == "cuda" else time_cpu
    rows = []
    info = run_info(device, threads)
    print(f"# {info['device']}, {threads} torch thread(s), {info['versions']}")
    header = f"{'B':>4} {'V':>7} {'mode':>6} " + " ".join(f"{p:>17}" for p in table)
    base = "triton" if "triton" in table else "torch"  # the fastest linalign path here
    print(header + f"   authors/{base}  reference/{base}")
    f, w = open_csv(out_csv)
    with f:  # rows written as measured: a cut run keeps them
        for B, V in sizes:
            rows += _measure_size(B, V, modes, table, timer, info, device, dtype, steepness)
            w.writerows(rows[-len(modes) * len(table):])
            f.flush()
    print(f"# {len(rows)} rows appended to {out_csv}")
    return rows


def _row(B, V, dtype, steepness, mode, provider, m, s, info):
    return dict(op="step", B=B, V=V, dtype=str(dtype).replace("torch.", ""),
                rows=f"zipf {steepness[0]}-{steepness[1]}", mode=mode, provider=provider,
                median_ms=f"{m:.4f}", spread_ms=f"{s:.4f}",
                floor_us=f"{floor_us(B, V, dtype):.3f}", **info)


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
            rows.append(_row(B, V, dtype, steepness, mode, name, m, s, info))
        base = "triton" if "triton" in med else "torch"
        ratios = f"{med['authors'] / med[base]:>14.1f}x {med['reference'] / med[base]:>15.1f}x"
        print(f"{B:>4} {V:>7} {mode:>6} " + " ".join(f"{med[p]:>14.3f} ms" for p in table)
              + "   " + ratios)
        sys.stdout.flush()
    return rows


def run_grid(Bs, Vs, dtypes, modes, device, threads, out_csv, steepness=(1.2, 2.0),
             names=None, time_limit=None):
    """The --grid run (see the module docstring); returns the rows, then prints the summary."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    table = providers(device, grid=True)
    if names:
        table = {n: fn for n, fn in table.items() if n in names}
    timer = time_gpu_short if device.type == "cuda" else time_cpu
    info = run_info(device, threads)
    print(f"# {info['device']}, {threads} torch thread(s), {info['versions']}")
    print(f"# grid: B {list(Bs)} x V {list(Vs)} x {[str(d)[6:] for d in dtypes]} x "
          f"{list(modes)}; providers {list(table)}; 'torch' only for B * V <= {TORCH_MAX_BV}")
    print(f"{'dtype':>8} {'mode':>6} {'B':>4} {'V':>7} "
          + " ".join(f"{n + ' us':>22}" for n in table))
    rows, skipped, compile_s, failed = [], [], {}, {}
    pools = {}
    f, w = open_csv(out_csv)
    with f:
        for dtype in dtypes:
            for V in Vs:
                if V not in pools:  # drawn once per V in fp32, on the CPU
                    pools[V] = two_branch(min(POOL, max(Bs)), V, seed=V, steepness=steepness,
                                          temperature=SETTING["temperature"])
                for B in Bs:
                    if time_limit is not None and time.perf_counter() - start > time_limit:
                        skipped.append((dtype, B, V))
                        continue
                    reps = -(-B // pools[V][0].shape[0])
                    zp, z0 = (x.repeat(reps, 1)[:B].to(device=device, dtype=dtype)
                              .contiguous() for x in pools[V])
                    for mode in modes:
                        cells = []
                        for name, fn in table.items():
                            if (name == "torch" and B * V > TORCH_MAX_BV) or name in failed:
                                cells.append(f"{'-':>22}")
                                continue
                            try:
                                if name == "reference-compiled":
                                    key = (str(dtype)[6:], mode, "B=1" if B == 1 else "B>1")
                                    if key not in compile_s:  # the first call compiles
                                        t = time.perf_counter()
                                        fn(zp, z0, mode)
                                        if device.type == "cuda":
                                            torch.cuda.synchronize()
                                        compile_s[key] = time.perf_counter() - t
                                m, s = timer(lambda: fn(zp, z0, mode))
                            except Exception as e:  # a baseline that breaks (e.g. inductor)
                                failed[name] = f"{type(e).__name__} at {B}x{V} {mode}: " + \
                                    (str(e).splitlines() or [""])[0][:200]
                                print(f"# {name} failed, left out from here on: {failed[name]}")
                                cells.append(f"{'failed':>22}")
                                continue
                            row = _row(B, V, dtype, steepness, mode, name, m, s, info)
                            rows.append(row)
                            w.writerow(row)
                            cells.append(f"{m * 1e3:>22.1f}")
                        f.flush()
                        print(f"{str(dtype)[6:]:>8} {mode:>6} {B:>4} {V:>7} " + " ".join(cells))
                        sys.stdout.flush()
                    del zp, z0
    print(f"# {len(rows)} rows written to {out_csv} in {time.perf_counter() - start:.0f} s")
    if compile_s:
        print(f"# reference-compiled: {len(compile_s)} graphs compiled, first calls took "
              + ", ".join(f"{'/'.join(k)} {v:.1f} s" for k, v in compile_s.items()))
    for name, why in failed.items():
        print(f"# {name}: failed ({why})")
    if skipped:
        print(f"# --time-limit {time_limit} s reached: {len(skipped)} (dtype, B, V) cells not "
              "run: " + ", ".join(f"{str(d)[6:]} {B}x{V}" for d, B, V in skipped))
    print()
    summary(rows)
    return rows


def _latest(csv_path):
    """The rows of the latest run (latest date) in a results CSV; missing columns are ''."""
    with open(csv_path, newline="") as f:
        every = [{k: (r.get(k) or "") for k in FIELDS} for r in csv.DictReader(f)]
    if not every:
        return []
    latest = max(r["date"] for r in every)
    return [r for r in every if r["date"] == latest]


def summary(rows):
    """The grid's summary table (markdown): per (dtype, mode, B, V) the triton step time,
    the bandwidth floor and the speed ratios."""
    cells = {}
    for r in rows:
        key = (r["dtype"], r["mode"], int(r["B"]), int(r["V"]))
        cells.setdefault(key, {})[r["provider"]] = float(r["median_ms"]) * 1e3
        dtype = getattr(torch, r["dtype"], None) if r["dtype"] else None
        fl = r.get("floor_us") or (floor_us(int(r["B"]), int(r["V"]), dtype) if dtype else "")
        if fl != "":
            cells[key]["floor"] = float(fl)
    if not cells:
        print("(no rows)")
        return
    if rows[0].get("device"):
        print(f"Step time, {rows[0]['device']}, {rows[0].get('versions', '')}, "
              f"{rows[0].get('date', '')}; floor = 2 B V bytes / 3.0 TB/s\n")
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    ratio = lambda a, b: None if a is None or b is None else a / b  # noqa: E731
    print("| dtype | mode | B | V | triton (us) | triton in a CUDA graph (us) | floor (us) "
          "| graph / floor | authors / triton | reference-compiled / triton |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    order = lambda k: (k[0], k[1], k[3], k[2])  # noqa: E731
    for (dtype, mode, B, V) in sorted(cells, key=order):
        c = cells[(dtype, mode, B, V)]
        t = c.get("triton")
        tg = c.get("triton-graph")
        print(f"| {dtype} | {mode} | {B} | {V} | {fmt(t, '.1f')} | {fmt(tg, '.1f')} "
              f"| {fmt(c.get('floor'), '.2f')} | {fmt(ratio(tg, c.get('floor')), '.1f')} "
              f"| {fmt(ratio(c.get('authors'), t), '.1f')} "
              f"| {fmt(ratio(c.get('reference-compiled'), t), '.1f')} |")
    sys.stdout.flush()


def report(csv_path):
    """Markdown tables of a results CSV: for each kind of rows, its latest run. Older CSVs
    (without floor_us, say) read the same; missing columns are left out."""
    with open(csv_path, newline="") as f:
        every = [{k: (r.get(k) or "") for k in FIELDS} for r in csv.DictReader(f)]
    for kind in dict.fromkeys(r["rows"] for r in every):
        rows = [r for r in every if r["rows"] == kind]
        latest = max(r["date"] for r in rows)
        rows = [r for r in rows if r["date"] == latest]
        names = list(dict.fromkeys(r["provider"] for r in rows))
        cells = {}
        for r in rows:
            key = (r["dtype"], int(r["B"]), int(r["V"]), r["mode"])
            cells.setdefault(key, {})[r["provider"]] = float(r["median_ms"])
        print(f"{kind} rows; {rows[0]['device']}, {rows[0]['threads']} thread(s), "
              f"{rows[0]['versions']}, {latest}\n")
        base = "triton" if "triton" in names else "torch"
        print("| dtype | B | V | mode | " + " | ".join(f"{n} (ms)" for n in names) +
              f" | authors / {base} |")
        print("|---" * (5 + len(names)) + "|")
        for (dtype, B, V, mode), med in sorted(cells.items()):
            vals = " | ".join(f"{med[n]:.2f}" if n in med else "-" for n in names)
            rat = (f"{med['authors'] / med[base]:.1f}x" if "authors" in med and base in med
                   else "-")
            print(f"| {dtype or '?'} | {B} | {V} | {mode} | {vals} | {rat} |")
        print()


def host_overhead(calls=2000):
    """The fixed Python cost of a step (argument checks, parameter tensors, workspace,
    launch arguments), without the launches themselves (replaced by no-ops) or Triton's own
    launcher cost. Runs anywhere (CPU tensors)."""
    import linalign.kernels.step as ks

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    names = ["la_max_kernel", "la_ladder_kernel", "la_compact_kernel", "la_step_tuned",
             "la_step_kernel"]
    saved = {n: getattr(ks, n) for n in names}
    zp, z0 = two_branch(1, 32000, seed=0)
    try:
        for n in names:
            setattr(ks, n, NoLaunch())
        cases = [
            ("linalign.step (checks, then kernels.la_step)",
             lambda: linalign.step(zp, z0, **SETTING, seed=0, check=False, backend="triton")),
            ("kernels.la_step, fused (1 launch)",
             lambda: ks.la_step(zp, z0, 3.0, 0.5, 0.8, greedy=False, seed=0, split=1)),
            ("kernels.la_step, split (4 launches)",
             lambda: ks.la_step(zp, z0, 3.0, 0.5, 0.8, greedy=False, seed=0, split=4)),
        ]
        for label, f in cases:
            for _ in range(100):
                f()
            t = time.perf_counter()
            for _ in range(calls):
                f()
            print(f"{label}: {(time.perf_counter() - t) / calls * 1e6:.0f} us per call")
    finally:
        for n, k in saved.items():
            setattr(ks, n, k)


VARIANTS = ("K=1", "kl", "K=2", "K=3")  # --variants: what each costs against K = 1


def variant_calls(zp, z0, backend, seed, greedy, extra):
    """name -> zero-argument call of the step in each variant of issue 6, on the same rows:
    the fixed-ratio step (K = 1), kl mode (budget 1 nat, default cap), and K = 2 and 3
    principles (the extra principle branches ``extra``, stacked once outside the timed
    call, as a decoder's [K, B, V] logits view would be)."""
    kw = dict(temperature=SETTING["temperature"], top_p=SETTING["top_p"], greedy=greedy,
              seed=seed, backend=backend, check=False)
    stacks = {K: torch.stack([zp, *extra[:K - 1]]) for K in (2, 3)}
    return {
        "K=1": lambda: linalign.step(zp, z0, ratio=SETTING["ratio"], **kw),
        "kl": lambda: linalign.step(zp, z0, kl_budget=1.0, **kw),
        "K=2": lambda: linalign.step(stacks[2], z0, ratio=[SETTING["ratio"]] * 2, **kw),
        "K=3": lambda: linalign.step(stacks[3], z0, ratio=[SETTING["ratio"]] * 3, **kw),
    }


def _graphed(call):
    """``call`` captured once in a CUDA graph; returns the replay (GPU only)."""
    call()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call()
    return g.replay


def run_variants(sizes, device, threads, out_csv, dtype=torch.float32, modes=("greedy",)):
    """--variants: kl mode and K = 2, 3 principles against the K = 1 step, side by side on
    the same rows and backend (CPU: torch; GPU: triton eagerly and as a CUDA-graph replay).
    Prints medians and the ratio to K = 1; appends rows with op "step-<variant>"."""
    torch.set_num_threads(threads)
    info = run_info(device, threads)
    gpu = device.type == "cuda"
    timer = time_gpu if gpu else time_cpu
    providers_ = ("triton", "triton-graph") if gpu else ("torch",)
    print(f"# {info['device']}, {threads} torch thread(s), {info['versions']}")
    print(f"{'B':>4} {'V':>7} {'mode':>6} {'provider':>13} " +
          " ".join(f"{v:>10}" for v in VARIANTS) + "   " +
          " ".join(f"{v + '/K=1':>9}" for v in VARIANTS[1:]))
    rows = []
    f, w = open_csv(out_csv)
    with f:
        for B, V in sizes:
            zp, z0 = two_branch(B, V, seed=B * 7 + V, temperature=SETTING["temperature"],
                                device=device, dtype=dtype)
            g = torch.Generator().manual_seed(V)
            extra = [(zp.float().cpu() + 0.3 * torch.randn(B, V, generator=g)).to(device, dtype)
                     for _ in range(2)]
            seed = torch.zeros((), dtype=torch.int64, device=device) if gpu else 0
            for mode in modes:
                calls = variant_calls(zp, z0, "triton" if gpu else "torch", seed,
                                      mode == "greedy", extra)
                for prov in providers_:
                    med = {}
                    for name, call in calls.items():
                        fn = _graphed(call) if prov == "triton-graph" else call
                        m, sp = timer(fn)
                        med[name] = m
                        row = _row(B, V, dtype, (1.2, 2.0), mode, prov, m, sp, info)
                        row["op"] = f"step-{name}"
                        rows.append(row)
                        w.writerow(row)
                    f.flush()
                    print(f"{B:>4} {V:>7} {mode:>6} {prov:>13} " +
                          " ".join(f"{med[v] * 1e3:>7.1f} us" for v in VARIANTS) + "   " +
                          " ".join(f"{med[v] / med['K=1']:>8.2f}x" for v in VARIANTS[1:]))
                    sys.stdout.flush()
    print(f"# {len(rows)} rows appended to {out_csv}")
    return rows


def _ints(text):
    return tuple(int(x) for x in text.split(","))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only B = 8, V = 49152")
    ap.add_argument("--grid", action="store_true", help="the GPU grid: B in "
                    f"{set(GRID_B)} x V in {set(GRID_V)} x --dtypes x greedy/sample, "
                    "short do_bench, summary table last")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="logits dtype without --grid")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="logits dtypes with --grid "
                    "(default bfloat16,float32)")
    ap.add_argument("--B", type=_ints, default=GRID_B, help="batch sizes with --grid")
    ap.add_argument("--V", type=_ints, default=GRID_V, help="vocabulary sizes with --grid")
    ap.add_argument("--providers", default=None, help="with --grid: only these (comma list "
                    f"out of {','.join(GRID_PROVIDERS)})")
    ap.add_argument("--time-limit", type=float, default=None, metavar="S", help="with "
                    "--grid: start no new (B, V) cell after S seconds (then print the summary)")
    ap.add_argument("--out", default=None, help="CSV to append to (default: "
                    "benchmarks/results/step_<device>.csv)")
    ap.add_argument("--steepness", default="1.2,2.0", help="Zipf steepness range of the rows "
                    "(default 1.2,2.0: a 0.8 nucleus of 3 to ~450 tokens; 1.0,1.0: flat rows)")
    ap.add_argument("--report", metavar="CSV", help="print the latest run in CSV as a "
                    "markdown table and exit")
    ap.add_argument("--host-overhead", action="store_true", help="time the Python cost of one "
                    "linalign.step call on the triton backend with the kernel launches "
                    "replaced by no-ops (CPU tensors, B = 1, V = 32000) and exit")
    ap.add_argument("--summary", metavar="CSV", help="print the summary table of the latest "
                    "run in CSV (triton against the floor and the baselines) and exit")
    ap.add_argument("--variants", action="store_true", help="kl mode and K = 2, 3 "
                    "principles against the K = 1 step, side by side (B in --B, default "
                    "1,8,64 on a GPU and 1,8 on a CPU; V = 49152 and 128256)")
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report)
    if args.host_overhead:
        return host_overhead()
    if args.summary:
        return summary(_latest(args.summary))
    device = torch.device(args.device)
    out = args.out or os.path.join(RESULTS, f"step_{device.type}.csv")
    steep = tuple(float(x) for x in args.steepness.split(","))
    if args.variants:
        Bs = args.B if args.B != GRID_B else ((1, 8, 64) if device.type == "cuda" else (1, 8))
        Vs = args.V if args.V != GRID_V else (49152, 128256)
        return run_variants([(B, V) for V in Vs for B in Bs], device, args.threads, out,
                            getattr(torch, args.dtype))
    if args.grid:
        dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
        names = args.providers.split(",") if args.providers else None
        return run_grid(args.B, args.V, dtypes, ("greedy", "sample"), device, args.threads,
                        out, steep, names, args.time_limit)
    sizes = [(8, 49152)] if args.quick else [(B, V) for V in (32000, 49152, 128256)
                                             for B in (1, 8, 64)]
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
