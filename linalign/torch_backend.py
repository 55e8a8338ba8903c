"""The fast torch path: the step vectorised over the batch, sort-free, for CPU tensors (and
as a fallback on GPUs without Triton).

How it avoids sorting the vocabulary:

1. One streaming pass gives the row max ``m`` and ``Z = sum exp((z_p - m) / T)``.
2. ``torch.topk(k=256, sorted=False)`` selects the candidate tokens (a selection, O(V)),
   which are put in vocabulary order (a sort of 256 ids, not of the vocabulary).
3. The threshold ``tau`` (the smallest logit whose mass-above is below ``top_p * Z``) is
   found by a weighted radix select over the candidates' order-preserving 32-bit keys: three
   ``bincount`` levels of 11, 11 and 10 bits. Exact: comparisons are on the logits, only
   the fp32 mass sums round.
4. If ``tau`` lies strictly above the k-th candidate, every nucleus token is a candidate and
   the rest of the step (aligned scores, greedy argmax or inverse-CDF draw, log-prob) runs on
   [B, 256]. Rows whose nucleus does not fit (flat rows, ``top_p = 1``) redo steps 3 and 4
   on the full row, still vectorised: same functions, wider input.

Randomness: one uniform per row (``linalign.random``), so a seeded call draws the same
tokens as the Triton kernel.
"""
import torch

from .random import row_uniforms
from .reference import GAP, aligned_scores

CANDIDATES = 256
_INF = float("inf")


