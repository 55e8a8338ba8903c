"""Decoding as small free functions, in the manner of gpt-fast's ``generate.py``.

- ``ModelCall``: how to call one Hugging Face causal LM with a KV cache (the cache keyword
  of its transformers version, ``logits_to_keep``).
- ``left_pad``, ``prefill``, ``decode_one``: rows of prompt ids left-padded into one batch
  with an attention mask and positions counted from each row's first real token, their
  prompt forward, and the forward of one new token per row (``CachedRows`` holds the cache).
- ``DecodeState``: what a decoding call keeps on the device (the step's per-row
  parameters, the step index, done flags, status bits, output tokens), updated in place.
- ``take_step``: one token for every row from one forward's logits, with the step as a
  parameter (``linalign.step``, the authors' step, or a wrapper such as ``linalign.hf``'s).
- ``decode``: **the** loop. It takes a cache strategy (``linalign.caches``: dynamic caches,
  or a static cache replayed as a CUDA graph) and a step function, yields every step's
  tokens and returns a ``Decoded``; ``linalign.streaming`` drives it (to the end, into a
  streamer, or as an iterator over text).

Every call shape: G branch groups (K principle groups and the base group; G = 1 for plain
decoding) of B rows, stacked group-major as G B rows in one forward. Design and choices:
docs/decoder.md.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch

from .constants import Status
from .options import NEUTRAL_PENALTIES, RowParams


# ---------------------------------------------------------------------------- the model
@dataclass
class ModelCall:
    """How to call ``model``'s forward with a KV cache."""

    model: object
    cache_kw: str          # "cache" (transformers 5.24) or "past_key_values" (5.17)
    keep_logits: bool      # the forward takes logits_to_keep
    takes_cache: bool      # the forward takes a cache argument at all

    @classmethod
    def of(cls, model) -> ModelCall:
        params = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed past_key_values to cache; 5.17 ignores cache= silently.
        kw = "cache" if "cache" in params and "past_key_values" not in params \
            else "past_key_values"
        return cls(model, kw, "logits_to_keep" in params,
                   "cache" in params or "past_key_values" in params)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the valid prompt ids are [0, vocab_size)."""
        return self.model.get_input_embeddings().num_embeddings

    def __call__(self, ids, mask, pos, cache) -> torch.Tensor:
        # ids, pos: [R, n]; mask: [R, length] -> logits [R, V] at the last position
        kw = {self.cache_kw: cache, "use_cache": True}
        if self.keep_logits:
            kw["logits_to_keep"] = 1
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                          **kw).logits[:, -1, :]

    def check_length(self, groups, max_new_tokens):
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


def left_pad(rows, pad_id, L, new_tokens):
    """Prompt ids left-padded to L ([R, L]) and the attention mask over the prompt and the
    tokens to come ([R, L + new_tokens]), on the CPU."""
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L + new_tokens), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    mask[:, L:] = 1
    return ids, mask


def positions(mask_prompt: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first real token: [R, L] from the [R, L] mask."""
    return (mask_prompt.cumsum(-1) - 1).clamp(min=0)


