"""Driving the decoding loop (``linalign.decoding.decode``): to its end, into a
``streamer`` (the protocol of Hugging Face ``generate``), or as an iterator over new text.
All three close the loop when they stop early, so its caches are free again at once.

Stop strings (``StopStrings``): the loop ends a row once its text holds one, and the answer
ends before the first occurrence; the text iterator never yields text that a stop string
later cuts (docs/decoder.md, "Stop strings")."""
from __future__ import annotations

import torch

from .prompts import decode_text


def run_to_end(steps):
    """Drive the loop to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def feed_streamer(steps, streamer, prompt_rows, pad_id):
    """Drive the loop, feeding ``streamer`` as ``generate`` does: the first group's prompt
    ids ([B, L], left-padded), then each step's [B] tokens, then ``end()``. A streamer that
    raises ends the loop (closing it frees its caches)."""
    width = max(len(r) for r in prompt_rows)
    try:
        streamer.put(torch.tensor([[pad_id] * (width - len(r)) + r for r in prompt_rows]))
        while True:
            try:
                streamer.put(next(steps).cpu())
            except StopIteration as stop:
                return stop.value
    finally:
        steps.close()
        streamer.end()


class _Detok:
    """Incremental detokenisation of one row: new text once it no longer ends inside a
    multi-byte character; the final flush makes the pieces add up to the returned text."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.ids, self.shown, self.stop = tokenizer, [], "", stop
        self.stopped = False  # the text holds a stop string: nothing more to show

    def add(self, tok) -> str:
        self.ids.append(tok)
        text = decode_text(self.tokenizer, self.ids)
        if self.stop:
            at = first_stop(text, self.stop)
            self.stopped = at is not None
            text = text[:at] if self.stopped else text[:len(text) - held_back(text, self.stop)]
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

    def flush(self, final: str) -> str:
        if not final.startswith(self.shown):  # pragma: no cover - tokenizer rewrote the past
            raise RuntimeError("streamed text is not a prefix of the final text")
        piece, self.shown = final[len(self.shown):], final
        return piece


def first_stop(text: str, strings) -> int | None:
    """Where the first occurrence of any of ``strings`` starts in ``text`` (None: none)."""
    found = [i for i in (text.find(s) for s in strings) if i >= 0]
    return min(found) if found else None


def held_back(text: str, strings) -> int:
    """How many characters at the end of ``text`` could still begin a stop string (the
    longest suffix of ``text`` that is a proper prefix of one of ``strings``)."""
    for n in range(min(len(text), max(map(len, strings)) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in strings):
            return n
    return 0


class StopStrings:
    """The stop strings of one decoding call, for ``linalign.decoding.decode``.

    ``check(state)`` (at the loop's host checks) decodes the new tokens of every active row
    and marks the rows whose text now holds a stop string as done, so they stop costing
    compute. ``cut(ids, reason)`` gives a finished row's answer: the ids up to and including
    the token that completed the first stop string, the text before that string, and the
    reason "stop" (else the ids, their text and ``reason`` unchanged). The answer depends
    only on the ids: not on when a host check saw them.
    """

    def __init__(self, tokenizer, strings):
        self.tokenizer, self.strings = tokenizer, tuple(strings)
        self.window = max(map(len, self.strings)) + 8  # tokens re-read before the new ones
        self.seen = {}  # call-order row -> tokens already checked

    def check(self, state):
        # state: the loop's DecodeState; out_tok [Ba, N], length [Ba], done [Ba] on the device
        rows = state.call_rows()
        done = state.done.tolist()
        lengths = state.length.tolist()
        ids = state.out_tok[:, :max(lengths, default=0)].tolist()
        for j, i in enumerate(rows):
            if done[j]:
                continue
            n, start = lengths[j], self.seen.get(i, 0)
            self.seen[i] = n
            recent = decode_text(self.tokenizer, ids[j][max(0, start - self.window):n])
            if first_stop(recent, self.strings) is not None and \
                    first_stop(decode_text(self.tokenizer, ids[j][:n]), self.strings) is not None:
                state.done[j] = True

    def cut(self, ids, reason):
        """(ids, reason, text) of a finished row (see the class docstring)."""
        text = decode_text(self.tokenizer, ids)
        if first_stop(text, self.strings) is None:
            return ids, reason, text
        lo, hi = 1, len(ids)  # the shortest prefix whose text holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if first_stop(decode_text(self.tokenizer, ids[:mid]), self.strings) is None:
                lo = mid + 1
            else:
                hi = mid
        text = decode_text(self.tokenizer, ids[:lo])
        return ids[:lo], "stop", text[:first_stop(text, self.strings)]


def stream_text(steps, tokenizer, B, eos_ids, *, single, stop=()):
    """An iterator over new text from the loop: strings for one prompt (``single``), else
    ``(row, text)`` pairs. Each row's pieces add up to exactly its final text. Stopping
    early (close, break, an error in the consumer) closes the loop at once. ``stop``: the
    call's stop strings; text that could still begin one is held back until it cannot, and
    a row's text ends before the first one."""
    texts = [_Detok(tokenizer, stop) for _ in range(B)]
    done = [False] * B
    eos = set(eos_ids)
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
                if tok in eos:
                    done[row] = True
                piece = texts[row].add(tok)
                done[row] = done[row] or texts[row].stopped
                if piece:
                    yield piece if single else (row, piece)
    finally:  # stopped early: end the loop now, so its caches are free again at once
        steps.close()
    for row in range(B):
        final = result.texts[row] if result.texts is not None else \
            decode_text(tokenizer, result.token_ids[row])
        piece = texts[row].flush(final)
        if piece:
            yield piece if single else (row, piece)