def _ukey(x: torch.Tensor) -> torch.Tensor:
    # Order-preserving key of fp32 values as int64 in [0, 2**32); -0.0 and +0.0 are equal.
    b = (x + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    return torch.where(b < 0, b ^ 0x7FFFFFFF, b) + 2**31


def radix_threshold(ukey: torch.Tensor, w: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """Smallest key whose mass strictly above is below ``thr``, by a weighted radix select.

    ukey: [R, W] int64 keys in [0, 2**32); w: [R, W] masses (0 = not a candidate, > 0
    otherwise); thr: [R]. Returns [R] int64 keys. Each level histograms the masses of the
    keys that share the prefix found so far, and keeps the lowest non-empty bin whose mass
    strictly above (plus the mass above the prefix) is below ``thr``.
    """
    R, W = ukey.shape
    rows = torch.arange(R, device=ukey.device)[:, None]
    prefix = torch.zeros(R, dtype=torch.int64, device=ukey.device)
    above = torch.zeros(R, dtype=torch.float64, device=ukey.device)
    inside = w > 0
    wf = w.flatten()
    for shift, bits in ((21, 11), (10, 11), (0, 10)):
        nb = 1 << bits
        if shift != 21:
            inside = inside & ((ukey >> (shift + bits)) == prefix[:, None])
        idx = torch.where(inside, ((ukey >> shift) & (nb - 1)) + rows * nb, R * nb)
        hist = torch.bincount(idx.flatten(), weights=wf, minlength=R * nb + 1)
        hist = hist[: R * nb].view(R, nb).to(torch.float64)
        at_or_above = hist.flip(-1).cumsum(-1).flip(-1)
        strictly_above = above[:, None] + torch.cat([at_or_above[:, 1:], hist[:, :1] * 0], -1)
        ok = (hist > 0) & (strictly_above < thr[:, None])
        b = ok.to(torch.int8).argmax(-1)  # the first (lowest) bin that qualifies
        above = strictly_above.gather(-1, b[:, None]).squeeze(-1)
        prefix = (prefix << bits) | b
    return prefix


def _finish(cz, cz0, cidx, tau, inv_t, r, t0, greedy, u):
    """Aligned step on candidate columns given the threshold key ``tau`` per row.

    cz, cz0: [R, W] fp32 principle / without logits of the candidates, in vocabulary order;
    cidx: [R, W] their token ids; tau: [R]; inv_t, r: [R] fp32; t0: [R] bool (T = 0 rows);
    u: [R] uniforms or None (greedy). Returns (tokens, logprobs, nucleus sizes, fallback).
    """
    in_n = (_ukey(cz) >= tau[:, None]) & (cz > -_INF)
    ok = in_n & (cz0 > -_INF)  # banned stays banned
    n_in = in_n.sum(-1, dtype=torch.int32)
    fallback = ~ok.any(-1) & (n_in > 0)
    ok = torch.where(fallback[:, None], in_n, ok)
    r_eff = torch.where(fallback, 0.0, r)
    a = aligned_scores(cz, torch.where(ok, cz0, cz), r_eff[:, None])
    a = torch.where(ok, a, -_INF)
    a_max = a.amax(-1)
    ref = torch.where(a_max == -_INF, 0.0, a_max)
    w = torch.exp((a - ref[:, None]) * inv_t[:, None])
    s = w.sum(-1)
    pos = a.argmax(-1)  # first maximum = lowest token id (columns are in vocabulary order)
    if not greedy:
        cum = w.cumsum(-1)
        hit = (cum > (u * s)[:, None]) & (w > 0)
        last = w.shape[-1] - 1 - (w > 0).flip(-1).to(torch.int8).argmax(-1)
        drawn = torch.where(hit.any(-1), hit.to(torch.int8).argmax(-1), last)
        pos = torch.where(t0, pos, drawn)
    a_tok = a.gather(-1, pos[:, None]).squeeze(-1)
    logprob = torch.where(t0, 0.0, (a_tok - a_max) * inv_t - torch.log(s))
    return cidx.gather(-1, pos[:, None]).squeeze(-1), logprob, n_in, fallback


def _row_param(x, B, device):
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32)
    return torch.full((B,), x, dtype=torch.float32, device=device)


def torch_step(logits_p, logits_0, ratio, temperature, top_p, *, greedy, generator=None,
               seed=None, offset=0, candidates=CANDIDATES):
    """The step on validated arguments (see ``linalign.step``); returns four [B] tensors.

    ``candidates``: how many top principle logits the fast route looks at (tests lower it
    to force the full-row route).
    """
    B, V = logits_p.shape
    dev = logits_p.device
    zp = logits_p.float()
    r = _row_param(ratio, B, dev)
    T = _row_param(temperature, B, dev)
    p = _row_param(top_p, B, dev)
    t0 = T == 0
    inv_t = 1.0 / torch.where(t0, 1.0, T)

    # Bad input: NaN and +inf propagate through amax. Bad entries become -inf (banned).
    m = zp.amax(-1)
    bad = ~(m < _INF) | ~(logits_0.amax(-1).float() < _INF)
    z0 = logits_0
    if bool(bad.any()):
        zp = torch.where(torch.isnan(zp) | (zp == _INF), -_INF, zp)
        z0 = z0.float()
        z0 = torch.where(torch.isnan(z0) | (z0 == _INF), -_INF, z0)
        m = zp.amax(-1)
    empty = m == -_INF
    ref = torch.where(empty, 0.0, m)
    e = torch.exp((zp - ref[:, None]) * inv_t[:, None])
    thr = (p * e.sum(-1)).to(torch.float64)
    cut = m - GAP * torch.where(t0, 0.0, T)  # the gap rule, in fp32 like every backend
    # Rows with nothing to search: T = 0 (N = the ties at the max) and top_p = 1.
    no_search = t0 | (p >= 1) | empty
    cut_key = _ukey(cut)

    k = min(V, candidates)
    cval, cidx = zp.topk(k, dim=-1, sorted=False)
    cidx, order = cidx.sort(-1)  # vocabulary order for the inverse CDF
    cval = cval.gather(-1, order)
    ckey = _ukey(cval)
    cw = torch.where(cval >= cut[:, None], e.gather(-1, cidx), 0.0)
    tau = torch.where(no_search, cut_key, radix_threshold(ckey, cw, thr))
    fits = (tau > ckey.amin(-1)) | (k == V)

    u = None if greedy else row_uniforms(B, dev, generator=generator, seed=seed, offset=offset)
    cz0 = z0.gather(-1, cidx).float()
    tokens, logprobs, sizes, fallback = _finish(
        cval, cz0, cidx, tau, inv_t, r, t0, greedy, u)
    if not bool(fits.all()):
        rows = (~fits).nonzero().flatten()
        zr, er = zp[rows], e[rows]
        wr = torch.where(zr >= cut[rows, None], er, 0.0)
        tau_r = torch.where(no_search[rows], cut_key[rows], radix_threshold(_ukey(zr), wr, thr[rows]))
        full = torch.arange(V, device=dev).expand(len(rows), V)
        out = _finish(zr, z0[rows].float(), full, tau_r, inv_t[rows], r[rows], t0[rows], greedy,
                      None if u is None else u[rows])
        for dst, src in zip((tokens, logprobs, sizes, fallback), out):
            dst[rows] = src
    status = fallback.to(torch.int32) | torch.where(bad | empty, 2, 0).to(torch.int32)
    tokens = torch.where(empty, 0, tokens)
    logprobs = torch.where(empty, -_INF, logprobs)
    return tokens, logprobs, sizes, status


__all__ = ["torch_step", "radix_threshold"]
