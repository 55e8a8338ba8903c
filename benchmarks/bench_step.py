"""Benchmark of one Linear Alignment step: linalign's backends against the authors' step.

As a script (prints medians and speed ratios measured side by side in one run, and appends
one row per measurement to a results CSV, benchmarks/common.py's schema):

    python benchmarks/bench_step.py                  # B in {1, 8, 64}, V in {32000, 49152, 128256}
    python benchmarks/bench_step.py --quick          # B = 8, V = 49152 only
    python benchmarks/bench_step.py --quick --steepness 1.0,1.0   # flat rows
    python benchmarks/bench_step.py --report benchmarks/results/step_cpu.csv  # the README's tables
    python benchmarks/bench_step.py --grid --out step_cuda.csv --time-limit 140   # the GPU grid
    python benchmarks/bench_step.py --host-overhead           # a call's own Python cost
    python benchmarks/bench_step.py --variants      # kl mode, K = 2 and 3 principles vs K = 1

As pytest-benchmark tests (CPU: B = 1 and 8, V = 49152; and a short check of the harness):

    pytest benchmarks/bench_step.py --benchmark-enable

Inputs: synthetic Zipf-like rows (linalign.testing.two_branch), drawn so that a 0.8
nucleus at T = 0.5 holds 3 to about 450 tokens, like real next-token rows; never uniform
noise. Settings: the authors' HH step, ratio 3, T = 0.5, top_p = 0.8, given explicitly
(the library's default ratio is 1.0, linalign.options.DEFAULT_RATIO; these benchmarks
compare against the authors' setting), greedy and sampled. Providers: "torch" (linalign's
torch path), "reference" (linalign.reference, a per-row loop), "authors" (the authors'
sort-based step, linalign.baselines.authors_step); on a GPU also "triton" (the fused
kernel, ``check=False``: no host sync, the mode for CUDA graphs) and "reference-compiled"
(``torch.compile(linalign.baselines.vectorized_step, dynamic=True)``: the reference's
algorithm batched and sort-based, which the compiler takes as one graph; its sampling
uniforms are drawn once per batch size, outside the timed call). Before timing, the default
run checks every provider's greedy tokens against the reference's (the authors' step may
differ only where a row has a tie: bf16 rows have many) and prints the result.
CPU timings: torch threads fixed (default 1), median of at least 5 runs and 0.5 s after one
warm-up run; spread = interquartile range (common.median_spread). GPU timings:
triton.testing.do_bench medians and quartiles. do_bench (triton 3.6) zeroes a 256 MB buffer
before every timed run, which evicts the 50 MB L2, so every run reads its logits from HBM:
no rotation of input buffers is needed.

--grid (for the GPU): B in {1, 8, 32, 64, 256} x V in {32000, 128256, 152064, 262144} x
--dtypes (default bfloat16,float32) x {greedy, sample}; providers triton, triton-graph (the
same call captured once in a CUDA graph and timed by replay: the launches' device time
without Python's), authors (eager), reference-compiled and torch. Short do_bench (warm-up
5 ms, 20 ms of runs). "torch" (tens of host-synchronising kernels, ms per call on a GPU)
runs only where B * V <= 64 * 128256; the per-row "reference" does not run in the grid
(about 1 ms per row on a GPU). Rows: a pool of 64 rows per V drawn once (seed V) in fp32
and cast to each dtype; B = 256 repeats the pool four times (rows are independent, and L2
is flushed between runs). torch.compile compiles one graph per (dtype, mode, B == 1 or
not), each timed as its first call and reported; a baseline that fails is left out from
then on, with its error printed. --time-limit stops starting new (B, V) cells after that
many seconds (the cells left out are listed). The run ends with its --report table: per
(dtype, B, V, mode) the providers' times in microseconds, the bandwidth floor
``2 * B * V * bytes / 3.0 TB/s`` (both branches read once at an H100's measured
device-to-device bandwidth; common.floor_us) and the speed ratios.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linalign  # noqa: E402
from linalign.baselines import authors_step  # noqa: E402
from linalign.testing import two_branch  # noqa: E402
import common  # noqa: E402

SETTING = dict(ratio=3.0, temperature=0.5, top_p=0.8)  # the authors' HH setting, explicit
GRID_B = (1, 8, 32, 64, 256)
GRID_V = (32000, 128256, 152064, 262144)
GRID_PROVIDERS = ("triton", "triton-graph", "authors", "reference-compiled", "torch")
TORCH_MAX_BV = 64 * 128256  # the grid times "torch" only up to this B * V (ms per call on a GPU)
POOL = 64  # distinct rows per V in the grid
# Column order of the reports: linalign's paths first, then the baselines.
ORDER = ("triton", "triton-graph", "torch", "reference", "authors", "reference-compiled",
         "authors-compiled")
VARIANTS = ("K1", "kl", "K2", "K3")  # --variants: what each costs against K = 1


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------- providers
def compiled_reference():
    """``torch.compile(vectorized_step, dynamic=True)`` as a provider; its uniforms (those of
    ``seed=0``, what the other providers draw) are made once per (B, device), untimed."""
    from linalign.baselines import vectorized_step
    from linalign.random import row_uniforms

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
    is kept (the latest cell's); the kernels compile before the capture."""
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


