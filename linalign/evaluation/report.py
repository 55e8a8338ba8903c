"""What a run of the evaluation writes and prints: ``write_outputs`` (PREFIX.csv,
PREFIX.json, PREFIX.samples.jsonl[.gz], PREFIX.png), ``markdown_report`` (the tables of a
PREFIX.json) and ``candidate_default`` (the rule that proposes a default setting). The
files and their fields: docs/eval.md, "Outputs".
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import sys

from .harness import baseline_of, log_line, parse_setting, summarise
from .scorers import PRINCIPLES

CSV_FIELDS = ["setting", "decoding", "principle", "n", "adherence", "adherence_lo",
              "adherence_hi", "clean", "rep3", "distinct2", "ppl_mean", "ppl_median",
              "ppl_pooled", "mean_tokens", "eos_rate", "mean_ratio", "vs_prompt_baseline",
              "vs_prompt_pairs",
              "vs_prompt_wins", "vs_prompt_losses", "vs_prompt_p", "vs_prompt_clean_wins",
              "vs_prompt_clean_losses", "vs_prompt_clean_p", "generate_s", "model",
              "device", "dtype", "max_new_tokens", "temperature", "top_p", "seed", "torch",
              "transformers", "date"]
#: The CSV columns that come from the run's ``meta`` (the same on every row).
META_FIELDS = CSV_FIELDS[CSV_FIELDS.index("model"):]
KIND_COLOURS = {"none": "tab:gray", "prompt": "tab:blue", "la": "tab:red", "kl": "tab:green"}


# ============================================================================ files
def write_outputs(result: dict, prefix: str, meta: dict, *, gzip_samples: bool = False,
                  samples: bool = True, plot: bool = True, progress=sys.stderr) -> list[str]:
    """Write PREFIX.csv, PREFIX.json, PREFIX.samples.jsonl(.gz) (unless ``samples`` is
    False) and PREFIX.png (unless ``plot`` is False) for a ``run_eval`` result; return the
    paths written."""
    folder = os.path.dirname(prefix)
    if folder:
        os.makedirs(folder, exist_ok=True)
    paths = [write_csv(result, prefix + ".csv", meta),
             write_json(result, prefix + ".json", meta)]
    if samples:
        paths.append(write_samples(result["samples"], prefix + ".samples.jsonl" +
                                   (".gz" if gzip_samples else "")))
    if plot:
        png = plot_summary(result["rows"], prefix + ".png", title=meta.get("title"),
                           progress=progress)
        if png:
            paths.append(png)
    return paths


def write_csv(result: dict, path: str, meta: dict) -> str:
    """One row per setting, decoding and principle, with the run's ``META_FIELDS``."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in result["rows"]:
            t = result["timing"].get(f"{r['setting']}/{r['decoding']}", {})
            w.writerow({**{k: csv_value(v) for k, v in r.items()},
                        "generate_s": csv_value(t.get("generate_s")),
                        **{k: meta.get(k, "") for k in META_FIELDS}})
    return path


def write_json(result: dict, path: str, meta: dict) -> str:
    """The rows, the run's ``meta``, the timing, the principles that have rows (with their
    rules) and the prompts."""
    rows = result["rows"]
    summary = {"meta": meta, "rows": rows, "timing": result["timing"],
               "principles": {n: {"text": p.text, "rule": p.rule}
                              for n, p in PRINCIPLES.items()
                              if any(r["principle"] == n for r in rows)},
               "prompts": meta.get("prompts")}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    return path


def write_samples(samples: list[dict], path: str) -> str:
    """Every answer, one JSON object a line (gzipped when ``path`` ends with .gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    return path


def read_samples(path: str) -> list[dict]:
    """The answers a run wrote (``write_samples``)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_run(prefix: str) -> tuple[dict, list[dict]]:
    """An earlier run's PREFIX.json and its answers (PREFIX.samples.jsonl[.gz])."""
    with open(prefix + ".json", encoding="utf-8") as f:
        old = json.load(f)
    path = next((prefix + ".samples.jsonl" + ext for ext in (".gz", "")
                 if os.path.exists(prefix + ".samples.jsonl" + ext)), None)
    if path is None:
        raise FileNotFoundError(f"{prefix}.samples.jsonl(.gz): the run's answers are missing")
    return old, read_samples(path)


def resummarise(prefix: str, *, plot: bool = True, progress=sys.stderr) -> list[str]:
    """Summarise the answers of an earlier run again (PREFIX.samples.jsonl[.gz]) with this
    version's summary (e.g. its paired tests), keeping the run's ``meta`` and timing from
    PREFIX.json; rewrite PREFIX.csv, PREFIX.json and PREFIX.png; return the paths."""
    old, samples = read_run(prefix)
    names = list(old.get("principles") or {}) or None
    result = {"rows": summarise(samples, names), "timing": old.get("timing", {})}
    return write_outputs(result, prefix, old["meta"], samples=False, plot=plot,
                         progress=progress)


#: What two evaluation runs must share for their answers to be summarised together.
SHARED_META = ("model", "dtype", "max_new_tokens", "temperature", "top_p", "seed", "prompts",
               "system")


