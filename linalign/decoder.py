"""Generation with Linear Alignment over a Hugging Face causal LM (SPEC section 5).

Each request runs as two branches, the conversation with the principle in the system message
and without it. ``mode="stacked"`` (default) puts both branches of every prompt into one
batch of 2B rows with one KV cache: left padding, an attention mask, position ids counted
from each row's first real token, one forward pass per step. ``mode="two-caches"`` keeps
the authors' structure (two caches, two forward passes per step) as the check and the
fallback. Both branches are fed the token that ``linalign.step`` chose for the row.

The loop keeps tokens, positions, flags and seeds on the device. It reads the "rows done"
flags back to the host once every few steps (every step on the CPU, where that costs
nothing; every 8 steps on a GPU, so the host can queue the next forward passes meanwhile),
and then drops finished rows from the batch (their KV cache rows included), so a finished
row stops costing compute. A finished row that is still in the batch emits padding. A
streamer reads every step's tokens, which synchronises every step.

``fast=True`` (stacked and plain decoding) runs the same loop over a transformers
``StaticCache`` and static buffers (``_FastSession``); on CUDA one decode step (the forward
of the rows' new tokens, the step and the bookkeeping) is captured once in a CUDA graph and
replayed. Finished rows stay in the batch until every row is done. See docs/decoder.md.
"""
from __future__ import annotations

import inspect
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .api import MAX_RATIO, RULES, Status, step
from .models import eos_token_ids

MODES = ("stacked", "two-caches")
#: The authors' Anthropic-HH setting (Gao et al. 2024): ratio 3, temperature 0.5, top-p 0.8,
#: greedy. See docs/decoder.md for why the decoder keeps it as its default.
DEFAULTS = dict(ratio=3.0, temperature=0.5, top_p=0.8, greedy=True, max_new_tokens=256)
_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio increment: row seeds far apart in key space
#: fast=True: eager decode steps (on a side stream) before the CUDA graph is captured, and how
#: many shapes' static caches and graphs an aligner keeps (least recently used dropped).
FAST_WARMUP_STEPS = 2
FAST_SESSIONS = 4


class BatchTooLargeError(MemoryError):
    """The device ran out of memory during prefill or decoding. The message says the batch
    and suggests what to lower; the aligner stays usable (see docs/errors.md)."""


def _is_oom(e: BaseException) -> bool:
    # torch.OutOfMemoryError (CUDA, also torch.cuda.OutOfMemoryError); on the CPU the
    # allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory")
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
    """What ``generate`` returns. Lists have one entry per prompt, in input order.

    token_ids: generated ids per row, the end-of-sequence token included when the row ended
    on one. texts: those ids decoded without special tokens. logprobs: per generated token,
    the log-probability of the chosen token under the step's masked aligned distribution
    (``return_logprobs=True``; else None). finish_reasons: "eos" or "length".
    prefill_seconds: the prompt forward pass(es). decode_seconds: everything after it.
    decode_tokens_per_second: generated tokens of all rows / decode_seconds. steps: decoding
    steps run. extra["status"]: per row, the OR of the step's ``Status`` bits over its tokens
    (FALLBACK: some step fell back to plain top-p decoding).
    """
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    logprobs: list[list[float]] | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0
    extra: dict = field(default_factory=dict)

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


def _per_row(name, value, B, *, cast=float):
    if isinstance(value, (list, tuple)):
        if len(value) != B:
            raise ValueError(f"{name} has {len(value)} values for {B} prompts")
        return [cast(v) for v in value]
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return [cast(value.item())] * B
        if value.shape != (B,):
            raise ValueError(f"{name} must be a number or {B} values; got shape "
                             f"{list(value.shape)}")
        return [cast(v) for v in value.tolist()]
    return [cast(value)] * B


def _rule(name, values):
    valid, expected = RULES[name]  # the step's own rules and words
    bad = ~valid(torch.tensor(values, dtype=torch.float32))
    if bool(bad.any()):
        raise ValueError(f"{name} must be {expected}; got {values[int(bad.nonzero()[0])]}")
    return values


def _ratios(ratio, B, K) -> list[list[float]]:
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
                rows.append([float(x) for x in v])
            else:
                rows.append([float(v)] * K)
        per = [[rows[b][k] for b in range(B)] for k in range(K)]
    else:
        per = [_per_row("ratio", ratio, B)] * K
    for k in range(K):
        _rule("ratio", per[k])
    return per


def _check_params(B, ratio, temperature, top_p, max_new_tokens, mode, K=1, kl_budget=None,
                  max_ratio=MAX_RATIO):
    """Host-side validation, once per call, so the loop can run the step with check=False.
    Returns (ratios: K lists of B, or None in kl mode; kl: (budgets, caps) or None; T; p)."""
    if ratio is not None and kl_budget is not None:
        raise ValueError("pass either ratio= (a fixed step) or kl_budget= (kl mode, SPEC "
                         "section 3), not both")
    kl = None
    if kl_budget is not None:
        if K > 1:
            raise ValueError(f"kl_budget is for one principle per prompt (SPEC section 3); got "
                             f"{K} principles per prompt: pass ratio= instead")
        kl = (_rule("kl_budget", _per_row("kl_budget", kl_budget, B)),
              _rule("max_ratio", _per_row("max_ratio", max_ratio, B)))
        r = None
    else:
        r = _ratios(DEFAULTS["ratio"] if ratio is None else ratio, B, K)
    T = _rule("temperature", _per_row("temperature", temperature, B))
    p = _rule("top_p", _per_row("top_p", top_p, B))
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int >= 0; got {max_new_tokens!r} "
                        f"({type(max_new_tokens).__name__})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0; got {max_new_tokens} "
                         "(0 returns empty answers without running the model)")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    return r, kl, T, p