class CachedRows:
    """One batched dynamic KV cache: its rows' attention mask (preallocated to the final
    length), the next position of every row, and the cache object (updated in place)."""

    def __init__(self, cache, mask, pos, length):
        self.cache = cache    # DynamicCache over [R, ...]
        self.mask = mask      # [R, L + max_new_tokens] int64, 0 on left padding
        self.pos = pos        # [R] int64: position of the next token
        self.length = length  # positions used so far (the same for every row)

    def select(self, idx):
        """Keep rows ``idx`` (a [R'] index tensor), their cache rows included."""
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        self.pos = self.pos[idx]

    def grow(self, extra: int):
        """``extra`` more mask positions (for a caller that does not know the length)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], extra))], 1)


def prefill(call: ModelCall, rows, pad_id, max_new_tokens) -> tuple[CachedRows, torch.Tensor]:
    """The prompt forward of R rows of prompt ids: (their cache, logits [R, V] of each row's
    last prompt position)."""
    from transformers import DynamicCache

    dev = call.device
    L = max(len(r) for r in rows)
    ids, mask = left_pad(rows, pad_id, L, max_new_tokens)
    ids, mask = ids.to(dev), mask.to(dev)
    pos = positions(mask[:, :L])
    part = CachedRows(DynamicCache(), mask, pos[:, -1] + 1, L)
    return part, call(ids, mask[:, :L], pos, part.cache)


def decode_one(call: ModelCall, part: CachedRows, tokens) -> torch.Tensor:
    """The forward of one new token per row: tokens [R] -> logits [R, V]."""
    part.length += 1
    if part.length > part.mask.shape[1]:
        raise ValueError(f"the attention mask has {part.mask.shape[1]} positions; grow it "
                         "(CachedRows.grow) before decoding past them")
    logits = call(tokens[:, None], part.mask[:, :part.length], part.pos[:, None], part.cache)
    part.pos = part.pos + 1
    return logits


def split_branches(chunks, G, Ba):
    """The step's (z_p, z_0) from one forward's logits: ``chunks`` is [the stacked
    [G Ba, V] logits] or one [Ba, V] tensor per group (one cache per group). G = 1: both
    are the same rows; G = K + 1 >= 3: z_p is [K, Ba, V]. Views, no copy."""
    if len(chunks) == 1:
        z = chunks[0]
        if G <= 2:
            return z[:Ba], z[(G - 1) * Ba:]
        return z[:(G - 1) * Ba].view(G - 1, Ba, -1), z[(G - 1) * Ba:]
    if G <= 2:
        return chunks[0], chunks[-1]
    return torch.stack(chunks[:-1]), chunks[-1]


# ---------------------------------------------------------------------------- the state
class DecodeState:
    """What one decoding call keeps on the device, over its Ba active rows (all B at first),
    updated in place so that a CUDA graph captured over one step stays valid.

    Per active row: the step's parameters (``ratio`` [K, Ba] or kl mode's ``kl_budget`` and
    ``max_ratio``, ``temperature``, ``top_p``, ``seeds``), the step index ``off`` (the
    sampling offset), ``done``, the OR of ``status`` bits, the sum of the ratios used
    (``ratio_sum``), the number of tokens before the row ended (``length``), the output
    tokens and log-probs [Ba, N], and ``tok_in`` [G Ba] (the next input token of every
    branch row). ``rows``: each active row's index in the call (None while every row is
    active). Finished rows that leave the batch (``select``) are kept in ``retired``.
    """

    def __init__(self, G, B, N, *, greedy, want_logprobs, kl, eos_ids, pad_id, device,
                 penalized=False, ngram=0):
        K = max(G - 1, 1)
        i64 = dict(dtype=torch.long, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.G, self.B, self.N, self.greedy = G, B, N, greedy
        self.ratio = None if kl else torch.zeros((K, B), **f32)
        self.kl_budget = torch.zeros(B, **f32) if kl else None
        self.max_ratio = torch.zeros(B, **f32) if kl else None
        self.temperature = torch.zeros(B, **f32)
        self.top_p = torch.zeros(B, **f32)
        self.seeds = None if greedy else torch.zeros(B, **i64)
        self.off = torch.zeros(B, **i64)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        self.status = torch.zeros(B, dtype=torch.int32, device=device)
        self.ratio_sum = torch.zeros(B, **f32)
        self.length = torch.zeros(B, dtype=torch.int32, device=device)
        # out_tok doubles as the answer's history (penalties, n-gram bans): -1 until written
        self.out_tok = torch.full((B, N), -1, **i64)
        self.penalties = {name: torch.zeros(B, **f32) for name in NEUTRAL_PENALTIES} \
            if penalized else None
        self.ngram = ngram
        self.out_lp = torch.zeros((B, N), **f32) if want_logprobs else None
        self.tok_in = torch.zeros(G * B, **i64)
        self.eos = torch.tensor(list(eos_ids) or [-1], **i64)  # [E] end-of-sequence ids
        self.pad_id = pad_id
        self.rows = None     # [Ba] call-order index of each active row; None: all
        self.retired = {}    # call-order index -> its outputs (Python values)

    @property
    def kl(self) -> bool:
        return self.kl_budget is not None

    def load(self, rp: RowParams):
        """Start a call: copy in the per-row values (in place) and clear the rest."""
        dev = self.done.device

        def put(dst, values, dtype=torch.float32):
            dst.copy_(torch.tensor(values, dtype=dtype, device=dev))

        if self.kl:
            put(self.kl_budget, rp.kl[0])
            put(self.max_ratio, rp.kl[1])
        else:
            put(self.ratio, rp.ratios)
        put(self.temperature, rp.temperature)
        put(self.top_p, rp.top_p)
        if self.seeds is not None:
            put(self.seeds, rp.seeds, torch.long)
        if self.penalties is not None:
            for name, t in self.penalties.items():
                put(t, rp.penalties[name])
        for t in (self.off, self.done, self.status, self.ratio_sum, self.length):
            t.zero_()
        self.out_tok.fill_(-1)
        if self.out_lp is not None:
            self.out_lp.zero_()
        self.rows, self.retired = None, {}

    def step_kwargs(self) -> dict:
        """The step's keyword arguments for the active rows (check=False: no host sync)."""
        if self.kl:
            how = dict(kl_budget=self.kl_budget, max_ratio=self.max_ratio)
        else:
            how = dict(ratio=self.ratio[0] if self.G <= 2 else self.ratio)
        if self.penalties is not None:
            how.update(self.penalties, history=self.out_tok)
        return dict(how, temperature=self.temperature, top_p=self.top_p, greedy=self.greedy,
                    seed=self.seeds, offset=self.off, check=False)

    def step_tokens(self, t: int) -> torch.Tensor:
        """Step t's tokens of all B rows, in call order (padding for finished rows)."""
        if self.rows is None:
            return self.out_tok[:, t]
        full = torch.full((self.B,), self.pad_id, dtype=torch.long, device=self.done.device)
        return full.index_copy_(0, self.rows, self.out_tok[:, t])

    _PER_ROW = ("ratio_sum", "status", "length", "out_tok", "out_lp")

    def _host_rows(self, idx=None) -> list[dict]:
        """The per-row outputs of active rows ``idx`` (all when None) as Python values."""
        cols = {n: (getattr(self, n) if idx is None else getattr(self, n)[idx]).tolist()
                for n in self._PER_ROW if getattr(self, n) is not None}
        count = self.done.numel() if idx is None else idx.numel()
        return [{n: v[j] for n, v in cols.items()} for j in range(count)]

    def call_rows(self) -> list[int]:
        """The call-order index of every active row."""
        return list(range(self.done.numel())) if self.rows is None else self.rows.tolist()

    def select(self, keep: torch.Tensor):
        """Keep the active rows ``keep`` (indices into the active rows); the others are
        retired with their outputs (read to the host)."""
        Ba = self.done.numel()
        gone = torch.ones(Ba, dtype=torch.bool, device=keep.device)
        gone[keep] = False
        gone = gone.nonzero().squeeze(1)
        order = self.call_rows()
        for j, values in zip(gone.tolist(), self._host_rows(gone)):
            self.retired[order[j]] = values
        for name in ("temperature", "top_p", "seeds", "off", "done", "kl_budget",
                     "max_ratio", *self._PER_ROW):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[keep])
        if self.ratio is not None:
            self.ratio = self.ratio[:, keep]
        if self.penalties is not None:
            self.penalties = {name: t[keep] for name, t in self.penalties.items()}
        self.tok_in = self.tok_in.view(self.G, Ba)[:, keep].reshape(-1)
        self.rows = (torch.arange(Ba, device=keep.device) if self.rows is None
                     else self.rows)[keep]

    def host_row(self, i: int) -> dict:
        """Row ``i``'s (call order) outputs so far as Python values."""
        if i in self.retired:
            return self.retired[i]
        j = self.call_rows().index(i)
        return self._host_rows(torch.tensor([j], device=self.done.device))[0]

    def collect(self) -> list[dict]:
        """Every row's outputs, in call order, as Python values (the state is unchanged)."""
        rows = dict(self.retired)
        rows.update(zip(self.call_rows(), self._host_rows()))
        return [rows[i] for i in range(self.B)]


