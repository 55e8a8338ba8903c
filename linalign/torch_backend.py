"""The fast torch path: the step vectorised over the batch, sort-free, for CPU tensors (and
as a fallback on GPUs without Triton). ``run(args)`` is its entry point, for every mode: one
principle with a fixed ratio, kl mode (``kl_ratio``) and several principles (``compose``).

How it avoids sorting the vocabulary:

1. One streaming pass gives the row max ``m`` and ``Z = sum exp((z_p - m) / T)``.
2. ``torch.topk(k, sorted=False)`` selects k candidate tokens (a selection, O(V)), which
   are put in vocabulary order (a sort of k ids, not of the vocabulary). First k = 256 (a
   real row's nucleus is a handful to a few hundred tokens); rows whose nucleus turns out
   larger try again with k sized by one ``bincount`` of their masses over 1024 slices of
   the distance from the max (the nucleus plus about two slices of 0.08 T); a row that still
   does not fit (only if fp32 rounding beat that margin) uses the whole row.
3. The threshold ``tau`` (the smallest logit whose mass-above is below ``top_p * Z``) is
   found by a weighted radix select over the candidates' order-preserving int32 keys: three
   ``bincount`` levels of 11, 11 and 10 bits. Exact: comparisons are on the logits, only
   the fp32 mass sums round.
4. If ``tau`` lies strictly above the smallest candidate (checked exactly), every nucleus
   token is a candidate and the rest of the step (aligned scores, greedy argmax or
   inverse-CDF draw, log-prob) runs on [B, k]; otherwise the row moves to the next k. Every
   try runs the same two functions, vectorised over its rows.

Randomness: one uniform per row (``linalign.random``), so a seeded call draws the same
tokens as the Triton kernel.
"""
import dataclasses

import torch

from .arguments import Penalties, StepArgs, StepOutput, used_ratio
from .constants import FMAX, GAP, Status
from .random import row_uniforms

CANDIDATES = 256  # first try: the nucleus of a real row is a handful to a few hundred tokens
BUCKETS = 1024  # slices of the gap window [0, 80 T] used to size the candidate set
_INF = float("inf")