def combine(prefixes: list[str], out: str, *, plot: bool = True,
            progress=sys.stderr) -> list[str]:
    """Summarise the answers of several runs together (an evaluation split into parts):
    their settings must differ and their ``SHARED_META`` agree (``ValueError`` naming the
    first that does not). Writes OUT.csv, .json, .samples.jsonl.gz and .png; the meta is
    the first run's, with every run's settings, decodings and seconds, and ``parts`` (the
    prefixes and commands)."""
    runs = [(prefix, *read_run(prefix)) for prefix in prefixes]
    first = runs[0][1]["meta"]
    seen = set()
    for prefix, old, samples in runs:
        for key in SHARED_META:
            if old["meta"].get(key) != first.get(key):
                raise ValueError(f"{prefix}: {key} differs from {prefixes[0]}'s; only runs of "
                                 "the same protocol can be summarised together")
        keys = {(s["setting"], s["decoding"]) for s in samples}
        if keys & seen:
            raise ValueError(f"{prefix}: {sorted(keys & seen)} also in an earlier part")
        seen |= keys
    samples = [s for _, _, part in runs for s in part]
    meta = dict(first, settings=list(dict.fromkeys(
        x for _, old, _ in runs for x in old["meta"].get("settings", []))),
        decodings=list(dict.fromkeys(x for _, old, _ in runs
                                     for x in old["meta"].get("decodings", []))),
        total_seconds=sum(old["meta"].get("total_seconds") or 0 for _, old, _ in runs),
        parts=[{"prefix": prefix, "command": old["meta"].get("command"),
                "date": old["meta"].get("date")} for prefix, old, _ in runs])
    names = list(dict.fromkeys(n for _, old, _ in runs for n in old.get("principles") or {}))
    timing = {k: v for _, old, _ in runs for k, v in old.get("timing", {}).items()}
    result = {"rows": summarise(samples, names or None), "timing": timing,
              "samples": samples}
    return write_outputs(result, out, meta, gzip_samples=True, plot=plot, progress=progress)


def csv_value(v):
    """A CSV cell: floats to 6 significant digits, None empty."""
    return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)


