"""The command-line options shared by ``linalign generate``, ``run`` and ``eval``: one
builder, so every command has the same names, defaults and bounds.

- ``add_sampling_arguments``: ``--ratio --kl-budget --max-ratio --temperature --top-p
  --greedy/--sample --max-new-tokens --seed --repetition-penalty --presence-penalty
  --frequency-penalty --no-repeat-ngram-size --stop``, with the defaults of
  ``linalign.options.SamplingParams`` and types derived from ``linalign.options.RULES``.
- ``add_model_arguments``: ``--model --system --device --dtype --fast --mode --threads``.
- ``sampling_params(args)``, ``load_aligner(args)``: what a command does with them.

A bad value becomes argparse's one-line error; the command prints it with exit code 2.
"""
from __future__ import annotations

import argparse
import os

from .decoder import MODES
from .options import (COMMAND_REPETITION_PENALTY, DEFAULT_RATIO, INT_RULES, SamplingParams,
                      rule_of)

#: ``--model`` value that builds the tiny random Llama of ``linalign.testing`` with its byte
#: tokenizer (no download, gibberish output): for tests of the commands.
TINY_MODEL = "linalign:tiny-random"
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: The commands' defaults: the library's, with the commands' repetition penalty (its
#: evidence is where it is defined).
_DEFAULTS = SamplingParams(repetition_penalty=COMMAND_REPETITION_PENALTY)


class CommandError(Exception):
    """A bad argument, input or output found by a command: one line on stderr, exit 2."""


# ---------------------------------------------------------------------------- types
def number(name: str):
    """An argparse type for the real option ``name``: a float that satisfies its rule."""
    bound = rule_of(name)

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
        if not bound.number_ok(value):
            raise argparse.ArgumentTypeError(f"must be {bound.refusal(value)}")
        return value
    return parse


def integer(lo: int = 0, name: str | None = None):
    """An argparse type: an int >= ``lo`` (or within ``INT_RULES[name]``)."""
    hi = None
    if name is not None:
        lo, hi = INT_RULES[name]

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}; got {value}")
        if hi is not None and value >= hi:
            raise argparse.ArgumentTypeError(f"expected an integer below 2**63; got {value}")
        return value
    return parse


# ---------------------------------------------------------------------------- builders
SAMPLING_OPTIONS = ("ratio", "kl_budget", "max_ratio", "temperature", "top_p", "greedy",
                    "max_new_tokens", "seed", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "no_repeat_ngram_size", "stop")


def add_sampling_arguments(parser, *, options=SAMPLING_OPTIONS, max_new_tokens=None,
                           seed=None, for_lines=False):
    """Add the sampling options named in ``options`` to ``parser``. ``max_new_tokens`` and
    ``seed`` override those defaults (the evaluation's protocol fixes both); ``for_lines``:
    the values are defaults for input lines that give none (``linalign run``)."""
    g = parser.add_argument_group("sampling" + (" (for input lines that give none)"
                                                if for_lines else ""))
    if "ratio" in options:
        g.add_argument("--ratio", type=number("ratio"), action="append", default=None,
                       help=f"how far past the principle branch to push (default "
                       f"{DEFAULT_RATIO:g}, from the evaluation: docs/decoder.md); once for "
                       "every principle, or once per principle" +
                       (" (for lines with that many principles)" if for_lines else ""))
    if "kl_budget" in options:
        g.add_argument("--kl-budget", type=number("kl_budget"), default=None, metavar="EPS",
                       help="instead of --ratio: kl mode, a ratio per token that moves the "
                       "answer EPS nats from the plain model (one principle)")
    if "max_ratio" in options:
        g.add_argument("--max-ratio", type=number("max_ratio"), default=_DEFAULTS.max_ratio,
                       help="cap on the ratio that kl mode derives (default %(default)s)")
    if "temperature" in options:
        g.add_argument("--temperature", type=number("temperature"),
                       default=_DEFAULTS.temperature, help="default %(default)s (0: argmax)")
    if "top_p" in options:
        g.add_argument("--top-p", type=number("top_p"), default=_DEFAULTS.top_p,
                       help="nucleus of the principle branch (default %(default)s)")
    if "greedy" in options:
        mode = g.add_mutually_exclusive_group()
        mode.add_argument("--greedy", dest="greedy", action="store_true",
                          default=_DEFAULTS.greedy, help="argmax inside the nucleus (default)")
        mode.add_argument("--sample", dest="greedy", action="store_false",
                          help="sample from the aligned distribution")
    if "max_new_tokens" in options:
        g.add_argument("--max-new-tokens", type=integer(name="max_new_tokens"),
                       default=_DEFAULTS.max_new_tokens if max_new_tokens is None
                       else max_new_tokens, help="default %(default)s")
    if "seed" in options:
        what = "base of the rows' sampling seeds (each mixed with the row's id)" \
            if for_lines else "seed for --sample"
        g.add_argument("--seed", type=integer(name="seed"), default=seed,
                       help=f"{what} (default: " +
                       ("a fresh one)" if seed is None else "%(default)s)"))
    add_penalty_arguments(g, options)
    return g


#: The real-valued penalties' flags: (option, metavar, help). docs/semantics.md, "Penalties".
PENALTY_FLAGS = (
    ("repetition_penalty", "R", "> 1 makes tokens already in the answer less likely, in both "
                                "branches (Hugging Face's rule; 1: off)"),
    ("presence_penalty", "P", "subtracted from the logit of every token already in the "
                              "answer (OpenAI's rule; 0: off)"),
    ("frequency_penalty", "F", "subtracted once per earlier occurrence in the answer "
                               "(OpenAI's rule; 0: off)"),
)


