"""Does Linear Alignment make a model follow a principle? A judge-free evaluation (issue 7).

Every principle here comes with a program that decides whether an answer follows it (answer
language, capital letters, a required word, a length limit, a speaking style with marker
words, a closing question, no digits, a list format, a first word, no contractions,
emojis), so the evaluation needs no judge model. Each setting answers every prompt of
``linalign/data/eval_prompts.txt`` under every principle:

- ``none``: plain decoding without the principle (one answer per prompt, scored against
  every principle: the base rate);
- ``prompt``: plain decoding with the principle in the system message;
- ``la-r{R}``: Linear Alignment at ratio R;
- ``kl-{eps}``: Linear Alignment in kl mode with a per-token budget of eps nats (SPEC
  section 3), when ``LinearAligner.generate`` takes ``kl_budget=``;

each greedy and sampled (temperature, top-p and a fixed seed per prompt, the same in every
setting). Metrics per setting, per principle and overall:

- adherence: the fraction of answers the principle's scorer accepts (with a 95 % Wilson
  interval);
- degeneration, on the generated token ids without the end-of-turn token: ``rep3``, the
  fraction of an answer's 3-grams that repeat an earlier 3-gram of the same answer, and
  ``distinct2``, the fraction of its 2-grams that are distinct; both averaged over answers
  that have at least one such n-gram;
- perplexity of the answer under the same model conditioned on the conversation *without*
  the principle (the end-of-turn token included when the answer ended): ``ppl_mean`` the
  mean over answers of exp(mean NLL), ``ppl_median`` their median, ``ppl_pooled``
  exp(total NLL / total tokens). It is computed in one batched forward per chunk of
  answers (left-padded prompt, right-padded answer, masks), not one sample at a time.

``run_eval`` runs a grid; ``write_outputs`` writes PREFIX.csv (one row per setting and
principle, ``all`` for the overall), PREFIX.json (the same rows, the principles, the
prompts and the command that made them), PREFIX.samples.jsonl[.gz] (every answer with its
score) and PREFIX.png (adherence against degeneration; needs matplotlib, skipped with a
note without it). ``linalign eval`` and ``benchmarks/eval_principles.py`` are the command
lines. See docs/eval.md.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gzip
import inspect
import json
import math
import re
import sys
import time
import unicodedata
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Sequence

import torch

from .cli_args import integer, number as _rule_number

# ============================================================================ scorers
# Words: runs of letters, with inner apostrophes kept ("don't", "cookin'" keeps its trailing
# apostrophe only through the contraction patterns below).
_WORD = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)*")
_APOS = "['\u2019]"

#: Frequent function words of each language, disjoint (no word in both lists), so a count
#: tells the languages apart even in a 30-word answer. Words that are common in both (a,
#: on, me, plus, son, six) are in neither.
FRENCH_WORDS = frozenset("""
le la les un une des du de et est sont ou mais donc car ni que qui quoi dont au aux ce
cet cette ces il ils elle elles je tu nous vous leur leurs mon ma mes ton ta tes notre
votre vos pour par avec sans dans sur sous entre chez vers pas ne très aussi bien tout
tous toute toutes être avoir fait faire peut peuvent comme quand où y en se sa ses lui
c'est n'est qu'il j'ai d'un d'une l'eau voici ici alors puis ensuite bonjour merci oui
""".split())
ENGLISH_WORDS = frozenset("""
the and is are was were be been being of to in it its you your yours that this these
those with for from by at as or but not no yes if then than so do does did have has had
can could will would should may might must what which who whom how why when where there
here they them their we our us he him his she her i my an any some all each every into
about over under after before very just also only more most other such while because
""".split())


def words(text: str) -> list[str]:
    """The words of ``text`` (letters, inner apostrophes kept), in order."""
    return _WORD.findall(text)


def word_count(text: str) -> int:
    """Whitespace-separated pieces holding a letter or a digit ("-" bullets do not count,
    "20" does)."""
    return sum(1 for w in text.split() if any(c.isalnum() for c in w))


def has_letters(text: str) -> bool:
    return any(c.isalpha() for c in text)


def language_counts(text: str) -> tuple[int, int]:
    """(French function words, English function words) in ``text``; apostrophes are
    normalised to ' and "l'eau" also counts as "l'"."""
    fr = en = 0
    for w in words(text.replace("\u2019", "'").lower()):
        if w in FRENCH_WORDS or (len(w) > 2 and w[1] == "'" and w[0] in "cdjlmnst"):
            fr += 1
        elif w in ENGLISH_WORDS:
            en += 1
    return fr, en


def is_french(text: str) -> bool:
    """At least 3 French function words and more than twice as many as English ones."""
    fr, en = language_counts(text)
    return fr >= 3 and fr > 2 * en


def uppercase_ratio(text: str) -> tuple[float, int]:
    """(uppercase letters / cased letters, number of cased letters)."""
    cased = [c for c in text if c.isupper() or c.islower()]
    if not cased:
        return 0.0, 0
    return sum(c.isupper() for c in cased) / len(cased), len(cased)


def is_capitals(text: str) -> bool:
    """At least 10 cased letters, and 90 % or more of them upper case."""
    ratio, n = uppercase_ratio(text)
    return n >= 10 and ratio >= 0.9


