"""Linear Alignment inside Hugging Face ``generate``, for code that already calls it.

Two ways in (design and limits: docs/hf.md):

- ``LinearAlignmentLogitsProcessor``: a ``transformers.LogitsProcessor``. ``generate`` runs
  the principle branch (its ``input_ids``) as usual; on every call the processor runs the
  branch without the principle through the same model, with its own KV cache
  (``linalign.decoding.prefill`` / ``decode_one``), and turns the principle branch's scores
  into the aligned scores ``s`` (``-inf`` off the nucleus). ``do_sample=False`` then picks
  ``argmax s``, the Linear Alignment greedy token; sampling with no other warper draws from
  ``softmax(s)``.
- ``generate``: a ``custom_generate`` callable (``model.generate(...,
  custom_generate=linalign.hf.generate)``; transformers 5.17 and 5.24 take a callable), also
  callable directly as ``linalign.hf.generate(model, ...)``. Both branches run stacked in
  linalign's decoding loop (``linalign.decoding.decode``) with a step that applies
  ``generate``'s logits processors first; ``linalign.step`` picks each token.

``prepare`` builds both branches' ids from text with the chat template, as
``LinearAligner.branches`` does. ``masked_scores`` is the score vector both ways share.
"""
from __future__ import annotations

import functools
import warnings

import torch
from transformers import GenerationConfig, LogitsProcessor
from transformers.generation import GenerateDecoderOnlyOutput

from .api import step as linalign_step
from .arguments import penalty_args
from .caches import DynamicCaches
from .constants import FMAX, Status
from .decoding import ModelCall, decode, decode_one, left_pad, prefill
from .options import DEFAULT_RATIO, NEUTRAL_PENALTIES, SamplingParams
from .prompts import ChatFormat, id_rows
from .torch_backend import penalize

#: Positions added to the processor's attention mask each time it runs out (it does not
#: know ``max_new_tokens``).
MASK_CHUNK = 64
#: The step arguments that choose a token; the processor leaves that to ``generate``.
_TOKEN_ARGS = ("greedy", "generator", "seed", "offset")
#: What ``generate`` hands a ``custom_generate`` callable besides our own arguments
#: (transformers 5.17: ``past_key_values``; 5.24: ``cache``). Its cache stays unused.
_HF_MODEL_KWARGS = {"attention_mask", "position_ids", "logits_to_keep", "cache",
                    "past_key_values", "use_cache", "cache_position"}
_DEFAULTS = SamplingParams()
#: generate's own processors that linalign applies itself, to both branches and on the
#: answer's tokens (docs/hf.md, "Penalties"): left out of the principle branch's processors.
_OWN_PROCESSORS = ("RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor")


# ----------------------------------------------------------------------------- scores
def masked_scores(logits_p, logits_0, *, ratio=None, temperature=None, top_p=None,
                  **step_kwargs):
    """The aligned scores of every token, and the step that found the nucleus.

    logits_p, logits_0: [B, V] (see ``linalign.api``). Returns ``(s, out)``: ``s`` [B, V]
    fp32, ``s_i = (z_p[i] + r (z_p[i] - z_0[i])) / T`` on the allowed set (the nucleus of
    ``softmax(z_p / T)`` less tokens banned in either branch; r = 0 on rows that fell back)
    and ``-inf`` elsewhere, so ``argmax s`` is the step's greedy token and ``softmax(s)`` its
    sampling distribution (``linalign.reference.distribution``); ``out`` is the
    ``StepOutput`` of ``linalign.step(greedy=True)`` on the same logits. A T = 0 row scores
    its greedy token 0 and every other token ``-inf``.

    ratio, temperature, top_p: None for ``linalign.SamplingParams``'s defaults (ratio's
    unless ``kl_budget=`` is among ``step_kwargs``). ``step_kwargs`` go to ``linalign.step``
    unchanged (``kl_budget``, ``max_ratio``, ``backend``, ``check``). Bad arguments raise as
    ``linalign.step`` does.
    """
    T = _DEFAULTS.temperature if temperature is None else temperature
    p = _DEFAULTS.top_p if top_p is None else top_p
    if ratio is None and step_kwargs.get("kl_budget") is None:
        ratio = DEFAULT_RATIO
    kw = {k: v for k, v in dict(step_kwargs, ratio=ratio).items() if v is not None}
    out = linalign_step(logits_p, logits_0, temperature=T, top_p=p, greedy=True, **kw)
    return dense_scores(*penalized_branches(logits_p, logits_0, kw), out, T), out