def tokens_of(out):
    """The token ids a provider returned (None for a graph replay)."""
    if out is None or isinstance(out, torch.Tensor):
        return out
    return out.tokens if hasattr(out, "tokens") else out[0]


def check_greedy(table, zp, z0):
    """Every provider's greedy tokens against the reference's (the torch path's without
    one): {provider: rows that differ}, providers returning no tokens left out."""
    toks = {name: tokens_of(fn(zp, z0, "greedy")) for name, fn in table.items()}
    toks = {name: t.cpu() for name, t in toks.items() if t is not None}
    base = "reference" if "reference" in toks else next(iter(toks))
    return {name: (t != toks[base]).nonzero().flatten().tolist() for name, t in toks.items()
            if name != base}, base


def greedy_line(diffs, base, B):
    same = [n for n, rows in diffs.items() if not rows]
    text = f"# greedy tokens: {', '.join(same) or 'none'} = {base} on all {B} rows"
    for name, rows in diffs.items():
        if rows:
            text += f"; {name} differs on rows {rows[:8]}" + (
                " (a tie in the row: the authors keep one of tied tokens)"
                if name == "authors" else " (unexpected)")
    return text


# ---------------------------------------------------------------------------- the default run
def step_case(B, V, dtype, mode, steepness, variant=None):
    case = dict(B=B, V=V, dtype=dtype_name(dtype), mode=mode,
                rows=f"zipf {steepness[0]}-{steepness[1]}")
    if variant is not None:
        case["variant"] = variant
    return case


def run(sizes, modes, device, threads, out_csv, dtype=torch.float32, steepness=(1.2, 2.0),
        timer=None):
    """The default table: every provider on the same rows, per (B, V); returns the Results
    written to ``out_csv`` (appended as each size is measured)."""
    torch.set_num_threads(threads)
    table = providers(device)
    timer = timer or (common.time_gpu if device.type == "cuda" else common.time_cpu)
    info = common.run_info(device, threads)
    print(f"# {info['device']}, {threads} torch thread(s), {info['versions']}, "
          f"commit {info['commit']}")
    base = "triton" if "triton" in table else "torch"  # the fastest linalign path here
    print(f"{'B':>4} {'V':>7} {'mode':>6} " + " ".join(f"{p:>17}" for p in table) +
          f"   authors/{base}  reference/{base}")
    results = []
    for B, V in sizes:
        zp, z0 = two_branch(B, V, seed=B * 7 + V, temperature=SETTING["temperature"],
                            steepness=steepness, device=device, dtype=dtype)
        print(greedy_line(*check_greedy(table, zp, z0), B))
        rows = _measure_size(zp, z0, modes, table, timer, info, steepness)
        common.write_results(out_csv, rows)
        results += rows
    print(f"# {len(results)} rows appended to {out_csv}")
    return results


def _measure_size(zp, z0, modes, table, timer, info, steepness):
    """One (B, V): every mode and provider on the same rows; prints a line per mode."""
    (B, V), rows = zp.shape, []
    for mode in modes:
        med = {}
        for name, fn in table.items():
            m, s = timer(lambda: fn(zp, z0, mode))
            med[name] = m
            rows.append(common.make_result(
                "step", step_case(B, V, zp.dtype, mode, steepness), name, m, s, info))
        base = "triton" if "triton" in med else "torch"
        ratios = f"{med['authors'] / med[base]:>14.1f}x {med['reference'] / med[base]:>15.1f}x"
        print(f"{B:>4} {V:>7} {mode:>6} " + " ".join(f"{med[p]:>14.3f} ms" for p in table)
              + "   " + ratios)
        sys.stdout.flush()
    return rows


