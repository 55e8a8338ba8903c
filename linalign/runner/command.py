"""The ``linalign run`` command: its options (the shared builder of ``linalign.cli_args``
plus the run's own), and ``run_command``: read the input, skip the ids already done, decode
this rank's rows, merge the output. ``linalign/cli.py`` adds it as a sub-command
(``add_run_parser``); ``python -m linalign.runner ...`` runs it on its own (``main``).
docs/run.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..cli_args import (CommandError, add_model_arguments, add_sampling_arguments,
                        check_model_path, integer, load_aligner, resolve_device,
                        sampling_params)
from ..decoding import BadLogitsError
from .batches import decode_jobs
from .jobs import RunOptions, Settings, defaults_problem, resolve
from .lines import read_input
from .progress import Progress
from .results import ResultWriter, merge_outputs, part_path, part_paths, result_ids
from .sharding import Distributed, gather_and_merge, shard_of

DESCRIPTION = ("Decode every line of --input (JSON objects with id, prompt, principle and "
               "optional ratio, kl_budget, seed, max_new_tokens) and append one result line "
               "per row to --output the moment the row finishes. Rerun the same command to "
               "resume: ids already in the output are skipped. Under torchrun the input is "
               "sharded across ranks and merged into --output. See docs/run.md.")


# ----------------------------------------------------------------------------- options
def add_run_parser(subparsers):
    """Add ``run`` to the ``linalign`` command's sub-commands (the parser class is the one
    given to ``add_subparsers``, so bad arguments are one line and exit code 2)."""
    r = subparsers.add_parser("run", help="align many prompts from a JSON-lines file "
                              "(resumable, torchrun-aware)", description=DESCRIPTION)
    add_run_arguments(r)
    r.set_defaults(run_command=run_command)
    return r


def add_run_arguments(r):
    """The options of ``linalign run``: --input --output, the shared sampling options (the
    defaults of lines that give none) and model options, and the run's own."""
    r.add_argument("--input", required=True, metavar="JSONL", help="prompts, one JSON object "
                   "per line")
    r.add_argument("--output", required=True, metavar="JSONL", help="results, one JSON object "
                   "per line (appended to; existing ids are skipped)")
    add_sampling_arguments(r, for_lines=True)
    add_model_arguments(r)
    g = r.add_argument_group("the run")
    g.add_argument("--batch-size", type=integer(1), default=8,
                   help="rows per generate call (default %(default)s)")
    g.add_argument("--strict", action="store_true", help="stop (exit code 2) at a malformed "
                   "input line instead of reporting and skipping it")
    g.add_argument("--token-ids", action="store_true",
                   help="also write the generated token ids of every row")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    g.add_argument("--merge", nargs="*", default=None, metavar="PART",
                   help="decode nothing: merge --output and the part files (default: every "
                   "OUTPUT.rank*-of-* beside it) into --output in input order")
    # test hook: stop as if interrupted once this many rows are written
    g.add_argument("--stop-after", type=integer(1), default=None, help=argparse.SUPPRESS)


def settings_of(args) -> Settings:
    """The parsed options as ``Settings``. ``--ratio`` given n times is the default of lines
    with n principles (once: of every line)."""
    params = sampling_params(args, len(args.ratio) if args.ratio else 1)
    if args.fast and args.mode != "stacked":
        raise CommandError("--fast runs the stacked loop: drop --fast or --mode two-caches")
    return Settings(params, RunOptions(mode=args.mode, fast=args.fast, system=args.system,
                                       model=args.model, token_ids=args.token_ids))


def check_paths(args):
    inp, out = Path(args.input), Path(args.output)
    if not inp.is_file():
        raise CommandError(f"--input {args.input}: no such file")
    if not out.parent.is_dir():
        raise CommandError(f"--output {args.output}: folder {out.parent} does not exist")
    if out.exists() and inp.resolve() == out.resolve():
        raise CommandError("--output is the --input file")
    check_model_path(args.model)


# ----------------------------------------------------------------------------- the run
def merge_command(args, dist: Distributed, log) -> int:
    """``--merge``: OUTPUT and the part files into OUTPUT, nothing decoded."""
    if dist.on:
        raise CommandError("--merge runs on one process, not under torchrun")
    summary = merge_outputs(args.input, args.output, args.merge or None)
    log(f"merged {summary.rows} rows from {len(summary.parts)} part file(s) into "
        f"{args.output}" + (f"; {len(summary.missing)} input ids have no result yet"
                            if summary.missing else ""))
    return 0


def checked_rows(args, s: Settings, dist: Distributed, log):
    """The input's valid rows, and its problems (reported by rank 0, line by line; with
    ``--strict`` the first one is a ``CommandError``)."""
    rows, problems = read_input(args.input)
    misfits = [(r.line, why) for r in rows
               if (why := defaults_problem(r, s.params)) is not None]
    if misfits:
        bad = {n for n, _ in misfits}
        problems = sorted(problems + misfits)
        rows = [r for r in rows if r.line not in bad]
    if problems and args.strict:
        n, msg = problems[0]
        raise CommandError(f"{args.input} line {n}: {msg} (--strict)")
    if dist.rank == 0:
        for n, msg in problems:
            log(f"{args.input} line {n}: {msg}; line skipped")
    return rows, problems