def add_penalty_arguments(g, options):
    """``--repetition-penalty --presence-penalty --frequency-penalty --no-repeat-ngram-size
    --stop`` (those named in ``options``): docs/semantics.md, "Penalties", and
    docs/decoder.md, "Stop strings"."""
    for name, metavar, words in PENALTY_FLAGS:
        if name in options:
            g.add_argument("--" + name.replace("_", "-"), type=number(name),
                           default=getattr(_DEFAULTS, name), metavar=metavar,
                           help=words + " (default %(default)s)")
    if "no_repeat_ngram_size" in options:
        g.add_argument("--no-repeat-ngram-size", type=integer(name="no_repeat_ngram_size"),
                       default=_DEFAULTS.no_repeat_ngram_size, metavar="N",
                       help="never repeat an N-gram of the answer (default %(default)s: off)")
    if "stop" in options:
        g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                       type=stop_string, help="end the answer before the first TEXT "
                       "(repeatable)")


def stop_string(text):
    """An argparse type: a non-empty stop string."""
    if not text:
        raise argparse.ArgumentTypeError("expected a non-empty stop string")
    return text


def add_model_arguments(parser, *, modes=True):
    """``--model --system --device --dtype --fast --threads`` (and ``--mode``)."""
    g = parser.add_argument_group("model and device")
    g.add_argument("--model", default=None, metavar="PATH", help="a local Hugging Face "
                   "causal-LM folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--system", default=None, help="base system text of both branches "
                   "(default: the chat template's own)")
    g.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default auto: "
                   "cuda when there is one, under torchrun the local rank's GPU)")
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="model weights (default "
                   "auto: bfloat16 on a GPU; on the CPU float32 with the embedded model's "
                   "linear layers packed with fp16 weights, over twice as fast; float32: "
                   "the exact fp32 model)")
    g.add_argument("--fast", action="store_true", help="static KV cache and, on a GPU, one "
                   "CUDA graph per decoding step (same tokens; docs/decoder.md)")
    if modes:
        g.add_argument("--mode", choices=MODES, default="stacked", help="one forward of all "
                       "branches per step (stacked, default) or one cache per branch")
    g.add_argument("--threads", type=integer(1), default=None,
                   help="torch CPU threads (default: torch's choice)")
    return g


# ---------------------------------------------------------------------------- use
def ratio_value(ratios: list[float] | None, K: int):
    """The decoder's ``ratio`` from ``--ratio`` given once or once per principle (None: the
    default); ``CommandError`` when the count fits neither."""
    if ratios is None:
        return None
    if len(ratios) not in (1, K):
        raise CommandError(f"--ratio given {len(ratios)} times for {K} principles: give it "
                           "once, or once per --principle")
    return ratios[0] if len(ratios) == 1 else ratios


def sampling_params(args, K: int = 1) -> SamplingParams:
    """The parsed sampling options as ``SamplingParams`` (K: principles per prompt)."""
    ratio = ratio_value(getattr(args, "ratio", None), K)
    kl = getattr(args, "kl_budget", None)
    if kl is not None:
        if ratio is not None:
            raise CommandError("give --ratio or --kl-budget, not both (kl mode derives the "
                               "ratio from the budget)")
        if K > 1:
            raise CommandError("--kl-budget is for one --principle (kl mode bounds the step "
                               "of one principle); use --ratio with several")
    fields = {name: getattr(args, name) for name in SAMPLING_OPTIONS
              if name not in ("ratio", "kl_budget") and hasattr(args, name)}
    if fields.get("stop", ()) is None:  # --stop never given
        fields["stop"] = _DEFAULTS.stop
    elif "stop" in fields:
        fields["stop"] = tuple(fields["stop"])
    return SamplingParams(ratio=ratio, kl_budget=kl, **fields)


def resolve_device(name: str, local_rank: int = 0):
    """``--device`` as a ``torch.device`` (auto: the local rank's GPU when there is one)."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {name}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise CommandError(f"--device {name}: expected cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: no CUDA device here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and \
            dev.index >= torch.cuda.device_count():
        raise CommandError(f"--device {name}: there are {torch.cuda.device_count()} CUDA "
                           f"device(s) here, cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise CommandError(f"--device {name}: the CPU is one device: use --device cpu")
    return dev


def resolve_dtype(name: str, device):
    """``--dtype`` as a torch dtype (auto: bfloat16 on a GPU, float32 on the CPU)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def check_model_path(path):
    if path not in (None, TINY_MODEL) and not os.path.exists(os.path.expanduser(path)):
        raise CommandError(f"--model {path}: no such folder or file")


_TINY = {}


def load_aligner(args, local_rank: int = 0):
    """A ``LinearAligner`` for the parsed ``--model --system --device --dtype --threads``
    (``TINY_MODEL``: the tiny random Llama, built once per process and device)."""
    import torch

    from .decoder import LinearAligner

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device, local_rank)
    dtype = resolve_dtype(args.dtype, dev)
    if args.model == TINY_MODEL:
        from .testing import ByteTokenizer, random_llama

        if (dev, dtype) not in _TINY:  # tests run the commands many times in one process
            _TINY[dev, dtype] = random_llama("tiny", logit_std=1.5, device=dev, dtype=dtype)
        return LinearAligner(_TINY[dev, dtype], ByteTokenizer(), system=args.system)
    check_model_path(args.model)
    from transformers.utils import logging as hf_logging

    from . import models

    hf_logging.disable_progress_bar()  # a command prints its answer, not loading bars
    hf_logging.set_verbosity_error()
    # --dtype auto packs the embedded model's linear layers on the CPU; an explicit dtype
    # keeps the model as loaded (models.use_packing decides)
    model, tokenizer = models.load_model(args.model, device=dev, dtype=dtype,
                                         packed=None if args.dtype == "auto" else False)
    return LinearAligner(model, tokenizer, system=args.system)
