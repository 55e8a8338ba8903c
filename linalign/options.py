"""Every sampling option, its default and its bounds, in one place.

- ``RULES``: what each real-valued parameter must be. The step's checks of Python numbers
  (``check_number``) and of [B] tensors (``Bound.tensor_ok``), the decoder's checks, the
  command-line types (``linalign.cli_args``) and the run files' line checks
  (``linalign.runner.lines``) are all derived from this one table
  (``tests/test_options.py`` checks that they agree on the edge values).
- ``SamplingParams``: the options of a generation with their defaults, used by the decoder,
  ``linalign.hf``, the commands and the run files. ``SamplingParams.rows`` validates them for
  a batch and expands them to per-row values.

Why the defaults are what they are: docs/decoder.md, "Defaults".
"""
from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass

from .constants import MAX_RATIO, SEED_LIMIT, SEED_MIX

#: The ratio when neither ``ratio`` nor ``kl_budget`` is given. On the embedded
#: SmolLM2-135M-Instruct, over 48 prompts x 12 programmatically scored principles (greedy,
#: 576 answers per setting), ratios 1 and 3 both reached 0.238 adherence against 0.205 for
#: the principle in the prompt alone, ratio 1 with less repetition and perplexity; paired
#: on the same prompt and principle, ratio 1 beats the prompt alone more clearly than
#: ratio 3 (docs/eval.md). The authors used 3 with 7B models; 1 is the evidence we have.
DEFAULT_RATIO = 1.0

#: The commands' repetition penalty (``linalign generate`` and ``linalign run``; the step,
#: the decoder and ``linalign.hf`` keep Hugging Face's neutral 1.0, as a library should).
#: Greedy decoding of the embedded SmolLM2 loops, and Linear Alignment amplifies what the
#: principle branch prefers, loops included. On all 48 prompts x 12 principles (greedy, 576
#: answers per setting, docs/eval.md), 1.3 took repeated 3-grams from 0.10 to 0 and clean
#: adherence (followed without looping) of ratio 1 from 0.149 to 0.215 (paired: 56 answers
#: gained, 18 lost, p = 1e-5) at a small cost in plain adherence (0.238 -> 0.215; 15 gained,
#: 28 lost, p = 0.07); against the principle in the prompt alone, clean 72 gained, 17 lost.
COMMAND_REPETITION_PENALTY = 1.3


def as_fp32(x: float) -> float:
    """``x`` rounded to fp32, the precision every step computes in (inf past its range)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


@dataclass(frozen=True)
class Bound:
    """What a real parameter must be: finite, at least (or above) ``lo``, at most ``hi``.
    ``words`` says it in the errors ("top_p must be in (0, 1]")."""

    words: str
    lo: float | None = None
    lo_open: bool = False
    hi: float | None = None

    def number_ok(self, x: float) -> bool:
        """For a Python number, judged at fp32 (what the step computes with): 1e39 is not
        a finite ratio and 1e-50 is not a top_p above 0."""
        if self.exact_ok(x) and 1e-30 < abs(x) < 1e38:
            # rounding to fp32 is monotonic and keeps 0, 1 and the finite range: it cannot
            # move such a value across a bound (the common case, without packing bytes)
            return True
        return self.exact_ok(as_fp32(x))

    def exact_ok(self, x: float) -> bool:
        """The test on ``x`` as it is (no rounding)."""
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return self.hi is None or x <= self.hi

    def refusal(self, x: float) -> str:
        """Why ``x`` is refused: the bound, and the fp32 value when rounding is the cause."""
        note = f" ({as_fp32(x):g} in fp32, the step's arithmetic)" if self.exact_ok(x) else ""
        return f"{self.words}; got {x}{note}"

    def tensor_ok(self, t):
        """The same test, elementwise, on an fp32 tensor: a bool tensor."""
        import torch

        ok = torch.isfinite(t)
        if self.lo is not None:
            ok &= (t > self.lo) if self.lo_open else (t >= self.lo)
        if self.hi is not None:
            ok &= t <= self.hi
        return ok


RULES = {
    "ratio": Bound("a finite number"),
    "temperature": Bound("finite and >= 0", lo=0.0),
    "top_p": Bound("in (0, 1]", lo=0.0, lo_open=True, hi=1.0),
    "kl_budget": Bound("finite and >= 0 (nats)", lo=0.0),
    "max_ratio": Bound("finite and >= 0", lo=0.0),
    "repetition_penalty": Bound("finite and > 0", lo=0.0, lo_open=True),
    "presence_penalty": Bound("a finite number"),
    "frequency_penalty": Bound("a finite number"),
}
#: Integer options: the smallest value and one past the largest (None: unbounded).
INT_RULES = {"max_new_tokens": (0, None), "seed": (0, SEED_LIMIT),
             "no_repeat_ngram_size": (0, None)}
#: The penalties (docs/semantics.md, "Penalties") and the value at which each does nothing.
NEUTRAL_PENALTIES = {"repetition_penalty": 1.0, "presence_penalty": 0.0,
                     "frequency_penalty": 0.0}


def rule_of(name: str) -> Bound:
    """The bound of ``name``; ``ratio[2]``, a per-principle ratio, is a ratio."""
    return RULES[name.split("[")[0]]


def check_number(name: str, x, what: str = "a number or a [B] tensor") -> float:
    """A Python number that satisfies ``RULES[name]``, as a float; else ``TypeError`` (not a
    number) or ``ValueError`` (out of bounds) naming the value and what was expected."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be {what}; got {type(x).__name__}")
    try:
        x = float(x)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name} must be {rule_of(name).words}; got {x}") from None
    bound = rule_of(name)
    if not bound.number_ok(x):
        raise ValueError(f"{name} must be {bound.refusal(x)}")
    return x