def penalized_branches(logits_p, logits_0, step_kwargs):
    """``(logits_p, logits_0)`` as the step saw them: penalised (fp32 copies) when
    ``step_kwargs`` carry a history and penalties that are not neutral, else unchanged."""
    B, V = logits_p.shape
    pen = penalty_args(step_kwargs.get("history"),
                       {name: step_kwargs.get(name, neutral)
                        for name, neutral in NEUTRAL_PENALTIES.items()},
                       B, V, logits_p.device, check=False)
    if pen is None:
        return logits_p, logits_0
    return penalize(logits_p, pen), penalize(logits_0, pen)


def _col(x, B, device):
    """A number or a [B] tensor as an fp32 [B, 1] column."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32).reshape(B, 1)
    return torch.full((B, 1), float(x), device=device)


def dense_scores(logits_p, logits_0, out, temperature):
    """The aligned scores of every token from a step's output on the same logits: the
    nucleus is the top-|N| of z_p with its ties, so ``out.nucleus_size`` gives it back; the
    ratio is the one each row used (``out.ratio``: 0 where it fell back, kl mode's r_eff)."""
    # logits_p, logits_0: [B, V] -> s: [B, V] fp32
    zp, z0 = logits_p.float(), logits_0.float()
    B, V = zp.shape
    ninf = float("-inf")
    k = out.nucleus_size.long().clamp(min=1)[:, None]  # [B, 1]
    tau = zp.topk(int(k.max()), dim=-1).values.gather(-1, k - 1)
    # a row that fell back ignores the without-branch (and its bans)
    fell = (out.status & int(Status.FALLBACK)) != 0
    allowed = (zp >= tau) & (zp > ninf) & ((z0 > ninf) | fell[:, None])
    r = out.ratio.reshape(B, 1).float()
    d = (zp - torch.where(allowed, z0, zp)).clamp(-FMAX, FMAX)
    a = (zp + r * d).clamp(-FMAX, FMAX)
    T = _col(temperature, B, zp.device)
    s = torch.where(allowed, (a / torch.where(T > 0, T, 1.0)).clamp(-FMAX, FMAX), ninf)
    one_hot = torch.arange(V, device=zp.device) == out.tokens[:, None]
    return torch.where(T > 0, s, torch.where(one_hot, 0.0, ninf))


# ----------------------------------------------------------------------------- inputs
def _unpadded(name, ids, mask, vocab) -> list[list[int]]:
    """Prompt ids without their padding, one list per row. ids: lists of ints, or a [B, L]
    (or [L]) tensor; mask: None (every id is real) or 0/1 of the same shape."""
    if mask is not None:
        ids = torch.as_tensor(ids)
        mask = torch.as_tensor(mask)
        if mask.shape != ids.shape:
            raise ValueError(f"{name} has shape {list(ids.shape)} but its attention mask has "
                             f"shape {list(mask.shape)}; expected the same shape")
        if ids.dim() == 1:
            ids, mask = ids[None], mask[None]
        ids = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
    return id_rows(name, ids, vocab)


def _expand(rows, B, name):
    """The W rows of the without-branch for the B rows that generate runs: B = k W when
    generate repeats each prompt k times (num_return_sequences), each row k times in turn."""
    W = len(rows)
    if B % W:
        raise ValueError(f"generate runs {B} rows of the principle branch but {name} has {W} "
                         f"rows; expected one row per prompt ({B} rows, or {B} / "
                         "num_return_sequences)")
    k = B // W
    return [r for r in rows for _ in range(k)], k


def _per_row(name, x, W, k, device):
    """A number stays a number; W values (a list or a [W] tensor, one per prompt) or W k
    (one per generated sequence) become a [W k] fp32 tensor on ``device``."""
    if isinstance(x, (list, tuple)):
        x = torch.tensor(x, dtype=torch.float32)
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    if x.numel() == W:
        x = x.repeat_interleave(k)
    elif x.numel() != W * k:
        raise ValueError(f"{name} has {x.numel()} values; expected one number, one per "
                         f"prompt ({W}) or one per generated sequence ({W * k})")
    return x.to(device=device, dtype=torch.float32)


def _pad_id(model) -> int:
    """The id that pads the without-branch's prompts (masked out, so any id of the
    vocabulary will do): the generation config's pad, the config's, its eos, or 0."""
    gc = getattr(model, "generation_config", None)
    for pad in (getattr(gc, "pad_token_id", None), getattr(model.config, "pad_token_id", None),
                getattr(gc, "eos_token_id", None), 0):
        if pad is not None:
            return int(pad[0] if isinstance(pad, (list, tuple)) else pad)


def prepare(tokenizer, prompts, principle, system=None, *, device=None) -> dict:
    """Both branches' prompt ids for ``generate``, built exactly as ``LinearAligner.branches``
    builds them (``linalign.prompts.ChatFormat``) (the principle after ``system`` in the system
    message; without a chat template ``principle + "\\n\\n" + prompt``).

    prompts: a string or a list; principle: one string or one per prompt. Returns a dict of
    [B, L] int64 tensors, left padded with the tokenizer's pad (else end-of-sequence) id:
    ``input_ids``, ``attention_mask`` (the principle branch) and ``ids_without``,
    ``attention_mask_without``, so that ``model.generate(**prepare(...),
    custom_generate=linalign.hf.generate)`` works as written.
    """
    *withs, without = ChatFormat(tokenizer, system).branch_ids(prompts, principle)
    if len(withs) > 1:
        raise ValueError("linalign.hf takes one principle per prompt (a string, or one string "
                         "per prompt); several principles at once: LinearAligner.generate")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token "
                         "(pad_token_id and eos_token_id are None): set tokenizer.pad_token_id")
    out = {}
    for key, rows in (("", withs[0]), ("_without", without)):
        ids, mask = left_pad(rows, int(pad), max(map(len, rows)), 0)
        out["input_ids" if not key else "ids" + key] = ids.to(device)
        out["attention_mask" + key] = mask.to(device)
    return out