# ---------------------------------------------------------------------------- the GPU grid
class Grid:
    """The --grid run's state: providers, timer, compile times, failures, cells left out."""

    def __init__(self, device, threads, names):
        self.table = providers(device, grid=True)
        if names:
            self.table = {n: fn for n, fn in self.table.items() if n in names}
        self.device = device
        self.timer = (lambda fn: common.time_gpu(fn, warmup=5, rep=20)) \
            if device.type == "cuda" else common.time_cpu
        self.info = common.run_info(device, threads)
        self.compile_s, self.failed, self.skipped = {}, {}, []

    def time(self, name, fn, zp, z0, mode):
        """(median, spread) in ms, or None where the provider does not run or failed."""
        B, V = zp.shape
        if (name == "torch" and B * V > TORCH_MAX_BV) or name in self.failed:
            return None
        try:
            if name == "reference-compiled":
                key = (dtype_name(zp.dtype), mode, "B=1" if B == 1 else "B>1")
                if key not in self.compile_s:  # the first call compiles
                    t = time.perf_counter()
                    fn(zp, z0, mode)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    self.compile_s[key] = time.perf_counter() - t
            return self.timer(lambda: fn(zp, z0, mode))
        except Exception as e:  # a baseline that breaks (e.g. inductor) is left out
            self.failed[name] = f"{type(e).__name__} at {B}x{V} {mode}: " + \
                (str(e).splitlines() or [""])[0][:200]
            print(f"# {name} failed, left out from here on: {self.failed[name]}")
            return None

    def cell(self, zp, z0, mode, steepness):
        """Every provider on one (dtype, B, V, mode); prints its line, returns its Results."""
        (B, V), rows, cells = zp.shape, [], []
        for name, fn in self.table.items():
            got = self.time(name, fn, zp, z0, mode)
            cells.append(f"{'-' if got is None else f'{got[0] * 1e3:.1f}':>22}")
            if got is not None:
                rows.append(common.make_result(
                    "step", step_case(B, V, zp.dtype, mode, steepness), name, *got,
                    self.info))
        print(f"{dtype_name(zp.dtype):>8} {mode:>6} {B:>4} {V:>7} " + " ".join(cells))
        sys.stdout.flush()
        return rows

    def notes(self, time_limit):
        if self.compile_s:
            print(f"# reference-compiled: {len(self.compile_s)} graphs compiled, first calls "
                  "took " + ", ".join(f"{'/'.join(k)} {v:.1f} s"
                                      for k, v in self.compile_s.items()))
        for name, why in self.failed.items():
            print(f"# {name}: failed ({why})")
        if self.skipped:
            print(f"# --time-limit {time_limit} s reached: {len(self.skipped)} (dtype, B, V) "
                  "cells not run: " + ", ".join(f"{dtype_name(d)} {B}x{V}"
                                                for d, B, V in self.skipped))


