"""The command line of the evaluation: ``linalign eval`` (``add_eval_parser``) and
``benchmarks/eval_principles.py`` (``build_eval_parser``), both run by ``eval_command``.

The sampling and model options come from the builder every command shares
(``linalign.cli_args``): the same names, defaults and bounds as ``linalign generate`` and
``linalign run``, except ``--max-new-tokens`` (the protocol's 48) and ``--seed`` (the
protocol's fixed 0). Options and outputs: docs/eval.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import stat
import sys
import time

import torch

from ..cli_args import (CommandError, add_model_arguments, add_sampling_arguments, integer,
                        load_aligner)
from .harness import (DECODINGS, DEFAULT_MAX_NEW_TOKENS, DEFAULT_SEED, DEFAULT_SETTINGS,
                      load_prompts, log_line, parse_setting, run_eval)
from .report import markdown_report, report_caption, write_outputs
from .scorers import PRINCIPLES

#: ``meta.model`` of a run without ``--model``.
EMBEDDED_MODEL = "SmolLM2-135M-Instruct (embedded)"
#: The shared sampling options the evaluation takes (its settings give the ratio or the kl
#: budget, ``--decodings`` greedy or sampled); ``--max-new-tokens`` and ``--seed`` have the
#: protocol's defaults.
SAMPLING_OPTIONS = ("max_ratio", "temperature", "top_p", "max_new_tokens", "seed")
DESCRIPTION = ("Answer the evaluation prompts under each principle with no principle, the "
               "principle in the prompt only, and Linear Alignment at several ratios and kl "
               "budgets; score each answer with the principle's program; write a CSV, a "
               "JSON, the answers and a plot. See docs/eval.md.")


# ============================================================================ parsers
def add_eval_parser(subparsers):
    """Add ``eval`` to the ``linalign`` command's sub-commands (the parser class is the one
    given to ``add_subparsers``, so bad arguments are one line and exit code 2)."""
    p = subparsers.add_parser(
        "eval", help="measure principle adherence, degeneration and perplexity",
        description=DESCRIPTION)
    p.set_defaults(run_command=eval_command)
    return add_eval_arguments(p, "eval_<device>")


def build_eval_parser(parser_class=argparse.ArgumentParser, *, prog="linalign eval",
                      default_out="eval_<device>"):
    """A stand-alone parser with the same options (benchmarks/eval_principles.py)."""
    p = parser_class(prog=prog, description="Principle adherence of Linear Alignment "
                     "(see docs/eval.md).")
    return add_eval_arguments(p, default_out)


def add_eval_arguments(p, default_out: str | None):
    """The options of the evaluation: its grid, the shared sampling and model options, and
    where to write."""
    g = p.add_argument_group("the grid")
    g.add_argument("--settings", default=DEFAULT_SETTINGS,
                   help="comma-separated: none, prompt, la-r<ratio>, kl-<budget nats> "
                   "(default %(default)s)")
    g.add_argument("--decodings", default=",".join(DECODINGS),
                   help="greedy, sampled or both (default %(default)s)")
    g.add_argument("--principles", default=None,
                   help=f"comma-separated subset of: {', '.join(PRINCIPLES)} (default: all)")
    g.add_argument("--prompts", type=integer(1), default=None, metavar="N",
                   help="use the first N prompts only (default: all)")
    g.add_argument("--prompt-file", default=None, metavar="PATH",
                   help="prompts, one per line (default: linalign/data/eval_prompts.txt)")
    g.add_argument("--batch-size", type=integer(1), default=64,
                   help="prompts per generate call (default %(default)s; a GPU takes the "
                   "whole setting at once, e.g. 576)")
    g.add_argument("--ppl-batch-size", type=integer(1), default=None,
                   help="answers per perplexity forward (default: --batch-size; at most "
                   "1 GiB of logits per forward either way)")
    s = add_sampling_arguments(p, options=SAMPLING_OPTIONS,
                               max_new_tokens=DEFAULT_MAX_NEW_TOKENS, seed=DEFAULT_SEED)
    s.description = (f"the protocol: --max-new-tokens {DEFAULT_MAX_NEW_TOKENS} (not the "
                     "library's 256) and a fixed --seed (the base of one seed per prompt, "
                     "the same in every setting and for every principle); --temperature and "
                     "--top-p apply to every setting, --max-ratio caps the kl settings' ratio")
    add_model_arguments(p, modes=False)
    o = p.add_argument_group("output")
    o.add_argument("--out", default=default_out, metavar="PREFIX",
                   help="write PREFIX.csv, PREFIX.json, PREFIX.samples.jsonl and PREFIX.png "
                   "(default %(default)s; <device> becomes cpu or cuda)")
    o.add_argument("--gzip-samples", action="store_true",
                   help="write PREFIX.samples.jsonl.gz instead")
    o.add_argument("--no-plot", action="store_true", help="skip the PNG")
    o.add_argument("--report", default=None, metavar="JSON",
                   help="print the Markdown tables of an earlier PREFIX.json and exit (no "
                   "model is loaded)")
    return p


# ============================================================================ the command
def eval_command(args, out=None, progress=None) -> int:
    """Run ``linalign eval`` with parsed ``args``; print the summary tables; return 0.

    Bad values raise ``CommandError`` (the command prints one line, exit code 2)."""
    out = sys.stdout if out is None else out
    progress = sys.stderr if progress is None else progress
    if args.report:
        out.write(report_text(args.report) + "\n")
        return 0
    names, settings, decodings, prompts = grid_of(args)
    t0 = time.perf_counter()
    aligner = load_aligner(args)
    meta = run_meta(args, aligner, settings, decodings, prompts)
    log_line(progress, f"model {meta['model']} on {aligner.device} ({meta['dtype']}) in "
                       f"{time.perf_counter() - t0:.1f} s; {torch.get_num_threads()} torch "
                       f"threads; {len(prompts)} prompts x {len(names)} principles")
    prefix = args.out.replace("<device>", meta["device"]) if args.out else None

    def checkpoint(partial):  # the tables so far (no answers file, no plot)
        if prefix:
            write_outputs(partial, prefix, meta, samples=False, plot=False)

    t0 = time.perf_counter()
    result = run_eval(aligner, principles=names, prompts=prompts, settings=settings,
                      decodings=decodings, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      max_ratio=args.max_ratio, batch_size=args.batch_size,
                      ppl_batch_size=args.ppl_batch_size, fast=args.fast, progress=progress,
                      on_run=checkpoint)
    total = time.perf_counter() - t0
    meta.update(total_seconds=total, partial=False)
    if prefix:
        paths = write_outputs(result, prefix, meta, gzip_samples=args.gzip_samples,
                              plot=not args.no_plot, progress=progress)
        log_line(progress, "wrote " + ", ".join(paths))
    out.write(markdown_report({"rows": result["rows"]}) + "\n")
    log_line(progress, f"evaluation took {total:.1f} s")
    return 0


def read_results(path: str) -> dict:
    """A PREFIX.json written by an earlier run (``--report``); ``CommandError`` naming the
    file when it is missing, not a regular file, unreadable or not JSON."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CommandError(f"--report {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CommandError(f"--report {path}: not a regular file; give the PREFIX.json of an "
                           "earlier linalign eval run")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise CommandError(f"--report {path}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:
        raise CommandError(f"--report {path}: not JSON ({str(e).splitlines()[0]}); give the "
                           "PREFIX.json of an earlier linalign eval run") from None


def report_text(path: str) -> str:
    """The caption and Markdown tables of the PREFIX.json at ``path``; ``CommandError`` when
    the file is not one (JSON of another shape)."""
    summary = read_results(path)
    try:
        if not isinstance(summary, dict) or not isinstance(summary.get("rows"), list):
            raise ValueError('no "rows" list at the top')
        return report_caption(summary, path) + "\n\n" + markdown_report(summary)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise CommandError(f"--report {path}: not the PREFIX.json of a linalign eval run "
                           f"({type(e).__name__}: {e})") from None


def grid_of(args) -> tuple[list[str], list[str], list[str], list[str]]:
    """(principle names, setting names, decodings, prompts) of the parsed ``args``, checked
    before any model is loaded; ``CommandError`` naming the option at fault."""
    settings = [s for s in args.settings.split(",") if s.strip()]
    if not settings:
        raise CommandError("--settings is empty")
    try:
        settings = [parse_setting(s).name for s in settings]
    except ValueError as e:
        raise CommandError(f"--settings: {e}") from None
    decodings = [d.strip() for d in args.decodings.split(",") if d.strip()]
    if not decodings or any(d not in DECODINGS for d in decodings):
        raise CommandError(f"--decodings {args.decodings}: expected greedy, sampled or both")
    names = list(PRINCIPLES) if args.principles is None else \
        [n.strip() for n in args.principles.split(",") if n.strip()]
    if not names:
        raise CommandError("--principles is empty")
    for n in names:
        if n not in PRINCIPLES:
            raise CommandError(f"--principles: unknown principle {n!r}; known: "
                               f"{', '.join(PRINCIPLES)}")
    try:
        prompts = load_prompts(args.prompt_file)[:args.prompts]
    except OSError as e:
        raise CommandError(f"--prompt-file {args.prompt_file}: {e.strerror or e}") from None
    except ValueError as e:  # not UTF-8, no prompts
        raise CommandError(f"--prompt-file {args.prompt_file}: {e}") from None
    return names, settings, decodings, prompts


def run_meta(args, aligner, settings, decodings, prompts) -> dict:
    """``meta`` of the output files: the command, the model, the device and the options
    (``total_seconds`` and ``partial`` are updated at the end)."""
    dev = aligner.device
    return dict(command=command_line(), model=args.model or EMBEDDED_MODEL,
                system=args.system, device=dev.type,
                device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                dtype=str(next(aligner.model.parameters()).dtype).removeprefix("torch."),
                threads=torch.get_num_threads(), max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                batch_size=args.batch_size, fast=args.fast, settings=settings,
                decodings=decodings, max_ratio=args.max_ratio, total_seconds=None,
                partial=True, prompts=prompts, date=datetime.date.today().isoformat(),
                **versions())


def versions() -> dict:
    """Python, torch and transformers versions."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        out["transformers"] = ""
    return out


def command_line() -> str:
    """The command that is running, as a user would type it."""
    argv = list(sys.argv) or ["linalign"]
    head = argv[0]
    if head.endswith(".py"):
        head = "python " + os.path.relpath(head)
    elif os.path.basename(head) in ("linalign", "__main__.py"):
        head = "linalign"
    return " ".join([head] + [shlex.quote(a) for a in argv[1:]])
