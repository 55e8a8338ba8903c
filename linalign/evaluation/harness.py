"""The evaluation grid and its run: settings, prompts, seeds, ``run_eval`` and ``summarise``.

Each setting answers every prompt under every principle, greedy and sampled:

- ``none``: plain decoding without the principle (one answer per prompt, scored against
  every principle: the base rate);
- ``prompt``: plain decoding with the principle in the system message;
- ``la-r{R}``: Linear Alignment at ratio R;
- ``kl-{eps}``: Linear Alignment in kl mode with a per-token budget of eps nats, its ratio
  capped at ``max_ratio`` (docs/semantics.md, "kl mode").

Sampled answers use one seed per prompt, the same in every setting and for every
principle. Every answer is scored by its principle (``linalign.evaluation.scorers``), and
measured for repetition and for its perplexity under the model without the principle
(``linalign.evaluation.metrics``). Settings, choices and costs: docs/eval.md.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Sequence

from ..options import RULES, SamplingParams, check_int, check_number, row_seeds
from .metrics import (CLEAN_REP3, distinct_n, mcnemar_exact, mean, median, repeated_ngram_rate,
                      response_nll, wilson_interval)
from .scorers import PRINCIPLES

DECODINGS = ("greedy", "sampled")
#: Ratios 1 to 8 bracket the authors' 3 (HH) and 5 (preferences). The kl budgets are chosen
#: so that their effective ratios span the same range: on SmolLM2-135M-Instruct at T = 0.5
#: (24 answers, 573 positions) the variance v of (z_p - z_0) / T under the base branch had
#: quartiles 0.002, 0.027 and 0.18, so sqrt(2 eps / v) - 1 has a median of about 1.7, 4
#: and 7.6 for eps = 0.1, 0.3 and 1 (before the cap of max_ratio; see docs/eval.md).
DEFAULT_SETTINGS = "none,prompt,la-r1,la-r3,la-r5,la-r8,kl-0.1,kl-0.3,kl-1"
#: The protocol's answer length, not the library's: 48 new tokens leave room for every
#: principle to show (and for a brief answer to end).
DEFAULT_MAX_NEW_TOKENS = 48
#: Temperature, nucleus and kl cap: the library's defaults (``SamplingParams``), the
#: authors' T = 0.5 and top-p 0.8.
DEFAULT_TEMPERATURE = SamplingParams.temperature
DEFAULT_TOP_P = SamplingParams.top_p
DEFAULT_MAX_RATIO = SamplingParams.max_ratio
#: The base seed of the sampled settings: fixed, so that a run is reproducible.
DEFAULT_SEED = 0


# ============================================================================ settings
#: The modifiers a setting may carry after "+": the decoder's repetition controls
#: (docs/decoder.md), e.g. ``la-r1+rep1.3`` or ``prompt+pres0.5+freq0.5`` or ``none+ngram3``.
MODIFIERS = {"rep": "repetition_penalty", "pres": "presence_penalty",
             "freq": "frequency_penalty", "ngram": "no_repeat_ngram_size"}
NUMBER = r"[0-9]*\.?[0-9]+(?:e-?[0-9]+)?"


@dataclass(frozen=True)
class Setting:
    """One way of answering: ``kind`` "none", "prompt", "la" (``value`` = ratio) or "kl"
    (``value`` = per-token budget in nats), and ``options``: the decoder options its
    modifiers set, as ((name, value), ...)."""
    name: str
    kind: str
    value: float | None = None
    options: tuple = ()

    @property
    def modifiers(self) -> str:
        """The "+..." part of the name ("" without modifiers)."""
        return self.name[len(self.name.split("+")[0]):]


def parse_setting(name: str) -> Setting:
    """``none``, ``prompt``, ``la-r{R}`` (e.g. la-r3) or ``kl-{eps}`` (e.g. kl-0.5), then
    any of the ``MODIFIERS`` (``+rep1.3``, ``+pres0.5``, ``+freq0.5``, ``+ngram3``). R and
    eps must be values the decoder takes (finite in fp32), and eps above 0; a modifier's
    value is checked by the decoder's rules."""
    name = name.strip()
    head, *mods = name.split("+")
    options = []
    for mod in mods:
        m = re.fullmatch(rf"({'|'.join(MODIFIERS)})({NUMBER})", mod)
        if not m:
            raise ValueError(f"unknown modifier {mod!r} in setting {name!r}: expected "
                             "+rep<repetition penalty>, +pres<presence penalty>, "
                             "+freq<frequency penalty> or +ngram<n> (e.g. la-r1+rep1.3)")
        option = MODIFIERS[m.group(1)]
        if option == "no_repeat_ngram_size":
            if not m.group(2).isdigit():
                raise ValueError(f"{mod!r} in setting {name!r}: the n-gram size is an int")
            value = check_int(option, int(m.group(2)))
        else:
            value = check_number(option, float(m.group(2)))
        options.append((option, value))
    if head in ("none", "prompt"):
        return Setting(name, head, None, tuple(options))
    m = re.fullmatch(rf"(la-r|kl-)({NUMBER})", head)
    if m:
        kind = "la" if m.group(1) == "la-r" else "kl"
        value = float(m.group(2))
        if RULES["ratio" if kind == "la" else "kl_budget"].number_ok(value) and (
                kind == "la" or value > 0):
            return Setting(name, kind, value, tuple(options))
    raise ValueError(f"unknown setting {name!r}: expected none, prompt, la-r<ratio> (e.g. "
                     "la-r3) or kl-<budget in nats, > 0> (e.g. kl-0.5), with optional "
                     "+rep/+pres/+freq/+ngram modifiers")