def _row_seeds(seed, B, greedy) -> list[int] | None:
    """Per-row Philox seeds: a row's draws depend on its seed and the step only, never on the
    other rows or on where the row sits in the batch after finished rows are dropped."""
    if greedy:
        return None
    if seed is None:  # torch's global generator decides, so torch.manual_seed reproduces
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, (list, tuple)):
        seeds = _per_row("seed", seed, B, cast=int)
    else:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or one int per prompt; got {seed!r}")
        seeds = [seed]
    for s in seeds:
        if not 0 <= s < 2**63:
            raise ValueError(f"seed must be in [0, 2**63); got {s}")
    if not isinstance(seed, (list, tuple)):
        seeds = [(seed + _SEED_MIX * (i + 1)) % 2**63 for i in range(B)]
    return seeds


def _id_rows(name, rows, vocab) -> list[list[int]]:
    if isinstance(rows, torch.Tensor):
        rows = rows.tolist() if rows.dim() == 2 else [rows.tolist()]
    rows = [list(map(int, r.tolist() if isinstance(r, torch.Tensor) else r)) for r in rows]
    if not rows:
        raise ValueError(f"no prompts given: {name} has no rows (pass one list of prompt ids "
                         "per prompt)")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"{name}[{i}] is empty: every prompt needs at least one token "
                             "(a row of prompt ids per prompt)")
        # An id outside the embedding would fail deep in the model (on a GPU, as a
        # device-side assert that breaks the CUDA context): refuse it here.
        if min(r) < 0 or max(r) >= vocab:
            bad = next(x for x in r if not 0 <= x < vocab)
            raise ValueError(f"{name}[{i}] holds token id {bad}, outside the model's "
                             f"vocabulary [0, {vocab})")
    return rows


class _Part:
    """One batched cache: its rows' attention mask (preallocated to the final length), the
    next position of every row, and the cache object itself (updated in place)."""

    def __init__(self, cache, mask, pos, length):
        self.cache = cache    # DynamicCache over [R, ...]
        self.mask = mask      # [R, L + max_new_tokens] int64, 0 on left padding
        self.pos = pos        # [R] int64: position of the next token
        self.length = length  # positions used so far (the same for every row)

    def select(self, idx):
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        self.pos = self.pos[idx]


class _FastSession:
    """The fast path's state for one shape: a ``StaticCache`` over G * B rows and
    ``max_len`` positions, and static buffers that every decode step reads and writes in
    place, so that a CUDA graph captured over one step stays valid for every later step and
    every later call of the same shape. Nothing here is ever rebound after creation: new
    values are copied in."""

    def __init__(self, model, G, B, L, N, greedy, want_logprobs, eos_ids, dev, kl=False):
        from transformers import StaticCache

        R, self.G, self.B, self.N = G * B, G, B, N
        self.max_len = L + N
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        i64, f32 = dict(dtype=torch.long, device=dev), dict(dtype=torch.float32, device=dev)
        self.mask = torch.zeros((R, self.max_len), **i64)  # left padding 0, the rest 1
        self.pos = torch.zeros(R, **i64)          # position of the next input token
        self.tok_in = torch.zeros(R, **i64)       # the next input token of every row
        self.off = torch.zeros(B, **i64)          # step index (the sampling offset)
        self.ratio = torch.zeros((max(G - 1, 1), B), **f32)  # [K, B]
        self.kl = (torch.zeros(B, **f32), torch.zeros(B, **f32)) if kl else None
        self.ratio_sum = torch.zeros(B, **f32)
        self.temperature = torch.zeros(B, **f32)
        self.top_p = torch.zeros(B, **f32)
        self.seeds = None if greedy else torch.zeros(B, **i64)
        self.eos = torch.tensor(eos_ids or [-1], **i64)
        self.done = torch.zeros(B, dtype=torch.bool, device=dev)
        self.status = torch.zeros(B, dtype=torch.int32, device=dev)
        self.out_tok = torch.zeros((B, N), **i64)
        self.out_lp = torch.zeros((B, N), **f32) if want_logprobs else None
        self.graph = None         # torch.cuda.CUDAGraph once captured
        self.capture_failed = False
        self.warm_steps = 0       # eager decode steps run so far (CUDA warm-up)
        self.busy = False         # a generator is using it (two live streams: two sessions)