def take_step(state: DecodeState, chunks, step, *, backend="auto", stop=None):
    """One token for every active row from one forward's logits ``chunks`` (see
    ``split_branches``), all in place on the device (no host synchronisation): the step at
    step index ``state.off``, then the bookkeeping (finished rows emit padding; a row is done
    at an end-of-sequence token, or where ``stop(tokens)`` says so)."""
    Ba, G = state.done.numel(), state.G
    zp, z0 = split_branches(chunks, G, Ba)
    if state.ngram:
        zp, z0 = ban_repeated_ngrams(zp, z0, state.out_tok, state.off, state.ngram)
    out = step(zp, z0, backend=backend, **state.step_kwargs())
    done = state.done
    if G > 1 and out.ratio is not None:
        used = out.ratio if out.ratio.dim() == 1 else out.ratio.mean(0)
        state.ratio_sum.add_(torch.where(done, 0.0, used))
    tok = torch.where(done, state.pad_id, out.tokens)
    col = state.off[:1]
    state.out_tok.index_copy_(1, col, tok[:, None])
    if state.out_lp is not None:
        state.out_lp.index_copy_(1, col, torch.where(done, 0.0, out.logprobs)[:, None])
    state.status.bitwise_or_(torch.where(done, 0, out.status).to(torch.int32))
    state.length.add_((~done).to(torch.int32))
    ended = (tok[:, None] == state.eos).any(1)
    if stop is not None:
        ended = ended | stop(tok)
    done.logical_or_(ended)
    state.tok_in.copy_(tok.repeat(G))


