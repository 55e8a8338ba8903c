"""The baselines linalign is measured and checked against; no backend uses them.

- ``authors_step``: a direct transcription of the authors' sort-based step
  (Wizardcoast/Linear_Alignment, ``model.py`` ``score_process`` and ``utils.py``
  ``top_p_logits`` / ``denoise_logits``), rewritten here for comparison only. Per step: two
  softmaxes over the vocabulary, a full sort of the principle branch, a cumulative sum, a
  scatter of the mask back to vocabulary order, a renormalisation, the mask "principle
  probability is not zero in fp32", then argmax or ``torch.multinomial``. Tests check the
  reference against it on tie-free rows; the benchmarks time it.
- ``authors_as_step``: the same behind ``linalign.step``'s interface, so that the decoding
  loop can run the authors' step in place of linalign's (``LinearAligner(..., step=)``).
- ``vectorized_step``: the contract for the whole batch as one sort-based graph without host
  synchronisation, to be compiled (``torch.compile(vectorized_step, dynamic=True)``): the
  "compiled reference" baseline of the benchmarks.
"""
import torch

from .arguments import StepOutput
from .constants import FMAX, GAP, Status


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


def authors_as_step(logits_p, logits_0, *, ratio, temperature, top_p, greedy, **_):
    """``authors_step`` behind ``linalign.step``'s interface (one principle, a fixed ratio;
    per-row tensors use their first row's temperature and top-p, as the authors' code has
    one of each). Only ``tokens`` is meaningful: the other fields are zeros."""
    B = logits_p.shape[0]
    r = ratio if not isinstance(ratio, torch.Tensor) else ratio[:, None]
    T = float(temperature[0]) if isinstance(temperature, torch.Tensor) else temperature
    p = float(top_p[0]) if isinstance(top_p, torch.Tensor) else top_p
    tokens = authors_step(logits_p, logits_0, ratio=r, temperature=T, top_p=p, greedy=greedy)
    zeros = torch.zeros(B, dtype=torch.int32, device=logits_p.device)
    return StepOutput(tokens, zeros.float(), zeros, zeros)


