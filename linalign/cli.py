"""The ``linalign`` command (also ``python -m linalign``).

    linalign generate "How do I cook rice?" --principle "Answer like a pirate."

prints the aligned answer of the embedded SmolLM2-135M-Instruct, offline. Bad arguments end
with exit code 2 and one line on stderr, never a traceback; running out of memory ends with
exit code 1 and one line. See docs/errors.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ._args import integer, number
from .api import MAX_RATIO
from .decoder import DEFAULTS, MODES
from .evaluation import add_eval_parser, eval_command
from .runner import add_run_parser, run_command

#: The command's default ratio. The library keeps the authors' 3.0 (DEFAULTS); the command,
#: whose default model is the embedded SmolLM2-135M, uses 1.0: on all 48 evaluation prompts
#: x 12 principles ratios 1 and 3 had the same adherence (0.238), ratio 1 with lower
#: perplexity (2.43 against 2.67) and repetition (benchmarks/results/eval_cpu_48.*).
COMMAND_RATIO = 1.0


class UsageError(Exception):
    """A bad argument: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)






def build_parser() -> argparse.ArgumentParser:
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
    g.add_argument("--ratio", type=number(what="a finite number"), action="append",
                   default=None, help="how far past the principle branch to push (default "
                   f"{COMMAND_RATIO:g}, chosen on the embedded model: docs/eval.md); once for "
                   "every principle, or once per --principle")
    g.add_argument("--kl-budget", type=number(0.0, what="a number >= 0"), default=None,
                   metavar="EPS", help="instead of --ratio: the closed-form step, a ratio per "
                   "token that moves the answer EPS nats from the plain model (one principle)")
    g.add_argument("--max-ratio", type=number(0.0, what="a number >= 0"), default=MAX_RATIO,
                   help="cap on the ratio that --kl-budget gives (default %(default)s)")
    g.add_argument("--temperature", type=number(0.0, what="a number >= 0"),
                   default=DEFAULTS["temperature"], help="default %(default)s")
    g.add_argument("--top-p", type=number(0.0, 1.0, lo_open=True, what="a number in (0, 1]"),
                   default=DEFAULTS["top_p"], help="nucleus of the principle branch "
                   "(default %(default)s)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--greedy", dest="greedy", action="store_true", default=True,
                      help="argmax inside the nucleus (default)")
    mode.add_argument("--sample", dest="greedy", action="store_false",
                      help="sample from the aligned distribution")
    g.add_argument("--max-new-tokens", type=integer(0), default=DEFAULTS["max_new_tokens"],
                   help="default %(default)s")
    g.add_argument("--seed", type=integer(0), default=None,
                   help="seed for --sample (default: a fresh one)")
    g.add_argument("--system", default=None, help="base system text of both branches "
                   "(default: the chat template's own)")
    g.add_argument("--model", default=None, metavar="PATH", help="a local Hugging Face "
                   "causal-LM folder or .gguf file (default: the embedded SmolLM2)")
    shown = g.add_mutually_exclusive_group()
    shown.add_argument("--stream", action="store_true", help="print the answer as it is made")
    shown.add_argument("--compare", action="store_true", help="also print the answer without "
                       "the principle and with the principle only in the prompt")
    g.add_argument("--mode", choices=MODES, default="stacked", help="one forward of 2B rows "
                   "(stacked, default) or two caches")
    g.add_argument("--threads", type=integer(0), default=None,
                   help="torch CPU threads (default: torch's choice)")
    g.add_argument("--stats", action="store_true", help="print load and decoding times to "
                   "stderr")
    add_run_parser(sub)  # linalign run: many prompts from a JSON-lines file (runner.py)
    add_eval_parser(sub, _Parser)  # linalign eval: principle adherence (evaluation.py)
    return parser


def _check(args):
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    if any(not p.strip() for p in args.principle):
        raise UsageError("--principle is empty")
    K = len(args.principle)
    if args.kl_budget is not None:
        if args.ratio is not None:
            raise UsageError("give --ratio or --kl-budget, not both")
        if K > 1:
            raise UsageError("--kl-budget is for one --principle (the closed-form step of "
                             "one principle); use --ratio with several")
    elif args.ratio is None:
        args.ratio = [COMMAND_RATIO]
    if args.ratio is not None and len(args.ratio) not in (1, K):
        raise UsageError(f"--ratio given {len(args.ratio)} times for {K} principles: give it "
                         "once, or once per --principle")
    if args.model is not None and not os.path.exists(os.path.expanduser(args.model)):
        raise UsageError(f"--model {args.model}: no such folder or file")
    if args.threads == 0:
        raise UsageError("--threads must be at least 1")


def _generate(args, out):
    import torch

    from . import models
    from .decoder import LinearAligner

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a command prints its answer, not loading bars
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    model, tokenizer = models.load_model(args.model)
    aligner = LinearAligner(model, tokenizer, system=args.system)
    load = time.perf_counter() - t0
    kw = dict(temperature=args.temperature, top_p=args.top_p, greedy=args.greedy,
              max_new_tokens=args.max_new_tokens, seed=args.seed)
    principle = args.principle[0] if len(args.principle) == 1 else [args.principle]
    if args.kl_budget is not None:
        how = dict(kl_budget=args.kl_budget, max_ratio=args.max_ratio)
        title = f"Linear Alignment (kl budget {args.kl_budget:g})"
    else:
        ratio = args.ratio[0] if len(args.ratio) == 1 else [args.ratio]
        how = dict(ratio=ratio)
        title = f"Linear Alignment (ratio {', '.join(f'{r:g}' for r in args.ratio)})"
    if args.compare:
        for title, run in (
                ("without the principle",
                 lambda: aligner.generate_plain(args.prompt, **kw)),
                ("principle in the prompt only",
                 lambda: aligner.generate_plain(args.prompt, " ".join(args.principle), **kw)),
                (title,
                 lambda: aligner.generate(args.prompt, principle, mode=args.mode, **how,
                                          **kw))):
            out.write(f"=== {title} ===\n")
            _show(run(), args.stats, out)
            out.write("\n")
    elif args.stream:
        t0 = time.perf_counter()
        for piece in aligner.stream(args.prompt, principle, mode=args.mode, **how, **kw):
            out.write(piece)
            out.flush()
        out.write("\n")
        if args.stats:
            print(f"generated in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    else:
        _show(aligner.generate(args.prompt, principle, mode=args.mode, **how, **kw),
              args.stats, out)
    if args.stats:
        print(f"model loaded in {load:.1f} s", file=sys.stderr)


def _show(result, stats, out):
    out.write(result.text.strip() + "\n")
    out.flush()
    if stats:
        print(f"prefill {result.prefill_seconds:.2f} s, {result.new_tokens} tokens at "
              f"{result.decode_tokens_per_second:.1f} tokens/s", file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "run":
            return run_command(args)
        if args.command == "eval":
            return eval_command(args)
        _check(args)
        _generate(args, sys.stdout)
    except UsageError as e:
        print(f"linalign: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad values found past the parser, a model that does not load
        print(f"linalign: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:  # BatchTooLargeError: the message says what to lower
        print(f"linalign: error: {str(e).splitlines()[0] if str(e) else 'out of memory'}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("linalign: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
