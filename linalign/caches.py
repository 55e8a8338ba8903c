"""Cache strategies for the decoding loop (``linalign.decoding.decode``).

A strategy opens a session for one call (``with strategy.session(...) as s``) that holds
the call's ``DecodeState`` and its KV cache, and does the model's side of a step:

- ``s.prefill(groups)``: the prompt forward; returns the logits (a list of chunks, see
  ``linalign.decoding.split_branches``);
- ``s.forward(tok_in)``: the forward of one new token per branch row;
- ``s.advance(body)``: run one decoding step (``body``), eagerly or by replaying a graph;
- ``s.can_drop_rows`` / ``s.select(keep)``: whether finished rows may leave the batch.

``DynamicCaches``: transformers' ``DynamicCache``, all branches stacked in one cache (one
forward per step) or one cache per branch group (``stacked=False``, the authors'
structure); finished rows leave the batch at the host checks. ``StaticGraph``
(``fast=True``): a ``StaticCache`` and static buffers kept per call shape, and on CUDA one
decoding step captured as a CUDA graph and replayed. Details: docs/decoder.md.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from contextlib import contextmanager

import torch

from .decoding import DecodeState, decode_one, left_pad, positions, prefill

#: fast=True: eager decode steps (on a side stream) before the CUDA graph is captured, and how
#: many shapes' static caches and graphs a ``StaticGraph`` keeps (least recently used dropped).
FAST_WARMUP_STEPS = 2
FAST_SESSIONS = 4


class DynamicCaches:
    """Dynamic KV caches. ``stacked``: one cache over all G B rows (one forward per step);
    else one cache per branch group (G forwards per step). ``drop_finished``: finished rows
    leave the batch at the host checks (their cache rows too), so they stop costing compute.
    """

    def __init__(self, *, stacked: bool = True, drop_finished: bool = True):
        self.stacked, self.drop_finished = stacked, drop_finished

    @contextmanager
    def session(self, call, G, B, groups, N, *, greedy, want_logprobs, kl, pad_id, eos_ids,
                penalized=False, ngram=0, **_):
        state = DecodeState(G, B, N, greedy=greedy, want_logprobs=want_logprobs, kl=kl,
                            eos_ids=eos_ids, pad_id=pad_id, device=call.device,
                            penalized=penalized, ngram=ngram)
        yield DynamicSession(call, state, pad_id, N, self.stacked, self.drop_finished)


class DynamicSession:
    def __init__(self, call, state, pad_id, N, stacked, drop_finished):
        self.call, self.state, self.pad_id, self.N = call, state, pad_id, N
        self.stacked, self.can_drop_rows = stacked, drop_finished
        self.parts = []
        self.active = state.B  # rows per group still in the caches

    def prefill(self, groups):
        if self.stacked:
            part, logits = prefill(self.call, [r for g in groups for r in g], self.pad_id,
                                   self.N)
            self.parts = [part]
            return [logits]
        out = [prefill(self.call, g, self.pad_id, self.N) for g in groups]
        self.parts = [p for p, _ in out]
        return [logits for _, logits in out]

    def forward(self, tok_in):
        # tok_in: [G Ba] the next token of every branch row, group-major
        if len(self.parts) == 1:
            return [decode_one(self.call, self.parts[0], tok_in)]
        Ba = self.active
        return [decode_one(self.call, p, tok_in[g * Ba:(g + 1) * Ba])
                for g, p in enumerate(self.parts)]

    def select(self, keep):
        # keep: indices into the Ba active rows of each group
        Ba, G = self.active, self.state.G
        for part in self.parts:
            part.select(keep if len(self.parts) > 1 else
                        torch.cat([keep + g * Ba for g in range(G)]))
        self.active = keep.numel()

    def advance(self, body):
        body()


class StaticGraph:
    """``fast=True``: a transformers ``StaticCache`` and static buffers per call shape, kept
    for reuse (the ``FAST_SESSIONS`` most recently used), and on CUDA one decoding step
    captured once as a CUDA graph and replayed. Finished rows stay in the batch until every
    row is done. ``stats`` counts captures, replays, eager steps and failed captures."""

    def __init__(self):
        self.sessions: OrderedDict = OrderedDict()
        self.stats = dict(captures=0, replays=0, eager_steps=0, capture_failures=0)

    @staticmethod
    def check(call):
        """``ValueError`` when ``call``'s model cannot decode over a static cache."""
        if not call.takes_cache:
            raise ValueError("fast=True needs a model whose forward takes a KV cache "
                             "(`cache` or `past_key_values`); this one takes neither")

    @contextmanager
    def session(self, call, G, B, groups, N, *, greedy, want_logprobs, kl, pad_id, eos_ids,
                step, backend, penalized=False, ngram=0):
        L = max(len(r) for g in groups for r in g)
        key = (G, B, L, N, bool(greedy), bool(want_logprobs), backend, tuple(eos_ids), pad_id,
               step, bool(kl), bool(penalized), int(ngram))
        s = self.sessions.get(key)
        if s is None or s.busy:  # two live iterators of one shape get separate sessions
            s = StaticSession(call, G, B, L, N, self.stats, DecodeState(
                G, B, N, greedy=greedy, want_logprobs=want_logprobs, kl=kl, eos_ids=eos_ids,
                pad_id=pad_id, device=call.device, penalized=penalized, ngram=ngram))
            if key not in self.sessions:
                self.sessions[key] = s
                while len(self.sessions) > FAST_SESSIONS:
                    self.sessions.popitem(last=False)
        else:
            self.sessions.move_to_end(key)
        s.busy = True
        try:
            yield s
        finally:
            s.busy = False

    def clear(self):
        """Drop the static caches and CUDA graphs kept for reuse."""
        self.sessions.clear()