class LinearAligner:
    """Linear Alignment decoding with a Hugging Face causal LM and its tokenizer.

    ``system``: base system text that both branches carry (None: the chat template's own
    default system message, if it has one). The principle goes after it in the principle
    branch's system message, separated by a space. Without a chat template the branches are
    ``principle + "\\n\\n" + prompt`` and ``prompt`` (with ``system + "\\n\\n"`` in front of
    both when given).
    """

    def __init__(self, model, tokenizer, *, system: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
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
        params = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed past_key_values to cache; 5.17 ignores cache= silently.
        self._cache_kw = "cache" if "cache" in params and "past_key_values" not in params \
            else "past_key_values"
        self._keep_logits = "logits_to_keep" in params
        self._template = getattr(tokenizer, "chat_template", None) is not None
        self._step = step  # benchmarks swap in the authors' step to time their structure
        # fast=True needs a cache argument that the forward really reads
        self._has_cache_kw = "cache" in params or "past_key_values" in params
        self._fast_sessions: OrderedDict = OrderedDict()
        #: fast=True counters: CUDA graphs captured, graph replays, decode steps run eagerly
        #: (CPU, CUDA warm-up, or a failed capture), failed captures.
        self.fast_stats = dict(captures=0, replays=0, eager_steps=0, capture_failures=0)
        self._default_system = self._find_default_system() if self._template else None

    # ------------------------------------------------------------------ prompts
    def _find_default_system(self) -> str | None:
        """The system text a chat template inserts when the conversation has none (SmolLM2's
        "You are a helpful AI assistant named SmolLM..."), found by rendering both ways."""
        mark, user = "\x00linalign-mark\x00", [{"role": "user", "content": "x"}]
        try:
            marked = self._render([{"role": "system", "content": mark}] + user)
        except Exception:  # template without a system role
            return None
        plain = self._render(user)
        head, _, tail = marked.partition(mark)
        if plain.startswith(head) and plain.endswith(tail) and len(plain) > len(head + tail):
            return plain[len(head):len(plain) - len(tail)]
        return None

    def _render(self, messages) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    def prompt_texts(self, prompt: str, principle: str | None) -> str:
        """The text of one branch: the conversation with ``principle`` in the system
        message, or without it (``principle=None``)."""
        base = self.system if self.system is not None else self._default_system
        if not self._template:
            text = prompt if principle is None else principle + "\n\n" + prompt
            return text if self.system is None else self.system + "\n\n" + text
        system = base
        if principle is not None:
            system = principle if not base else base + " " + principle
        messages = ([] if system is None else [{"role": "system", "content": system}]) + \
            [{"role": "user", "content": prompt}]
        return self._render(messages)

    def encode(self, text: str) -> list[int]:
        # A rendered chat template already holds its special tokens.
        return self.tokenizer(text, add_special_tokens=not self._template)["input_ids"]

    def branches(self, prompts, principle):
        """Prompt ids of the branches: (with the principle, without it), one row per prompt.
        With several principles per prompt (K > 1) the first item is K lists of rows, one
        per principle (the form ``generate_ids`` takes)."""
        prompts = _texts("prompt", prompts)
        per_prompt = _principles(principle, len(prompts))
        K = len(per_prompt[0])
        withs = [[self.encode(self.prompt_texts(q, ps[k])) for q, ps in zip(prompts, per_prompt)]
                 for k in range(K)]
        return (withs[0] if K == 1 else withs,
                [self.encode(self.prompt_texts(q, None)) for q in prompts])

    # ------------------------------------------------------------------ public API
    def generate(self, prompts, principle, *, ratio=None, kl_budget=None,
                 max_ratio=MAX_RATIO, temperature=DEFAULTS["temperature"],
                 top_p=DEFAULTS["top_p"], greedy=DEFAULTS["greedy"],
                 max_new_tokens=DEFAULTS["max_new_tokens"], seed=None, streamer=None,
                 mode="stacked", return_logprobs=False, backend="auto",
                 fast=False) -> GenerationResult:
        """Generate aligned answers for ``prompts`` (a string or a list) under ``principle``:
        one string; one per prompt; or, for several principles at once (SPEC section 4),
        one list of K strings per prompt (the same K for every prompt of a call).

        ratio: one number (default 3.0) or one per prompt; with K principles each prompt's
        entry may be a list of K ratios. kl_budget (instead of ratio): kl mode, SPEC
        section 3, a budget in nats per token, one number or one per prompt; max_ratio caps
        the ratio it gives (one principle only). ``result.extra["ratio"]`` has each row's
        mean ratio over its tokens.
        temperature, top_p: one number or one per prompt (SPEC section 2). greedy:
        argmax of the aligned scores inside the nucleus; False samples. seed: an int (each
        row gets its own Philox seed derived from it and its index) or one int per prompt;
        None draws one from torch's global generator. streamer: any object with
        ``put(ids)`` / ``end()`` (``transformers.TextStreamer`` works), fed the principle
        branch's prompt ids first and then each step's [B] tokens, as ``generate`` does.
        mode: "stacked" (one forward of 2B rows per step) or "two-caches".
        fast: True runs the stacked loop over a static KV cache and, on CUDA, replays one
        decode step as a CUDA graph (same tokens; finished rows keep running until all are
        done; "stacked" only). See docs/decoder.md.
        """
        ids_with, ids_without = self.branches(prompts, principle)
        return self.generate_ids(ids_with, ids_without, ratio=ratio, kl_budget=kl_budget,
                                 max_ratio=max_ratio, temperature=temperature, top_p=top_p,
                                 greedy=greedy, max_new_tokens=max_new_tokens, seed=seed,
                                 streamer=streamer, mode=mode, return_logprobs=return_logprobs,
                                 backend=backend, fast=fast)

    def generate_ids(self, ids_with, ids_without, *, ratio=None, kl_budget=None,
                     max_ratio=MAX_RATIO, temperature=DEFAULTS["temperature"],
                     top_p=DEFAULTS["top_p"], greedy=DEFAULTS["greedy"],
                     max_new_tokens=DEFAULTS["max_new_tokens"], seed=None, streamer=None,
                     mode="stacked", return_logprobs=False, backend="auto",
                     fast=False) -> GenerationResult:
        """``generate`` at token level: prompt ids of both branches in (lists of ints, one
        per row, or [B, L] tensors without padding), generated ids out. Several principles:
        ``ids_with`` is K such lists of rows (or a [K, B, L] tensor), one per principle."""
        groups = self._id_groups(ids_with, ids_without)
        return self._consume(self._decode(groups, ratio, temperature, top_p, greedy,
                                          max_new_tokens, seed, mode, return_logprobs,
                                          backend, fast, kl_budget, max_ratio), streamer,
                             groups[0])

    def _id_groups(self, ids_with, ids_without):
        """[K principle groups..., the base group], each a list of B prompt id rows."""
        nested = (isinstance(ids_with, torch.Tensor) and ids_with.dim() == 3) or (
            isinstance(ids_with, (list, tuple)) and ids_with and
            isinstance(ids_with[0], (list, tuple)) and ids_with[0] and
            isinstance(ids_with[0][0], (list, tuple, torch.Tensor)))
        withs = list(ids_with) if nested else [ids_with]
        names = ["ids_with"] if len(withs) == 1 else [f"ids_with[{k}]" for k in range(len(withs))]
        groups = [_id_rows(n, w, self.vocab_size) for n, w in zip(names, withs)]
        groups.append(_id_rows("ids_without", ids_without, self.vocab_size))
        for n, g in zip(names, groups):
            if len(g) != len(groups[-1]):
                raise ValueError(f"{n} has {len(g)} rows but ids_without has "
                                 f"{len(groups[-1])}")
        return groups

    def generate_plain(self, prompts, principle=None, *, temperature=DEFAULTS["temperature"],
                       top_p=DEFAULTS["top_p"], greedy=DEFAULTS["greedy"],
                       max_new_tokens=DEFAULTS["max_new_tokens"], seed=None, streamer=None,
                       return_logprobs=False, backend="auto", fast=False) -> GenerationResult:
        """Plain top-p decoding of one branch in the same loop (no Linear Alignment): the
        conversation with ``principle`` in the system message, or without one. One forward
        of B rows per step; the step runs with both branches equal and ratio 0."""
        prompts = _texts("prompt", prompts)
        principles = [None] * len(prompts) if principle is None else \
            _texts("principle", principle, len(prompts))
        rows = [self.encode(self.prompt_texts(q, p)) for q, p in zip(prompts, principles)]
        return self.generate_plain_ids(rows, temperature=temperature, top_p=top_p,
                                       greedy=greedy, max_new_tokens=max_new_tokens,
                                       seed=seed, streamer=streamer,
                                       return_logprobs=return_logprobs, backend=backend,
                                       fast=fast)

    def generate_plain_ids(self, ids, *, temperature=DEFAULTS["temperature"],
                           top_p=DEFAULTS["top_p"], greedy=DEFAULTS["greedy"],
                           max_new_tokens=DEFAULTS["max_new_tokens"], seed=None,
                           streamer=None, return_logprobs=False,
                           backend="auto", fast=False) -> GenerationResult:
        """``generate_plain`` at token level: one branch's prompt ids in, ids out."""
        rows = _id_rows("ids", ids, self.vocab_size)
        return self._consume(self._decode([rows], None, temperature, top_p, greedy,
                                          max_new_tokens, seed, "stacked", return_logprobs,
                                          backend, fast), streamer, rows)

    def stream(self, prompts, principle, **kwargs) -> Iterator:
        """Like ``generate``, as an iterator over new text. For one prompt (a string) it yields
        strings; for a list it yields ``(row, text)`` pairs. The pieces of a row join to
        exactly its ``generate`` text. Stopping early leaves the aligner usable."""
        single = isinstance(prompts, str)
        ids_with, ids_without = self.branches(prompts, principle)
        defaults = dict(DEFAULTS, ratio=None, kl_budget=None, max_ratio=MAX_RATIO, seed=None,
                        mode="stacked", return_logprobs=False, backend="auto", fast=False)
        unknown = set(kwargs) - set(defaults)
        if unknown:
            raise TypeError(f"unexpected arguments: {sorted(unknown)}")
        a = {**defaults, **kwargs}
        groups = self._id_groups(ids_with, ids_without)
        B = len(ids_without)
        # Checked here, not at the first next(): a bad call fails where it is made.
        _check_params(B, a["ratio"], a["temperature"], a["top_p"], a["max_new_tokens"],
                      a["mode"], len(groups) - 1, a["kl_budget"], a["max_ratio"])
        self._check_fast(a["fast"], a["mode"])
        if a["seed"] is not None:
            _row_seeds(a["seed"], B, a["greedy"])
        self._check_length(groups, a["max_new_tokens"])
        steps = self._decode(groups, a["ratio"], a["temperature"], a["top_p"], a["greedy"],
                             a["max_new_tokens"], a["seed"], a["mode"], a["return_logprobs"],
                             a["backend"], a["fast"], a["kl_budget"], a["max_ratio"])
        return self._pieces(steps, B, single)

    def _pieces(self, steps, B, single):
        texts = [_Detok(self.tokenizer) for _ in range(B)]
        done = [False] * B
        try:
            while True:
                try:
                    tokens = next(steps).tolist()
                except StopIteration as stop:
                    result = stop.value
                    break
                for row, tok in enumerate(tokens):
                    if done[row]:
                        continue
                    if tok in self.eos_ids:
                        done[row] = True
                    piece = texts[row].add(tok)
                    if piece:
                        yield piece if single else (row, piece)
        finally:  # stopped early (close, break, an error in the consumer's loop): end the
            steps.close()  # loop now, so a fast=True session is free again at once
        for row in range(B):
            piece = texts[row].flush(result.texts[row])
            if piece:
                yield piece if single else (row, piece)

    # ------------------------------------------------------------------ the loop
    def _consume(self, steps, streamer, prompt_rows) -> GenerationResult:
        if streamer is None:
            while True:
                try:
                    next(steps)
                except StopIteration as stop:
                    return stop.value
        width = max(len(r) for r in prompt_rows)
        first = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in prompt_rows])
        try:
            streamer.put(first)
            while True:
                try:
                    streamer.put(next(steps).cpu())
                except StopIteration as stop:
                    return stop.value
        finally:
            steps.close()  # a streamer that raised: end the loop (frees a fast session)
            streamer.end()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the valid prompt ids are [0, vocab_size)."""
        return self.model.get_input_embeddings().num_embeddings

    def _prefill(self, rows, max_new_tokens) -> tuple[_Part, torch.Tensor]:
        # rows: R prompt id lists -> logits [R, V] of each row's last prompt position
        dev = self.device
        L = max(len(r) for r in rows)
        ids, mask = _left_pad(rows, self.pad_id, L, max_new_tokens)
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask[:, :L].cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache
        part = _Part(DynamicCache(), mask, pos[:, -1] + 1, L)
        logits = self._forward(part, ids, pos)
        return part, logits

    def _forward(self, part, ids, pos) -> torch.Tensor:
        # ids, pos: [R, n] -> logits [R, V] at the last position; the cache grows to
        # part.length positions, which the caller has already advanced
        kw = {self._cache_kw: part.cache, "use_cache": True}
        if self._keep_logits:
            kw["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=part.mask[:, :part.length],
                         position_ids=pos, **kw)
        return out.logits[:, -1, :]

    def _decode_one(self, part, tokens) -> torch.Tensor:
        # tokens: [R] -> logits [R, V]
        part.length += 1
        logits = self._forward(part, tokens[:, None], part.pos[:, None])
        part.pos = part.pos + 1
        return logits

    def _decode(self, groups, ratio, temperature, top_p, greedy, max_new_tokens, seed, mode,
                want_logprobs, backend, fast=False, kl_budget=None, max_ratio=MAX_RATIO):
        """``_decode_steps``, with running out of memory turned into ``BatchTooLargeError``
        (the batch, the lengths and what to lower). The failed call's tensors are released
        before the error is raised, so the aligner stays usable."""
        try:
            return (yield from self._decode_steps(groups, ratio, temperature, top_p, greedy,
                                                  max_new_tokens, seed, mode, want_logprobs,
                                                  backend, fast, kl_budget, max_ratio))
        except BaseException as e:  # noqa: B036 - re-raised at once unless it is an OOM
            if not _is_oom(e):
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
            f"tokens + max_new_tokens={max_new_tokens}, mode={mode!r}, fast={fast}): pass "
            f"fewer prompts per call (e.g. {max(1, B // 2)}), a lower max_new_tokens or "
            f"shorter prompts; fast=True keeps up to {FAST_SESSIONS} static caches, "
            f"aligner.clear_fast_cache() frees them ({what})") from None

    def _decode_steps(self, groups, ratio, temperature, top_p, greedy, max_new_tokens, seed,
                      mode, want_logprobs, backend, fast=False, kl_budget=None,
                      max_ratio=MAX_RATIO):
        """Generator: yields each step's tokens [B] (pad for finished rows) on the device and
        returns the GenerationResult. groups: G lists of B prompt id lists (G = 2: with and
        without the principle; G = K + 1 >= 3: K principles and the base, SPEC section 4;
        G = 1: plain decoding of one branch)."""
        G, B = len(groups), len(groups[0])
        K = max(G - 1, 1)
        r, kl, T, p = _check_params(B, ratio if G > 1 else [0.0] * B, temperature, top_p,
                                    max_new_tokens, mode, K, kl_budget if G > 1 else None,
                                    max_ratio)
        self._check_fast(fast, mode)
        seeds = _row_seeds(seed, B, greedy)
        self._check_length(groups, max_new_tokens)
        dev = self.device
        if max_new_tokens == 0:
            return self._result([[] for _ in range(B)], None, [], 0.0, 0.0, 0)
        if fast:
            return (yield from self._decode_fast(groups, r, kl, T, p, greedy, max_new_tokens,
                                                 seeds, want_logprobs, backend))

        f32 = dict(dtype=torch.float32, device=dev)
        T, p = torch.tensor(T, **f32), torch.tensor(p, **f32)
        # the step's ratio arguments, [K, B] (K = 1: [B]) or kl mode's two [B] tensors
        r = None if r is None else torch.tensor(r, **f32)
        kl = None if kl is None else (torch.tensor(kl[0], **f32), torch.tensor(kl[1], **f32))
        ratio_sum = torch.zeros(B, **f32)  # the ratio each row used, summed over its tokens
        seeds = None if seeds is None else torch.tensor(seeds, dtype=torch.long, device=dev)
        eos = torch.tensor(self.eos_ids or [-1], dtype=torch.long, device=dev)
        out_tok = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=dev)
        out_lp = torch.zeros((B, max_new_tokens), **f32) if want_logprobs else None
        status = torch.zeros(B, dtype=torch.int32, device=dev)
        rows = torch.arange(B, device=dev)        # original index of each active row
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        sync_every = 1 if dev.type == "cpu" else 8

        with torch.inference_mode():
            _sync(dev)
            t0 = time.perf_counter()
            if mode == "stacked":
                part, logits = self._prefill([row for g in groups for row in g],
                                             max_new_tokens)
                parts, split = [part], [logits]
            else:
                parts, split = zip(*(self._prefill(g, max_new_tokens) for g in groups))
                parts, split = list(parts), list(split)
            _sync(dev)
            t1 = time.perf_counter()
            steps = 0
            for t in range(max_new_tokens):
                # zp, z0: the active rows' logits with the principle(s) ([Ba, V], or
                # [K, Ba, V] for K principles) and without it (the same rows when G = 1);
                # stacked: views of the [G Ba, V] logits, no copy
                Ba = rows.numel()
                zp, z0 = _branches(split, G, Ba)
                out = self._step(zp, z0, **_ratio_args(r, kl, G), temperature=T, top_p=p,
                                 greedy=greedy, seed=seeds, offset=t, backend=backend,
                                 check=False)
                if out.ratio is not None and G > 1:
                    used = out.ratio if out.ratio.dim() == 1 else out.ratio.mean(0)
                    ratio_sum[rows] += torch.where(done, 0.0, used)
                tok = torch.where(done, self.pad_id, out.tokens)
                out_tok[rows, t] = tok
                if out_lp is not None:
                    out_lp[rows, t] = torch.where(done, 0.0, out.logprobs)
                status[rows] |= torch.where(done, 0, out.status)
                done = done | torch.isin(tok, eos)
                steps = t + 1
                yield out_tok[:, t]
                if t + 1 == max_new_tokens:
                    break
                if (t + 1) % sync_every == 0:
                    if bool((status[rows] & Status.BAD_INPUT).any()):
                        self._raise_bad(status)
                    n_done = int(done.sum())
                    if n_done == Ba:
                        break
                    if n_done:
                        keep = (~done).nonzero().squeeze(1)
                        for part in parts:
                            part.select(keep if len(parts) > 1 else
                                        torch.cat([keep + g * Ba for g in range(G)]))
                        rows, done, T, p = rows[keep], done[keep], T[keep], p[keep]
                        r = None if r is None else r[:, keep]
                        kl = None if kl is None else (kl[0][keep], kl[1][keep])
                        seeds = None if seeds is None else seeds[keep]
                        tok = tok[keep]
                step_in = tok.repeat(G) if len(parts) == 1 else tok
                split = [self._decode_one(part, step_in) for part in parts]
            _sync(dev)
            t2 = time.perf_counter()
        if bool((status & Status.BAD_INPUT).any()):
            self._raise_bad(status)
        return self._result(out_tok[:, :steps].tolist(),
                            None if out_lp is None else out_lp[:, :steps].tolist(),
                            status.tolist(), t1 - t0, t2 - t1, steps,
                            ratio_sum.tolist() if G > 1 else None)

    # ------------------------------------------------------------------ fast=True
    def _check_fast(self, fast, mode):
        if not isinstance(fast, bool):
            raise TypeError(f"fast must be True or False; got {fast!r}")
        if not fast:
            return
        if mode != "stacked":
            raise ValueError(f'fast=True runs the stacked loop (mode="stacked") only; got '
                             f'mode={mode!r}')
        if not self._has_cache_kw:
            raise ValueError("fast=True needs a model whose forward takes a KV cache "
                             "(`cache` or `past_key_values`); this one takes neither")
        try:
            from transformers import StaticCache  # noqa: F401
        except ImportError as e:  # pragma: no cover - every supported transformers has it
            raise ValueError("fast=True needs transformers.StaticCache") from e

    def clear_fast_cache(self):
        """Drop the static caches and CUDA graphs that ``fast=True`` keeps for reuse."""
        self._fast_sessions.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fast_session(self, G, B, L, N, greedy, want_logprobs, backend, dev,
                      kl=False) -> _FastSession:
        """The session of this shape: reused (its graph included) when one is free, else a
        new one; the aligner keeps the FAST_SESSIONS most recently used."""
        key = (G, B, L, N, bool(greedy), bool(want_logprobs), backend, tuple(self.eos_ids),
               self.pad_id, self._step, bool(kl))
        s = self._fast_sessions.get(key)
        if s is not None and not s.busy:
            self._fast_sessions.move_to_end(key)
            return s
        s = _FastSession(self.model, G, B, L, N, greedy, want_logprobs, self.eos_ids, dev, kl)
        if key not in self._fast_sessions:
            self._fast_sessions[key] = s
            while len(self._fast_sessions) > FAST_SESSIONS:
                self._fast_sessions.popitem(last=False)
        return s

    def _fast_forward(self, s, ids, pos) -> torch.Tensor:
        # the whole preallocated mask every time: the static cache attends over all max_len
        # positions, causality hides the ones not written yet
        kw = {self._cache_kw: s.cache, "use_cache": True}
        if self._keep_logits:
            kw["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=s.mask, position_ids=pos, **kw)
        return out.logits[:, -1, :]

    def _fast_step(self, s, logits, greedy, backend):
        """The step and its bookkeeping at step index s.off, all in place on the device:
        no host synchronisation (the step runs with check=False and [B] tensors)."""
        B, G = s.B, s.G
        zp, z0 = _branches([logits], G, B)
        out = self._step(zp, z0, **_ratio_args(s.ratio, s.kl, G), temperature=s.temperature,
                         top_p=s.top_p, greedy=greedy, seed=s.seeds, offset=s.off,
                         backend=backend, check=False)
        if out.ratio is not None and G > 1:
            used = out.ratio if out.ratio.dim() == 1 else out.ratio.mean(0)
            s.ratio_sum.add_(torch.where(s.done, 0.0, used))
        tok = torch.where(s.done, self.pad_id, out.tokens)
        col = s.off[:1]
        s.out_tok.index_copy_(1, col, tok[:, None])
        if s.out_lp is not None:
            s.out_lp.index_copy_(1, col, torch.where(s.done, 0.0, out.logprobs)[:, None])
        s.status.bitwise_or_(torch.where(s.done, 0, out.status).to(torch.int32))
        s.done.logical_or_((tok[:, None] == s.eos).any(1))
        s.tok_in.copy_(tok.repeat(G))

    def _fast_body(self, s, greedy, backend):
        """One decode step after the first: forward of every row's new token (finished rows
        included: a static cache cannot drop rows), then the step. This is what the CUDA
        graph captures."""
        logits = self._fast_forward(s, s.tok_in[:, None], s.pos[:, None])
        s.pos.add_(1)
        s.off.add_(1)
        self._fast_step(s, logits, greedy, backend)

    def _fast_advance(self, s, greedy, backend, dev):
        if s.graph is not None:
            s.graph.replay()
            self.fast_stats["replays"] += 1
            return
        if dev.type != "cuda" or s.capture_failed:
            self._fast_body(s, greedy, backend)
            self.fast_stats["eager_steps"] += 1
            return
        if s.warm_steps < FAST_WARMUP_STEPS:
            # the torch.cuda.graph recipe: warm up (kernel compilation, cuBLAS workspaces,
            # lazy allocations) on a side stream; these are real decode steps
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                self._fast_body(s, greedy, backend)
            torch.cuda.current_stream(dev).wait_stream(side)
            s.warm_steps += 1
            self.fast_stats["eager_steps"] += 1
            return
        # Capture records the kernels without running them, so the step still has to be
        # run: by the first replay, or eagerly if capture fails.
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(dev)
            with torch.cuda.graph(graph):
                self._fast_body(s, greedy, backend)
        except Exception as e:  # something in the step is not capturable: stay eager
            s.capture_failed = True
            self.fast_stats["capture_failures"] += 1
            warnings.warn(f"fast=True: CUDA graph capture failed ({type(e).__name__}: {e}); "
                          "decoding continues with the static cache, without the graph",
                          RuntimeWarning, stacklevel=4)
            torch.cuda.synchronize(dev)
            self._fast_body(s, greedy, backend)
            self.fast_stats["eager_steps"] += 1
            return
        s.graph = graph
        self.fast_stats["captures"] += 1
        s.graph.replay()
        self.fast_stats["replays"] += 1

    def _decode_fast(self, groups, r, kl, T, p, greedy, N, seeds, want_logprobs, backend):
        """``_decode`` over a static cache (generator, same yields and result). Rows stay in
        the batch until all are done: a finished row emits padding at full cost."""
        G, B = len(groups), len(groups[0])
        dev = self.device
        rows = [row for g in groups for row in g]
        L = max(len(x) for x in rows)
        sync_every = 1 if dev.type == "cpu" else 8
        with torch.inference_mode():
            _sync(dev)
            t0 = time.perf_counter()
            s = self._fast_session(G, B, L, N, greedy, want_logprobs, backend, dev,
                                   kl is not None)
            s.busy = True
            try:
                ids, mask = _left_pad(rows, self.pad_id, L, N)
                s.mask.copy_(mask)
                pos = (s.mask[:, :L].cumsum(-1) - 1).clamp(min=0)
                s.pos.copy_(pos[:, -1] + 1)
                s.off.zero_()
                if kl is None:
                    s.ratio.copy_(torch.tensor(r))
                else:
                    s.kl[0].copy_(torch.tensor(kl[0]))
                    s.kl[1].copy_(torch.tensor(kl[1]))
                s.ratio_sum.zero_()
                s.temperature.copy_(torch.tensor(T))
                s.top_p.copy_(torch.tensor(p))
                if s.seeds is not None:
                    s.seeds.copy_(torch.tensor(seeds, dtype=torch.long))
                s.done.zero_()
                s.status.zero_()
                s.out_tok.fill_(self.pad_id)
                if s.out_lp is not None:
                    s.out_lp.zero_()
                s.cache.reset()  # in place: the captured graph keeps its addresses
                logits = self._fast_forward(s, ids.to(dev), pos)
                _sync(dev)
                t1 = time.perf_counter()
                self._fast_step(s, logits, greedy, backend)  # step 0 on the prompt logits
                steps = 1
                yield s.out_tok[:, 0]
                for t in range(1, N):
                    if t % sync_every == 0:
                        if bool((s.status & Status.BAD_INPUT).any()):
                            self._raise_bad(s.status)
                        if bool(s.done.all()):
                            break
                    self._fast_advance(s, greedy, backend, dev)
                    steps = t + 1
                    yield s.out_tok[:, t]
                _sync(dev)
                t2 = time.perf_counter()
                status = s.status.clone()
                ratio_sum = s.ratio_sum.tolist() if G > 1 else None
                toks = s.out_tok[:, :steps].tolist()
                lps = None if s.out_lp is None else s.out_lp[:, :steps].tolist()
            finally:
                s.busy = False
        if bool((status & Status.BAD_INPUT).any()):
            self._raise_bad(status)
        return self._result(toks, lps, status.tolist(), t1 - t0, t2 - t1, steps, ratio_sum)

    def _raise_bad(self, status):
        bad = (status & Status.BAD_INPUT).nonzero().squeeze(1).tolist()
        raise RuntimeError(f"the model produced NaN or +inf logits, or no finite logit, for "
                           f"rows {bad}: no token can be chosen (check the model's dtype and "
                           "weights)")

    def _result(self, toks, lps, status, prefill, decode, steps,
                ratio_sum=None) -> GenerationResult:
        ids, reasons, logprobs = [], [], [] if lps is not None else None
        for i, row in enumerate(toks):
            end = next((j for j, x in enumerate(row) if x in self.eos_ids), None)
            n = len(row) if end is None else end + 1
            ids.append(row[:n])
            reasons.append("length" if end is None else "eos")
            if logprobs is not None:
                logprobs.append(lps[i][:n])
        texts = [_decode_text(self.tokenizer, r) for r in ids]
        extra = {"status": status}
        if ratio_sum is not None:  # each row's mean ratio over its tokens (kl mode: r_eff)
            extra["ratio"] = [ratio_sum[i] / max(len(ids[i]), 1) for i in range(len(ids))]
        return GenerationResult(texts, ids, reasons, logprobs, prefill, decode, steps, extra)

    def _check_length(self, groups, max_new_tokens):
        """Before any compute: every row's prompt plus max_new_tokens fits the model's
        positions (max_position_embeddings; a model without it is not checked)."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is None:
            return
        names = ["with the principle", "without the principle"] if len(groups) == 2 else \
            ["plain"] if len(groups) == 1 else \
            [f"principle {k + 1}" for k in range(len(groups) - 1)] + ["without the principles"]
        for i in range(len(groups[0])):
            g = max(range(len(groups)), key=lambda g: len(groups[g][i]))
            n = len(groups[g][i])
            if n + max_new_tokens > limit:
                raise ValueError(
                    f"prompt {i} ({names[g]} branch) has {n} tokens; {n} + max_new_tokens="
                    f"{max_new_tokens} = {n + max_new_tokens} positions exceeds the model's "
                    f"context of {limit} positions (max_position_embeddings): shorten the "
                    f"prompt or the principle, or lower max_new_tokens to at most "
                    f"{max(0, limit - n)}")