def check_grid(principles: Sequence[str] | None, settings: Sequence[str] | str,
               decodings: Sequence[str]) -> tuple[list[str], list[Setting], list[str]]:
    """The principle names (default: all), the parsed settings (a list or a comma-separated
    string) and the decodings of a run; ``ValueError`` naming the first bad one."""
    names = list(PRINCIPLES) if principles is None else list(principles)
    for n in names:
        if n not in PRINCIPLES:
            raise ValueError(f"unknown principle {n!r}; known: {', '.join(PRINCIPLES)}")
    if isinstance(settings, str):
        settings = [s for s in settings.split(",") if s.strip()]
    parsed = [parse_setting(s) for s in settings]
    decodings = list(decodings)
    for d in decodings:
        if d not in DECODINGS:
            raise ValueError(f"unknown decoding {d!r}; expected one of {DECODINGS}")
    return names, parsed, decodings


def prompt_seeds(seed: int, n: int) -> list[int]:
    """One sampling seed per prompt, the same in every setting and for every principle, so
    settings differ by their distributions, not by their luck: the decoder's per-row seeds
    of a call with base ``seed`` (``linalign.options.row_seeds``), kept per prompt."""
    return row_seeds(seed, n)


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


def log_line(progress, text: str):
    """``text`` as one line on ``progress`` (a file, or None for silence)."""
    if progress is not None:
        print(text, file=progress, flush=True)


# ============================================================================ the plan
@dataclass(frozen=True)
class Plan:
    """What every setting of a run shares: the grid, the sampling options of every call
    (``params``: temperature, top_p, max_new_tokens, max_ratio), one seed per prompt, the
    batch sizes and the decoder's ``fast``."""
    principles: list[str]
    prompts: list[str]
    settings: list[Setting]
    decodings: list[str]
    params: SamplingParams
    seeds: list[int]
    batch_size: int
    ppl_batch_size: int
    fast: bool

    def rows(self, setting: Setting) -> list[tuple[str | None, int]]:
        """The answers of a setting, as (principle name, prompt index); ``none`` answers
        each prompt once, without a principle."""
        if setting.kind == "none":
            return [(None, j) for j in range(len(self.prompts))]
        return [(n, j) for n in self.principles for j in range(len(self.prompts))]

    def params_for(self, setting: Setting, greedy: bool,
                   prompt_indices: Sequence[int]) -> SamplingParams:
        """The options of one generate call: the setting's ratio or kl budget, and for
        sampling the seeds of its prompts."""
        seed = None if greedy else [self.seeds[j] for j in prompt_indices]
        params = dataclasses.replace(self.params, greedy=greedy, seed=seed,
                                     **dict(setting.options))
        if setting.kind == "la":
            return dataclasses.replace(params, ratio=setting.value)
        if setting.kind == "kl":
            return dataclasses.replace(params, kl_budget=setting.value)
        return params