# ----------------------------------------------------------------------------- processor
class LinearAlignmentLogitsProcessor(LogitsProcessor):
    """Linear Alignment as a logits processor for ``model.generate``.

    ``model.generate(input_ids=<principle branch>, attention_mask=...,
    logits_processor=[proc], do_sample=False)`` gives the Linear Alignment greedy tokens;
    ``do_sample=True, temperature=1.0, top_p=1.0, top_k=0`` (no other warper: they would
    act on the aligned scores, see docs/hf.md) samples from the aligned distribution.

    model: the model that ``generate`` runs. ids_without: the prompt ids of the branch without
    the principle, one row per prompt, in the order of ``input_ids`` (lists of ints, or a
    [B, L] tensor with ``attention_mask_without``, 0 on padding; without a mask every id is a
    prompt token). ratio, temperature, top_p (None: ``linalign.SamplingParams``'s defaults;
    ratio's unless ``kl_budget=`` is given): a number or one per prompt (``linalign.api``).
    Other keyword arguments go to ``linalign.step`` (``kl_budget``, ``max_ratio``,
    ``backend``, ``check``, and the penalties ``repetition_penalty``, ``presence_penalty``,
    ``frequency_penalty``, applied to both branches from the tokens ``generate`` appended
    after the prompt: pass them here, not to ``generate``, whose own repetition penalty
    would act once more on the principle branch, prompt included; docs/hf.md).

    Each call takes the principle branch's ``input_ids`` [B, L] and ``scores`` [B, V] (raw
    logits, or what earlier processors made of them) and returns ``masked_scores``. The first
    call of a generation prefills the without-branch (left padding, mask, positions from
    the mask); later calls feed it the token ``generate`` appended, ``input_ids[:, -1]``. B
    may be a multiple of the rows of ``ids_without`` (``num_return_sequences``). Called
    again with the same prompts it starts over; with other prompts it raises ``ValueError``
    (``reset(ids_without=...)`` rebinds it). Beam search is refused (``ValueError``).
    """

    def __init__(self, model, ids_without, attention_mask_without=None, *, ratio=None,
                 temperature=None, top_p=None, **step_kwargs):
        bad = sorted(set(step_kwargs) & set(_TOKEN_ARGS))
        if bad:
            raise TypeError(f"{bad}: the processor returns scores and generate picks the token "
                            "(do_sample=False for greedy, do_sample=True to sample); for "
                            "linalign's own seeded sampling use linalign.hf.generate")
        self.model = model
        self._call = ModelCall.of(model)
        self._pad_id = _pad_id(model)
        # per-row values (one per prompt) are repeated with the prompts, see _per_row
        self._params = dict(ratio=ratio, temperature=temperature, top_p=top_p,
                            **{k: step_kwargs.pop(k) for k in ("kl_budget", "max_ratio",
                                                               *NEUTRAL_PENALTIES)
                               if k in step_kwargs})
        self._step_kwargs = step_kwargs
        self.reset(ids_without, attention_mask_without)

    def reset(self, ids_without=None, attention_mask_without=None):
        """Drop the without-branch's KV cache (the next call prefills again). With
        ``ids_without``: bind the processor to new prompts."""
        if ids_without is not None:
            self._rows = _unpadded("ids_without", ids_without, attention_mask_without,
                                   self._call.vocab_size)
        self._part = None    # the without-branch's CachedRows (cache, mask, positions)
        self._prompt = None  # [B, P] the principle-branch prompt of this generation
        self._length = 0     # input_ids length at the last call
        self._kw = None      # the step's per-row arguments for this generation's B rows

    def __call__(self, input_ids, scores):
        # input_ids: [B, L] the principle branch so far; scores: [B, V] its next-token scores
        with torch.no_grad():
            z0 = self._without_logits(input_ids, scores)
            kw = self._kw
            if any(name in kw for name in NEUTRAL_PENALTIES):  # the answer so far
                kw = dict(kw, history=input_ids[:, self._prompt.shape[1]:].to(scores.device))
            return masked_scores(scores, z0, **kw)[0]

    def _without_logits(self, input_ids, scores) -> torch.Tensor:
        # -> [B, V] next-token logits of the branch without the principle
        B, L = input_ids.shape
        if self._part is not None:
            P = self._prompt.shape[1]
            if L == self._length + 1 and torch.equal(input_ids[:, :P], self._prompt):
                self._length = L
                part = self._part
                if part.length + 1 > part.mask.shape[1]:
                    part.grow(MASK_CHUNK)
                return decode_one(self._call, part, input_ids[:, -1].to(part.mask.device))
            if not torch.equal(input_ids, self._prompt):
                raise ValueError(
                    f"this processor is in the middle of a generation (principle-branch "
                    f"prompt of shape {list(self._prompt.shape)}, {self._length} ids seen) and "
                    f"got input_ids of shape {list(input_ids.shape)} that do not continue it: "
                    "a new generate call with other prompts needs "
                    "proc.reset(ids_without=...) or a new processor")
        # The first call of a generation: log-probabilities instead of logits mean beam
        # search, whose row reordering the without-branch cache cannot follow.
        if bool(torch.allclose(scores.float().logsumexp(-1), scores.new_zeros(B).float(),
                               atol=1e-4)):
            raise ValueError("the scores are log-probabilities (every row's logsumexp is 0): "
                             "beam search (num_beams > 1) is not supported by Linear "
                             "Alignment's processor; use do_sample=False or do_sample=True "
                             "with num_beams=1")
        rows, k = _expand(self._rows, B, "ids_without")
        dev = scores.device
        self._kw = {name: _per_row(name, x, len(self._rows), k, dev)
                    for name, x in self._params.items()}
        self._kw.update(self._step_kwargs)
        self._part, z0 = prefill(self._call, rows, self._pad_id, MASK_CHUNK)
        self._prompt, self._length = input_ids.clone(), L
        return z0