def order_key(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 key of fp32 values (-0.0 and +0.0 get the same key)."""
    b = (x + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0 (and copies)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def radix_threshold(key: torch.Tensor, w: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """Smallest key whose mass strictly above is below ``thr``, by a weighted radix select.

    key: [R, W] int32 order keys; w: [R, W] fp32 masses (0 = not a candidate, > 0
    otherwise); thr: [R]. Returns [R] int32 keys. Each level histograms the masses of the
    keys that share the prefix found so far (11, 11 and 10 bits of the key with its sign bit
    flipped, i.e. read as unsigned), and keeps the lowest non-empty bin whose mass strictly
    above (plus the mass above the prefix) is below ``thr``.
    """
    R, W = key.shape
    u = key ^ -(2**31)  # unsigned order in the bit pattern; shifts are masked below
    offsets = (torch.arange(R, device=key.device, dtype=torch.int32) * 2048)[:, None]
    prefix = torch.zeros(R, dtype=torch.int32, device=key.device)
    above = torch.zeros(R, dtype=torch.float64, device=key.device)
    for shift, bits in ((21, 11), (10, 11), (0, 10)):
        nb = 1 << bits
        wl = w
        if shift != 21:
            high = 32 - shift - bits
            wl = w * (((u >> (shift + bits)) & ((1 << high) - 1)) == prefix[:, None])
        idx = ((u >> shift) & (nb - 1)) + offsets
        hist = torch.bincount(idx.flatten(), weights=wl.flatten(), minlength=R * 2048)
        hist = hist.view(R, 2048)[:, :nb].to(torch.float64)
        at_or_above = hist.flip(-1).cumsum(-1).flip(-1)
        strictly_above = above[:, None] + torch.cat([at_or_above[:, 1:], hist[:, :1] * 0], -1)
        ok = (hist > 0) & (strictly_above < thr[:, None])
        b = ok.to(torch.int8).argmax(-1)  # the first (lowest) bin that qualifies
        above = strictly_above.gather(-1, b[:, None]).squeeze(-1)
        prefix = (prefix << bits) | b.to(torch.int32)
    return prefix ^ -(2**31)


def _finish(cz, ckey, cz0, cidx, tau, inv_t, r, t0, greedy, u):
    """Aligned step on candidate columns given the threshold key ``tau`` per row.

    cz, cz0: [R, W] fp32 principle / without logits of the candidates, in vocabulary order;
    ckey: [R, W] order keys of cz; cidx: [R, W] their token ids; tau: [R]; inv_t, r: [R]
    fp32; t0: [R] bool (T = 0 rows); u: [R] uniforms or None (greedy).
    Returns (tokens, logprobs, nucleus sizes, fallback).
    """
    in_n = (ckey >= tau[:, None]) & (cz > -_INF)
    ok = in_n & (cz0 > -_INF)  # banned stays banned
    n_in = in_n.sum(-1, dtype=torch.int32)
    fallback = ~ok.any(-1) & (n_in > 0)
    ok = torch.where(fallback[:, None], in_n, ok)
    r_eff = torch.where(fallback, 0.0, r)
    d = (cz - torch.where(ok, cz0, cz)).clamp(-FMAX, FMAX)
    a = (cz + r_eff[:, None] * d).clamp(-FMAX, FMAX)  # z_p + r (z_p - z_0), clamped
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


def candidate_count(dist, e, inv_t, thr, t0, p):
    """How many top logits per row surely hold the nucleus (a small superset of it).

    dist: [R, V] distance ``m - z_p`` (+inf for banned tokens), overwritten; e: [R, V] the
    masses ``exp(-dist / T)``. One bincount histograms the mass over BUCKETS equal slices of
    the gap window [0, 80 T] (one more bucket for everything beyond); the nucleus ends in
    the last bucket whose closer buckets hold less than ``thr``. Returns the [R] counts of
    tokens up to one bucket past that one, plus one (the margin absorbs fp32 rounding; the
    caller checks exactly that the nucleus fits).
    """
    R = dist.shape[0]
    nb = BUCKETS
    # In place where possible: on the CPU every fresh [B, V] buffer costs page faults.
    bucket = dist.mul_((inv_t * (nb / GAP))[:, None]).clamp_(max=nb).to(torch.int32)
    bucket += (torch.arange(R, device=dist.device, dtype=torch.int32) * (nb + 1))[:, None]
    flat = bucket.view(-1)
    size = R * (nb + 1)
    mass = torch.bincount(flat, weights=e.view(-1), minlength=size).view(R, nb + 1)
    count = torch.bincount(flat, minlength=size).view(R, nb + 1)
    mass = mass[:, :nb].to(torch.float64)
    closer = mass.cumsum(-1) - mass
    qualifies = (mass > 0) & (closer < thr[:, None])
    last = nb - 1 - qualifies.flip(-1).to(torch.int8).argmax(-1)
    last = torch.where(t0, 0, torch.where(p >= 1, nb - 1, last))
    limit = (last + 1).clamp(max=nb - 1)
    # One more than the count, so that the exact check below sees a candidate under tau.
    return count.cumsum(-1).gather(-1, limit[:, None]).squeeze(-1) + 1


def _solve(zp, z0, e, k, thr, cut_key, no_search, inv_t, r, t0, greedy, u):
    """The step for a set of rows on their k largest principle logits (all of them when
    k == V). Returns (tokens, logprobs, nucleus sizes, fallback, fits): ``fits`` says where
    the candidates surely held the whole nucleus (the other rows' results are not valid)."""
    R, V = zp.shape
    if k >= V:  # every token is a candidate: no selection (and no sort of the vocabulary)
        cval, cidx = zp, torch.arange(V, device=zp.device).expand(R, V)
    else:
        cval, cidx = zp.topk(k, dim=-1, sorted=False)
        cidx, order = cidx.sort(-1)  # vocabulary order (k ids) for the inverse CDF
        cval = cval.gather(-1, order)
    ckey = order_key(cval)
    cw = e.gather(-1, cidx) * (ckey >= cut_key[:, None])
    tau = torch.where(no_search, cut_key, radix_threshold(ckey, cw, thr))
    # Exact check: tau strictly above the smallest candidate means every token at or above
    # tau (ties included) is a candidate.
    fits = (tau > ckey.amin(-1)) | (k >= V)
    out = _finish(cval, ckey, z0.gather(-1, cidx).float(), cidx, tau, inv_t, r, t0, greedy, u)
    return (*out, fits)


def torch_step(logits_p, logits_0, ratio, temperature, top_p, *, greedy, generator=None,
               seed=None, offset=0, candidates=(CANDIDATES, "sized")):
    """The step on validated arguments (see ``linalign.step``); returns four [B] tensors.

    ``candidates``: the candidate-set sizes tried in turn by the rows that are still
    unresolved: numbers, or "sized" for ``candidate_count``; the full row comes last.
    """
    B, V = logits_p.shape
    dev = logits_p.device
    zp = logits_p.float().contiguous()  # any layout: the candidate search flattens the rows
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
    # exp((z_p - m) / T), bit for bit what the kernel computes; in place (on the CPU every
    # fresh [B, V] buffer costs page faults).
    e = (zp - ref[:, None]).mul_(inv_t[:, None]).exp_()
    thr = (p * e.sum(-1)).to(torch.float64)
    cut = m - GAP * torch.where(t0, 0.0, T)  # the gap rule, in fp32 like every backend
    # Rows with nothing to search: T = 0 (N = the ties at the max) and top_p = 1.
    no_search = t0 | (p >= 1) | empty
    cut_key = order_key(cut)
    u = None if greedy else row_uniforms(B, dev, generator=generator, seed=seed, offset=offset)

    results = None
    rows = torch.arange(B, device=dev)  # the rows still unresolved
    for k in (*candidates, V):
        sub = (lambda x: x) if len(rows) == B else (lambda x: x[rows])  # noqa: E731
        zr, er, inv_r = sub(zp), sub(e), sub(inv_t)
        if k == "sized":
            k = int(candidate_count(sub(ref)[:, None] - zr, er, inv_r, sub(thr), sub(t0),
                                    sub(p)).max())
        *out, fits = _solve(zr, sub(z0), er, min(int(k), V), sub(thr), sub(cut_key),
                            sub(no_search), inv_r, sub(r), sub(t0), greedy,
                            None if u is None else sub(u))
        if results is None:
            results = out
        else:
            for dst, src in zip(results, out):
                dst[rows] = src
        if bool(fits.all()):
            break
        rows = rows[~fits]
    tokens, logprobs, sizes, fallback = results
    status = torch.where(fallback, int(Status.FALLBACK), 0) | \
        torch.where(bad | empty, int(Status.BAD_INPUT), 0)
    status = status.to(torch.int32)
    tokens = torch.where(empty, 0, tokens)
    logprobs = torch.where(empty, -_INF, logprobs)
    return tokens, logprobs, sizes, status


def kl_ratio(logits_p, logits_0, temperature, kl_budget, max_ratio):
    """kl mode (docs/semantics.md, "kl mode"), vectorised: the [B] fp32 ``r_eff = kappa - 1`` of
    every row.

    ``v`` = variance of ``g = (z_p - z_0) / T`` under ``softmax(z_0 / T)`` over the tokens
    finite in both branches (NaN and +inf count as banned), computed in two passes (the
    mean, then the spread about it: no cancellation when the branches differ by a large
    constant); ``kappa = sqrt(2 eps / v)`` clipped to ``[0, 1 + max_ratio]``. ``v == 0``, no
    such token or ``T == 0``: r = 0; a non-finite ``v`` (hostile logits): ``kappa = 0``.
    The same definition as ``linalign.reference.kl_ratio``.
    """
    B = logits_p.shape[0]
    dev = logits_p.device
    zp, z0 = logits_p.float(), logits_0.float()
    T = _row_param(temperature, B, dev)
    t0 = T == 0
    inv_t = (1.0 / torch.where(t0, 1.0, T))[:, None]
    v = W = None
    if dev.type == "cpu" and not torch.compiler.is_compiling() and bool(
            ((zp.amax(-1) < _INF) & (zp.amin(-1) > -_INF) & (z0.amax(-1) < _INF) &
             (z0.amin(-1) > -_INF)).all()):
        # Every logit finite (the usual case; a check costs nothing on the CPU): no masks,
        # in place, the weighted sums as batched dot products. Kept when every v is finite:
        # else a token of weight 0 whose g overflowed made a NaN, and the masked sums run.
        w = (z0 - z0.amax(-1, keepdim=True)).mul_(inv_t).exp_()
        g = (zp - z0).mul_(inv_t)
        W = w.sum(-1)
        mean = torch.bmm(w[:, None, :], g[:, :, None]).view(B) / W
        g.sub_(mean[:, None]).square_()
        v = torch.bmm(w[:, None, :], g[:, :, None]).view(B) / W
        if not bool(torch.isfinite(v).all()):
            v = None
    if v is None:
        both = (zp > -_INF) & (zp < _INF) & (z0 > -_INF) & (z0 < _INF)  # NaN fails both
        m0 = torch.where(both, z0, -_INF).amax(-1, keepdim=True)
        m0 = torch.where(m0 > -_INF, m0, 0.0)
        w = torch.where(both, ((z0 - m0) * inv_t).exp(), 0.0)
        g = torch.where(both, (zp - z0) * inv_t, 0.0)
        W = w.sum(-1)
        live = w > 0  # a token of weight 0 adds nothing, even where g overflowed
        mean = torch.where(live, w * g, 0.0).sum(-1) / W
        v = torch.where(live, w * (g - mean[:, None]).square(), 0.0).sum(-1) / W
    eps = _row_param(kl_budget, B, dev)
    cap = 1.0 + _row_param(max_ratio, B, dev)
    kappa = torch.where(torch.isfinite(v), (2.0 * eps / v).sqrt(), 0.0)
    kappa = torch.minimum(kappa.clamp(min=0.0), cap)
    return torch.where(t0 | (W == 0) | (v == 0), 0.0, kappa - 1.0)



# ---------------------------------------------------------------------------- penalties
def penalize(z: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """Logits after the penalties (docs/semantics.md, "Penalties"): ``z`` [B, V] or
    [K, B, V] (every branch of the same B rows, which share the history) -> a new fp32
    tensor of the same shape, no host synchronisation.

    The reference's arithmetic (``linalign.reference.penalized_row``) on the touched entries
    only: each history entry's count (one ``scatter_add`` into a [B, V] buffer, read back
    with ``gather``), its logit, its penalised value, scattered into a copy of ``z``.
    Padding entries are pointed at the row's largest valid id (so they write the value its
    own entries write: the scatter has no race), or at id 0 with count 0 (unchanged) when
    the row has none."""
    out = z.float().clone()
    B, V = z.shape[-2:]
    dev = z.device
    h = penalties.history
    valid = (h >= 0) & (h < V)
    ids = torch.where(valid, h, -1)
    top = ids.amax(1, keepdim=True).clamp(min=0)  # [B, 1]: the row's largest valid id
    idx = torch.where(valid, h, top)  # [B, H]
    counts = torch.zeros((B, V), dtype=torch.float32, device=dev).scatter_add_(
        1, torch.where(valid, h, 0), valid.to(torch.float32)).gather(1, idx)
    rep, pres, freq = (_fp32_col(x, B, dev) for x in (penalties.repetition,
                                                      penalties.presence,
                                                      penalties.frequency))
    idx = idx.expand(*out.shape[:-1], -1)
    x = out.gather(-1, idx)  # [..., B, H]
    y = torch.where(x < 0, x * rep, x / rep)
    amount = (freq * counts + pres).clamp(-FMAX, FMAX)
    y = (y - amount).clamp(-FMAX, FMAX)
    return out.scatter_(-1, idx, torch.where((counts > 0) & torch.isfinite(x), y, x))


def with_penalties(args: StepArgs) -> StepArgs:
    """``args`` with every branch penalised (fp32 copies), or ``args`` itself when it has no
    penalties."""
    if args.penalties is None:
        return args
    return dataclasses.replace(args, logits=penalize(args.logits, args.penalties),
                               logits_0=penalize(args.logits_0, args.penalties),
                               penalties=None)


def _fp32_col(x, B, device):
    """A number or a [B] tensor as an fp32 [B, 1] column (a number rounded to fp32 first,
    as the reference computes with it)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32).reshape(B, 1)
    return torch.full((B, 1), float(x), dtype=torch.float32, device=device)


# -------------------------------------------------------------------- several principles
def _col(x, B, device):
    """A Python number stays a number; a [B] tensor becomes an fp32 [B, 1] column."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32).reshape(B, 1)
    return float(x)


def compose(logits, logits_0, ratios):
    """Several principles (docs/semantics.md, "Several principles") as the two branches of a
    one-principle step.

    ``logits`` [K, B, V] and ``logits_0`` [B, V] (fp32/bf16/fp16), ``ratios`` K numbers or
    [B] tensors -> (``z_c``, ``z_b``, ``bad``): ``z_c = z_1 + sum_{k >= 2} (z_k - z_0)``, the
    composed principle branch whose nucleus the step takes, and ``z_b = 2 z_c - a`` with
    ``a = z_0 + sum_k (1 + r_k)(z_k - z_0)``, so that the step with ratio 1,
    ``z_c + 1 (z_c - z_b) = a``, scores exactly the composed logits (up to fp32 rounding);
    two fp32 [B, V] tensors, and the [B] bool rows that held NaN or +inf in some branch. A
    token that is not finite in every branch is -inf in both outputs (banned, out of the
    nucleus). The Triton version (``linalign.kernels.compose``) does the same arithmetic.
    """
    K, B, V = logits.shape
    dev = logits.device
    zs, z0 = logits.float(), logits_0.float()
    if dev.type == "cpu" and not torch.compiler.is_compiling():
        # On the CPU a check costs nothing: rows of finite logits (the usual case) skip
        # the masks, in place where possible (every fresh [B, V] buffer costs page faults).
        hi = torch.maximum(zs.amax((0, 2)), z0.amax(-1))  # NaN propagates
        lo = torch.minimum(zs.amin((0, 2)), z0.amin(-1))
        if bool(((hi < _INF) & (lo > -_INF)).all()):
            d = zs - z0  # [K, B, V]
            zc = zs[0].clone()
            for k in range(1, K):
                zc += d[k]  # z_1 + sum_{k >= 2} (z_k - z_0): the reference's order
            zc.clamp_(-FMAX, FMAX)
            a = z0.clone()
            for k in range(K):
                a.add_((1.0 + _col(ratios[k], B, dev)) * d[k]).clamp_(-FMAX, FMAX)
            zb = zc.mul(2.0).sub_(a).clamp_(-FMAX, FMAX)
            return zc, zb, torch.zeros(B, dtype=torch.bool, device=dev)
    bad_s = torch.isnan(zs) | (zs == _INF)
    bad_0 = torch.isnan(z0) | (z0 == _INF)
    bad = bad_s.any(-1).any(0) | bad_0.any(-1)
    finite = ((zs > -_INF) & ~bad_s).all(0) & (z0 > -_INF) & ~bad_0
    z0f = torch.where(finite, z0, 0.0)
    d = torch.where(finite, zs - z0f, 0.0)  # [K, B, V]
    zc = torch.where(finite, zs[0], 0.0)
    for k in range(1, K):
        zc = zc + d[k]  # z_1 + sum_{k >= 2} (z_k - z_0): the reference's order
    zc = zc.clamp(-FMAX, FMAX)
    a = z0f
    for k in range(K):
        a = (a + (1.0 + _col(ratios[k], B, dev)) * d[k]).clamp(-FMAX, FMAX)
    zb = (2.0 * zc - a).clamp(-FMAX, FMAX)
    return (torch.where(finite, zc, -_INF), torch.where(finite, zb, -_INF), bad)


def flag_bad_rows(status: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``status`` with ``Status.BAD_INPUT`` set on the [B] bool rows ``bad``."""
    return status | torch.where(bad, int(Status.BAD_INPUT), 0).to(torch.int32)


# ------------------------------------------------------------------------- entry point
def run(args: StepArgs) -> StepOutput:
    """The step on checked arguments (every mode); ``ratio`` of the output is [K, B]."""
    args = with_penalties(args.host_seed())
    kw = dict(greedy=args.greedy, generator=args.generator, seed=args.seed,
              offset=args.offset)
    if args.K == 1:
        zp = args.logits[0]
        r = args.ratios[0] if args.kl is None else \
            kl_ratio(zp, args.logits_0, args.temperature, *args.kl)
        out = torch_step(zp, args.logits_0, r, args.temperature, args.top_p, **kw)
        return StepOutput(*out, ratio=used_ratio(r, out[3])[None])
    zc, zb, bad = compose(args.logits, args.logits_0, args.ratios)
    tokens, logprobs, sizes, status = torch_step(zc, zb, 1.0, args.temperature, args.top_p,
                                                 **kw)
    status = flag_bad_rows(status, bad)
    return StepOutput(tokens, logprobs, sizes, status,
                      torch.stack([used_ratio(r, status) for r in args.ratios]))