def repeated_ngram_bans(history, t, n):
    """The tokens that would complete an n-gram already in the answer (Hugging Face's
    ``no_repeat_ngram_size``, on the answer's tokens): (ids [Ba, W], banned [Ba, W] bool).

    history: [Ba, N] int64, the answer so far (-1 where not written yet); t: [Ba] int64, the
    number of tokens so far. Every window of n tokens in the history whose first n - 1 equal
    the answer's last n - 1 bans its last token. On the device, no host synchronisation."""
    Ba, N = history.shape
    windows = history.unfold(1, n, 1)  # [Ba, W, n], W = N - n + 1: every n-gram slot
    pos = t[:, None] - (n - 1) + torch.arange(n - 1, device=history.device)  # [Ba, n - 1]
    tail = history.gather(1, pos.clamp(min=0))  # the answer's last n - 1 tokens
    match = (windows[..., :n - 1] == tail[:, None, :]).all(-1)
    banned = match & (windows >= 0).all(-1) & (pos >= 0).all(1, keepdim=True)
    return windows[..., n - 1], banned


def ban_repeated_ngrams(zp, z0, history, t, n):
    """(zp, z0) with the tokens of ``repeated_ngram_bans`` at -inf in every branch (new
    tensors). zp: [Ba, V] or [K, Ba, V]; z0: [Ba, V]. A window longer than the history
    bans nothing."""
    if n > history.shape[1]:
        return zp, z0
    ids, banned = repeated_ngram_bans(history, t, n)
    ids = torch.where(banned, ids, 0)
    # the min with +inf leaves a token as it is, so a token banned by one window and not by
    # another is banned whatever the order of the scatter
    src = torch.where(banned, float("-inf"), float("inf"))

    def ban(z):
        return z.scatter_reduce(-1, ids.expand(*z.shape[:-1], -1),
                                src.to(z.dtype).expand(*z.shape[:-1], -1), "amin")

    return ban(zp), ban(z0)


# ---------------------------------------------------------------------------- the loop
class BadLogitsError(RuntimeError):
    """The model produced NaN or +inf logits (or no finite logit) for some rows."""


def raise_on_bad_rows(status: torch.Tensor, rows=None):
    bad = ((status & int(Status.BAD_INPUT)) != 0).nonzero().squeeze(1)
    if rows is not None:
        bad = rows[bad]
    raise BadLogitsError(f"the model produced NaN or +inf logits, or no finite logit, for "
                         f"rows {bad.tolist()}: no token can be chosen (check the model's "
                         "dtype and weights)")