# ----------------------------------------------------------------------------- generate
def _is_warper(processor) -> bool:
    # Sampling warpers reshape the distribution the step defines; processors (penalties,
    # banned words, minimum length) act on the principle branch before the step.
    name = type(processor).__name__
    return name.endswith("LogitsWarper") or name == "LogitNormalization"


def _is_default_top_k(processor) -> bool:
    # generate adds top-k 50, its library default, to every sampling call whose config does
    # not set top_k: ignored without a warning (one the user set is warned about).
    defaults = getattr(GenerationConfig, "_get_default_generation_params", dict)()
    return type(processor).__name__ == "TopKLogitsWarper" and \
        getattr(processor, "top_k", None) == defaults.get("top_k", 50)


class _GenerateStep:
    """``linalign.step`` as ``generate`` would run it: its logits processors act on the
    principle branch first (they see the sequences so far); the aligned scores and raw
    logits are kept when asked for; its stopping criteria end rows (``stop``)."""

    def __init__(self, seq, processors, criteria, keep_scores, keep_logits):
        self.seq, self.processors, self.criteria = seq, processors, criteria
        self.keep_scores, self.keep_logits = keep_scores, keep_logits
        self.scores, self.logits, self.now = [], [], None

    def __call__(self, logits_p, logits_0, **kw):
        # logits_p, logits_0: [B, V]; kw: linalign.step's keywords from the loop
        raw = logits_p.to(torch.float32, copy=True)  # processors may write in place
        z = raw
        for p in self.processors:
            z = p(self.seq, z)
        out = linalign_step(z, logits_0, **kw)
        self.now = dense_scores(*penalized_branches(z, logits_0, kw), out, kw["temperature"])
        if self.keep_scores:
            self.scores.append(self.now)
        if self.keep_logits:
            self.logits.append(raw)
        return out

    def stop(self, tokens):
        # tokens: [B] this step's tokens (padding for finished rows) -> [B] rows to end
        self.seq = torch.cat([self.seq, tokens[:, None]], dim=-1)
        if not self.criteria:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return self.criteria(self.seq, self.now).to(tokens.device)


