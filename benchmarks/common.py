"""What the benchmarks share (bench_step.py, bench_decode.py, plot_step.py): the results
folder, what a run records about itself (device, versions, commit, date), the timing
helpers, and the one CSV schema of every results file, with its one writer
(``write_results``) and its one reader (``read_results``).

The schema: one row per measurement, the columns ``FIELDS``:

    bench, case, provider, median, spread, unit, device, threads, versions, commit, date

- ``bench``: what was timed. "step": one call of a Linear Alignment step (linalign's or a
  baseline's; bench_step.py); "decode": a decoding loop's throughput (bench_decode.py);
  "prefill": the same loop's prefill forward.
- ``case``: what it was timed on, ``key=value;key=value`` (values hold neither ";" nor
  "="). step: B, V, dtype, mode (greedy or sample), rows (the synthetic rows' Zipf
  steepness range) and, for ``--variants``, variant (K1, kl, K2, K3). decode and prefill:
  model, B, new_tokens, and in rows written since this schema dtype and repeats. Rows
  migrated from the earlier per-script files carry no key they did not record, and their
  decode rows say ``spread=range`` (see ``spread``).
- ``provider``: who did the work: torch, triton, triton-graph, reference, authors, ...
  (step); plain, stacked, two-caches, authors, *-fast, kl, K2, K3 (decode).
- ``median``, ``spread``: the median of the timed runs and their spread, in ``unit``. The
  spread is the interquartile range (``median_spread``; on a GPU, ``do_bench``'s
  quartiles); the migrated decode rows (``spread=range``) hold max - min over their runs,
  and the migrated prefill rows hold no spread (empty).
- ``unit``: "ms" (step), "tokens/s" (decode), "s" (prefill).
- ``device``, ``threads``, ``versions``: the machine, the torch threads, and the versions
  of python, torch, linalign and triton.
- ``commit``: ``git rev-parse --short HEAD`` of the measured tree, with "-dirty" when
  tracked files had uncommitted changes, "unknown" without git; rows measured before this
  schema carry the commit that added their file, marked "(file added)".
- ``date``: when the run started, "YYYY-MM-DD HH:MM UTC". One run = the rows of one file
  with one date; the reports show each file's latest run (per kind of rows).

Why one ``case`` column rather than a column per key: the step and the decoding benchmarks
describe their cases with different keys, and keys came with new modes (floor_us, the
variants, repeats): a column per key meant a new header each time (four headers between
the earlier files) or columns empty for most rows. One reader parses ``case`` into a dict.
Derived numbers are not stored: the step's bandwidth floor follows from B, V and dtype.
"""
import csv
import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
FIELDS = ["bench", "case", "provider", "median", "spread", "unit", "device", "threads",
          "versions", "commit", "date"]
UNITS = {"step": "ms", "decode": "tokens/s", "prefill": "s"}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HBM_BYTES_PER_S = 3.0e12  # an H100's measured device-to-device bandwidth


@dataclasses.dataclass
class Result:
    """One measurement: a row of a results file, ``case`` parsed into a dict of strings."""

    bench: str
    case: dict
    provider: str
    median: float
    spread: float | None
    unit: str
    device: str
    threads: int
    versions: str
    commit: str
    date: str

    def get(self, key, default=None):
        return self.case.get(key, default)


# ---------------------------------------------------------------------------- the schema
def format_case(case: dict) -> str:
    for k, v in case.items():
        if not str(k) or any(c in f"{k}{v}" for c in ";="):
            raise ValueError(f"case {k}={v!r}: keys and values hold neither ';' nor '='")
    return ";".join(f"{k}={v}" for k, v in case.items())


def parse_case(text: str) -> dict:
    return dict(part.split("=", 1) for part in text.split(";") if part)


def _rounded(x: float) -> float:
    return float(f"{x:.6g}")


def make_result(bench, case, provider, median, spread, info) -> Result:
    """A new measurement as a Result: numbers rounded to 6 significant digits, case values
    as strings (as they read back). ``info``: ``run_info``'s dict."""
    return Result(bench=bench, case={k: str(v) for k, v in case.items()}, provider=provider,
                  median=_rounded(median),
                  spread=None if spread is None else _rounded(spread),
                  unit=UNITS[bench], device=info["device"], threads=int(info["threads"]),
                  versions=info["versions"], commit=info["commit"], date=info["date"])