def check_int(name: str, x) -> int:
    """An int within ``INT_RULES[name]``; else ``TypeError`` / ``ValueError``."""
    lo, hi = INT_RULES[name]
    words = f"an int >= {lo}" if hi is None else f"an int in [{lo}, 2**63)"
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be {words}; got {x!r} ({type(x).__name__})")
    if x < lo or (hi is not None and x >= hi):
        raise ValueError(f"{name} must be {words}; got {x}")
    return x


def check_flag(name: str, x) -> bool:
    """``x`` if it is a Python bool; else ``TypeError`` (1, "yes" or a tensor are refused: a
    truthy value of another type is more often a mistake than a choice)."""
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be True or False; got {x!r} ({type(x).__name__})")
    return x


# ---------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class SamplingParams:
    """The options of one generation and their defaults.

    ratio: how far past the principle branch to push (``None``: ``DEFAULT_RATIO``, unless
    ``kl_budget`` is given). One number; or one per prompt, each a number or, with K
    principles per prompt, a list of K. kl_budget, max_ratio: kl mode instead of a fixed
    ratio (docs/semantics.md, "kl mode"): a budget in nats per token, one number or one per
    prompt, and the cap on the ratio it derives. temperature, top_p: one number or one per
    prompt (docs/semantics.md). greedy: argmax of the aligned scores inside the nucleus
    (True) or a draw from them. max_new_tokens: an int >= 0. seed: for sampling, an int
    (row i gets its own Philox seed derived from it, docs/decoder.md "Randomness") or one
    int per prompt; None draws one from torch's global generator.
    repetition_penalty, presence_penalty, frequency_penalty: one number or one per prompt,
    applied to every branch from the answer's tokens so far (docs/semantics.md,
    "Penalties"); the defaults (1, 0, 0) do nothing. no_repeat_ngram_size: an int >= 0; n > 0
    bans, in every branch, a token that would complete an n-gram already in the answer.
    stop: strings (or one string); the answer ends before the first occurrence of any, with
    finish reason "stop" (docs/decoder.md, "Stop strings").
    """

    ratio: object = None
    kl_budget: object = None
    max_ratio: object = MAX_RATIO
    temperature: object = 0.5
    top_p: object = 0.8
    greedy: bool = True
    max_new_tokens: int = 256
    seed: object = None
    repetition_penalty: object = 1.0
    presence_penalty: object = 0.0
    frequency_penalty: object = 0.0
    no_repeat_ngram_size: int = 0
    stop: object = ()

    @classmethod
    def build(cls, params: SamplingParams | None = None, **options) -> SamplingParams:
        """``params`` (default: the defaults) with ``options`` replacing some fields;
        ``TypeError`` for a name that is not an option."""
        if params is not None and not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams; got {type(params).__name__}")
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unexpected arguments {unknown}; the sampling options are "
                            f"{[f.name for f in dataclasses.fields(cls)]}")
        return dataclasses.replace(params or cls(), **options)

    def rows(self, B: int, K: int = 1) -> RowParams:
        """Validated per-row values for B prompts with K principles each (``ValueError`` /
        ``TypeError`` naming the bad value, before any compute)."""
        if self.ratio is not None and self.kl_budget is not None:
            raise ValueError("pass either ratio= (a fixed step) or kl_budget= (kl mode, "
                             "docs/semantics.md), not both")
        kl = None
        ratios = None
        caps = _checked("max_ratio", per_row("max_ratio", self.max_ratio, B))
        if self.kl_budget is not None:
            if K > 1:
                raise ValueError(f"kl_budget is for one principle per prompt; got {K} "
                                 "principles per prompt: pass ratio= instead")
            kl = (_checked("kl_budget", per_row("kl_budget", self.kl_budget, B)), caps)
        else:
            ratios = _ratios(DEFAULT_RATIO if self.ratio is None else self.ratio, B, K)
        check_flag("greedy", self.greedy)
        return RowParams(
            ratios=ratios, kl=kl,
            temperature=_checked("temperature", per_row("temperature", self.temperature, B)),
            top_p=_checked("top_p", per_row("top_p", self.top_p, B)),
            greedy=self.greedy,
            max_new_tokens=check_int("max_new_tokens", self.max_new_tokens),
            seeds=None if self.greedy else row_seeds(self.seed, B),
            penalties={name: _checked(name, per_row(name, getattr(self, name), B))
                       for name in NEUTRAL_PENALTIES},
            no_repeat_ngram_size=check_int("no_repeat_ngram_size", self.no_repeat_ngram_size),
            stop=stop_strings(self.stop))


