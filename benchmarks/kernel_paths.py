"""Each launch of the Triton step timed on its own, and the path each row takes (GPU only).

    python benchmarks/kernel_paths.py                      # B in {1, 8, 64, 256}, V = 128256, bf16
    python benchmarks/kernel_paths.py --B 64 --V 32000,128256 --steepness 1.0,1.0 --top-p 0.95

The step is two launches (kernels/step.py): ``la_chunk_kernel`` reads both branches once,
chunk by chunk, and the last chunk of each row finishes it on its candidates;
``la_flat_kernel`` finishes, chunk-parallel, the rows whose candidates did not hold the
nucleus (flat rows) and costs a load and an exit when there are none. For each (B, V,
dtype, mode) this prints the rows' paths (``kernels.step.step_paths``: "buffer" rows done by
launch 1, "score" and "search" rows done by launch 2, and launch 2's jobs), then the median
and interquartile range of each launch's device time and of the pair, against the
bandwidth floor ``2 B V bytes / 3.0 TB/s`` (benchmarks/common.py). Timing: CUDA events
recorded between the launches (``la_step(..., events=...)``), after a write of 256 MB that
evicts the rows from L2 and a ``torch.cuda._sleep`` that keeps the GPU busy while the host
queues the launches, so that no host latency falls between the events. Rows: the
benchmark's (``linalign.testing.two_branch``, Zipf steepness ``--steepness``, drawn for T =
0.5), ratio 3, T 0.5, top_p ``--top-p``. Prints only; nothing is written.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from linalign.testing import two_branch  # noqa: E402


def numbers(text, kind):
    return [kind(x) for x in text.split(",") if x]


def quartiles(xs):
    q = statistics.quantiles(xs, n=4)
    return q[1], q[2] - q[0]


def time_launches(call, reps):
    """Median and IQR (microseconds) of launch 1, launch 2 and both, over ``reps`` calls."""
    flush = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda")
    times = [[], [], []]
    for _ in range(reps):
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        flush.zero_()
        torch.cuda._sleep(2_000_000)  # the GPU waits here while the host queues the launches
        call(ev)
        torch.cuda.synchronize()
        first, second = ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2])
        for t, v in zip(times, (first, second, first + second)):
            t.append(v * 1e3)
    return [quartiles(t) for t in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", default="1,8,64,256")
    ap.add_argument("--V", default="128256")
    ap.add_argument("--dtypes", default="bfloat16")
    ap.add_argument("--modes", default="greedy,sample")
    ap.add_argument("--steepness", default="1.2,2.0", help="the rows' Zipf steepness range")
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_paths.py times CUDA launches: it needs a GPU")
    from linalign.kernels import la_step, step_paths

    torch.set_num_threads(1)
    info = common.run_info(torch.device("cuda"), 1)
    steep = tuple(numbers(args.steepness, float))
    print(f"# {info['device']}, {info['versions']}, commit {info['commit']}; ratio 3, T 0.5, "
          f"top-p {args.top_p}, rows zipf {steep[0]}-{steep[-1]}; microseconds (median, IQR)")
    print(f"{'B':>4} {'V':>7} {'dtype':>8} {'mode':>6} | {'buffer':>6} {'score':>5} "
          f"{'search':>6} {'jobs':>4} | {'launch 1':>14} {'launch 2':>14} {'both':>14} | "
          f"{'floor':>6} {'both/floor':>10}")
    for V in numbers(args.V, int):
        for B in numbers(args.B, int):
            for dname in args.dtypes.split(","):
                dtype = getattr(torch, dname)
                zp, z0 = two_branch(B, V, seed=B * 7 + V, temperature=0.5, steepness=steep,
                                    device="cuda", dtype=dtype)
                seeds = torch.arange(B, device="cuda")
                for mode in args.modes.split(","):
                    kw = dict(greedy=mode == "greedy", seed=seeds)
                    call = lambda ev: la_step(zp, z0, 3.0, 0.5, args.top_p, events=ev, **kw)  # noqa: E731,B023
                    for _ in range(3):
                        call(None)  # compile and warm up
                    paths = step_paths(zp, z0, 3.0, 0.5, args.top_p, **kw)
                    (m1, s1), (m2, s2), (mb, sb) = time_launches(call, args.reps)
                    floor = common.floor_us(B, V, dname)
                    print(f"{B:>4} {V:>7} {dname:>8} {mode:>6} | {paths['buffer']:>6} "
                          f"{paths['score']:>5} {paths['search']:>6} {paths['jobs']:>4} | "
                          f"{m1:>7.1f} ({s1:>4.1f}) {m2:>7.1f} ({s2:>4.1f}) {mb:>7.1f} "
                          f"({sb:>4.1f}) | {floor:>6.2f} {mb / floor:>9.1f}x", flush=True)


if __name__ == "__main__":
    main()