def _values(x, W, k):
    """A sampling option as ``SamplingParams`` takes it for the W k rows generate runs: a
    number stays a number; W values (one per prompt) are repeated k times each, W k values
    (one per generated sequence) are kept."""
    if isinstance(x, torch.Tensor):
        x = x.tolist() if x.dim() else x.item()
    if not isinstance(x, (list, tuple)) or len(x) != W or k == 1:
        return x
    return [v for v in x for _ in range(k)]


def _check_generate_call(gc, top_k, ids_without, kwargs):
    """The misuses of ``generate`` that are refused before any compute."""
    if (gc.num_beams or 1) > 1:
        raise ValueError(f"num_beams={gc.num_beams}: beam search is not supported by Linear "
                         "Alignment decoding; use num_beams=1 (greedy or sampling)")
    if top_k not in (None, 0):
        raise ValueError(f"top_k={top_k}: Linear Alignment's nucleus is top_p of the principle "
                         "branch; pass top_p (and leave top_k unset or 0)")
    if ids_without is None:
        raise ValueError("ids_without is missing: pass the prompt ids of the branch without "
                         "the principle (ids_without=, attention_mask_without=), e.g. from "
                         "linalign.hf.prepare(tokenizer, prompts, principle)")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _HF_MODEL_KWARGS)
    if unknown:
        raise TypeError(f"linalign.hf.generate does not take {unknown}; it takes the prompt ids "
                        f"and attention masks of both branches, and generation settings")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
        raise ValueError("a filled KV cache was passed: linalign.hf.generate prefills both "
                         "branches itself and cannot continue from a cache")