def run_grid(Bs, Vs, dtypes, modes, device, threads, out_csv, steepness=(1.2, 2.0),
             names=None, time_limit=None):
    """The --grid run (see the module docstring); returns its Results, then prints its
    report table."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    grid = Grid(device, threads, names)
    print(f"# {grid.info['device']}, {threads} torch thread(s), {grid.info['versions']}, "
          f"commit {grid.info['commit']}")
    print(f"# grid: B {list(Bs)} x V {list(Vs)} x {[dtype_name(d) for d in dtypes]} x "
          f"{list(modes)}; providers {list(grid.table)}; 'torch' only for B * V <= "
          f"{TORCH_MAX_BV}")
    print(f"{'dtype':>8} {'mode':>6} {'B':>4} {'V':>7} "
          + " ".join(f"{n + ' us':>22}" for n in grid.table))
    results, pools = [], {}
    for dtype in dtypes:
        for V in Vs:
            if V not in pools:  # drawn once per V in fp32, on the CPU
                pools[V] = two_branch(min(POOL, max(Bs)), V, seed=V, steepness=steepness,
                                      temperature=SETTING["temperature"])
            for B in Bs:
                if time_limit is not None and time.perf_counter() - start > time_limit:
                    grid.skipped.append((dtype, B, V))
                    continue
                reps = -(-B // pools[V][0].shape[0])
                zp, z0 = (x.repeat(reps, 1)[:B].to(device=device, dtype=dtype).contiguous()
                          for x in pools[V])
                for mode in modes:
                    rows = grid.cell(zp, z0, mode, steepness)
                    common.write_results(out_csv, rows)
                    results += rows
                del zp, z0
    print(f"# {len(results)} rows written to {out_csv} in "
          f"{time.perf_counter() - start:.0f} s")
    grid.notes(time_limit)
    print()
    print(report(out_csv))
    return results


# ---------------------------------------------------------------------------- reports
def _fmt_us(x):
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _ratio(a, b, digits=1, suffix="x"):
    return "-" if a is None or b is None else f"{a / b:.{digits}f}{suffix}"


def step_table(path, run):
    """A run of the step (not --variants) as the README shows it: the caption, then per
    (dtype, B, V, mode) each provider's median; on a GPU (triton rows) in microseconds with
    the bandwidth floor, else in milliseconds."""
    names = sorted({r.provider for r in run},
                   key=lambda p: (ORDER.index(p) if p in ORDER else len(ORDER), p))
    gpu = any(n.startswith("triton") for n in names)
    unit, scale = ("us", 1e3) if gpu else ("ms", 1.0)
    dtypes = sorted({r.case["dtype"] for r in run})
    cells = {}
    for r in run:
        c = r.case
        key = (c["dtype"], int(c["B"]), int(c["V"]), c["mode"])
        cells.setdefault(key, {})[r.provider] = r.median * scale
    base = "triton" if gpu else "torch"
    ratios = [("authors", base)] + ([("authors", "triton-graph")]
                                    if "triton-graph" in names else [])
    ratios = [(a, b) for a, b in ratios if a in names and b in names]
    header = (["dtype"] if len(dtypes) > 1 else []) + ["B", "V", "mode"] + \
        [f"{n} ({unit})" for n in names] + (["floor (us)"] if gpu else []) + \
        (["triton-graph / floor"] if "triton-graph" in names else []) + \
        [f"{a} / {b}" for a, b in ratios]
    lines = []
    for (dtype, B, V, mode), med in sorted(cells.items()):
        floor = common.floor_us(B, V, dtype)
        lines.append((([dtype] if len(dtypes) > 1 else []) + [B, V, mode] +
                      [(_fmt_us(med[n]) if gpu else f"{med[n]:.2f}") if n in med else "-"
                       for n in names] + ([_fmt_us(floor)] if gpu else []) +
                      ([_ratio(med.get("triton-graph"), floor)]
                       if "triton-graph" in names else []) +
                      [_ratio(med.get(a), med.get(b)) for a, b in ratios]))
    what = (f"{'Microseconds' if gpu else 'Milliseconds'} per step (median); ratio "
            f"{SETTING['ratio']:g}, T {SETTING['temperature']}, top-p {SETTING['top_p']}; "
            f"rows {run[0].case['rows']}" + (f", {dtypes[0]}" if len(dtypes) == 1 else "") +
            ("; floor 2 B V bytes / 3.0 TB/s." if gpu else "."))
    return common.caption(path, run, what) + "\n\n" + common.markdown_table(header, lines)


def variants_table(path, run):
    """A --variants run: per (B, V, mode, provider) the step's median in each variant and
    its ratio to K1 (one principle, a fixed ratio)."""
    gpu = any(r.provider.startswith("triton") for r in run)
    unit, scale = ("us", 1e3) if gpu else ("ms", 1.0)
    cells = {}
    for r in run:
        c = r.case
        key = (int(c["B"]), int(c["V"]), c["mode"], ORDER.index(r.provider), r.provider)
        cells.setdefault(key, {})[c["variant"]] = r.median * scale
    fmt = _fmt_us if gpu else (lambda x: f"{x:.2f}")
    header = ["B", "V", "mode", "provider"] + [f"{v} ({unit})" for v in VARIANTS] + \
        [f"{v} / K1" for v in VARIANTS[1:]]
    lines = [[B, V, mode, prov] + [fmt(med[v]) if v in med else "-" for v in VARIANTS] +
             [_ratio(med.get(v), med.get("K1"), 2, "") for v in VARIANTS[1:]]
             for (B, V, mode, _, prov), med in sorted(cells.items())]
    what = (f"One step in kl mode (kl: budget 1 nat) and with 2 and 3 principles (K2, K3: "
            f"ratio {SETTING['ratio']:g} each) against one principle (K1); T "
            f"{SETTING['temperature']}, top-p {SETTING['top_p']}; "
            f"{'microseconds' if gpu else 'milliseconds'} per step (median); rows "
            f"{run[0].case['rows']}, {run[0].case['dtype']}.")
    return common.caption(path, run, what) + "\n\n" + common.markdown_table(header, lines)


def report_blocks(path):
    """The Markdown tables of a results CSV's step rows, as the README shows them: the
    latest run of each kind (rows drawn alike, --variants or not), each under a caption
    naming the file, the date and the commit. One string (caption and table) per run."""
    results = common.read_results(path, bench="step")
    if not results:
        raise SystemExit(f"{path}: no step rows")
    runs = common.latest_runs(results, kind=lambda r: (r.case["rows"], "variant" in r.case))
    return [variants_table(path, run) if "variant" in run[0].case else step_table(path, run)
            for run in runs]


def report(path):
    return "\n\n".join(report_blocks(path))


# ---------------------------------------------------------------------------- other modes
def host_overhead(calls=2000):
    """The fixed Python cost of a step (argument checks, parameter tensors, workspace,
    launch arguments), without the launches themselves (replaced by no-ops) or Triton's own
    launcher cost. Runs anywhere (CPU tensors)."""
    import linalign.kernels.step as ks

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    names = ["la_chunk_kernel", "la_flat_kernel"]
    saved = {n: getattr(ks, n) for n in names}
    zp, z0 = two_branch(1, 32000, seed=0)
    try:
        for n in names:
            setattr(ks, n, NoLaunch())
        cases = [
            ("linalign.step (checks, then kernels.la_step)",
             lambda: linalign.step(zp, z0, **SETTING, seed=0, check=False, backend="triton")),
            ("kernels.la_step (2 launches)",
             lambda: ks.la_step(zp, z0, 3.0, 0.5, 0.8, greedy=False, seed=0)),
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


def variant_calls(zp, z0, backend, seed, greedy, extra):
    """name -> zero-argument call of the step in each variant, on the same rows: the
    fixed-ratio step (K1), kl mode (budget 1 nat, default cap), and K = 2 and 3 principles
    (the extra principle branches ``extra``, stacked once outside the timed call, as a
    decoder's [K, B, V] logits view would be)."""
    kw = dict(temperature=SETTING["temperature"], top_p=SETTING["top_p"], greedy=greedy,
              seed=seed, backend=backend, check=False)
    stacks = {K: torch.stack([zp, *extra[:K - 1]]) for K in (2, 3)}
    return {
        "K1": lambda: linalign.step(zp, z0, ratio=SETTING["ratio"], **kw),
        "kl": lambda: linalign.step(zp, z0, kl_budget=1.0, **kw),
        "K2": lambda: linalign.step(stacks[2], z0, ratio=[SETTING["ratio"]] * 2, **kw),
        "K3": lambda: linalign.step(stacks[3], z0, ratio=[SETTING["ratio"]] * 3, **kw),
    }


def _graphed(call):
    """``call`` captured once in a CUDA graph; returns the replay (GPU only)."""
    call()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call()
    return g.replay


def _variant_rows(B, V, device, dtype):
    """The rows of one (B, V) and two extra principle branches (the first plus 0.3 N(0, 1))."""
    zp, z0 = two_branch(B, V, seed=B * 7 + V, temperature=SETTING["temperature"],
                        device=device, dtype=dtype)
    g = torch.Generator().manual_seed(V)
    extra = [(zp.float().cpu() + 0.3 * torch.randn(B, V, generator=g)).to(device, dtype)
             for _ in range(2)]
    return zp, z0, extra


def run_variants(sizes, device, threads, out_csv, dtype=torch.float32, modes=("greedy",)):
    """--variants: kl mode and K = 2, 3 principles against the K = 1 step, side by side on
    the same rows and backend (CPU: torch; GPU: triton eagerly and as a CUDA-graph replay).
    Prints medians and the ratio to K = 1; appends rows with a ``variant`` in their case."""
    torch.set_num_threads(threads)
    info = common.run_info(device, threads)
    gpu = device.type == "cuda"
    timer = common.time_gpu if gpu else common.time_cpu
    print(f"# {info['device']}, {threads} torch thread(s), {info['versions']}, "
          f"commit {info['commit']}")
    print(f"{'B':>4} {'V':>7} {'mode':>6} {'provider':>13} " +
          " ".join(f"{v:>10}" for v in VARIANTS) + "   " +
          " ".join(f"{v + '/K1':>9}" for v in VARIANTS[1:]))
    results = []
    for B, V in sizes:
        zp, z0, extra = _variant_rows(B, V, device, dtype)
        seed = torch.zeros((), dtype=torch.int64, device=device) if gpu else 0
        for mode in modes:
            calls = variant_calls(zp, z0, "triton" if gpu else "torch", seed,
                                  mode == "greedy", extra)
            for prov in (("triton", "triton-graph") if gpu else ("torch",)):
                med, rows = {}, []
                for name, call in calls.items():
                    m, sp = timer(_graphed(call) if prov == "triton-graph" else call)
                    med[name] = m
                    rows.append(common.make_result(
                        "step", step_case(B, V, dtype, mode, (1.2, 2.0), name), prov, m, sp,
                        info))
                common.write_results(out_csv, rows)
                results += rows
                print(f"{B:>4} {V:>7} {mode:>6} {prov:>13} " +
                      " ".join(f"{med[v] * 1e3:>7.1f} us" for v in VARIANTS) + "   " +
                      " ".join(f"{med[v] / med['K1']:>8.2f}x" for v in VARIANTS[1:]))
                sys.stdout.flush()
    print(f"# {len(results)} rows appended to {out_csv}")
    return results


# ---------------------------------------------------------------------------- command
def _ints(text):
    return tuple(int(x) for x in text.split(","))


def parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only B = 8, V = 49152")
    ap.add_argument("--grid", action="store_true", help="the GPU grid: B in "
                    f"{set(GRID_B)} x V in {set(GRID_V)} x --dtypes x greedy/sample, "
                    "short do_bench, its report table last")
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
                    "--grid: start no new (B, V) cell after S seconds (then print the report)")
    ap.add_argument("--out", default=None, help="CSV to append to (default: "
                    "benchmarks/results/step_<device>.csv)")
    ap.add_argument("--steepness", default="1.2,2.0", help="Zipf steepness range of the rows "
                    "(default 1.2,2.0: a 0.8 nucleus of 3 to ~450 tokens; 1.0,1.0: flat rows)")
    ap.add_argument("--report", metavar="CSV", help="print the Markdown tables of the latest "
                    "runs in CSV (as the README shows them) and exit")
    ap.add_argument("--host-overhead", action="store_true", help="time the Python cost of one "
                    "linalign.step call on the triton backend with the kernel launches "
                    "replaced by no-ops (CPU tensors, B = 1, V = 32000) and exit")
    ap.add_argument("--variants", action="store_true", help="kl mode and K = 2, 3 "
                    "principles against the K = 1 step, side by side (B in --B, default "
                    "1,8,64 on a GPU and 1,8 on a CPU; V = 49152 and 128256)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    if args.report:
        return print(report(args.report))
    if args.host_overhead:
        return host_overhead()
    device = torch.device(args.device)
    out = args.out or os.path.join(common.RESULTS, f"step_{device.type}.csv")
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


# ---- pytest entry points (CPU) ----
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
        zp, z0 = two_branch(B, 49152, seed=B, temperature=SETTING["temperature"])
        fn = providers(torch.device("cpu"))[provider]
        benchmark.extra_info.update(B=B, V=49152, mode=mode, threads=1)
        benchmark(fn, zp, z0, mode)

    def test_step_harness(tmp_path, capsys):
        """The default run on small rows: every provider's greedy tokens equal the
        reference's, the rows it wrote read back equal through the one reader, and the
        report shows each measured median."""
        out = tmp_path / "step.csv"
        quick = lambda fn: common.time_cpu(fn, min_runs=2, min_seconds=0)  # noqa: E731
        rows = run([(3, 2000)], ("greedy", "sample"), torch.device("cpu"), 1, out,
                   timer=quick)
        printed = capsys.readouterr().out
        assert "# greedy tokens: torch, authors = reference on all 3 rows\n" in printed
        assert common.read_results(out) == rows
        assert [(r.provider, r.case["mode"]) for r in rows] == [
            (p, m) for m in ("greedy", "sample") for p in ("torch", "reference", "authors")]
        assert all(r.median > 0 and r.spread >= 0 and r.unit == "ms" for r in rows)
        text = report(out)
        assert " ".join(text.split()).startswith(
            f"`{out}`, {rows[0].date}, commit {rows[0].commit}: ")
        for r in rows:
            assert f"{r.median:.2f}" in text


if __name__ == "__main__":
    main()