def write_results(path, results):
    """Append ``results`` to the CSV at ``path`` (created with its header if new or empty;
    a file with another header is refused). Numbers are written as Python's shortest
    round-trip form, so they read back equal. Call it as rows are measured: the file is
    closed after each call, so a run cut short keeps its rows."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != FIELDS:
            raise ValueError(f"{path}: header {header} is not the results schema {FIELDS} "
                             "(benchmarks/common.py); write to another file")
        new = False
    else:
        new = True
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(FIELDS)
        for r in results:
            w.writerow([r.bench, format_case(r.case), r.provider, repr(float(r.median)),
                        "" if r.spread is None else repr(float(r.spread)), r.unit, r.device,
                        r.threads, r.versions, r.commit, r.date])


def read_results(path, bench=None) -> list:
    """Every row of a results CSV as a Result (only ``bench``'s rows when given)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != FIELDS:
            raise ValueError(f"{path}: header {reader.fieldnames} is not the results schema "
                             f"{FIELDS} (benchmarks/common.py)")
        out = [Result(bench=r["bench"], case=parse_case(r["case"]), provider=r["provider"],
                      median=float(r["median"]),
                      spread=float(r["spread"]) if r["spread"] else None, unit=r["unit"],
                      device=r["device"], threads=int(r["threads"]), versions=r["versions"],
                      commit=r["commit"], date=r["date"]) for r in reader]
    return [r for r in out if bench is None or r.bench == bench]


def latest_runs(results, kind=lambda r: ()) -> list:
    """The latest run (latest date) of each ``kind`` of rows, kinds in the order they first
    appear: a list of lists of Results."""
    groups = {}
    for r in results:
        groups.setdefault(kind(r), []).append(r)
    runs = []
    for rows in groups.values():
        latest = max(r.date for r in rows)
        runs.append([r for r in rows if r.date == latest])
    return runs


# ---------------------------------------------------------------------------- a run
def device_name(device) -> str:
    if getattr(device, "type", device) == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def versions() -> str:
    import importlib.metadata as md

    import torch

    import linalign

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"linalign {linalign.__version__}"]
    try:
        parts.append(f"triton {md.version('triton')}")
    except md.PackageNotFoundError:
        pass
    return "; ".join(parts)


def commit(root=ROOT) -> str:
    """The short hash of HEAD, "-dirty" when tracked files have uncommitted changes
    (untracked files do not count); "unknown" when git or the repository is unavailable."""
    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "") if head else "unknown"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_info(device, threads) -> dict:
    """What every row of a run records about the run."""
    return dict(device=device_name(device), threads=threads, versions=versions(),
                commit=commit(), date=now())


# ---------------------------------------------------------------------------- timing
def median_spread(samples):
    """(median, spread) of timed runs. The spread is the interquartile range by
    ``statistics.quantiles`` (its default, exclusive method), which for 3 runs is
    max - min; for 2 runs it is max - min, for one run 0."""
    xs = sorted(samples)
    if len(xs) < 3:
        return statistics.median(xs), xs[-1] - xs[0]
    q = statistics.quantiles(xs, n=4)
    return statistics.median(xs), q[2] - q[0]


def time_cpu(fn, min_runs=5, min_seconds=0.5, max_runs=50):
    """(median, spread) in ms of ``fn()``: one warm-up run, then at least ``min_runs`` runs
    and ``min_seconds`` seconds (at most ``max_runs`` runs)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or
                                     time.perf_counter() - start < min_seconds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return median_spread(times)


def time_gpu(fn, warmup=25, rep=100):
    """(median, spread) in ms by ``triton.testing.do_bench`` (its quartiles)."""
    import triton.testing

    lo, med, hi = triton.testing.do_bench(fn, warmup=warmup, rep=rep,
                                          quantiles=[0.25, 0.5, 0.75])
    return med, hi - lo


def floor_us(B, V, dtype: str) -> float:
    """The bandwidth floor of one step, in microseconds: both [B, V] branches of ``dtype``
    ("bfloat16", ...) read once from HBM at 3.0 TB/s."""
    return 2 * B * V * BYTES[dtype] / HBM_BYTES_PER_S * 1e6


# ---------------------------------------------------------------------------- reports
def display_path(path) -> str:
    """``path`` relative to the repository when inside it (as the README names files)."""
    full = os.path.abspath(path)
    return os.path.relpath(full, ROOT) if full.startswith(ROOT + os.sep) else str(path)


def caption(path, run, what) -> str:
    """The line above a report table: its results file, the run's date and commit, the
    machine and versions, then ``what`` (units, settings); wrapped at 92 columns."""
    r = run[0]
    threads = f"{r.threads} torch thread" + ("" if r.threads == 1 else "s")
    text = (f"`{display_path(path)}`, {r.date}, commit {r.commit}: {r.device}, {threads}; "
            f"{r.versions}. {what}")
    return textwrap.fill(text, width=92, break_long_words=False, break_on_hyphens=False)


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