@dataclass(frozen=True)
class RowParams:
    """``SamplingParams`` validated for a batch: per-row Python values. ``ratios``: K lists
    of B ratios (None in kl mode); ``kl``: (budgets, caps), B each, or None; ``seeds``: one
    Philox seed per row when sampling, else None; ``penalties``: B values of each penalty
    (the names of ``NEUTRAL_PENALTIES``); ``stop``: the stop strings, a tuple."""

    ratios: list[list[float]] | None
    kl: tuple[list[float], list[float]] | None
    temperature: list[float]
    top_p: list[float]
    greedy: bool
    max_new_tokens: int
    seeds: list[int] | None
    penalties: dict = dataclasses.field(default_factory=dict)
    no_repeat_ngram_size: int = 0
    stop: tuple = ()

    @property
    def penalized(self) -> bool:
        """Some row has a penalty that is not neutral (else the step takes no history)."""
        return any(v != NEUTRAL_PENALTIES[name] for name, values in self.penalties.items()
                   for v in values)


def per_row(name: str, value, B: int, cast=float) -> list:
    """One value, or one per prompt (a list or a [B] tensor), as a list of B."""
    import torch

    if isinstance(value, (list, tuple)):
        if len(value) != B:
            raise ValueError(f"{name} has {len(value)} values for {B} prompts")
        return [_cast(name, v, cast) for v in value]
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return [_cast(name, value.item(), cast)] * B
        if value.shape != (B,):
            raise ValueError(f"{name} must be a number or {B} values; got shape "
                             f"{list(value.shape)}")
        return [_cast(name, v, cast) for v in value.tolist()]
    return [_cast(name, value, cast)] * B


def _cast(name, v, cast):
    if isinstance(v, bool) or not isinstance(v, int if cast is int else (int, float)):
        kind = "an int" if cast is int else "a number"
        raise TypeError(f"{name} must be {kind} or one per prompt; got {v!r} "
                        f"({type(v).__name__})")
    return cast(v)


def _checked(name: str, values: list[float]) -> list[float]:
    for v in values:
        check_number(name, v, "a number or one per prompt")
    return values


def _ratios(ratio, B: int, K: int) -> list[list[float]]:
    """K lists of B ratios. ``ratio``: one number; one per prompt, each a number or (K > 1)
    a list of K numbers, one per principle; or a [B] tensor."""
    if isinstance(ratio, (list, tuple)):
        if len(ratio) != B:
            raise ValueError(f"ratio has {len(ratio)} values for {B} prompts (pass one number, "
                             "or one per prompt: a number or a list with one per principle)")
        rows = []
        for i, v in enumerate(ratio):
            if isinstance(v, (list, tuple)):
                if len(v) != K:
                    raise ValueError(f"ratio[{i}] has {len(v)} values for {K} principles")
                rows.append([_cast("ratio", x, float) for x in v])
            else:
                rows.append([_cast("ratio", v, float)] * K)
        per = [[rows[b][k] for b in range(B)] for k in range(K)]
    else:
        per = [per_row("ratio", ratio, B)] * K
    for k in range(K):
        _checked("ratio", per[k])
    return per


def stop_strings(stop) -> tuple:
    """``stop`` (None, one string, or a list of strings) as a tuple of non-empty strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise TypeError(f"stop must be a string or a list of strings; got {stop!r}")
    if any(not s for s in stop):
        raise ValueError("stop has an empty string; expected non-empty stop strings")
    return tuple(stop)


def row_seeds(seed, B: int) -> list[int]:
    """Per-row Philox seeds: a row's draws depend on its seed and the step only, never on the
    other rows or on where the row sits in the batch. ``seed``: an int (row i gets
    ``(seed + SEED_MIX (i + 1)) mod 2**63``), one int per prompt (used verbatim), or None
    (a base drawn from torch's global generator, so ``torch.manual_seed`` reproduces)."""
    if seed is None:
        import torch

        seed = int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, (list, tuple)):
        return [check_int("seed", s) for s in per_row("seed", seed, B, cast=int)]
    seed = check_int("seed", seed)
    return [(seed + SEED_MIX * (i + 1)) % SEED_LIMIT for i in range(B)]