def make_plan(*, principles, prompts, settings, decodings, max_new_tokens, temperature,
              top_p, seed, max_ratio, batch_size, ppl_batch_size, fast) -> Plan:
    """A checked ``Plan``: every argument of ``run_eval`` is checked here, before the first
    answer (``ValueError`` / ``TypeError`` naming the bad one)."""
    names, parsed, decodings = check_grid(principles, settings, decodings)
    prompts = load_prompts() if prompts is None else list(prompts)
    if not prompts:
        raise ValueError("no prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    params = SamplingParams(max_ratio=check_number("max_ratio", max_ratio),
                            temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens)
    params.rows(1)  # temperature, top_p and max_new_tokens, checked by the decoder's rules
    return Plan(names, prompts, parsed, decodings, params, prompt_seeds(seed, len(prompts)),
                batch_size, ppl_batch_size or batch_size, fast)


# ============================================================================ the run
@dataclass
class Answers:
    """The answers of one setting and decoding, in the order of ``Plan.rows``; ``ratios``:
    the decoder's mean ratio per answer (the derived one in kl mode; None for plain)."""
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    ratios: list[float | None]


def generate_answers(aligner, plan: Plan, setting: Setting, rows, greedy: bool) -> Answers:
    """The answers for ``rows`` [(principle name or None, prompt index)], in batches of
    ``plan.batch_size``."""
    answers = Answers([], [], [], [])
    for start in range(0, len(rows), plan.batch_size):
        part = rows[start:start + plan.batch_size]
        prompts = [plan.prompts[j] for _, j in part]
        principles = None if setting.kind == "none" else [PRINCIPLES[n].text for n, _ in part]
        params = plan.params_for(setting, greedy, [j for _, j in part])
        if setting.kind in ("none", "prompt"):
            res = aligner.generate_plain(prompts, principles, params, fast=plan.fast)
            answers.ratios += [None] * len(part)
        else:
            res = aligner.generate(prompts, principles, params, fast=plan.fast)
            answers.ratios += list(res.extra["ratio"])
        answers.texts += res.texts
        answers.token_ids += res.token_ids
        answers.finish_reasons += res.finish_reasons
    return answers


def score_answers(setting: Setting, decoding: str, rows, answers: Answers, nll,
                  principles: Sequence[str]) -> list[dict]:
    """One sample per answer and principle: the answer, its score, rep3, distinct2, NLL and
    perplexity (``none`` answers are scored against every principle of the run)."""
    samples = []
    for (n, j), text, tok, why, ratio, (s_nll, cnt) in zip(
            rows, answers.texts, answers.token_ids, answers.finish_reasons, answers.ratios,
            nll):
        core = tok[:-1] if why == "eos" else tok  # the end-of-turn token is no text
        shared = dict(setting=setting.name, kind=setting.kind, value=setting.value,
                      decoding=decoding, prompt_index=j, text=text, token_ids=tok,
                      finish_reason=why, n_tokens=len(tok), ratio=ratio,
                      rep3=repeated_ngram_rate(core, 3), distinct2=distinct_n(core, 2),
                      nll=s_nll, nll_tokens=cnt, ppl=math.exp(s_nll / cnt) if cnt else None)
        for name in (principles if n is None else [n]):
            samples.append(dict(shared, principle=name, passed=PRINCIPLES[name](text, why)))
    return samples