def _col(x, B, device):
    """A Python number stays a number; a [B] tensor becomes an fp32 [B, 1] column."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32).reshape(B, 1)
    return float(x)


def vectorized_step(logits_p, logits_0, ratio, temperature, top_p, *, greedy, u=None):
    # logits_p, logits_0: [B, V]; ratio, temperature, top_p: numbers or [B]; u: [B] or None
    """The contract (docs/semantics.md) for the whole batch at once: the same answers as
    ``linalign.reference`` in fp32 (one principle, a fixed ratio), as one sort-based graph
    without host synchronisation.

    It exists to be compiled, as the "torch.compile of the reference" baseline of the
    benchmarks (``torch.compile(vectorized_step, dynamic=True)``); no backend uses it.
    Arguments are checked ones (as ``linalign.arguments.normalize`` makes them): [B, V] fp32,
    bf16 or fp16 logits; ``ratio``, ``temperature``, ``top_p`` Python numbers or [B]
    tensors; ``u`` the [B] uniforms of a sampled step (``linalign.random.row_uniforms``),
    ignored when ``greedy``. Temperatures must be > 0 (T = 0 rows are not handled here; the
    reference and the backends treat them as greedy). Returns (tokens int64, log-probs fp32,
    nucleus sizes int32, status int32), each [B], like ``linalign.reference.run``.

    How, per row, without a Python loop: sort the principle branch once (descending); the
    exclusive running sum of its softmax gives the mass strictly above each sorted position;
    with k = the number of positions whose running mass is below top_p, the nucleus is every
    token whose logit is >= the k-th largest (which keeps all ties of the last kept token:
    a tied token's mass-above is the running mass at the first of its ties), and within
    80 T of the best. The rest is elementwise, plus ``argmax`` (first maximal index) or an
    inverse-CDF draw in vocabulary order (first token whose running mass exceeds u times
    the total), as in ``linalign.reference.pick``.
    """
    B, V = logits_p.shape
    dev = logits_p.device
    ninf = float("-inf")
    r, T, p = (_col(x, B, dev) for x in (ratio, temperature, top_p))
    zp, z0 = logits_p.float(), logits_0.float()
    bad_p = torch.isnan(zp) | (zp == float("inf"))
    bad_0 = torch.isnan(z0) | (z0 == float("inf"))
    zp = torch.where(bad_p, ninf, zp)
    z0 = torch.where(bad_0, ninf, z0)
    finite_p = zp > ninf
    any_p = finite_p.any(-1, keepdim=True)  # [B, 1]
    bad = (bad_p.any(-1) | bad_0.any(-1) | ~any_p[:, 0])

    # The nucleus of softmax(zp / T).
    m = zp.max(-1, keepdim=True).values
    m = torch.where(any_p, m, torch.zeros_like(m))  # rows without a finite logit: no NaN
    pi = torch.softmax((zp - m) / T, dim=-1)
    values, order = torch.sort(zp, dim=-1, descending=True)
    run = torch.cumsum(pi.gather(-1, order), dim=-1)
    above = torch.cat([torch.zeros_like(run[:, :1]), run[:, :-1]], dim=-1)  # strictly above
    ones = torch.ones((B, 1), device=dev, dtype=torch.float32)
    below = (above < p * ones) | (p * ones >= 1.0)  # top_p = 1 keeps all (as the reference)
    k = below.sum(-1, keepdim=True).clamp(min=1)
    tau = values.gather(-1, k - 1)
    cut = m - GAP * (T * ones)  # the gap rule in fp32
    in_n = finite_p & (zp >= tau) & (zp >= cut)

    # Banned stays banned; fall back to r = 0 when that empties N.
    allowed = in_n & (z0 > ninf)
    fallback = in_n.any(-1, keepdim=True) & ~allowed.any(-1, keepdim=True)
    allowed = torch.where(fallback, in_n, allowed)
    r_eff = torch.where(fallback, torch.zeros_like(ones), r * ones)
    d = (zp - torch.where(allowed, z0, zp)).clamp(-FMAX, FMAX)
    a = (zp + r_eff * d).clamp(-FMAX, FMAX)
    a = torch.where(allowed, a, ninf)

    token, logp = _batched_pick(a, T, greedy, u)
    token = torch.where(any_p[:, 0], token, 0)
    logprob = torch.where(any_p[:, 0], logp.gather(-1, token[:, None])[:, 0], ninf)
    size = torch.where(any_p[:, 0], in_n.sum(-1).to(torch.int32), 0)
    status = torch.where(fallback[:, 0], int(Status.FALLBACK), 0) | \
        torch.where(bad, int(Status.BAD_INPUT), 0)
    status = torch.where(any_p[:, 0], status, int(Status.BAD_INPUT)).to(torch.int32)
    return token, logprob, size, status


def _batched_pick(a, T, greedy, u):
    """The token of every row of masked aligned scores ``a`` [B, V] (argmax, or the
    inverse-CDF draw in vocabulary order) and the rows' log-softmax ``logp`` [B, V]."""
    B, V = a.shape
    ninf = float("-inf")
    amax = a.max(-1, keepdim=True).values
    amax = torch.where(amax > ninf, amax, torch.zeros_like(amax))
    logp = torch.log_softmax((a - amax) / T, dim=-1)
    if greedy:
        return torch.argmax(a, dim=-1), logp
    w = torch.exp(logp)
    cum = torch.cumsum(w, dim=-1)
    pos = w > 0
    over = (cum > u.to(device=a.device, dtype=torch.float32).reshape(B, 1) * cum[:, -1:]) & pos
    first = torch.argmax(over.to(torch.int8), dim=-1)
    ids = torch.arange(V, device=a.device).expand(B, V)
    last = torch.where(pos, ids, 0).max(-1).values
    return torch.where(over.any(-1), first, last), logp
