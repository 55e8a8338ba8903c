"""Driving the decoding loop (``linalign.decoding.decode``): to its end, into a
``streamer`` (the protocol of Hugging Face ``generate``), or as an iterator over new text.
All three close the loop when they stop early, so its caches are free again at once."""
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

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def add(self, tok) -> str:
        self.ids.append(tok)
        text = decode_text(self.tokenizer, self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

    def flush(self, final: str) -> str:
        if not final.startswith(self.shown):  # pragma: no cover - tokenizer rewrote the past
            raise RuntimeError("streamed text is not a prefix of the final text")
        piece, self.shown = final[len(self.shown):], final
        return piece


def stream_text(steps, tokenizer, B, eos_ids, *, single):
    """An iterator over new text from the loop: strings for one prompt (``single``), else
    ``(row, text)`` pairs. Each row's pieces add up to exactly its final text. Stopping
    early (close, break, an error in the consumer) closes the loop at once."""
    texts = [_Detok(tokenizer) for _ in range(B)]
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
                if piece:
                    yield piece if single else (row, piece)
    finally:  # stopped early: end the loop now, so its caches are free again at once
        steps.close()
    for row in range(B):
        piece = texts[row].flush(decode_text(tokenizer, result.token_ids[row]))
        if piece:
            yield piece if single else (row, piece)
