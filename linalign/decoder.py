"""``LinearAligner``: Linear Alignment generation with a Hugging Face causal LM, a thin front
over the free functions of ``linalign.prompts`` (the branches), ``linalign.decoding`` (the
loop) and ``linalign.caches`` (dynamic caches, or a static cache and a CUDA graph).

Each request runs as two branches, the conversation with the principle in the system
message and without it (K + 1 branches for K principles). ``mode="stacked"`` (default)
puts the branches of every prompt into one batch with one KV cache: one forward pass per
step. ``mode="two-caches"`` keeps the authors' structure (one cache and one forward per
branch group) as the check. ``fast=True`` decodes over a static cache and, on CUDA, replays
one decoding step as a CUDA graph. Design and choices: docs/decoder.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .api import resolve_backend
from .api import step as linalign_step
from .caches import FAST_SESSIONS, DynamicCaches, StaticGraph
from .decoding import Decoded, ModelCall, decode
from .models import eos_token_ids
from .options import SamplingParams, stop_strings
from .prompts import ChatFormat, decode_text, id_rows
from .streaming import StopStrings, feed_streamer, run_to_end, stream_text
from .triton_backend import check_device

MODES = ("stacked", "two-caches")


class BatchTooLargeError(MemoryError):
    """The device ran out of memory during prefill or decoding. The message says the batch
    and suggests what to lower; the aligner stays usable (see docs/errors.md)."""


def is_out_of_memory(e: BaseException) -> bool:
    """``torch.OutOfMemoryError`` (CUDA), or the CPU allocator's ``RuntimeError``."""
    if isinstance(e, MemoryError) and not isinstance(e, BatchTooLargeError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or
                                            "DefaultCPUAllocator" in text or
                                            "out of memory" in text.lower())


@dataclass
class GenerationResult:
    """What ``LinearAligner.generate`` returns. Lists have one entry per prompt, in input
    order.

    token_ids: generated ids per row, the end-of-sequence token included when the row ended
    on one. texts: those ids decoded without special tokens. logprobs: per generated token,
    the log-probability of the chosen token under the step's masked aligned distribution
    (``return_logprobs=True``; else None). finish_reasons: "eos", "length", or "stop" (a
    stop string ended the row: its token ids run up to and including the token that
    completed the stop string, its text ends before it).
    prefill_seconds: the prompt forward pass(es). decode_seconds: everything after it.
    decode_tokens_per_second: generated tokens of all rows / decode_seconds. steps: decoding
    steps run. extra["status"]: per row, the OR of the step's ``Status`` bits over its tokens
    (FALLBACK: some step fell back to plain top-p decoding); extra["ratio"]: per row, the
    mean ratio the step used over its tokens (kl mode: the derived ratio).
    """
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    logprobs: list[list[float]] | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, decoded: Decoded, tokenizer) -> GenerationResult:
        extra = {"status": decoded.status}
        if decoded.mean_ratio is not None:
            extra["ratio"] = decoded.mean_ratio
        texts = decoded.texts if decoded.texts is not None else \
            [decode_text(tokenizer, r) for r in decoded.token_ids]
        return cls(texts, decoded.token_ids,
                   decoded.finish_reasons, decoded.logprobs, decoded.prefill_seconds,
                   decoded.decode_seconds, decoded.steps, extra)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def text(self) -> str:
        """The only text of a one-prompt call."""
        if len(self.texts) != 1:
            raise ValueError(f"text is for one prompt; this result has {len(self.texts)}")
        return self.texts[0]