# ============================================================================ the plot
def import_pyplot(progress=sys.stderr):
    """``matplotlib.pyplot`` on the Agg backend; None, with a note on ``progress``, when
    matplotlib is not installed. A matplotlib that is installed but does not import (a
    missing dependency, a broken install) raises: that is a fault to fix, not an option."""
    try:
        import matplotlib
    except ImportError as e:
        if e.name != "matplotlib":
            raise
        log_line(progress, "note: matplotlib is not installed; no plot written "
                           "(pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_summary(rows, path: str, *, title: str | None = None, progress=sys.stderr):
    """Overall adherence against degeneration (rep3) and against perplexity, one point per
    setting and decoding (circles greedy, triangles sampled); the path written, or None
    when matplotlib is not installed (``import_pyplot``)."""
    plt = import_pyplot(progress)
    if plt is None:
        return None
    overall = [r for r in rows if r["principle"] == "all"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "rep3", "repeated 3-gram rate (mean over answers)"),
                           (axes[1], "ppl_pooled",
                            "perplexity under the model without the principle (pooled)")):
        for r in overall:
            if r[key] is None:
                continue
            kind = parse_setting(r["setting"]).kind
            ax.errorbar(r[key], r["adherence"],
                        yerr=[[r["adherence"] - r["adherence_lo"]],
                              [r["adherence_hi"] - r["adherence"]]],
                        fmt="o" if r["decoding"] == "greedy" else "^",
                        color=KIND_COLOURS[kind], ms=6, capsize=2, lw=0.8)
            ax.annotate(r["setting"] + paired_label(r), (r[key], r["adherence"]),
                        fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("adherence (all principles)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=k)
               for k, c in KIND_COLOURS.items()] + \
        [plt.Line2D([], [], color="k", marker=m, ls="", label=d)
         for m, d in (("o", "greedy"), ("^", "sampled"))]
    axes[0].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(title or "Principle adherence against degeneration (95 % Wilson intervals)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def paired_label(row: dict) -> str:
    """" (p 0.003)": the paired test against the principle in the prompt, when the row has
    one."""
    p = row.get("vs_prompt_p")
    return "" if p is None else f" (p {p:.2g})"


# ============================================================================ the tables
def report_caption(summary: dict, path) -> str:
    """The line above a report's tables: the results file, its date and what ran."""
    m = summary.get("meta") or {}
    names = len(summary.get("principles") or {})
    return (f"`{path}` ({m.get('date', '?')}; {m.get('model', '?')}, {m.get('device', '?')} "
            f"{m.get('dtype', '')}, {m.get('threads', '?')} thread(s); "
            f"{len(m.get('prompts') or [])} prompts x {names} principles, "
            f"{m.get('max_new_tokens', '?')} new tokens, T {m.get('temperature', '?')}, "
            f"top-p {m.get('top_p', '?')}): every setting over all principles.")


def markdown_report(summary: dict) -> str:
    """Markdown tables from a PREFIX.json: the settings overall, then adherence per
    principle (one column per setting, greedy and sampled), then a candidate default."""
    rows = summary["rows"]
    overall = [r for r in rows if r["principle"] == "all"]
    lines = overall_table(overall)
    for decoding in dict.fromkeys(r["decoding"] for r in overall):
        lines += ["", f"Adherence per principle, {decoding}:", ""]
        lines += principle_table(rows, [r["setting"] for r in overall
                                        if r["decoding"] == decoding], decoding)
    pick = candidate_default(summary)
    if pick:
        lines += ["", pick]
    return "\n".join(lines)


def overall_table(overall: list[dict]) -> list[str]:
    """The lines of the table of every setting over all principles."""
    lines = ["| setting | decoding | adherence (95 % CI) | vs prompt: +/- (p) | clean | "
             "clean vs prompt: +/- (p) | rep-3 | distinct-2 | ppl pooled | ppl median | "
             "tokens | ended | mean r |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in overall:
        lines.append(f"| {r['setting']} | {r['decoding']} | {r['adherence']:.3f} "
                     f"({r['adherence_lo']:.2f}-{r['adherence_hi']:.2f}) | "
                     f"{paired_cell(r, '')} | {table_number(r.get('clean'))} | "
                     f"{paired_cell(r, 'clean_')} | {table_number(r['rep3'])} | "
                     f"{table_number(r['distinct2'])} | {table_number(r['ppl_pooled'], 2)} | "
                     f"{table_number(r['ppl_median'], 2)} | "
                     f"{table_number(r['mean_tokens'], 1)} | "
                     f"{table_number(r['eos_rate'], 2)} | "
                     f"{table_number(r.get('mean_ratio'), 2)} |")
    return lines


def paired_cell(row: dict, prefix: str) -> str:
    """"+29/-10 (0.003)": the pairs where only this setting passes, only the principle in
    the prompt does, and the exact McNemar p-value; "-" without a paired test."""
    p = row.get(f"vs_prompt_{prefix}p")
    if p is None:
        return "-"
    return (f"+{row[f'vs_prompt_{prefix}wins']}/-{row[f'vs_prompt_{prefix}losses']} "
            f"({p:.2g})")


def principle_table(rows: list[dict], settings: list[str], decoding: str) -> list[str]:
    """The lines of the table of adherence per principle (rows) and setting (columns) of
    one decoding; the best of each row in bold."""
    names = list(dict.fromkeys(r["principle"] for r in rows if r["principle"] != "all"))
    cell = {(r["setting"], r["principle"]): r for r in rows if r["decoding"] == decoding}
    lines = ["| principle | " + " | ".join(settings) + " |",
             "|---|" + "---|" * len(settings)]
    for n in names + ["all"]:
        vals = [cell.get((s, n)) for s in settings]
        best = max((v["adherence"] for v in vals if v), default=None)
        lines.append(f"| {n} | " + " | ".join(
            "" if v is None else (f"**{v['adherence']:.2f}**" if v["adherence"] == best
                                  else f"{v['adherence']:.2f}") for v in vals) + " |")
    return lines


def candidate_default(summary: dict, ppl_factor: float = 1.5, rep_margin: float = 0.05):
    """The Linear Alignment setting (la or kl) with the highest overall clean adherence
    (followed without looping) whose pooled perplexity is at most ``ppl_factor`` times, and
    whose rep3 at most ``rep_margin`` above, those of its baseline (``baseline_of``: the
    principle in the prompt with the same modifiers, same decoding); a sentence, or None."""
    overall = [r for r in summary["rows"] if r["principle"] == "all"]
    out = []
    for decoding in dict.fromkeys(r["decoding"] for r in overall):
        rows = {r["setting"]: r for r in overall if r["decoding"] == decoding}
        if "prompt" not in rows:
            continue
        ok = []
        for r in rows.values():
            ref = rows.get(baseline_of(r["setting"], rows))
            if parse_setting(r["setting"]).kind in ("la", "kl") and ref is not None and \
                    None not in (r["ppl_pooled"], ref["ppl_pooled"]) and \
                    r["ppl_pooled"] <= ppl_factor * ref["ppl_pooled"] and \
                    (r["rep3"] or 0) <= (ref["rep3"] or 0) + rep_margin:
                ok.append(r)
        if ok:
            best = max(ok, key=lambda r: r.get("clean") or 0.0)
            out.append(f"{decoding}: {best['setting']} (clean adherence "
                       f"{best.get('clean') or 0.0:.3f} against "
                       f"{rows['prompt'].get('clean') or 0.0:.3f} for the principle in the "
                       f"prompt only)")
        else:
            out.append(f"{decoding}: no Linear Alignment setting stays within the limits")
    if not out:
        return None
    return (f"Candidate default (highest clean adherence with pooled perplexity at most "
            f"{ppl_factor:g} x and rep-3 at most {rep_margin:g} above the principle-in-prompt "
            f"setting with the same modifiers): " + "; ".join(out) + ".")


def table_number(v, digits: int = 3) -> str:
    """A table cell: ``v`` with ``digits`` decimals, "-" for None."""
    return "-" if v is None else f"{v:.{digits}f}"