def done_ids(out: Path, own: Path, dist: Distributed) -> set[str]:
    """The ids already done: in OUTPUT and every part this machine sees (this rank's own
    file is repaired if a crash cut its last line), and under torchrun rank 0's view too
    (OUTPUT may be on its disk only). Joins the process group."""
    done = set()
    for p in [out] + part_paths(out):
        done |= result_ids(p, repair=p == own)
    dist.init()
    if dist.on:
        done |= dist.broadcast(done if dist.rank == 0 else None)
    return done


def decode_todo(args, s: Settings, todo, dist: Distributed, own: Path, log):
    """Load the model (when there is something to do) and decode ``todo`` into ``own``.
    Returns (rows the decoder refused, the progress counters)."""
    label = f"rank {dist.rank}/{dist.world} " if dist.on else ""
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = Progress(len(todo), bool(show) and dist.rank == 0, label)
    failed = []
    if not todo:
        return failed, progress
    aligner = load_aligner(args, dist.local_rank)
    progress.t0 = time.perf_counter()
    writer = ResultWriter(own)

    def write(obj):
        writer.write(obj)
        if args.stop_after is not None and writer.written >= args.stop_after:
            raise KeyboardInterrupt  # the test hook: an interruption after N rows

    try:
        decode_jobs(aligner, todo, s, write, batch_size=args.batch_size, rank=dist.rank,
                    progress=progress, log=log, strict=args.strict, failed=failed)
    finally:
        writer.close()
        progress.close()
    return failed, progress


def run(args, dist: Distributed, log) -> int:
    """The command's work; returns the exit code, raises for the errors ``run_command``
    turns into one."""
    s = settings_of(args)
    check_paths(args)
    if args.merge is not None:
        return merge_command(args, dist, log)
    resolve_device(args.device, dist.local_rank)  # a bad --device: exit 2 before any work
    rows, problems = checked_rows(args, s, dist, log)
    out = Path(args.output)
    own = part_path(out, dist.rank, dist.world) if dist.on else out
    done = done_ids(out, own, dist)
    base_seed = s.params.seed if s.params.seed is not None else \
        int.from_bytes(os.urandom(8), "big") % 2**63
    mine = [r for r in rows if not dist.on or shard_of(r.key, dist.world) == dist.rank]
    todo = [resolve(r, s, base_seed) for r in mine if r.key not in done]
    failed, progress = decode_todo(args, s, todo, dist, own, log)
    if failed:
        log(f"{len(failed)} row(s) refused by the decoder (reported above) have no result")
    if dist.on:
        code = gather_and_merge(dist, args.output, own, rows, log)
        return code or (1 if failed else 0)
    summary = merge_outputs(args.input, out, remove_parts=True)  # input order, parts folded in
    skipped = f", {len(problems)} malformed input line(s) skipped" if problems else ""
    log(f"{len(todo) - len(failed)} rows decoded ({len(mine) - len(todo)} already done)"
        f"{skipped}; {summary.rows} rows in {args.output}" +
        (f", {progress.tokens_per_second:.1f} tokens/s" if todo else ""))
    return 1 if failed else 0


def run_command(args) -> int:
    """The ``linalign run`` command: returns the exit code (0 done; 1 out of memory, rows
    the decoder refused, or a failed merge; 2 bad arguments, input or output; 130
    interrupted). Errors are one line on stderr."""
    dist = Distributed()
    prefix = f"linalign [rank {dist.rank}]" if dist.on else "linalign"

    def log(msg):
        print(f"{prefix}: {msg}", file=sys.stderr, flush=True)

    try:
        return run(args, dist, log)
    except (CommandError, ValueError) as e:
        # ValueError: bad values found past the parser (a model that does not load, a
        # prompt too long for the model's context with --strict). Every rank finds the same
        # CommandError: rank 0 says it.
        if dist.rank == 0 or not isinstance(e, CommandError):
            log(f"error: {e}")
        return 2
    except (MemoryError, BadLogitsError) as e:  # out of memory; a model giving NaN logits
        log(f"error: {str(e).splitlines()[0] if str(e) else 'out of memory'}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; finished rows are in the output: rerun the same command to resume")
        return 130
    finally:
        dist.close()


class OneLineParser(argparse.ArgumentParser):
    """A parser whose errors are a ``CommandError`` (one line), not argparse's usage."""

    def error(self, message):
        raise CommandError(message)


def main(argv=None) -> int:
    """``python -m linalign.runner ...``: the ``run`` command on its own (torchrun's ``-m``)."""
    parser = OneLineParser(prog="linalign run", description=DESCRIPTION)
    add_run_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except CommandError as e:
        print(f"linalign run: error: {e}", file=sys.stderr)
        return 2
    return run_command(args)