def _step_processors(logits_processor) -> list:
    """generate's logits processors that act on the principle branch before the step (the
    sampling warpers are left out, with a warning unless generate added them itself; the
    repetition penalty and the n-gram ban are linalign's own, ``_OWN_PROCESSORS``)."""
    processors = [p for p in (logits_processor or []) if not _is_warper(p) and
                  type(p).__name__ not in _OWN_PROCESSORS]
    ignored = [type(p).__name__ for p in (logits_processor or [])
               if _is_warper(p) and not _is_default_top_k(p)]
    if ignored:
        warnings.warn(f"linalign.hf.generate ignores the sampling warpers {ignored} (from the "
                      "generation config): Linear Alignment samples from its own aligned "
                      "distribution, set by temperature= and top_p= of this call",
                      UserWarning, stacklevel=3)
    return processors


def generate(model, input_ids=None, logits_processor=None, stopping_criteria=None,
             generation_config=None, *, ids_without=None, attention_mask_without=None,
             ratio=None, temperature=None, top_p=None, top_k=None, kl_budget=None,
             max_ratio=None, seed=None, presence_penalty=None, frequency_penalty=None,
             backend="auto", streamer=None, **kwargs):
    """Linear Alignment decoding as a ``custom_generate`` for ``model.generate``.

    ``model.generate(input_ids=<principle branch>, attention_mask=..., ids_without=...,
    attention_mask_without=..., custom_generate=linalign.hf.generate, max_new_tokens=...)``
    (``prepare`` builds these four from text), or ``linalign.hf.generate(model, ...)`` with
    the same arguments. Both branches run as one batch of 2B rows, one forward per step, in
    linalign's decoding loop (``linalign.decoding.decode``, dynamic caches, finished rows
    kept in the batch as generate keeps them); each token comes from ``linalign.step``.

    ids_without, attention_mask_without: as for ``LinearAlignmentLogitsProcessor``.
    ratio, kl_budget, max_ratio, temperature, top_p, seed: the options of
    ``linalign.SamplingParams`` (None: its defaults), a number or one per prompt (or one per
    generated sequence); ``generate`` hands them here, never to its own warpers. seed: as
    for ``LinearAligner`` (row i of the call samples with its own Philox seed derived from
    it, so the same seed gives ``LinearAligner.generate``'s tokens); None draws one from
    torch's global generator (``torch.manual_seed`` reproduces). backend: the step's. top_k:
    only None or 0 (the nucleus is top_p of the principle branch). presence_penalty,
    frequency_penalty: as for ``linalign.SamplingParams``. ``repetition_penalty`` and
    ``no_repeat_ngram_size`` come from the generation config (``generate(...,
    repetition_penalty=1.3)`` sets them there): linalign applies them once, to both
    branches, on the answer's tokens, and generate's own processors for them are left out
    (docs/hf.md, "Penalties").

    From the generation config: ``max_new_tokens`` / ``max_length``, ``do_sample`` (False:
    greedy), eos and pad ids (a row ends at eos and emits pad afterwards; finished rows keep
    running until all are done, as in transformers' own loop), ``stopping_criteria``,
    ``return_dict_in_generate`` with ``output_scores`` (the aligned scores ``s``, -inf off
    the nucleus) and ``output_logits`` (the principle branch's raw logits), and
    ``num_return_sequences``. The logits processors that ``generate`` builds (repetition
    penalty, bad words, minimum length...) act on the principle branch's logits before the
    step; sampling warpers are ignored with a warning. ``streamer`` works when this function
    is called directly (transformers does not hand it to a ``custom_generate`` callable).

    Returns the sequences [B, L + new] (prompt included, as given), or a
    ``GenerateDecoderOnlyOutput``. Raises ``ValueError`` for beam search, a missing or
    mismatched ``ids_without``, a prompt too long for the model, a non-empty cache.
    """
    if not hasattr(generation_config, "_eos_token_tensor"):
        # Called directly: model.generate prepares the generation config (defaults, special
        # tokens, lengths, stopping criteria, num_return_sequences) and calls back here.
        return model.generate(
            input_ids, generation_config=generation_config, logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            custom_generate=functools.partial(generate, streamer=streamer),
            ids_without=ids_without, attention_mask_without=attention_mask_without,
            ratio=ratio, temperature=temperature, top_p=top_p, top_k=top_k,
            kl_budget=kl_budget, max_ratio=max_ratio, seed=seed,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            backend=backend, **kwargs)
    gc = generation_config
    _check_generate_call(gc, top_k, ids_without, kwargs)
    processors = _step_processors(logits_processor)
    call = ModelCall.of(model)
    B, L = input_ids.shape
    with_rows = _unpadded("input_ids", input_ids, kwargs.get("attention_mask"),
                          call.vocab_size)
    without, k = _expand(_unpadded("ids_without", ids_without, attention_mask_without,
                                   call.vocab_size), B, "ids_without")
    W, dev = B // k, call.device
    N = max(gc.max_length - L, 0)  # generate has set max_length from max_new_tokens
    options = dict(ratio=ratio, kl_budget=kl_budget, max_ratio=max_ratio,
                   temperature=temperature, top_p=top_p, seed=seed,
                   presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                   repetition_penalty=gc.repetition_penalty,
                   no_repeat_ngram_size=gc.no_repeat_ngram_size or None)
    params = SamplingParams.build(greedy=not gc.do_sample, max_new_tokens=N, **{
        name: _values(x, W, k) for name, x in options.items() if x is not None})
    rp = params.rows(B)
    call.check_length([with_rows, without], N)
    eos = [] if gc._eos_token_tensor is None else gc._eos_token_tensor.flatten().tolist()
    pad = gc._pad_token_tensor
    pad = int(pad) if pad is not None else (eos[0] if eos else 0)
    seq = input_ids.to(dev)  # the sequences so far: [B, L + t], on the model's device
    hook = _GenerateStep(seq, processors, stopping_criteria,
                         gc.return_dict_in_generate and gc.output_scores,
                         gc.return_dict_in_generate and gc.output_logits)
    decoded = _decode(call, [with_rows, without], rp, hook, pad, eos, backend, streamer,
                      input_ids)
    n = max(map(len, decoded.token_ids), default=0)
    new = torch.tensor([r + [pad] * (n - len(r)) for r in decoded.token_ids],
                       dtype=seq.dtype, device=dev).reshape(B, n)
    seq = torch.cat([seq, new], dim=-1)
    if not gc.return_dict_in_generate:
        return seq
    return GenerateDecoderOnlyOutput(
        sequences=seq, scores=tuple(hook.scores[:n]) if gc.output_scores else None,
        logits=tuple(hook.logits[:n]) if gc.output_logits else None)


def _decode(call, groups, rp, hook, pad, eos, backend, streamer, input_ids):
    """The decoding loop as ``generate`` runs it (finished rows stay in the batch, as in
    transformers' own loop), feeding ``streamer`` the prompt and every step's tokens."""
    steps = decode(call, groups, rp, step=hook, pad_id=pad, eos_ids=eos,
                   cache=DynamicCaches(stacked=True, drop_finished=False), backend=backend,
                   stop=hook.stop)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    try:
        while True:
            tokens = next(steps)
            if streamer is not None:
                streamer.put(tokens.cpu())
    except StopIteration as end:
        return end.value
    finally:
        steps.close()
        if streamer is not None:
            streamer.end()
