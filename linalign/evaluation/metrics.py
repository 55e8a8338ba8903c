"""The numbers the evaluation reports besides adherence: repetition (repeated n-gram rate,
distinct-n) on token ids, the Wilson interval of a proportion, means and medians that skip
missing values, and ``response_nll``, the negative log-likelihood of answers under the
model, batched. Definitions and choices: docs/eval.md, "Metrics".
"""
from __future__ import annotations

import inspect
import math
from typing import Iterable, Sequence

import torch

#: An answer whose repeated 3-gram rate is above this counts as degenerate in ``clean``.
CLEAN_REP3 = 0.2


def ngrams(ids: Sequence[int], n: int) -> list[tuple]:
    """The n-grams of ``ids``, in order."""
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def repeated_ngram_rate(ids: Sequence[int], n: int = 3) -> float | None:
    """Fraction of the n-grams of ``ids`` that repeat an earlier n-gram of the same
    sequence: 1 - distinct / total. None when the sequence has no n-gram."""
    grams = ngrams(list(ids), n)
    return None if not grams else 1.0 - len(set(grams)) / len(grams)


def distinct_n(ids: Sequence[int], n: int = 2) -> float | None:
    """Distinct n-grams / n-grams of one sequence; None when it has no n-gram."""
    grams = ngrams(list(ids), n)
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


def mcnemar_exact(wins: int, losses: int) -> float:
    """The two-sided exact McNemar p-value of paired binary outcomes: ``wins`` pairs where
    only the first passes, ``losses`` where only the second does (pairs that agree carry no
    information). Under the null each discordant pair is a fair coin:
    ``p = min(1, 2 P[Binomial(wins + losses, 1/2) <= min(wins, losses)])``; 1 without
    discordant pairs."""
    n = wins + losses
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None; None when there are none."""
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
    V = model.get_output_embeddings().weight.shape[0]
    R_all = max(len(responses[i]) for i in todo)
    rows = max(1, min(batch_size, max_logits // ((R_all + 1) * V)))
    todo.sort(key=lambda i: len(contexts[i]) + len(responses[i]))  # less padding per chunk
    for start in range(0, len(todo), rows):
        chunk = todo[start:start + rows]
        scores = chunk_nll(model, [contexts[i] for i in chunk],
                           [responses[i] for i in chunk], pad_id)
        for i, score in zip(chunk, scores):
            out[i] = score
    return out


@torch.inference_mode()
def chunk_nll(model, contexts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
              pad_id: int) -> list[tuple[float, int]]:
    """``response_nll`` of one chunk of non-empty responses: one forward."""
    dev = next(model.parameters()).device
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    Lc = max(len(c) for c in contexts)
    R = max(len(r) for r in responses)
    ids = torch.full((len(contexts), Lc + R), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (c, r) in enumerate(zip(contexts, responses)):
        c, r = list(c), list(r)
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
    nll = torch.where(on, nll.view(len(contexts), R), 0.0)  # where: padded rows may be NaN
    sums, counts = nll.sum(1).tolist(), on.sum(1).tolist()
    return [(float(s), int(n)) for s, n in zip(sums, counts)]