class StaticSession:
    """The fast path's state for one shape: a ``StaticCache`` over G B rows and ``L + N``
    positions, and static buffers that every decoding step reads and writes in place, so
    that a CUDA graph captured over one step stays valid for every later step and every
    later call of the same shape. Nothing here is rebound after creation: new values are
    copied in."""

    can_drop_rows = False

    def __init__(self, call, G, B, L, N, stats, state):
        from transformers import StaticCache

        dev = call.device
        self.call, self.L, self.stats, self.state = call, L, stats, state
        self.cache = StaticCache(config=call.model.config, max_cache_len=L + N)
        self.mask = torch.zeros((G * B, L + N), dtype=torch.long, device=dev)  # 0: padding
        self.pos = torch.zeros(G * B, dtype=torch.long, device=dev)  # next input's position
        self.graph = None         # torch.cuda.CUDAGraph once captured
        self.capture_failed = False
        self.warm_steps = 0       # eager decode steps run so far (CUDA warm-up)
        self.busy = False         # a call is using it

    def prefill(self, groups):
        ids, mask = left_pad([r for g in groups for r in g], self.state.pad_id, self.L,
                             self.state.N)
        self.mask.copy_(mask)
        pos = positions(self.mask[:, :self.L])
        self.pos.copy_(pos[:, -1] + 1)
        self.cache.reset()  # in place: a captured graph keeps its addresses
        # the whole preallocated mask every time: the static cache attends over all
        # positions, causality hides the ones not written yet
        return [self.call(ids.to(self.mask.device), self.mask, pos, self.cache)]

    def forward(self, tok_in):
        logits = self.call(tok_in[:, None], self.mask, self.pos[:, None], self.cache)
        self.pos.add_(1)
        return [logits]

    def select(self, keep):  # pragma: no cover - can_drop_rows is False
        raise RuntimeError("rows cannot leave a static cache")

    def advance(self, body):
        """One decoding step: a graph replay once captured; on CUDA, first
        ``FAST_WARMUP_STEPS`` eager steps on a side stream, then the capture; eager on the
        CPU or after a failed capture."""
        dev = self.mask.device
        if self.graph is not None:
            self.graph.replay()
            self.stats["replays"] += 1
            return
        if dev.type != "cuda" or self.capture_failed:
            body()
            self.stats["eager_steps"] += 1
            return
        if self.warm_steps < FAST_WARMUP_STEPS:
            # the torch.cuda.graph recipe: warm up (kernel compilation, cuBLAS workspaces,
            # lazy allocations) on a side stream; these are real decoding steps
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                body()
            torch.cuda.current_stream(dev).wait_stream(side)
            self.warm_steps += 1
            self.stats["eager_steps"] += 1
            return
        # Capture records the kernels without running them, so the step still has to be
        # run: by the first replay, or eagerly if capture fails.
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(dev)
            with torch.cuda.graph(graph):
                body()
        except Exception as e:  # something in the step is not capturable: stay eager
            self.capture_failed = True
            self.stats["capture_failures"] += 1
            warnings.warn(f"fast=True: CUDA graph capture failed ({type(e).__name__}: {e}); "
                          "decoding continues with the static cache, without the graph",
                          RuntimeWarning, stacklevel=4)
            torch.cuda.synchronize(dev)
            body()
            self.stats["eager_steps"] += 1
            return
        self.graph = graph
        self.stats["captures"] += 1
        graph.replay()
        self.stats["replays"] += 1