@dataclass
class Decoded:
    """What the loop returns, per row in call order: the generated ids (up to and including
    the token that ended the row), why it ended ("eos", "stop" or "length"), the
    log-probabilities (when asked for), the OR of the step's status bits, the mean ratio
    the step used (None for plain decoding); the timings; and, with stop strings, the texts
    (ids up to the token that completed a stop string, the text cut before it)."""

    token_ids: list[list[int]]
    finish_reasons: list[str]
    logprobs: list[list[float]] | None
    status: list[int]
    mean_ratio: list[float] | None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0
    texts: list[str] | None = None  # with stop strings: each answer cut before the first

    @classmethod
    def empty(cls, B) -> Decoded:
        return cls([[] for _ in range(B)], ["length"] * B, None, [0] * B, None)

    @classmethod
    def of_rows(cls, rows, N, eos_ids, G, want_logprobs, seconds, steps,
                stops=None) -> Decoded:
        """From ``DecodeState.collect``'s rows; ``seconds``: (prefill, decode); ``stops``:
        the call's stop strings (``linalign.streaming.StopStrings``) or None."""
        eos = set(eos_ids)
        ids = [r["out_tok"][:r["length"]] for r in rows]
        reasons = [finish_reason(i, r["length"], N, eos) for i, r in zip(ids, rows)]
        texts = None
        if stops is not None:
            cut = [stops.cut(i, why) for i, why in zip(ids, reasons)]
            ids, reasons, texts = (list(x) for x in zip(*cut)) if cut else ([], [], [])
        lengths = [len(i) for i in ids]
        return cls(ids, reasons,
                   [r["out_lp"][:n] for r, n in zip(rows, lengths)] if want_logprobs else None,
                   [r["status"] for r in rows],
                   None if G == 1 else [r["ratio_sum"] / max(r["length"], 1) for r in rows],
                   *seconds, steps, texts)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def sync_every(device) -> int:
    """Decoding steps between host checks: every step on the CPU (where reading a flag
    costs nothing), every 8 on a GPU (the host queues the next steps meanwhile)."""
    return 1 if device.type == "cpu" else 8


def decode(call: ModelCall, groups, rp: RowParams, *, cache, step, pad_id, eos_ids,
           want_logprobs=False, backend="auto", stop=None, on_finished=None, stops=None):
    """The decoding loop: a generator that yields each step's [B] tokens (on the device,
    padding for finished rows) and returns a ``Decoded``.

    groups: G lists of B prompt id lists (G = 2: with and without the principle; G = K + 1:
    K principles and the base; G = 1: plain decoding). rp: the validated per-row values
    (``SamplingParams.rows``). cache: a strategy of ``linalign.caches``. step: a function
    with ``linalign.step``'s signature. stop: an optional ``tokens [Ba] -> bool [Ba]`` that
    ends rows besides the end-of-sequence ids. on_finished: called as
    ``on_finished(row, ids, reason)`` for each row as soon as the loop sees it end (at its
    host checks, ``sync_every``), and for the rest at the end; with ``stops`` as
    ``on_finished(row, ids, reason, text)``. stops: the call's stop strings
    (``linalign.streaming.StopStrings``: ``check(state)`` at the host checks ends the rows
    whose text holds one, ``cut(ids, reason)`` trims a finished row) or None. The penalties
    and ``no_repeat_ngram_size`` of ``rp`` act in the step, from the answer's tokens so far
    (``DecodeState.out_tok``, on the device).

    The host reads the done flags and status bits every ``sync_every`` steps
    (``host_check``): it raises ``BadLogitsError`` for rows with NaN or +inf logits, ends
    the loop when every row is done, and (where the cache strategy can) drops the finished
    rows from the batch.
    """
    G, B, N = len(groups), len(groups[0]), rp.max_new_tokens
    finished = Finished(on_finished, N, eos_ids, stops)
    if N == 0:
        return finished.rest(Decoded.empty(B))
    dev = call.device
    every = sync_every(dev)
    with torch.inference_mode():
        _sync(dev)
        t0 = time.perf_counter()
        with cache.session(call, G, B, groups, N, greedy=rp.greedy,
                           want_logprobs=want_logprobs, kl=rp.kl is not None, pad_id=pad_id,
                           eos_ids=eos_ids, step=step, backend=backend,
                           penalized=rp.penalized, ngram=rp.no_repeat_ngram_size) as session:
            state = session.state
            state.load(rp)
            chunks = session.prefill(groups)
            _sync(dev)
            t1 = time.perf_counter()
            take_step(state, chunks, step, backend=backend, stop=stop)  # on the prompt
            steps = 1
            yield state.step_tokens(0)
            for t in range(1, N):
                if t % every == 0 and host_check(state, session, finished, stops):
                    break
                session.advance(lambda: decode_step(session, state, step, backend, stop))
                steps = t + 1
                yield state.step_tokens(t)
            _sync(dev)
            t2 = time.perf_counter()
            if bool((state.status & Status.BAD_INPUT).any()):
                raise_on_bad_rows(state.status, state.rows)
            rows = state.collect()
    return finished.rest(Decoded.of_rows(rows, N, eos_ids, G, want_logprobs,
                                         (t1 - t0, t2 - t1), steps, stops))