def _branches(split, G, Ba):
    """The step's (z_p, z_0) from the logits of one step: ``split`` is [the stacked
    [G Ba, V] logits] or one [Ba, V] tensor per group (two caches). G = 1: both are the
    same rows; G = K + 1 >= 3: z_p is [K, Ba, V]."""
    if len(split) == 1:
        z = split[0]
        if G <= 2:
            return z[:Ba], z[(G - 1) * Ba:]
        return z[:(G - 1) * Ba].view(G - 1, Ba, -1), z[(G - 1) * Ba:]
    if G <= 2:
        return split[0], split[-1]
    return torch.stack(split[:-1]), split[-1]


def _ratio_args(r, kl, G):
    """The step's ratio keywords: r is [K, B] (K = 1: the [B] row is passed), kl a pair."""
    if kl is not None:
        return dict(kl_budget=kl[0], max_ratio=kl[1])
    return dict(ratio=r[0] if G <= 2 else r)


class _Detok:
    """Incremental detokenisation of one row: new text once it no longer ends inside a
    multi-byte character; the final flush makes the pieces add up to the returned text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def add(self, tok) -> str:
        self.ids.append(tok)
        text = _decode_text(self.tokenizer, self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

    def flush(self, final: str) -> str:
        if not final.startswith(self.shown):  # pragma: no cover - tokenizer rewrote the past
            raise RuntimeError("streamed text is not a prefix of the final text")
        piece, self.shown = final[len(self.shown):], final
        return piece


def _principles(principle, n) -> list[list[str]]:
    """One list of K principles per prompt (the same K for all): ``principle`` is one
    string, one per prompt, or one list of strings per prompt (SPEC section 4)."""
    if isinstance(principle, Sequence) and not isinstance(principle, str) and principle and \
            any(isinstance(p, (list, tuple)) for p in principle):
        if len(principle) != n:
            raise ValueError(f"{len(principle)} principle lists for {n} prompts: pass one "
                             "list of principles per prompt")
        rows = [[p] if isinstance(p, str) else _texts("principle", p) for p in principle]
        ks = sorted({len(r) for r in rows})
        if len(ks) > 1:
            raise ValueError(f"every prompt of a call needs the same number of principles; "
                             f"got {ks}: group the prompts by their number of principles")
        return rows
    return [[p] for p in _texts("principle", principle, n)]


def _texts(name, value, n=None) -> list[str]:
    if isinstance(value, str):
        value = [value] * (n or 1)
    elif not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a string or a list of strings; got "
                        f"{type(value).__name__}")
    value = list(value)
    if not value:
        raise ValueError(f"no {name}s given: pass a string or a non-empty list of strings")
    if n is not None and len(value) != n:
        raise ValueError(f"{len(value)} {name}s for {n} prompts: pass one {name}, or one "
                         "per prompt")
    for i, v in enumerate(value):
        if not v.strip():
            if name == "principle":
                raise ValueError(
                    f"principle {i} is empty (or only whitespace): both branches would be "
                    "the same conversation and Linear Alignment would change nothing; give "
                    "the principle in plain words (decoding without any principle: "
                    "generate_plain with principle=None)")
            raise ValueError(f"{name} {i} is empty (or only whitespace): give the user's "
                             "message (generate_ids takes any non-empty prompt ids)")
    return value


def _decode_text(tokenizer, ids) -> str:
    # No clean-up of spaces: it rewrites earlier text (streamed pieces must add up) and is
    # meant for WordPiece vocabularies, not the byte-level BPE of causal LMs.
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _left_pad(rows, pad_id, L, new_tokens):
    """Prompt ids left-padded to L ([R, L]) and the attention mask over the prompt and the
    tokens to come ([R, L + new_tokens]), on the CPU."""
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L + new_tokens), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    mask[:, L:] = 1
    return ids, mask


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