def run_setting(aligner, plan: Plan, contexts, setting: Setting, decoding: str,
                progress) -> tuple[list[dict], dict]:
    """Answer, measure and score one setting and decoding: (samples, timing)."""
    rows = plan.rows(setting)
    t0 = time.perf_counter()
    answers = generate_answers(aligner, plan, setting, rows, decoding == "greedy")
    t1 = time.perf_counter()
    nll = response_nll(aligner.model, [contexts[j] for _, j in rows], answers.token_ids,
                       pad_id=aligner.pad_id, batch_size=plan.ppl_batch_size)
    t2 = time.perf_counter()
    samples = score_answers(setting, decoding, rows, answers, nll, plan.principles)
    rate = mean(float(s["passed"]) for s in samples)
    log_line(progress, f"{setting.name}/{decoding}: {len(rows)} answers in {t1 - t0:.1f} s, "
                       f"perplexity in {t2 - t1:.1f} s; adherence {rate:.3f}")
    return samples, {"generate_s": t1 - t0, "ppl_s": t2 - t1, "answers": len(rows)}


def run_eval(aligner, *, principles: Sequence[str] | None = None,
             prompts: Sequence[str] | None = None,
             settings: Sequence[str] | str = DEFAULT_SETTINGS,
             decodings: Sequence[str] = DECODINGS,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
             seed: int = DEFAULT_SEED, max_ratio: float = DEFAULT_MAX_RATIO,
             batch_size: int = 64, ppl_batch_size: int | None = None, fast: bool = False,
             progress=sys.stderr, on_run: Callable[[dict], None] | None = None) -> dict:
    """Answer every prompt under every principle in every setting and decoding; score.

    ``aligner``: a ``LinearAligner``. Returns ``{"rows": [...], "samples": [...],
    "timing": {...}}``: rows as ``summarise`` makes them; one sample per (setting,
    decoding, principle, prompt) with its text, token ids, finish reason, score, rep3,
    distinct2, NLL and perplexity; per setting and decoding the seconds spent generating
    and scoring perplexity. ``max_ratio`` caps the ratio of the kl settings. ``on_run``, if
    given, is called with the result so far after each setting and decoding (the command
    writes its files then, so a run cut short keeps what it did).
    """
    plan = make_plan(principles=principles, prompts=prompts, settings=settings,
                     decodings=decodings, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, seed=seed, max_ratio=max_ratio,
                     batch_size=batch_size, ppl_batch_size=ppl_batch_size, fast=fast)
    contexts = [aligner.encode(aligner.prompt_texts(q, None)) for q in plan.prompts]
    samples, timing = [], {}
    for decoding in plan.decodings:
        for setting in plan.settings:
            new, timing[f"{setting.name}/{decoding}"] = run_setting(
                aligner, plan, contexts, setting, decoding, progress)
            samples += new
            if on_run is not None:
                on_run({"rows": summarise(samples, plan.principles), "samples": samples,
                        "timing": timing})
    return {"rows": summarise(samples, plan.principles), "samples": samples,
            "timing": timing}


# ============================================================================ the summary
def summarise(samples, principles: Sequence[str] | None = None) -> list[dict]:
    """One row per (setting, decoding, principle) and per (setting, decoding) over all
    principles (principle "all"), in the order the samples came: n, adherence and its 95 %
    Wilson interval, ``clean`` (the fraction that passes *and* has rep3 <= CLEAN_REP3: the
    principle followed without degenerating), rep3, distinct2, ppl_mean, ppl_median,
    ppl_pooled, mean_tokens, eos_rate and mean_ratio (the decoder's mean ratio per answer,
    averaged; the effective ratio in kl mode; empty for none and prompt). The rows over all
    principles also carry ``paired_tests`` against the principle in the prompt, with the
    prefix ``vs_prompt_`` (baseline, pairs, wins, losses, p, clean_wins, clean_losses,
    clean_p)."""
    groups: dict[tuple, list] = {}
    runs: dict[tuple, int] = {}  # (setting, decoding) -> first-seen order
    for s in samples:
        runs.setdefault((s["setting"], s["decoding"]), len(runs))
        groups.setdefault((s["setting"], s["decoding"], s["principle"]), []).append(s)
        groups.setdefault((s["setting"], s["decoding"], "all"), []).append(s)
    order = {n: i for i, n in enumerate(list(principles or PRINCIPLES) + ["all"])}
    keys = sorted(groups, key=lambda k: (runs[k[:2]], order.get(k[2], len(order))))
    rows = [summary_row(key, groups[key]) for key in keys]
    paired = paired_tests(samples)
    for r in rows:
        if r["principle"] == "all":
            r.update({"vs_prompt_" + k: v
                      for k, v in paired.get((r["setting"], r["decoding"]), {}).items()})
    return rows