PIRATE_MARKERS = re.compile(
    r"\b(?:ar+r+|ahoy|avast|aye|ye|yer|mate|matey|mateys|me\s+hearty|me\s+hearties|hearties|"
    r"landlubbers?|buccaneers?|scallywags?|shiver\s+me\s+timbers|booty|yo[\s-]*ho|"
    r"sea\s*dogs?|grog|doubloons?|savvy|blimey)\b"
    # dropped g: "sailin'", "cookin'" (a letter run ending in in' and not inside a word)
    r"|\b[^\W\d_]+in['\u2019](?![^\W\d_])", re.IGNORECASE)


def pirate_markers(text: str) -> int:
    """Occurrences of pirate marker words (arr, ahoy, aye, ye, mate, matey, me hearties,
    ..., and dropped-g words like sailin')."""
    return len(PIRATE_MARKERS.findall(text))


SHAKESPEARE_MARKERS = re.compile(
    r"\b(?:thou|thee|thy|thine|hath|doth|dost|hast|art\s+thou|shalt|wilt|canst|wouldst|"
    r"couldst|shouldst|ere|forsooth|prithee|methinks|verily|wherefore|hither|thither|"
    r"whence|anon|nay|alas|fie|o'er|'tis|'twas|mayhap|perchance)\b", re.IGNORECASE)


def shakespeare_markers(text: str) -> int:
    """Occurrences of Early Modern English markers (thou, thee, thy, hath, doth, ...)."""
    return len(SHAKESPEARE_MARKERS.findall(text.replace("\u2019", "'")))


def has_word(text: str, word: str) -> bool:
    """``word`` (or its plural with s/es) as a whole word, any case."""
    return re.search(rf"\b{re.escape(word)}(?:e?s)?\b", text, re.IGNORECASE) is not None


_TRAILING = " \t\r\n\"'\u2019\u201d)*_`]"


def ends_with_question(text: str) -> bool:
    """The last character, after closing quotes, brackets and markdown, is '?'."""
    return text.rstrip(_TRAILING).endswith(("?", "\uff1f"))


def has_digit(text: str) -> bool:
    """Any decimal digit, in any script (unicodedata category Nd)."""
    return any(unicodedata.category(c) == "Nd" for c in text)


_LIST_ITEM = re.compile(r"^\s*(?:[-*+\u2022\u2013]|\d{1,3}[.)])\s+\S", re.MULTILINE)


def list_items(text: str) -> int:
    """Lines that start with a bullet (- * + or a bullet sign) or a number and '.' / ')',
    followed by text."""
    return len(_LIST_ITEM.findall(text))


def first_word(text: str) -> str:
    """The first word, lower case, after any leading punctuation or markdown."""
    w = words(text)
    return w[0].lower().replace("\u2019", "'") if w else ""


CONTRACTIONS = re.compile(
    rf"\b[^\W\d_]+(?:n{_APOS}t|{_APOS}(?:re|ve|ll|m|d))\b"
    rf"|\b(?:it|that|there|here|what|who|where|when|why|how|he|she|let|this|everyone|"
    rf"nobody|someone|something|everything){_APOS}s\b", re.IGNORECASE)


def contractions(text: str) -> int:
    """Occurrences of contractions: n't, 're, 've, 'll, 'm, 'd, and 's after pronouns and
    question words (it's, that's, let's, ...; possessives like "the dog's" do not count)."""
    return len(CONTRACTIONS.findall(text))


_EMOJI_RANGES = ((0x1F000, 0x1FAFF), (0x2600, 0x27BF), (0x2B00, 0x2BFF), (0x2300, 0x23FF),
                 (0x1F1E6, 0x1F1FF))


def emoji_count(text: str) -> int:
    """Characters in the emoji blocks (pictographs, emoticons, transport, symbols and
    dingbats, flags)."""
    return sum(1 for c in text if any(lo <= ord(c) <= hi for lo, hi in _EMOJI_RANGES))


# ============================================================================ principles
@dataclass(frozen=True)
class Principle:
    """A preference in plain words (``text``, put in the system message) and the program
    that decides whether an answer follows it: ``check(answer_text, finish_reason)``;
    ``finish_reason`` is "eos" (the answer ended) or "length" (cut at max_new_tokens).
    ``rule`` says in one line what ``check`` tests."""
    name: str
    text: str
    rule: str
    check: Callable[[str, str], bool]

    def __call__(self, text: str, finish_reason: str = "eos") -> bool:
        return bool(self.check(text, finish_reason))


#: Answers of at most this many words pass "brief"; with max_new_tokens 48 an answer that
#: long (about 25 to 35 tokens) has room to end with its end-of-turn token.
BRIEF_WORDS = 20

