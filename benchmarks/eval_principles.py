"""Principle adherence of Linear Alignment on the embedded SmolLM2-135M-Instruct.

The same evaluation as ``linalign eval`` (the package linalign/evaluation/, docs/eval.md),
with the results written next to the other benchmarks: benchmarks/results/eval_<device>.csv,
.json, .samples.jsonl.gz (every answer, gzipped) and .png (adherence against degeneration
and perplexity; needs matplotlib, skipped with a note when it is not installed).

    python benchmarks/eval_principles.py --device cuda --batch-size 576   # the whole grid
    python benchmarks/eval_principles.py --report benchmarks/results/eval_cuda.json
    python benchmarks/eval_principles.py --resummarise benchmarks/results/eval_cpu_48
    python benchmarks/eval_principles.py --combine PART1 PART2 --out PREFIX

``--combine A B --out PREFIX`` summarises the answers of several runs of one protocol (the
parts of an evaluation too long for one sitting: other settings, same prompts, model, dtype,
length, temperature, top-p, seed and system text) together, with the paired tests across
them, into PREFIX.csv, .json, .samples.jsonl.gz and .png.

``--resummarise PREFIX`` summarises the answers of an earlier run again with this version's
summary (its paired tests against the principle in the prompt, for instance) and rewrites
PREFIX.csv, .json and .png; the answers and the run's meta stay as they were.

On the CPU one torch thread is used unless --threads says otherwise (two shared cores: a
second thread can slow everything down); the whole grid is a GPU job (docs/eval.md has the
CPU costs and a subset that fits).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from linalign.cli_args import CommandError  # noqa: E402
from linalign.evaluation import build_eval_parser, eval_command  # noqa: E402
from linalign.evaluation.report import combine, resummarise  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    parser = build_eval_parser(prog="python benchmarks/eval_principles.py",
                               default_out=os.path.join(HERE, "results", "eval_<device>"))
    parser.add_argument("--combine", nargs="+", metavar="PREFIX", default=None,
                        help="summarise the answers of several runs of one protocol together "
                             "(parts of one evaluation) into --out")
    parser.add_argument("--resummarise", metavar="PREFIX", default=None,
                        help="summarise the answers of an earlier run (PREFIX.samples.jsonl"
                             "[.gz]) again and rewrite PREFIX.csv, .json and .png")
    args = parser.parse_args(argv)
    if args.resummarise or args.combine:
        try:
            if args.combine:
                paths = combine(args.combine, args.out, plot=not args.no_plot)
            else:
                paths = resummarise(args.resummarise, plot=not args.no_plot)
        except (OSError, ValueError, KeyError) as e:
            print(f"eval_principles: error: {e}", file=sys.stderr)
            return 2
        print("wrote " + ", ".join(paths), file=sys.stderr)
        return 0
    args.gzip_samples = True  # every answer of the grid: about 5 MB as text, 1 MB gzipped
    if args.threads is None and not args.report and (
            args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())):
        args.threads = 1
    try:
        return eval_command(args)
    except (CommandError, ValueError) as e:  # one line, as linalign eval prints it
        print(f"eval_principles: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