def host_check(state: DecodeState, session, finished: Finished, stops=None) -> bool:
    """What the host does every ``sync_every`` steps: raise ``BadLogitsError`` for rows with
    NaN or +inf logits, end the rows whose text holds a stop string, report the rows that
    have ended, drop them from the batch where the cache strategy can. True when every row
    is done."""
    if bool((state.status & Status.BAD_INPUT).any()):
        raise_on_bad_rows(state.status, state.rows)
    if stops is not None:
        stops.check(state)
    done = state.done
    if not bool(done.any()):
        return False
    idx = done.nonzero().squeeze(1)
    finished.ended(state, (idx if state.rows is None else state.rows[idx]).tolist())
    if bool(done.all()):
        return True
    if session.can_drop_rows:
        keep = (~done).nonzero().squeeze(1)
        state.select(keep)
        session.select(keep)
    return False


class Finished:
    """Calls ``on_finished(row, ids, reason)`` once per row (``(row, ids, reason, text)``
    with stop strings): for the rows a host check sees ended (``ended``), and at the end
    for the others (``rest``). Does nothing without a callback."""

    def __init__(self, on_finished, N, eos_ids, stops=None):
        self.on_finished, self.N, self.eos = on_finished, N, set(eos_ids)
        self.stops = stops
        self.reported = set()

    def ended(self, state: DecodeState, rows):
        if self.on_finished is None:
            return
        for i in rows:
            if i not in self.reported:
                self.reported.add(i)
                row = state.host_row(i)
                ids = row["out_tok"][:row["length"]]
                reason = finish_reason(ids, row["length"], self.N, self.eos)
                if self.stops is None:
                    self.on_finished(i, ids, reason)
                else:
                    self.on_finished(i, *self.stops.cut(ids, reason))

    def rest(self, decoded: Decoded) -> Decoded:
        if self.on_finished is not None:
            for i, (ids, reason) in enumerate(zip(decoded.token_ids, decoded.finish_reasons)):
                if i not in self.reported:
                    if decoded.texts is None:
                        self.on_finished(i, ids, reason)
                    else:
                        self.on_finished(i, ids, reason, decoded.texts[i])
        return decoded


def finish_reason(ids, length, N, eos) -> str:
    """Why a row ended: its end-of-sequence token, max_new_tokens, or a stop function."""
    if ids and ids[-1] in eos:
        return "eos"
    return "length" if length >= N else "stop"


def decode_step(session, state: DecodeState, step, backend, stop):
    """One decoding step after the first: the forward of every active row's new token, then
    the step. All in place: this is what a CUDA graph captures."""
    chunks = session.forward(state.tok_in)
    state.off.add_(1)
    take_step(state, chunks, step, backend=backend, stop=stop)
