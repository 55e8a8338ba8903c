"""The ``linalign run`` command: its options (the shared builder of ``linalign.cli_args``
plus the run's own), and ``run_command``: read the input, skip the ids already done, decode
this rank's rows, merge the output. ``linalign/cli.py`` adds it as a sub-command
(``add_run_parser``); ``python -m linalign.runner ...`` runs it on its own (``main``).
docs/run.md.
"""
from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
import time
from pathlib import Path

from ..cli_args import (CommandError, add_model_arguments, add_sampling_arguments,
                        check_model_path, integer, load_aligner, resolve_device,
                        sampling_params)
from ..cli_io import check_text, ignore_sigint, os_error_line, say
from ..decoding import BadLogitsError
from .batches import decode_jobs
from .jobs import RunOptions, Settings, defaults_problem, resolve
from .lines import read_input
from .progress import Progress
from .outputs import RunFiles, check_output
from .results import (ResultWriter, kind_of, merge_outputs, part_path, part_paths,
                      read_results)
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


def check_paths(args) -> Path:
    """--input is a readable regular file, --output a regular file or a new one (symlinks
    followed) that is not the input: checked before anything is read or written. Returns
    the file --output names."""
    try:
        st = os.stat(args.input)
    except FileNotFoundError:
        raise CommandError(f"--input {args.input}: no such file") from None
    except OSError as e:
        raise CommandError(f"--input {args.input}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CommandError(f"--input {args.input} is {kind_of(st.st_mode)}: the runner reads "
                           "it twice (at the start and for the merge); give a regular file")
    out = check_output(args.output)
    if out.exists() and os.path.samefile(args.input, out):
        raise CommandError("--output is the --input file")
    check_model_path(args.model)
    return out


# ----------------------------------------------------------------------------- the run
def merge_command(args, out: Path, files: RunFiles, dist: Distributed, log) -> int:
    """``--merge``: OUTPUT and the part files into OUTPUT, nothing decoded."""
    if dist.on:
        raise CommandError("--merge runs on one process, not under torchrun")
    files.open_results(out, repair=False)
    parts = part_paths(out) if args.merge is None or not args.merge else \
        [Path(p) for p in args.merge]
    for p in parts:
        if p.exists():
            files.open_results(p, "part file", repair=False)
    summary = merge_outputs(args.input, out, parts, files=files)
    log(f"merged {summary.rows} rows from {len(summary.parts)} part file(s) into "
        f"{args.output}" + (f"; {len(summary.missing)} input ids have no result yet"
                            if summary.missing else ""))
    return 0


def checked_rows(args, s: Settings, dist: Distributed, log):
    """The input's valid rows, and its problems (reported by rank 0, line by line; with
    ``--strict`` the first one is a ``CommandError``, as is an input whose every line is
    rejected)."""
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
    if problems and not rows:
        raise CommandError(f"every line of {args.input} was rejected ({len(problems)} "
                           "line(s), reported above): nothing to decode")
    return rows, problems


class RankError(CommandError):
    """A ``CommandError`` that only this rank finds (its own files): every rank says its
    own, where the others are said by rank 0 alone."""


def open_files(out: Path, own: Path, files: RunFiles, dist: Distributed) -> set[str]:
    """``lock_and_read`` with this rank's errors as ``RankError``."""
    try:
        return lock_and_read(out, own, files, dist)
    except RankError:
        raise
    except CommandError as e:
        raise RankError(str(e)) from None


def lock_and_read(out: Path, own: Path, files: RunFiles, dist: Distributed) -> set[str]:
    """Lock and check the files this process writes (its own part or OUTPUT; rank 0 and a
    single process: OUTPUT too), cut a line a crash left in its own file, and return the
    ids already done: in OUTPUT and every part this machine sees, and under torchrun rank
    0's view too (OUTPUT may be on its disk only). A single process also locks every part
    it sees (it folds them in and removes them): one held by a live run is refused. Joins
    the process group."""
    done = set()
    for o in files.open_results(own, "--output" if own == out else "part file"):
        done.add(str(o["id"]))
    if dist.rank == 0 and own != out:
        done |= {str(o["id"]) for o in files.open_results(out, repair=False)}
    for p in part_paths(out):
        if p == own:
            continue
        lines = files.open_results(p, "part file", repair=False) if not dist.on else \
            read_results(p)
        done |= {str(o["id"]) for o in lines}
    dist.init()
    if dist.on:
        done |= dist.broadcast(done if dist.rank == 0 else None)
    return done