class LinearAligner:
    """Linear Alignment decoding with a Hugging Face causal LM and its tokenizer.

    ``system``: base system text that both branches carry (None: the chat template's own
    default system message, if it has one); see ``linalign.prompts.ChatFormat``. ``step``:
    the step function the loop calls, with ``linalign.step``'s signature (default
    ``linalign.step``; the benchmarks pass ``linalign.baselines.authors_as_step``).

    The generation methods take the sampling options as a ``SamplingParams`` (``params=``),
    as keywords (its field names: ``ratio``, ``kl_budget``, ``max_ratio``, ``temperature``,
    ``top_p``, ``greedy``, ``max_new_tokens``, ``seed``, ``repetition_penalty``,
    ``presence_penalty``, ``frequency_penalty``, ``no_repeat_ngram_size``, ``stop``), or both
    (keywords win); the defaults are ``SamplingParams``'s. Besides those: ``streamer`` (any
    object with ``put``/``end``, fed as ``generate`` feeds it: token ids, so stop strings do
    not hold anything back there), ``mode`` ("stacked" or "two-caches"),
    ``return_logprobs``, ``backend`` (the step's), ``fast`` (static cache and CUDA graph;
    "stacked" only) and ``on_finished`` (called as ``on_finished(row, ids, reason)`` as soon
    as the loop sees a row end, at its host checks; with stop strings as
    ``on_finished(row, ids, reason, text)``, the text cut before the stop string).
    """

    def __init__(self, model, tokenizer, *, system: str | None = None, step=linalign_step):
        self.model = model
        self.tokenizer = tokenizer
        self.format = ChatFormat(tokenizer, system)
        self.call = ModelCall.of(model)
        self.step = step
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        if pad is None:
            if not self.eos_ids:
                raise ValueError("the tokenizer has neither a pad nor an end-of-sequence "
                                 "token (pad_token_id and eos_token_id are None, and so is "
                                 "the model's eos_token_id): set tokenizer.pad_token_id or "
                                 "model.generation_config.eos_token_id")
            pad = self.eos_ids[0]
        self.pad_id = int(pad)
        self.static = StaticGraph()  # fast=True: static caches and graphs kept per shape

    # ------------------------------------------------------------------ prompts
    @property
    def system(self) -> str | None:
        return self.format.system

    def prompt_texts(self, prompt: str, principle: str | None) -> str:
        """The text of one branch: the conversation with ``principle`` in the system
        message, or without it (``principle=None``)."""
        return self.format.text(prompt, principle)

    def encode(self, text: str) -> list[int]:
        return self.format.encode(text)

    def branches(self, prompts, principle):
        """Prompt ids of the branches: (with the principle, without it), one row per prompt.
        With several principles per prompt (K > 1) the first item is K lists of rows, one
        per principle (the form ``generate_ids`` takes)."""
        *withs, without = self.format.branch_ids(prompts, principle)
        return (withs[0] if len(withs) == 1 else withs), without

    # ------------------------------------------------------------------ generation
    def generate(self, prompts, principle, params: SamplingParams | None = None, *,
                 streamer=None, mode="stacked", return_logprobs=False, backend="auto",
                 fast=False, on_finished=None, **options) -> GenerationResult:
        """Aligned answers for ``prompts`` (a string or a list) under ``principle``: one
        string; one per prompt; or, for several principles at once, one list of K strings
        per prompt (the same K for every prompt of a call). Options: the class docstring."""
        groups = self.format.branch_ids(prompts, principle)
        return self._generate(groups, params, options, streamer=streamer, mode=mode,
                              return_logprobs=return_logprobs, backend=backend, fast=fast,
                              on_finished=on_finished)

    def generate_ids(self, ids_with, ids_without, params: SamplingParams | None = None, *,
                     streamer=None, mode="stacked", return_logprobs=False, backend="auto",
                     fast=False, on_finished=None, **options) -> GenerationResult:
        """``generate`` at token level: prompt ids of both branches in (lists of ints, one
        per row, or [B, L] tensors without padding), generated ids out. Several principles:
        ``ids_with`` is K such lists of rows (or a [K, B, L] tensor), one per principle."""
        return self._generate(self._id_groups(ids_with, ids_without), params, options,
                              streamer=streamer, mode=mode, return_logprobs=return_logprobs,
                              backend=backend, fast=fast, on_finished=on_finished)

    def generate_plain(self, prompts, principle=None, params: SamplingParams | None = None,
                       *, streamer=None, return_logprobs=False, backend="auto", fast=False,
                       on_finished=None, **options) -> GenerationResult:
        """Plain top-p decoding of one branch in the same loop (no Linear Alignment): the
        conversation with ``principle`` in the system message, or without one. One forward
        of B rows per step; the step runs with both branches equal and ratio 0."""
        rows = self.format.plain_ids(prompts, principle)
        return self.generate_plain_ids(rows, params, streamer=streamer,
                                       return_logprobs=return_logprobs, backend=backend,
                                       fast=fast, on_finished=on_finished, **options)

    def generate_plain_ids(self, ids, params: SamplingParams | None = None, *, streamer=None,
                           return_logprobs=False, backend="auto", fast=False,
                           on_finished=None, **options) -> GenerationResult:
        """``generate_plain`` at token level: one branch's prompt ids in, ids out."""
        return self._generate([id_rows("ids", ids, self.call.vocab_size)],
                              plain_params(params, options), {}, streamer=streamer,
                              mode="stacked", return_logprobs=return_logprobs,
                              backend=backend, fast=fast, on_finished=on_finished)

    def stream(self, prompts, principle, params: SamplingParams | None = None, *,
               mode="stacked", backend="auto", fast=False, **options) -> Iterator:
        """Like ``generate``, as an iterator over new text: strings for one prompt (a
        string), ``(row, text)`` pairs for a list. The pieces of a row join to exactly its
        ``generate`` text. Arguments are checked at the call; stopping early (close, break)
        ends the loop and leaves the aligner usable."""
        groups = self.format.branch_ids(prompts, principle)
        params = SamplingParams.build(params, **options)
        steps = self.steps(groups, params, mode=mode, backend=backend, fast=fast)
        return stream_text(steps, self.tokenizer, len(groups[0]), self.eos_ids,
                           single=isinstance(prompts, str), stop=stop_strings(params.stop))

    # ------------------------------------------------------------------ the loop
    def steps(self, groups, params: SamplingParams, *, mode="stacked", return_logprobs=False,
              backend="auto", fast=False, on_finished=None, stop=None):
        """The decoding loop over prompt id ``groups`` (K principle groups and the base
        group, or one group for plain decoding; ``linalign.prompts.ChatFormat.branch_ids``):
        every argument checked now, before any compute; returns the generator of
        ``linalign.decoding.decode`` (each step's [B] tokens, then a ``Decoded``), with
        running out of memory turned into ``BatchTooLargeError``."""
        G, B = len(groups), len(groups[0])
        rp = params.rows(B, max(G - 1, 1))
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        if not isinstance(fast, bool):
            raise TypeError(f"fast must be True or False; got {fast!r}")
        if fast:
            if mode != "stacked":
                raise ValueError(f'fast=True runs the stacked loop (mode="stacked") only; '
                                 f'got mode={mode!r}')
            StaticGraph.check(self.call)
        if resolve_backend(backend, self.device) == "triton":
            check_device(self.device)
        self.call.check_length(groups, rp.max_new_tokens)
        cache = self.static if fast else DynamicCaches(stacked=mode == "stacked")
        stops = StopStrings(self.tokenizer, rp.stop) if rp.stop else None
        steps = decode(self.call, groups, rp, cache=cache, step=self.step, pad_id=self.pad_id,
                       eos_ids=self.eos_ids, want_logprobs=return_logprobs, backend=backend,
                       stop=stop, on_finished=on_finished, stops=stops)
        return self._batch_too_large(steps, groups, rp.max_new_tokens, mode, fast)

    def _generate(self, groups, params, options, *, streamer, mode, return_logprobs, backend,
                  fast, on_finished) -> GenerationResult:
        params = SamplingParams.build(params, **options)
        steps = self.steps(groups, params, mode=mode, return_logprobs=return_logprobs,
                           backend=backend, fast=fast, on_finished=on_finished)
        decoded: Decoded = run_to_end(steps) if streamer is None else \
            feed_streamer(steps, streamer, groups[0], self.pad_id)
        return GenerationResult.of(decoded, self.tokenizer)

    def _batch_too_large(self, steps, groups, N, mode, fast):
        """``steps``, with running out of memory turned into ``BatchTooLargeError`` (the
        batch, the lengths and what to lower). The failed call's tensors are released before
        the error is raised, so the aligner stays usable."""
        try:
            return (yield from steps)
        except BaseException as e:  # noqa: B036 - re-raised at once unless it is an OOM
            if not is_out_of_memory(e):
                raise
            what = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        # outside the except block: the old traceback (and the tensors its frames hold) is
        # gone before the cache is emptied and the new error is raised
        G, B = len(groups), len(groups[0])
        longest = max(len(r) for g in groups for r in g)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        raise BatchTooLargeError(
            f"out of memory decoding {B} prompt(s) ({G * B} rows of up to {longest} prompt "
            f"tokens + max_new_tokens={N}, mode={mode!r}, fast={fast}): pass fewer prompts per "
            f"call (e.g. {max(1, B // 2)}), a lower max_new_tokens or shorter prompts; "
            f"fast=True keeps up to {FAST_SESSIONS} static caches, aligner.clear_fast_cache() "
            f"frees them ({what})") from None

    def _id_groups(self, ids_with, ids_without):
        """[K principle groups..., the base group], each a list of B prompt id rows."""
        nested = (isinstance(ids_with, torch.Tensor) and ids_with.dim() == 3) or (
            isinstance(ids_with, (list, tuple)) and ids_with and
            isinstance(ids_with[0], (list, tuple)) and ids_with[0] and
            isinstance(ids_with[0][0], (list, tuple, torch.Tensor)))
        withs = list(ids_with) if nested else [ids_with]
        names = ["ids_with"] if len(withs) == 1 else [f"ids_with[{k}]" for k in range(len(withs))]
        V = self.call.vocab_size
        groups = [id_rows(n, w, V) for n, w in zip(names, withs)]
        groups.append(id_rows("ids_without", ids_without, V))
        for n, g in zip(names, groups):
            if len(g) != len(groups[-1]):
                raise ValueError(f"{n} has {len(g)} rows but ids_without has "
                                 f"{len(groups[-1])}")
        return groups

    # ------------------------------------------------------------------ housekeeping
    @property
    def fast_stats(self) -> dict:
        """fast=True counters: CUDA graphs captured, graph replays, decode steps run eagerly
        (CPU, CUDA warm-up, or a failed capture), failed captures."""
        return self.static.stats

    def clear_fast_cache(self):
        """Drop the static caches and CUDA graphs that ``fast=True`` keeps for reuse."""
        self.static.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def device(self) -> torch.device:
        return self.call.device

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the valid prompt ids are [0, vocab_size)."""
        return self.call.vocab_size


def plain_params(params: SamplingParams | None, options: dict) -> SamplingParams:
    """The options of plain decoding: no ratio (the step runs with ratio 0)."""
    bad = sorted({"ratio", "kl_budget", "max_ratio"} & set(options))
    if bad:
        raise TypeError(f"plain decoding takes no {bad}: it decodes one branch (use generate "
                        "for Linear Alignment)")
    return SamplingParams.build(params, **options, ratio=0.0, kl_budget=None,
                                max_ratio=SamplingParams.max_ratio)