def is_clean(sample: dict) -> bool:
    """The answer follows its principle and does not degenerate (rep3 <= CLEAN_REP3)."""
    return bool(sample["passed"]) and (sample["rep3"] or 0.0) <= CLEAN_REP3


def baseline_of(setting: str, names, baseline: str = "prompt") -> str:
    """The setting ``setting`` is compared with: ``baseline`` with the same modifiers when
    the run has it (la-r1+rep1.3 against prompt+rep1.3: the method, penalties equal), else
    ``baseline`` itself."""
    same = baseline + parse_setting(setting).modifiers
    return same if same in names else baseline


def paired_tests(samples, baseline: str = "prompt") -> dict[tuple[str, str], dict]:
    """Each setting against the principle in the prompt (``baseline_of``: with the same
    modifiers when the run has them), paired on the same prompt and principle, per
    decoding: ``{(setting, decoding): {...}}`` with ``baseline``, ``pairs``, ``wins`` (the
    setting passes where the baseline fails), ``losses`` (the reverse), ``p`` (exact
    McNemar, two-sided), and ``clean_wins``, ``clean_losses``, ``clean_p`` for clean
    adherence (``is_clean``). Pairs missing on either side are left out; a baseline has no
    entry."""
    by_key = {(s["setting"], s["decoding"], s["prompt_index"], s["principle"]): s
              for s in samples if s.get("prompt_index") is not None}
    names = {k[0] for k in by_key}
    out = {}
    for (setting, decoding, i, name), s in by_key.items():
        ref = baseline_of(setting, names, baseline)
        base = by_key.get((ref, decoding, i, name))
        if setting == ref or base is None:
            continue
        t = out.setdefault((setting, decoding), dict(
            dict.fromkeys(("pairs", "wins", "losses", "clean_wins", "clean_losses"), 0),
            baseline=ref))
        t["pairs"] += 1
        for prefix, ok in (("", lambda x: bool(x["passed"])), ("clean_", is_clean)):
            a, b = ok(s), ok(base)
            t[prefix + "wins"] += a and not b
            t[prefix + "losses"] += b and not a
    for t in out.values():
        t["p"] = mcnemar_exact(t["wins"], t["losses"])
        t["clean_p"] = mcnemar_exact(t["clean_wins"], t["clean_losses"])
    return out


def summary_row(key: tuple[str, str, str], group: list[dict]) -> dict:
    """The row of ``summarise`` for one (setting, decoding, principle) and its samples."""
    k = sum(bool(s["passed"]) for s in group)
    lo, hi = wilson_interval(k, len(group))
    nll, cnt = sum(s["nll"] for s in group), sum(s["nll_tokens"] for s in group)
    return dict(setting=key[0], decoding=key[1], principle=key[2], n=len(group),
                adherence=k / len(group), adherence_lo=lo, adherence_hi=hi,
                clean=mean(float(is_clean(s)) for s in group),
                rep3=mean(s["rep3"] for s in group),
                distinct2=mean(s["distinct2"] for s in group),
                ppl_mean=mean(s["ppl"] for s in group),
                ppl_median=median(s["ppl"] for s in group),
                ppl_pooled=math.exp(nll / cnt) if cnt else None,
                mean_tokens=mean(s["n_tokens"] for s in group),
                eos_rate=mean(float(s["finish_reason"] == "eos") for s in group),
                mean_ratio=mean(s.get("ratio") for s in group))