_P = [
    Principle("french", "Always answer in French, never in English.",
              "at least 3 French function words and more than twice as many as English ones",
              lambda t, f: is_french(t)),
    Principle("capitals", "Write your whole answer in capital letters.",
              "at least 10 cased letters, 90 % or more upper case",
              lambda t, f: is_capitals(t)),
    Principle("pirate", "Talk like a pirate.",
              "at least 2 pirate markers (arr, ahoy, aye, ye, mate, matey, me hearties, "
              "sailin', ...)",
              lambda t, f: pirate_markers(t) >= 2),
    Principle("shakespeare", "Speak like a character in a Shakespeare play.",
              "at least 2 Early Modern English markers (thou, thee, thy, hath, doth, ...)",
              lambda t, f: shakespeare_markers(t) >= 2),
    Principle("banana", "Mention bananas in your answer.",
              "the word banana or bananas, any case",
              lambda t, f: has_word(t, "banana")),
    Principle("brief", f"Answer in at most {BRIEF_WORDS} words.",
              f"the answer ended (not cut at max_new_tokens) with 1 to {BRIEF_WORDS} words",
              lambda t, f: f == "eos" and 1 <= word_count(t) <= BRIEF_WORDS),
    Principle("question", "End your answer with a question for the user.",
              "the answer ended (not cut) and its last character is '?' (after closing "
              "quotes and markdown)",
              lambda t, f: f == "eos" and ends_with_question(t)),
    Principle("no-digits", "Never use digits; write all numbers out in words.",
              "letters and no digit (0-9 or any other script's)",
              lambda t, f: has_letters(t) and not has_digit(t)),
    Principle("bullets", "Format your answer as a bulleted list.",
              "at least 2 lines starting with a bullet (- * + \u2022) or '1.' / '1)'",
              lambda t, f: list_items(t) >= 2),
    Principle("indeed", "Begin your answer with the word 'Indeed'.",
              "the first word is 'indeed' (any case, after leading punctuation)",
              lambda t, f: first_word(t) == "indeed"),
    Principle("formal", "Write formally and never use contractions.",
              "at least 3 words and no contraction (n't 're 've 'll 'm 'd, it's, that's, ...)",
              lambda t, f: len(words(t)) >= 3 and contractions(t) == 0),
    Principle("emoji", "Use emojis in your answer.",
              "at least one emoji character",
              lambda t, f: emoji_count(t) >= 1),
]
#: The principles, by name, in the order of the tables.
PRINCIPLES: dict[str, Principle] = {p.name: p for p in _P}


# ============================================================================ prompts
def load_prompts(path: str | None = None) -> list[str]:
    """The evaluation prompts: one per line, '#' comments and blank lines skipped. Default:
    the file shipped as package data, ``linalign/data/eval_prompts.txt``."""
    if path is None:
        text = resources.files("linalign").joinpath("data/eval_prompts.txt").read_text(
            encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"no prompts in {path or 'linalign/data/eval_prompts.txt'}: one "
                         "prompt per line expected ('#' lines are comments)")
    return prompts


# ============================================================================ metrics
def _ngrams(ids: Sequence[int], n: int) -> list[tuple]:
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def repeated_ngram_rate(ids: Sequence[int], n: int = 3) -> float | None:
    """Fraction of the n-grams of ``ids`` that repeat an earlier n-gram of the same
    sequence: 1 - distinct / total. None when the sequence has no n-gram."""
    grams = _ngrams(list(ids), n)
    return None if not grams else 1.0 - len(set(grams)) / len(grams)


def distinct_n(ids: Sequence[int], n: int = 2) -> float | None:
    """Distinct n-grams / n-grams of one sequence; None when it has no n-gram."""
    grams = _ngrams(list(ids), n)
    return None if not grams else len(set(grams)) / len(grams)


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k / n (95 % for z = 1.96)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


#: An answer whose repeated 3-gram rate is above this counts as degenerate in ``clean``.
CLEAN_REP3 = 0.2


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _median(values) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    m = len(values) // 2
    return values[m] if len(values) % 2 else (values[m - 1] + values[m]) / 2


