"""Plot a step benchmark CSV (bench_step.py --grid): step time against batch size.

    python benchmarks/plot_step.py step_cuda.csv step_cuda.png
    python benchmarks/plot_step.py step_cuda.csv bf16.png --only bfloat16:sample

One panel per vocabulary size V (columns) and per (dtype, mode) found in the CSV's latest
run (rows: bfloat16 sample first, then bfloat16 greedy, float32 sample, float32 greedy, ...).
Each panel: the median step time in microseconds (log y) against B (log x), one line per
provider, and the bandwidth floor (2 B V bytes / 3.0 TB/s, common.floor_us) as a dashed
black line. Only the latest run (the latest ``date``) of the CSV is drawn; the CSV is read
by the benchmarks' one reader (benchmarks/common.py). matplotlib is imported only when
plotting (the Agg backend: no display needed).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PROVIDER_ORDER = ("triton", "triton-graph", "reference-compiled", "authors", "authors-compiled",
                  "torch", "reference")
STYLE = {"triton": dict(color="C0", marker="o"), "triton-graph": dict(color="C6", marker="*"),
         "reference-compiled": dict(color="C1", marker="s"),
         "authors": dict(color="C2", marker="^"), "authors-compiled": dict(color="C4", marker="v"),
         "torch": dict(color="C3", marker="D"), "reference": dict(color="C5", marker="x")}


def load(csv_path):
    """The step rows of the CSV's latest run (--variants rows left out), as dicts with B, V
    int, median_us and floor_us float (common.read_results, common.floor_us)."""
    rows = [r for r in common.read_results(csv_path, bench="step") if "variant" not in r.case]
    if not rows:
        raise SystemExit(f"{csv_path}: no step rows")
    latest = max(r.date for r in rows)
    out = []
    for r in rows:
        if r.date != latest:
            continue
        B, V, dtype = int(r.case["B"]), int(r.case["V"]), r.case["dtype"]
        out.append(dict(B=B, V=V, dtype=dtype, mode=r.case["mode"], provider=r.provider,
                        median_us=r.median * 1e3, floor_us=common.floor_us(B, V, dtype),
                        device=r.device, date=latest))
    return out


def panel_rows(rows, only=None):
    """(dtype, mode) rows of the figure, bfloat16 and sampling first."""
    keys = dict.fromkeys((r["dtype"], r["mode"]) for r in rows)
    if only:
        keys = [k for k in keys if f"{k[0]}:{k[1]}" in only]
    rank = lambda k: (k[0] != "bfloat16", k[0], k[1] != "sample", k[1])  # noqa: E731
    return sorted(keys, key=rank)


def plot(rows, png, only=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = panel_rows(rows, only)
    if not keys:
        raise SystemExit(f"nothing to plot (only={only})")
    Vs = sorted({r["V"] for r in rows})
    providers = sorted({r["provider"] for r in rows},
                       key=lambda p: (PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else 99, p))
    fig, axes = plt.subplots(len(keys), len(Vs), figsize=(3.6 * len(Vs) + 0.4, 3.0 * len(keys)),
                             squeeze=False, sharex=True)
    for i, (dtype, mode) in enumerate(keys):
        for j, V in enumerate(Vs):
            ax = axes[i][j]
            sel = [r for r in rows if (r["dtype"], r["mode"], r["V"]) == (dtype, mode, V)]
            for p in providers:
                pts = sorted((r["B"], r["median_us"]) for r in sel if r["provider"] == p)
                if pts:
                    ax.plot(*zip(*pts), label=p, linewidth=1.5, markersize=4,
                            **STYLE.get(p, {}))
            floor = sorted({(r["B"], r["floor_us"]) for r in sel})
            if floor:
                ax.plot(*zip(*floor), "k--", linewidth=1, label="bandwidth floor")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"V = {V}, {dtype}, {mode}", fontsize=9)
            if sel:
                Bs = sorted({r["B"] for r in sel})
                ax.set_xticks(Bs)
                ax.set_xticklabels([str(b) for b in Bs])
            if i == len(keys) - 1:
                ax.set_xlabel("batch size B")
            if j == 0:
                ax.set_ylabel("step time (us)")
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    labels = list(handles)
    device = rows[0]["device"]
    fig.suptitle(f"One Linear Alignment step (r = 3, T = 0.5, top_p = 0.8), median time\n"
                 f"{device}, {rows[0]['date']}", fontsize=10)
    fig.legend([handles[k] for k in labels], labels, loc="lower center", ncol=len(labels),
               fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.94))
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", help="a CSV written by bench_step.py (its latest run is drawn)")
    ap.add_argument("png", help="the image to write")
    ap.add_argument("--only", default=None, help="comma list of dtype:mode panel rows to draw "
                    "(default: every one in the CSV), e.g. bfloat16:sample")
    args = ap.parse_args(argv)
    rows = load(args.csv)
    only = set(args.only.split(",")) if args.only else None
    plot(rows, args.png, only)
    print(f"wrote {args.png}: {len(rows)} measurements, "
          f"{len(panel_rows(rows, only))} panel row(s)")


if __name__ == "__main__":
    sys.exit(main())
