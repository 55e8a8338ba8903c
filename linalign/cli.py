"""The ``linalign`` command (also ``python -m linalign``).

    linalign generate "How do I cook rice?" --principle "Answer like a pirate."

prints the aligned answer of the embedded SmolLM2-135M-Instruct, offline. ``linalign run``
(many prompts from a file, ``linalign.runner``) and ``linalign eval`` (principle adherence,
``linalign.evaluation``) are the other sub-commands; all three share their options
(``linalign.cli_args``). Bad arguments end with exit code 2 and one line on stderr, never a
traceback; running out of memory ends with exit code 1 and one line. See docs/errors.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time

from .cli_args import (CommandError, add_model_arguments, add_sampling_arguments,
                       check_model_path, load_aligner, resolve_device, sampling_params)
from .cli_io import (EXIT_BROKEN_PIPE, check_text, ignore_sigint, interrupted, os_error_line,
                     quiet_broken_pipe, say)
from .decoding import BadLogitsError
from .options import DEFAULT_RATIO


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise CommandError(message)


def build_parser() -> argparse.ArgumentParser:
    from .evaluation import add_eval_parser
    from .runner import add_run_parser

    parser = _Parser(prog="linalign", description="Linear Alignment decoding "
                     "(Gao et al., ICML 2024): align a language model with a principle at "
                     "inference time.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    g = sub.add_parser("generate", help="answer a prompt under a principle",
                       description="Answer PROMPT with Linear Alignment towards --principle, "
                       "with the embedded SmolLM2-135M-Instruct unless --model is given.")
    g.add_argument("prompt", help="the user's message")
    g.add_argument("--principle", required=True, action="append",
                   help="the preference, in plain words (goes into the system message); "
                   "give it more than once to align with several principles at once")
    add_sampling_arguments(g)
    add_model_arguments(g)
    shown = g.add_mutually_exclusive_group()
    shown.add_argument("--stream", action="store_true", help="print the answer as it is made")
    shown.add_argument("--compare", action="store_true", help="also print the answer without "
                       "the principle and with the principle only in the prompt")
    g.add_argument("--stats", action="store_true", help="print load and decoding times to "
                   "stderr")
    add_run_parser(sub)
    add_eval_parser(sub)
    return parser


def _check(args):
    check_text("the prompt", args.prompt)
    for p in args.principle:
        check_text("--principle", p)
    check_text("--system", args.system)
    if not args.prompt.strip():
        raise CommandError("the prompt is empty")
    if any(not p.strip() for p in args.principle):
        raise CommandError("--principle is empty")
    check_model_path(args.model)
    resolve_device(args.device)  # a bad --device: before the model loads


def _generate(args, out):
    K = len(args.principle)
    params = sampling_params(args, K)
    t0 = time.perf_counter()
    aligner = load_aligner(args)
    load = time.perf_counter() - t0
    principle = args.principle[0] if K == 1 else [args.principle]
    if params.kl_budget is not None:
        title = f"Linear Alignment (kl budget {params.kl_budget:g})"
    else:
        shown = args.ratio or [DEFAULT_RATIO]
        title = f"Linear Alignment (ratio {', '.join(f'{r:g}' for r in shown)})"
    if isinstance(params.ratio, list):  # one per principle, for the one prompt
        params = dataclasses.replace(params, ratio=[params.ratio])
    how = dict(mode=args.mode, fast=args.fast)
    if args.compare:
        plain = dataclasses.replace(params, ratio=None, kl_budget=None)
        for title, run in (
                ("without the principle",
                 lambda: aligner.generate_plain(args.prompt, None, plain, fast=args.fast)),
                ("principle in the prompt only",
                 lambda: aligner.generate_plain(args.prompt, " ".join(args.principle), plain,
                                                fast=args.fast)),
                (title, lambda: aligner.generate(args.prompt, principle, params, **how))):
            out.write(f"=== {title} ===\n")
            _show(run(), args.stats, out)
            out.write("\n")
    elif args.stream:
        t0 = time.perf_counter()
        for piece in aligner.stream(args.prompt, principle, params, **how):
            out.write(piece)
            out.flush()
        out.write("\n")
        if args.stats:
            print(f"generated in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    else:
        _show(aligner.generate(args.prompt, principle, params, **how), args.stats, out)
    if args.stats:
        print(f"model loaded in {load:.1f} s on {aligner.device}", file=sys.stderr)


def _show(result, stats, out):
    out.write(result.text.strip() + "\n")
    out.flush()
    if stats:
        print(f"prefill {result.prefill_seconds:.2f} s, {result.new_tokens} tokens at "
              f"{result.decode_tokens_per_second:.1f} tokens/s", file=sys.stderr)


def main(argv=None) -> int:
    """The ``linalign`` command; returns the exit code (docs/errors.md). Every failure is
    one line on stderr."""
    sigint = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "generate":
            _check(args)
            _generate(args, sys.stdout)
            return 0
        return args.run_command(args)
    except CommandError as e:
        say(f"linalign: error: {e}")
        return 2
    except ValueError as e:  # bad values found past the parser, a model that does not load
        say(f"linalign: error: {e}")
        return 2
    except (MemoryError, BadLogitsError) as e:  # out of memory (the message says what to
        # lower); a model whose logits are NaN or +inf (the message names the rows)
        say(f"linalign: error: {str(e).splitlines()[0] if str(e) else 'out of memory'}")
        return 1
    except BrokenPipeError:  # stdout's reader went away (`linalign generate ... | head`)
        quiet_broken_pipe()
        say("linalign: stdout was closed before the answer was written in full (broken pipe)")
        return EXIT_BROKEN_PIPE
    except OSError as e:  # writing the answer failed: stdout on a full disk, ...
        say(f"linalign: error: {os_error_line(e)}")
        return 1
    except KeyboardInterrupt:
        sigint = ignore_sigint()
        say("linalign: interrupted")
        return 130
    except ImportError as e:
        if not interrupted(e):
            raise
        # a Ctrl-C inside transformers' lazy imports, which re-raise it as an ImportError
        sigint = ignore_sigint()
        say("linalign: interrupted")
        return 130
    finally:
        if sigint is not None:
            signal.signal(signal.SIGINT, sigint)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
