"""A direct transcription of the authors' sort-based step (Wizardcoast/Linear_Alignment,
``model.py`` ``score_process`` and ``utils.py`` ``top_p_logits`` / ``denoise_logits``),
rewritten here for comparison only: tests check the reference against it on tie-free rows
and the benchmarks time it. Not used by any backend.

What it does per step: two softmaxes over the vocabulary, a full sort of the principle
branch, a cumulative sum, a scatter of the mask back to vocabulary order, a renormalisation,
the mask "principle probability is not zero in fp32", then argmax or ``torch.multinomial``.
"""
import torch


def authors_top_p(probs, top_p):
    # probs: [B, V]; zero every token whose sorted exclusive cumulative mass is >= top_p,
    # always keeping the most probable one, then renormalise.
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
    drop[:, :1] = False
    drop = torch.zeros_like(drop).scatter_(-1, order, drop)
    kept = probs.masked_fill(drop, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def authors_step(logits_p, logits_0, *, ratio, temperature=0.5, top_p=0.8, greedy=True,
                 generator=None):
    """The authors' step on [B, V] logits; returns the int64 [B] token ids."""
    zp = logits_p.float()
    z0 = logits_0.float()
    aligned = zp * (ratio + 1) - z0 * ratio
    probs = torch.softmax(aligned / temperature, dim=-1)
    sys_probs = authors_top_p(torch.softmax(zp / temperature, dim=-1), top_p)
    probs = probs * sys_probs.ne(0)
    if greedy:
        return torch.argmax(probs, dim=-1)
    # Rows whose masked mass underflowed to zero fall back to the principle nucleus.
    empty = probs.sum(dim=-1) == 0
    probs = torch.where(empty[:, None], sys_probs, probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