def decode_todo(args, s: Settings, todo, dist: Distributed, fd: int, path: Path, log):
    """Load the model (when there is something to do) and decode ``todo``, appending to the
    open file ``fd`` (``path``). Returns (rows the decoder refused, the progress counters)."""
    label = f"rank {dist.rank}/{dist.world} " if dist.on else ""
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = Progress(len(todo), bool(show) and dist.rank == 0, label)
    failed = []
    if not todo:
        return failed, progress
    aligner = load_aligner(args, dist.local_rank)
    progress.t0 = time.perf_counter()
    writer = ResultWriter(fd, path)

    def write(obj):
        writer.write(obj)
        if args.stop_after is not None and writer.written >= args.stop_after:
            raise KeyboardInterrupt  # the test hook: an interruption after N rows

    try:
        decode_jobs(aligner, todo, s, write, batch_size=args.batch_size, rank=dist.rank,
                    progress=progress, log=log, strict=args.strict, failed=failed)
    finally:
        progress.close()
    return failed, progress


def run(args, dist: Distributed, files: RunFiles, log) -> int:
    """The command's work; returns the exit code, raises for the errors ``run_command``
    turns into one."""
    s = settings_of(args)
    check_text("--system", args.system)
    out = check_paths(args)
    if args.merge is not None:
        return merge_command(args, out, files, dist, log)
    resolve_device(args.device, dist.local_rank)  # a bad --device: exit 2 before any work
    rows, problems = checked_rows(args, s, dist, log)
    own = part_path(out, dist.rank, dist.world) if dist.on else out
    done = open_files(out, own, files, dist)
    base_seed = s.params.seed if s.params.seed is not None else \
        int.from_bytes(os.urandom(8), "big") % 2**63
    mine = [r for r in rows if not dist.on or shard_of(r.key, dist.world) == dist.rank]
    todo = [resolve(r, s, base_seed) for r in mine if r.key not in done]
    failed, progress = decode_todo(args, s, todo, dist, files.fd(own), own, log)
    if failed:
        log(f"{len(failed)} row(s) refused by the decoder (reported above) have no result")
    if dist.on:
        code = gather_and_merge(dist, out, own, rows, files, log)
        return code or (1 if failed else 0)
    # input order, the parts folded in (locked above) and removed
    summary = merge_outputs(args.input, out, remove_parts=True, files=files)
    skipped = f", {len(problems)} malformed input line(s) skipped" if problems else ""
    log(f"{len(todo) - len(failed)} rows decoded ({len(mine) - len(todo)} already done)"
        f"{skipped}; {summary.rows} rows in {args.output}" +
        (f", {progress.tokens_per_second:.1f} tokens/s" if todo else ""))
    return 1 if failed else 0


def run_command(args) -> int:
    """The ``linalign run`` command: returns the exit code (0 done; 1 out of memory, rows
    the decoder refused, a failed merge, or an error writing or reading a file while
    running; 2 bad arguments, input or output, or an output in use by another run; 130
    interrupted). Errors are one line on stderr (docs/errors.md)."""
    dist = Distributed()
    prefix = f"linalign [rank {dist.rank}]" if dist.on else "linalign"

    def log(msg):
        say(f"{prefix}: {msg}")

    files = RunFiles()
    sigint = None
    try:
        return run(args, dist, files, log)
    except (CommandError, ValueError) as e:
        # ValueError: bad values found past the parser (a model that does not load, a
        # prompt too long for the model's context with --strict). Every rank finds the same
        # CommandError: rank 0 says it.
        if dist.rank == 0 or isinstance(e, RankError) or not isinstance(e, CommandError):
            log(f"error: {e}")
        return 2
    except (MemoryError, BadLogitsError) as e:  # out of memory; a model giving NaN logits
        log(f"error: {str(e).splitlines()[0] if str(e) else 'out of memory'}")
        return 1
    except OSError as e:  # disk full, read-only file system, a file removed under the run
        log(f"error: {os_error_line(e)}; finished rows are kept: fix that and rerun the "
            "same command to resume")
        return 1
    except KeyboardInterrupt:
        sigint = ignore_sigint()  # a second Ctrl-C while the files are closed
        log("interrupted; finished rows are in the output: rerun the same command to resume")
        return 130
    finally:
        files.close()
        dist.close()
        if sigint is not None:
            signal.signal(signal.SIGINT, sigint)



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
        say(f"linalign run: error: {e}")
        return 2
    return run_command(args)