@torch.inference_mode()
def response_nll(model, contexts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                 *, pad_id: int = 0, batch_size: int = 64,
                 max_logits: int = 2 ** 28) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each response under ``model``, given
    its context: -sum_j log p(response_j | context, response_<j).

    Batched: each chunk is one forward over [context left-padded | response right-padded]
    with an attention mask and position ids counted from each row's first real token, so a
    row scores as it would alone (up to fp32 rounding). Only the response positions' logits
    are kept (``logits_to_keep`` when the model takes it), and a chunk holds at most
    ``max_logits`` logits (1 GiB of fp32 by default) besides ``batch_size`` rows. An empty
    response gives (0.0, 0).
    """
    # contexts, responses: B lists of ids -> B (nll, n)
    if len(contexts) != len(responses):
        raise ValueError(f"{len(contexts)} contexts for {len(responses)} responses")
    out: list[tuple[float, int]] = [(0.0, 0)] * len(contexts)
    todo = [i for i, r in enumerate(responses) if len(r)]
    if not todo:
        return out
    for i in todo:
        if not len(contexts[i]):
            raise ValueError(f"context {i} is empty: the first response token needs one")
    dev = next(model.parameters()).device
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    V = model.get_output_embeddings().weight.shape[0]
    R_all = max(len(responses[i]) for i in todo)
    rows = max(1, min(batch_size, max_logits // ((R_all + 1) * V)))
    todo.sort(key=lambda i: len(contexts[i]) + len(responses[i]))  # less padding per chunk
    for start in range(0, len(todo), rows):
        chunk = todo[start:start + rows]
        Lc = max(len(contexts[i]) for i in chunk)
        R = max(len(responses[i]) for i in chunk)
        ids = torch.full((len(chunk), Lc + R), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, i in enumerate(chunk):
            c, r = list(contexts[i]), list(responses[i])
            ids[b, Lc - len(c):Lc + len(r)] = torch.tensor(c + r)
            mask[b, Lc - len(c):Lc + len(r)] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kw = {"logits_to_keep": R + 1} if keep else {}
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                       use_cache=False, **kw).logits
        # the logits at positions Lc - 1 .. Lc + R - 2 predict the response tokens
        logits = logits[:, -(R + 1):-1] if keep else logits[:, Lc - 1:Lc + R - 1]
        target = ids[:, Lc:]
        nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                target.reshape(-1), reduction="none")
        on = mask[:, Lc:].bool()
        nll = torch.where(on, nll.view(len(chunk), R), 0.0)  # where: padded rows may be NaN
        sums, counts = nll.sum(1).tolist(), on.sum(1).tolist()
        for b, i in enumerate(chunk):
            out[i] = (float(sums[b]), int(counts[b]))
    return out


# ============================================================================ settings
@dataclass(frozen=True)
class Setting:
    """One way of answering: ``kind`` "none", "prompt", "la" (``value`` = ratio) or "kl"
    (``value`` = per-token budget in nats)."""
    name: str
    kind: str
    value: float | None = None


def parse_setting(name: str) -> Setting:
    """``none``, ``prompt``, ``la-r{R}`` (e.g. la-r3) or ``kl-{eps}`` (e.g. kl-0.5)."""
    name = name.strip()
    if name in ("none", "prompt"):
        return Setting(name, name)
    m = re.fullmatch(r"(la-r|kl-)([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)", name)
    if m:
        value = float(m.group(2))
        if math.isfinite(value) and (m.group(1) == "la-r" or value > 0):
            return Setting(name, "la" if m.group(1) == "la-r" else "kl", value)
    raise ValueError(f"unknown setting {name!r}: expected none, prompt, la-r<ratio> (e.g. "
                     "la-r3) or kl-<budget in nats, > 0> (e.g. kl-0.5)")


DECODINGS = ("greedy", "sampled")
#: Ratios 1 to 8 bracket the authors' 3 (HH) and 5 (preferences). The kl budgets are chosen
#: so that their effective ratios span the same range: on SmolLM2-135M-Instruct at T = 0.5
#: (24 answers, 573 positions) the variance v of (z_p - z_0) / T under the base branch had
#: quartiles 0.002, 0.027 and 0.18, so sqrt(2 eps / v) - 1 has a median of about 1.7, 4
#: and 7.6 for eps = 0.1, 0.3 and 1 (before the cap of max_ratio; see docs/eval.md).
DEFAULT_SETTINGS = "none,prompt,la-r1,la-r3,la-r5,la-r8,kl-0.1,kl-0.3,kl-1"
#: The authors' temperature and nucleus (SPEC section 1); 48 new tokens leave room for every
#: principle to show (and for a brief answer to end).
DEFAULT_MAX_NEW_TOKENS = 48
DEFAULT_TEMPERATURE = 0.5
DEFAULT_TOP_P = 0.8
_SEED_MIX = 0x9E3779B97F4A7C15


def kl_supported(aligner=None) -> bool:
    """Whether ``aligner.generate`` (default: ``LinearAligner.generate``) takes
    ``kl_budget=`` (SPEC section 3)."""
    if aligner is None:
        from .decoder import LinearAligner
        aligner = LinearAligner
    return "kl_budget" in inspect.signature(aligner.generate).parameters


def prompt_seeds(seed: int, n: int) -> list[int]:
    """One sampling seed per prompt, the same in every setting and for every principle, so
    settings differ by their distributions, not by their luck."""
    return [(seed + _SEED_MIX * (i + 1)) % 2 ** 63 for i in range(n)]


# ============================================================================ the harness
def _log(progress, text):
    if progress is not None:
        print(text, file=progress, flush=True)


def _generate_rows(aligner, setting, rows, prompts, principles, *, greedy, seeds,
                   batch_size, kw):
    """Answers for ``rows`` [(principle name or None, prompt index)], in batches."""
    texts, ids, reasons, ratios = [], [], [], []
    for s in range(0, len(rows), batch_size):
        part = rows[s:s + batch_size]
        qs = [prompts[j] for _, j in part]
        ps = [principles[n].text for n, _ in part] if setting.kind != "none" else None
        call = dict(kw, greedy=greedy, seed=None if greedy else [seeds[j] for _, j in part])
        if setting.kind in ("none", "prompt"):
            res = aligner.generate_plain(qs, ps, **call)
        elif setting.kind == "la":
            res = aligner.generate(qs, ps, ratio=setting.value, **call)
        else:
            res = aligner.generate(qs, ps, ratio=None, kl_budget=setting.value, **call)
        texts += res.texts
        ids += res.token_ids
        reasons += res.finish_reasons
        # the decoder's mean ratio per row (kl mode: the effective ratio), when it says
        r = res.extra.get("ratio") if setting.kind in ("la", "kl") else None
        ratios += list(r) if r is not None else [setting.value if setting.kind == "la"
                                                  else None] * len(part)
    return texts, ids, reasons, ratios


def run_eval(aligner, *, principles: Sequence[str] | None = None,
             prompts: Sequence[str] | None = None, settings: Sequence[str] | str =
             DEFAULT_SETTINGS, decodings: Sequence[str] = DECODINGS,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
             seed: int = 0, batch_size: int = 64, ppl_batch_size: int | None = None,
             kl_max_ratio: float | None = None, fast: bool = False, progress=sys.stderr,
             on_run: Callable[[dict], None] | None = None):
    """Answer every prompt under every principle in every setting and decoding; score.

    Returns ``{"rows": [...], "samples": [...], "skipped": [...], "timing": {...}}``: rows as
    ``summarise`` makes them; one sample per (setting, decoding, principle, prompt) with its
    text, token ids, finish reason, score, rep3, distinct2, NLL and perplexity. ``none``
    answers each prompt once and scores that answer against every principle. kl settings
    are skipped (listed in "skipped", with a note on ``progress``) when the decoder has no
    kl mode. ``on_run``, if given, is called with the result so far after each setting and
    decoding (the command writes its files then, so a run cut short keeps what it did).
    """
    names = list(PRINCIPLES) if principles is None else list(principles)
    for n in names:
        if n not in PRINCIPLES:
            raise ValueError(f"unknown principle {n!r}; known: {', '.join(PRINCIPLES)}")
    prompts = load_prompts() if prompts is None else list(prompts)
    if isinstance(settings, str):
        settings = [s for s in settings.split(",") if s.strip()]
    parsed = [parse_setting(s) for s in settings]
    for d in decodings:
        if d not in DECODINGS:
            raise ValueError(f"unknown decoding {d!r}; expected one of {DECODINGS}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    skipped = []
    if any(s.kind == "kl" for s in parsed) and not kl_supported(aligner):
        skipped = [s.name for s in parsed if s.kind == "kl"]
        _log(progress, f"note: this decoder has no kl mode (LinearAligner.generate takes no "
                       f"kl_budget=); skipping {', '.join(skipped)}")
        parsed = [s for s in parsed if s.kind != "kl"]
    kw = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, fast=fast)
    if kl_max_ratio is not None and not skipped:
        kl_kw = {"max_ratio": kl_max_ratio}
    else:
        kl_kw = {}
    seeds = prompt_seeds(seed, len(prompts))
    base = [aligner.encode(aligner.prompt_texts(q, None)) for q in prompts]
    model = aligner.model
    samples, timing = [], {}
    for decoding in decodings:
        greedy = decoding == "greedy"
        for setting in parsed:
            if setting.kind == "none":
                rows = [(None, j) for j in range(len(prompts))]
            else:
                rows = [(n, j) for n in names for j in range(len(prompts))]
            t0 = time.perf_counter()
            texts, ids, reasons, ratios = _generate_rows(
                aligner, setting, rows, prompts, PRINCIPLES, greedy=greedy, seeds=seeds,
                batch_size=batch_size, kw=dict(kw, **(kl_kw if setting.kind == "kl" else {})))
            t1 = time.perf_counter()
            nll = response_nll(model, [base[j] for _, j in rows], ids, pad_id=aligner.pad_id,
                               batch_size=ppl_batch_size or batch_size)
            t2 = time.perf_counter()
            timing[f"{setting.name}/{decoding}"] = {"generate_s": t1 - t0, "ppl_s": t2 - t1,
                                                    "answers": len(rows)}
            for (n, j), text, tok, why, ratio, (s_nll, cnt) in zip(rows, texts, ids, reasons,
                                                                    ratios, nll):
                core = tok[:-1] if why == "eos" else tok  # the end-of-turn token is no text
                shared = dict(setting=setting.name, kind=setting.kind, value=setting.value,
                              decoding=decoding, prompt_index=j, text=text, token_ids=tok,
                              finish_reason=why, n_tokens=len(tok), ratio=ratio,
                              rep3=repeated_ngram_rate(core, 3), distinct2=distinct_n(core, 2),
                              nll=s_nll, nll_tokens=cnt,
                              ppl=math.exp(s_nll / cnt) if cnt else None)
                for name in (names if n is None else [n]):
                    samples.append(dict(shared, principle=name,
                                        passed=PRINCIPLES[name](text, why)))
            rate = _mean(float(s["passed"]) for s in samples
                         if s["setting"] == setting.name and s["decoding"] == decoding)
            _log(progress, f"{setting.name}/{decoding}: {len(rows)} answers in "
                           f"{t1 - t0:.1f} s, perplexity in {t2 - t1:.1f} s; adherence "
                           f"{rate:.3f}")
            if on_run is not None:
                on_run({"rows": summarise(samples, names), "samples": samples,
                        "skipped": skipped, "timing": timing})
    return {"rows": summarise(samples, names), "samples": samples, "skipped": skipped,
            "timing": timing}


def summarise(samples, principles: Sequence[str] | None = None) -> list[dict]:
    """One row per (setting, decoding, principle) and per (setting, decoding) over all
    principles (principle "all"), in the order the samples came: n, adherence and its 95 %
    Wilson interval, ``clean`` (the fraction that passes *and* has rep3 <= CLEAN_REP3: the
    principle followed without degenerating), rep3, distinct2, ppl_mean, ppl_median,
    ppl_pooled, mean_tokens, eos_rate and mean_ratio (the decoder's mean ratio per answer,
    averaged; the effective ratio in kl mode; empty for none and prompt)."""
    groups: dict[tuple, list] = {}
    runs: dict[tuple, int] = {}  # (setting, decoding) -> first-seen order
    for s in samples:
        runs.setdefault((s["setting"], s["decoding"]), len(runs))
        groups.setdefault((s["setting"], s["decoding"], s["principle"]), []).append(s)
        groups.setdefault((s["setting"], s["decoding"], "all"), []).append(s)
    order = {n: i for i, n in enumerate(list(principles or PRINCIPLES) + ["all"])}
    keys = sorted(groups, key=lambda k: (runs[k[:2]], order.get(k[2], len(order))))
    rows = []
    for key in keys:
        g = groups[key]
        k = sum(bool(s["passed"]) for s in g)
        lo, hi = wilson_interval(k, len(g))
        nll, cnt = sum(s["nll"] for s in g), sum(s["nll_tokens"] for s in g)
        rows.append(dict(setting=key[0], decoding=key[1], principle=key[2], n=len(g),
                         adherence=k / len(g), adherence_lo=lo, adherence_hi=hi,
                         clean=_mean(float(bool(s["passed"]) and (s["rep3"] or 0.0) <=
                                           CLEAN_REP3) for s in g),
                         rep3=_mean(s["rep3"] for s in g),
                         distinct2=_mean(s["distinct2"] for s in g),
                         ppl_mean=_mean(s["ppl"] for s in g),
                         ppl_median=_median(s["ppl"] for s in g),
                         ppl_pooled=math.exp(nll / cnt) if cnt else None,
                         mean_tokens=_mean(s["n_tokens"] for s in g),
                         eos_rate=_mean(float(s["finish_reason"] == "eos") for s in g),
                         mean_ratio=_mean(s.get("ratio") for s in g)))
    return rows


# ============================================================================ outputs
CSV_FIELDS = ["setting", "decoding", "principle", "n", "adherence", "adherence_lo",
              "adherence_hi", "clean", "rep3", "distinct2", "ppl_mean", "ppl_median",
              "ppl_pooled", "mean_tokens", "eos_rate", "mean_ratio", "generate_s", "model",
              "device", "dtype", "max_new_tokens", "temperature", "top_p", "seed", "torch",
              "transformers", "date"]
_META_FIELDS = CSV_FIELDS[CSV_FIELDS.index("model"):]


def write_outputs(result, prefix: str, meta: dict, *, gzip_samples: bool = False,
                  samples: bool = True, plot: bool = True, progress=sys.stderr) -> list[str]:
    """Write PREFIX.csv, PREFIX.json, PREFIX.samples.jsonl(.gz) (unless ``samples`` is
    False) and PREFIX.png (unless ``plot`` is False); return the paths written."""
    import os
    folder = os.path.dirname(prefix)
    if folder:
        os.makedirs(folder, exist_ok=True)
    paths = []
    rows = result["rows"]
    with open(prefix + ".csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            t = result["timing"].get(f"{r['setting']}/{r['decoding']}", {})
            w.writerow({**{k: _fmt(v) for k, v in r.items()},
                        "generate_s": _fmt(t.get("generate_s")),
                        **{k: meta.get(k, "") for k in _META_FIELDS}})
    paths.append(prefix + ".csv")
    summary = {"meta": meta, "rows": rows, "skipped": result["skipped"],
               "timing": result["timing"],
               "principles": {n: {"text": p.text, "rule": p.rule}
                              for n, p in PRINCIPLES.items()
                              if any(r["principle"] == n for r in rows)},
               "prompts": meta.get("prompts")}
    with open(prefix + ".json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    paths.append(prefix + ".json")
    if samples:
        spath = prefix + ".samples.jsonl" + (".gz" if gzip_samples else "")
        opener = gzip.open if gzip_samples else open
        with opener(spath, "wt", encoding="utf-8") as f:
            for s in result["samples"]:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        paths.append(spath)
    if plot:
        png = plot_summary(rows, prefix + ".png", title=meta.get("title"), progress=progress)
        if png:
            paths.append(png)
    return paths


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)


_KIND_COLOURS = {"none": "tab:gray", "prompt": "tab:blue", "la": "tab:red", "kl": "tab:green"}


def plot_summary(rows, path: str, *, title: str | None = None, progress=sys.stderr):
    """Overall adherence against degeneration (rep3) and against perplexity, one point per
    setting and decoding (circles greedy, triangles sampled). Needs matplotlib; without it
    prints a note and returns None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log(progress, "note: matplotlib is not installed; no plot written "
                       "(pip install matplotlib)")
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
                        color=_KIND_COLOURS[kind], ms=6, capsize=2, lw=0.8)
            ax.annotate(r["setting"], (r[key], r["adherence"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("adherence (all principles)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=k)
               for k, c in _KIND_COLOURS.items()] + \
        [plt.Line2D([], [], color="k", marker=m, ls="", label=d)
         for m, d in (("o", "greedy"), ("^", "sampled"))]
    axes[0].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(title or "Principle adherence against degeneration (95 % Wilson intervals)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_report(summary: dict) -> str:
    """Markdown tables from a PREFIX.json: the settings overall, then adherence per
    principle (one column per setting, greedy and sampled), then a candidate default."""
    rows = summary["rows"]
    overall = [r for r in rows if r["principle"] == "all"]
    lines = ["| setting | decoding | adherence (95 % CI) | clean | rep-3 | distinct-2 | "
             "ppl pooled | ppl median | tokens | ended | mean r |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in overall:
        lines.append(f"| {r['setting']} | {r['decoding']} | {r['adherence']:.3f} "
                     f"({r['adherence_lo']:.2f}-{r['adherence_hi']:.2f}) | "
                     f"{_num(r.get('clean'))} | {_num(r['rep3'])} | "
                     f"{_num(r['distinct2'])} | {_num(r['ppl_pooled'], 2)} | "
                     f"{_num(r['ppl_median'], 2)} | {_num(r['mean_tokens'], 1)} | "
                     f"{_num(r['eos_rate'], 2)} | {_num(r.get('mean_ratio'), 2)} |")
    for decoding in dict.fromkeys(r["decoding"] for r in overall):
        settings = [r["setting"] for r in overall if r["decoding"] == decoding]
        names = list(dict.fromkeys(r["principle"] for r in rows if r["principle"] != "all"))
        cell = {(r["setting"], r["principle"]): r for r in rows if r["decoding"] == decoding}
        lines += ["", f"Adherence per principle, {decoding}:", "",
                  "| principle | " + " | ".join(settings) + " |",
                  "|---|" + "---|" * len(settings)]
        for n in names + ["all"]:
            vals = [cell.get((s, n)) for s in settings]
            best = max((v["adherence"] for v in vals if v), default=None)
            lines.append(f"| {n} | " + " | ".join(
                "" if v is None else (f"**{v['adherence']:.2f}**" if v["adherence"] == best
                                      else f"{v['adherence']:.2f}") for v in vals) + " |")
    pick = candidate_default(summary)
    if pick:
        lines += ["", pick]
    return "\n".join(lines)


def candidate_default(summary: dict, ppl_factor: float = 1.5, rep_margin: float = 0.05):
    """The Linear Alignment setting (la or kl) with the highest overall adherence whose
    pooled perplexity is at most ``ppl_factor`` times that of ``prompt`` (same decoding)
    and whose rep3 is at most ``rep_margin`` above it; a sentence, or None."""
    overall = [r for r in summary["rows"] if r["principle"] == "all"]
    out = []
    for decoding in dict.fromkeys(r["decoding"] for r in overall):
        ref = next((r for r in overall if r["decoding"] == decoding and
                    r["setting"] == "prompt"), None)
        if ref is None or ref["ppl_pooled"] is None:
            continue
        ok = [r for r in overall if r["decoding"] == decoding and
              parse_setting(r["setting"]).kind in ("la", "kl") and r["ppl_pooled"] is not None
              and r["ppl_pooled"] <= ppl_factor * ref["ppl_pooled"] and
              (r["rep3"] or 0) <= (ref["rep3"] or 0) + rep_margin]
        if ok:
            best = max(ok, key=lambda r: r["adherence"])
            out.append(f"{decoding}: {best['setting']} (adherence {best['adherence']:.3f} "
                       f"against {ref['adherence']:.3f} for the principle in the prompt only)")
        else:
            out.append(f"{decoding}: no Linear Alignment setting stays within the limits")
    if not out:
        return None
    return (f"Candidate default (highest adherence with pooled perplexity at most "
            f"{ppl_factor:g} x and rep-3 at most {rep_margin:g} above the principle-in-prompt "
            f"setting): " + "; ".join(out) + ".")


def _num(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


# ============================================================================ command line




def _configure(p: argparse.ArgumentParser, default_out: str | None):
    p.add_argument("--settings", default=DEFAULT_SETTINGS,
                   help="comma-separated: none, prompt, la-r<ratio>, kl-<budget nats> "
                   "(default %(default)s; kl settings are skipped with a note when the "
                   "decoder has no kl mode)")
    p.add_argument("--decodings", default=",".join(DECODINGS),
                   help="greedy, sampled or both (default %(default)s)")
    p.add_argument("--principles", default=None,
                   help=f"comma-separated subset of: {', '.join(PRINCIPLES)} (default: all)")
    p.add_argument("--prompts", type=integer(1), default=None, metavar="N",
                   help="use the first N prompts only (default: all)")
    p.add_argument("--prompt-file", default=None, metavar="PATH",
                   help="prompts, one per line (default: linalign/data/eval_prompts.txt)")
    p.add_argument("--max-new-tokens", type=integer(1), default=DEFAULT_MAX_NEW_TOKENS,
                   help="default %(default)s")
    p.add_argument("--temperature", type=_rule_number("temperature"),
                   default=DEFAULT_TEMPERATURE, help="default %(default)s")
    p.add_argument("--top-p", type=_rule_number("top_p"),
                   default=DEFAULT_TOP_P, help="default %(default)s")
    p.add_argument("--seed", type=integer(0), default=0,
                   help="base seed of the sampled settings (default %(default)s)")
    p.add_argument("--kl-max-ratio", type=_rule_number("max_ratio"), default=None,
                   help="max_ratio of the kl settings (default: the decoder's)")
    p.add_argument("--batch-size", type=integer(1), default=64,
                   help="prompts per generate call (default %(default)s; a GPU takes the "
                   "whole setting at once, e.g. 576)")
    p.add_argument("--ppl-batch-size", type=integer(1), default=None,
                   help="answers per perplexity forward (default: --batch-size; at most "
                   "1 GiB of logits per forward either way)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: "
                   "cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="model weights (default %(default)s)")
    p.add_argument("--fast", action="store_true",
                   help="decode with fast=True (static cache; a CUDA graph on a GPU)")
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a local Hugging Face causal-LM folder or .gguf file (default: the "
                   "embedded SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=integer(1), default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=default_out, metavar="PREFIX",
                   help="write PREFIX.csv, PREFIX.json, PREFIX.samples.jsonl and PREFIX.png "
                   "(default %(default)s; <device> becomes cpu or cuda)")
    p.add_argument("--gzip-samples", action="store_true",
                   help="write PREFIX.samples.jsonl.gz instead")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="print the Markdown tables of an earlier PREFIX.json and exit (no "
                   "model is loaded)")
    return p


def add_eval_parser(subparsers, parser_class=argparse.ArgumentParser):
    """Add the ``eval`` subcommand to ``linalign``'s subparsers (the subparsers' own parser
    class is used; ``parser_class`` is for ``build_eval_parser``)."""
    p = subparsers.add_parser(
        "eval", help="measure principle adherence, degeneration and perplexity",
        description="Answer the evaluation prompts under each principle with no principle, "
        "the principle in the prompt only, and Linear Alignment at several ratios (and kl "
        "budgets); score each answer with the principle's program; write a CSV, a JSON, "
        "the answers and a plot. See docs/eval.md.")
    p.set_defaults(run_command=eval_command)
    return _configure(p, "eval_<device>")


def build_eval_parser(parser_class=argparse.ArgumentParser, *, prog="linalign eval",
                      default_out="eval_<device>"):
    """A stand-alone parser with the same options (benchmarks/eval_principles.py)."""
    p = parser_class(prog=prog, description="Principle adherence of Linear Alignment "
                     "(see docs/eval.md).")
    return _configure(p, default_out)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected cpu, cuda, cuda:N or auto")
    return dev


def _versions():
    import platform
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        out["transformers"] = ""
    return out


def _command_line() -> str:
    """The command that is running, as a user would type it."""
    import os
    import shlex
    argv = list(sys.argv) or ["linalign"]
    head = argv[0]
    if head.endswith(".py"):
        head = "python " + os.path.relpath(head)
    elif os.path.basename(head) in ("linalign", "__main__.py"):
        head = "linalign"
    return " ".join([head] + [shlex.quote(a) for a in argv[1:]])


def eval_command(args, out=None, progress=None) -> int:
    """Run ``linalign eval`` with parsed ``args``; print the summary tables; return 0.

    Bad values raise ``ValueError`` (the command prints one line, exit code 2)."""
    out = sys.stdout if out is None else out
    progress = sys.stderr if progress is None else progress
    if args.report:
        with open(args.report, encoding="utf-8") as f:
            out.write(markdown_report(json.load(f)) + "\n")
        return 0
    settings = [s for s in args.settings.split(",") if s.strip()]
    if not settings:
        raise ValueError("--settings is empty")
    for s in settings:
        parse_setting(s)
    decodings = [d.strip() for d in args.decodings.split(",") if d.strip()]
    if not decodings or any(d not in DECODINGS for d in decodings):
        raise ValueError(f"--decodings {args.decodings}: expected greedy, sampled or both")
    names = None if args.principles is None else \
        [n.strip() for n in args.principles.split(",") if n.strip()]
    for n in names or []:
        if n not in PRINCIPLES:
            raise ValueError(f"--principles: unknown principle {n!r}; known: "
                             f"{', '.join(PRINCIPLES)}")
    prompts = load_prompts(args.prompt_file)[:args.prompts]
    dev = _resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    from . import models
    from .decoder import LinearAligner
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - models raises the helpful error
        pass
    t0 = time.perf_counter()
    model, tokenizer = models.load_model(args.model, device=dev, dtype=dtype)
    model_name = args.model or "SmolLM2-135M-Instruct (embedded)"
    aligner = LinearAligner(model, tokenizer)
    _log(progress, f"model {model_name} on {dev} ({args.dtype}) in "
                   f"{time.perf_counter() - t0:.1f} s; {torch.get_num_threads()} torch "
                   f"threads; {len(prompts)} prompts x {len(names or PRINCIPLES)} principles")
    device_name = dev.type
    meta = dict(command=_command_line(), model=model_name, device=device_name,
                device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                "cpu", dtype=args.dtype, threads=torch.get_num_threads(),
                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                fast=args.fast, settings=settings, decodings=decodings,
                kl_max_ratio=args.kl_max_ratio, total_seconds=None, partial=True,
                prompts=prompts, date=datetime.date.today().isoformat(), **_versions())
    prefix = args.out.replace("<device>", device_name) if args.out else None

    def checkpoint(partial):  # the tables so far (no answers file, no plot)
        if prefix:
            write_outputs(partial, prefix, meta, samples=False, plot=False)

    t0 = time.perf_counter()
    result = run_eval(aligner, principles=names, prompts=prompts, settings=settings,
                      decodings=decodings, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      batch_size=args.batch_size, ppl_batch_size=args.ppl_batch_size,
                      kl_max_ratio=args.kl_max_ratio, fast=args.fast, progress=progress,
                      on_run=checkpoint)
    total = time.perf_counter() - t0
    meta.update(total_seconds=total, partial=False)
    if prefix:
        paths = write_outputs(result, prefix, meta, gzip_samples=args.gzip_samples,
                              plot=not args.no_plot, progress=progress)
        _log(progress, "wrote " + ", ".join(paths))
    summary = {"rows": result["rows"]}
    out.write(markdown_report(summary) + "\n")
    _log(progress, f"evaluation took {total:.1f} s")
    return 0
