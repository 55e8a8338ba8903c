"""Fused Triton kernels for a Linear Alignment decoding step (docs/semantics.md).

All arithmetic is fp32 after the load. A row's work is:

1. **Max pass** (reads both branches once): the principle branch's max ``m`` and the
   bad-input flag (NaN or ``+inf`` in either branch). Per-lane accumulators, one combine
   at the end: no block-wide reduction inside the loop.
2. **Ladder pass** (reads the principle branch): ``Z = sum exp((z_p - m) / T)`` and, for
   ``L = 16`` levels ``m - d_j T`` (``d_j`` from 0.44 up to 80, the gap rule's cut, in steps
   of sqrt 2), the number of logits at or above each level.
3. **Candidate buffer**: the logits at or above the loosest level that holds at most
   ``CMAX`` (1024) of them are copied, with their ids, in vocabulary order, to a per-row
   buffer. If the level is the cut, or if the buffer's mass reaches ``top_p * Z`` (then
   every token below the level has at least that much mass above it and is out), the
   buffer holds the whole nucleus: the usual case, since real next-token rows are peaked.
   The threshold ``tau`` (the smallest logit whose mass-above is below ``top_p * Z``) is then
   resolved exactly on the buffer, the without-branch logits are gathered at the nucleus
   tokens only, and the aligned scores ``a = z_p + r (z_p - z_0)``, their max, first argmax,
   softmax sum and the inverse-CDF draw (vocabulary order) are computed on at most ``CMAX``
   values. Banning (``-inf`` in either branch) that empties the nucleus falls back to plain
   top-p decoding of the principle branch (``r = 0``).
4. **Otherwise** (a nucleus of more than about ``CMAX`` tokens: a flat row), the threshold
   is bracketed sort-free by multi-pivot passes over the row's order-preserving int32 keys
   (``NPIV`` pivots per pass: the two ends, half the rest spread evenly in key space, which
   bounds the worst case, half evenly in value; for each, the mass and the number of keys
   above it), until the bracket holds at most ``CMAX`` keys, which are copied to the buffer
   and resolved there; the scores and the draw then stream over the row with per-lane
   accumulators, reading the without-branch only where a token is in the nucleus.

Comparisons are on the logits themselves, so ties are kept together; only the fp32 mass
sums round. Results do not depend on block sizes or on the split beyond that rounding.

Two ways to run it:

- **fused** (``la_step_kernel`` with ``SPLIT=False``): one program per row, one launch.
  Used when the batch fills the GPU.
- **split** (small batches, ``plan_split``): each row is cut into ``S`` chunks and passes
  1 to 3 run over a ``(B, S)`` grid as three launches, ``la_max_kernel``,
  ``la_ladder_kernel`` (each chunk reduces the chunks' maxima first) and
  ``la_compact_kernel`` (each chunk writes its candidates at the offset given by the
  chunks before it); then ``la_step_kernel`` with ``SPLIT=True`` (one program per row)
  reduces the chunks' partials and does the rest. Every cross-chunk reduction is a sum,
  max or min in a fixed order, so results are deterministic.
"""
import os

import triton
import triton.language as tl

# Absolute, not "from .. import": run from the repository root, transformers probes for the
# unrelated PyPI package "kernels" and may import this folder under that top-level name.
from linalign import constants

# Under Triton's interpreter every call of a nested @triton.jit function re-patches the
# language module (about 1 ms each), while a plain Python helper runs with the caller's
# patched module and gives the same result. Compiled, the helpers are @triton.jit functions.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_helper = (lambda fn: fn) if INTERPRETED else triton.jit

# The contract's numbers (linalign/constants.py) as compile-time constants; a test pins them.
# Largest finite fp32: aligned scores are clamped to +-FMAX so that hostile but finite
# inputs (+-1e30 with a large ratio) never produce inf - inf = NaN.
FMAX = tl.constexpr(constants.FMAX)
# A token whose principle logit is more than GAP * T below the row's best is never in N.
GAP = tl.constexpr(constants.GAP)
# Status bits (constants.Status) and where a sampled row's uniform comes from
# (constants.RandomSource).
FALLBACK = tl.constexpr(int(constants.Status.FALLBACK))
BAD_INPUT = tl.constexpr(int(constants.Status.BAD_INPUT))
RNG_UNIFORMS = tl.constexpr(int(constants.RandomSource.UNIFORMS))
RNG_SEED = tl.constexpr(int(constants.RandomSource.SEED))
RNG_ROW_SEEDS = tl.constexpr(int(constants.RandomSource.ROW_SEEDS))
RNG_DEVICE_SEED = tl.constexpr(int(constants.RandomSource.DEVICE_SEED))
# "No key" markers for the int32 order keys (no finite or -inf value maps to either).
NONE_LO = tl.constexpr(-(2**31))
NONE_HI = tl.constexpr(2**31 - 1)
# key(-inf): keys at or below it are never candidates.
KEY_NEGINF = tl.constexpr(-2139095041)
NO_IDX = tl.constexpr(2**30)
# Ladder levels of the candidate pass: m - d_j T with d_j = GAP * 2 ** (-(L - 1 - j) / 2),
# from 0.44 T (L = 16) up to the gap rule's cut (j = L - 1).


# ---------------------------------------------------------------------------- helpers
@_helper
def _sanitize(x):
    # NaN and +inf are bad input: the row is flagged, and the value is treated as -inf
    # (banned) so that even a bad row with check=False yields a valid token id.
    bad = (x != x) | (x == float("inf"))
    return tl.where(bad, float("-inf"), x), bad


@_helper
def _key(x):
    # Order-preserving int32 image of an fp32 value: flip the magnitude bits of negatives.
    # -0.0 maps to -1; fold it onto +0.0 (key 0) because the two logits are equal.
    b = x.to(tl.int32, bitcast=True)
    k = b ^ ((b >> 31) & 0x7FFFFFFF)
    return tl.where(k == -1, 0, k)


@_helper
def _unkey(k):
    # Inverse of _key (the transform is an involution on the int32 bits).
    k = k.to(tl.int32)
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@_helper
def _load_row(rowp, offs, msk):
    x = tl.load(rowp + offs, mask=msk, other=float("-inf")).to(tl.float32)
    x, _ = _sanitize(x)
    return x


@_helper
def _aligned(x, y, r):
    # a = z_p + r * (z_p - z_0), clamped to the finite range (see FMAX).
    d = tl.minimum(tl.maximum(x - y, -FMAX), FMAX)
    return tl.minimum(tl.maximum(x + r * d, -FMAX), FMAX)


@_helper
def _row_param(ptr, val, row, PER_ROW: tl.constexpr):
    if PER_ROW:
        v = tl.load(ptr + row).to(tl.float32)
    else:
        v = tl.full((), val, tl.float32)
    return v


@_helper
def _temperature(T):
    # T == 0 is greedy (the limit T -> 0): N collapses onto the principle argmax; sums
    # computed with T = 1 for such rows are never used.
    is_t0 = T == 0.0
    return is_t0, 1.0 / tl.where(is_t0, 1.0, T)


@_helper
def _max_pass(rowp, row0, lo_i, hi_i, inv_t, BLOCK: tl.constexpr, KL: tl.constexpr):
    """Pass 1 over [lo_i, hi_i): the principle branch's max and the bad-input flag (NaN or
    +inf in either branch). Per-lane accumulators, one combine at the end.

    KL (kl mode, docs/semantics.md): also, per lane, the softmax(z_0 / T)-weighted moments of
    g = (z_p - z_0) / T over the tokens finite in both branches, as an online softmax with
    a weighted Welford update (running max m0 of z_0, weight sum W relative to it, mean mu,
    sum of squared deviations M2): one exp per element, no cancellation. Returns the
    per-lane (m0, W, mu, M2) for ``_moments``; zeros otherwise."""
    cols = tl.arange(0, BLOCK)
    m_l = tl.full((BLOCK,), float("-inf"), tl.float32)
    bad_l = tl.zeros((BLOCK,), tl.int32)
    m0_l = tl.full((BLOCK,), float("-inf"), tl.float32)
    w_l = tl.zeros((BLOCK,), tl.float32)
    mu_l = tl.zeros((BLOCK,), tl.float32)
    m2_l = tl.zeros((BLOCK,), tl.float32)
    for start in range(lo_i, hi_i, BLOCK):
        offs = start + cols
        msk = offs < hi_i
        x = tl.load(rowp + offs, mask=msk, other=float("-inf")).to(tl.float32)
        y = tl.load(row0 + offs, mask=msk, other=float("-inf")).to(tl.float32)
        x, bx = _sanitize(x)
        y, by = _sanitize(y)
        bad_l = bad_l | (bx | by).to(tl.int32)
        m_l = tl.maximum(m_l, x)
        if KL:
            valid = (x > float("-inf")) & (y > float("-inf"))
            yv = tl.where(valid, y, float("-inf"))
            gt = yv > m0_l
            # One exp: the new token's weight, or the rescale of the old sums. Operands are
            # made finite first, so that no lane computes inf - inf.
            ys = tl.where(valid, y, 0.0)
            ms = tl.where(m0_l > float("-inf"), m0_l, 0.0)
            e = tl.where(valid, tl.exp(tl.where(gt, m0_l - ys, ys - ms) * inv_t), 0.0)
            alpha = tl.where(gt, e, 1.0)
            w = tl.where(gt, 1.0, e)
            g = (tl.where(valid, x, 0.0) - ys) * inv_t
            w_old = w_l * alpha
            w_l = w_old + w
            delta = g - mu_l
            mu_l = mu_l + tl.where(w_l > 0.0, delta * (w / tl.where(w_l > 0.0, w_l, 1.0)), 0.0)
            m2_l = m2_l * alpha + w * delta * (g - mu_l)
            m0_l = tl.maximum(m0_l, yv)
    return tl.max(m_l, axis=0), tl.max(bad_l, axis=0), m0_l, w_l, mu_l, m2_l


@_helper
def _moments(m0_l, w_l, mu_l, m2_l, inv_t):
    """Combine per-lane (or per-chunk) moments of g: (W, mean, M2) of the whole row, with the
    weights relative to the row's max of z_0. Sums in a fixed order (deterministic)."""
    mx = tl.max(m0_l, axis=0)
    ref = tl.where(mx == float("-inf"), 0.0, mx)
    a = tl.where(m0_l > float("-inf"), tl.exp((m0_l - ref) * inv_t), 0.0)
    w = w_l * a
    wsum = tl.sum(w, axis=0)
    mu = tl.sum(w * mu_l, axis=0) / tl.where(wsum > 0.0, wsum, 1.0)
    dev = mu_l - mu
    m2 = tl.sum(m2_l * a, axis=0) + tl.sum(w * dev * dev, axis=0)
    return wsum, mu, m2


@_helper
def _kl_ratio(wsum, m2, eps, max_ratio, is_t0):
    """kl mode: r_eff = kappa - 1, kappa = sqrt(2 eps / v) clipped to [0, 1 + max_ratio],
    v = M2 / W. v == 0 (or no token finite in both branches, or T == 0): r = 0; a
    non-finite v (hostile logits): kappa = 0."""
    v = tl.maximum(m2 / tl.where(wsum > 0.0, wsum, 1.0), 0.0)
    finite = (v == v) & (v < float("inf"))
    kappa = tl.where(finite, tl.sqrt(2.0 * eps / tl.where(v > 0.0, v, 1.0)), 0.0)
    kappa = tl.minimum(tl.maximum(kappa, 0.0), 1.0 + max_ratio)
    return tl.where(is_t0 | (wsum == 0.0) | (v == 0.0), 0.0, kappa - 1.0)


@_helper
def _levels(m, T, is_t0, cut, L: tl.constexpr):
    """The ladder's L logit levels, tight to loose; the last is the gap rule's cut."""
    jj = tl.arange(0, L)
    d = GAP * tl.exp2((jj - (L - 1)).to(tl.float32) * 0.5)
    lv = m - d * tl.where(is_t0, 0.0, T)
    return tl.where(jj == L - 1, cut, lv)


@_helper
def _ladder_pass(rowp, lo_i, hi_i, m, inv_t, lv, BLOCK: tl.constexpr, L: tl.constexpr):
    """Pass 2 over [lo_i, hi_i) (the max known): Z = sum exp((x - m) / T) and, per ladder
    level, the number of finite logits at or above it."""
    cols = tl.arange(0, BLOCK)
    z_l = tl.zeros((BLOCK,), tl.float32)
    cnt = tl.zeros((BLOCK, L), tl.int32)
    for start in range(lo_i, hi_i, BLOCK):
        offs = start + cols
        x = _load_row(rowp, offs, offs < hi_i)
        z_l += tl.exp((x - m) * inv_t)
        ge = (x[:, None] >= lv[None, :]) & (x > float("-inf"))[:, None]
        cnt += ge.to(tl.int32)
    return tl.sum(z_l, axis=0), tl.sum(cnt, axis=0)


@_helper
def _pick_level(cnt, lv, CMAX: tl.constexpr, L: tl.constexpr):
    """The loosest level with at most CMAX logits at or above it: (j, level, count); j = -1
    if even the tightest has more."""
    jj = tl.arange(0, L)
    j = tl.max(tl.where(cnt <= CMAX, jj, -1), axis=0)
    c = tl.sum(tl.where(jj == j, lv, 0.0), axis=0)
    n = tl.sum(tl.where(jj == j, cnt, 0), axis=0)
    return j, c, n


@_helper
def _buffer_mass(cval, n, m, inv_t, CMAX: tl.constexpr):
    j = tl.arange(0, CMAX)
    x = tl.load(cval + j, mask=j < n, other=float("-inf"))
    return tl.sum(tl.exp((x - m) * inv_t), axis=0)


@_helper
def _search_init(m, T, top_p, is_t0):
    """The gap rule's cut, the first bracket (lo, hi] and whether a search is needed."""
    empty = m == float("-inf")  # no finite principle logit: nothing can be chosen
    cut = m - GAP * tl.where(is_t0, 0.0, T)  # in fp32, like every backend
    lo = tl.maximum(_key(cut) - 1, KEY_NEGINF)
    hi = _key(m)
    # top_p >= 1 keeps every token that passes the gap rule (N = keys >= key(cut)).
    need = (top_p < 1.0) & ~empty & ~is_t0 & (hi.to(tl.int64) - lo.to(tl.int64) > 1)
    return cut, lo, hi, need, empty


@_helper
def _pivots(lo, hi, NPIV: tl.constexpr):
    """NPIV pivots in the bracket: lo, NPIV - 2 interior ones (half spread in key space, half in
    value), hi. Needs hi - lo >= 2."""
    H: tl.constexpr = (NPIV - 2) // 2
    kk = tl.arange(0, NPIV)
    d = hi.to(tl.int64) - lo.to(tl.int64)
    by_key = (lo.to(tl.int64) + (d * kk) // (H + 1)).to(tl.int32)
    vlo = _unkey(lo)
    vhi = _unkey(hi)
    frac = (kk - H).to(tl.float32) / (NPIV - 1 - H)
    by_val = _key(vlo + (vhi - vlo) * frac)
    piv = tl.where(kk <= H, by_key, by_val)
    piv = tl.minimum(tl.maximum(piv, lo + 1), hi - 1)  # any interior pivot is valid
    return tl.where(kk == 0, lo, tl.where(kk == NPIV - 1, hi, piv))


@_helper
def _pivot_sums(rowp, lo_i, hi_i, piv, m, inv_t, BLOCK: tl.constexpr, NPIV: tl.constexpr):
    """For every pivot: mass and number of row keys above it, over [lo_i, hi_i)."""
    cols = tl.arange(0, BLOCK)
    mass = tl.zeros((BLOCK, NPIV), tl.float32)
    cnt = tl.zeros((BLOCK, NPIV), tl.int32)
    for start in range(lo_i, hi_i, BLOCK):
        offs = start + cols
        x = _load_row(rowp, offs, offs < hi_i)
        e = tl.exp((x - m) * inv_t)
        above = _key(x)[:, None] > piv[None, :]
        mass += tl.where(above, e[:, None], 0.0)
        cnt += above.to(tl.int32)
    return tl.sum(mass, axis=0), tl.sum(cnt, axis=0)


@_helper
def _bracket(piv, mass, cnt, thr, NPIV: tl.constexpr):
    """The new bracket from one pass: (lo, hi, mass above hi, count above lo, count above hi).
    piv[0] (the old lo) is out and piv[NPIV - 1] (the old hi) is in by construction; mass is
    monotone in the pivot (fp32 sums of non-negative terms), so lo < hi."""
    kk = tl.arange(0, NPIV)
    keep = ((mass < thr) & (kk > 0)) | (kk == NPIV - 1)
    lo = tl.max(tl.where(keep, NONE_LO, piv), axis=0)
    hi = tl.min(tl.where(keep, piv, NONE_HI), axis=0)
    m_hi = tl.max(tl.where(keep & (piv == hi), mass, -1.0), axis=0)
    c_lo = tl.max(tl.where(~keep & (piv == lo), cnt, -1), axis=0)
    c_hi = tl.max(tl.where(keep & (piv == hi), cnt, -1), axis=0)
    return lo, hi, m_hi, c_lo, c_hi


@_helper
def _open(lo, hi, cnt_in, CMAX: tl.constexpr):
    # The search goes on while the bracket holds more than CMAX keys of more than one value.
    return (cnt_in > CMAX) & (hi.to(tl.int64) - lo.to(tl.int64) > 1)


@_helper
def _compact(rowp, lo_i, hi_i, lo, top, hi, base, cidx, cval, CMAX: tl.constexpr,
             BLOCK: tl.constexpr):
    """Copy (index, logit) of the row keys in (lo, top] within [lo_i, hi_i) to the buffer,
    in vocabulary order from slot ``base``; return the smallest row key above ``hi``."""
    cols = tl.arange(0, BLOCK)
    pos = base
    gmin = tl.full((BLOCK,), NONE_HI, tl.int32)
    for start in range(lo_i, hi_i, BLOCK):
        offs = start + cols
        msk = offs < hi_i
        x = _load_row(rowp, offs, msk)
        k = _key(x)
        sel = msk & (k > lo) & (k <= top)
        c = tl.cumsum(sel.to(tl.int32), axis=0)
        dest = pos + c - 1
        ok = sel & (dest < CMAX)
        tl.store(cidx + dest, offs, mask=ok)
        tl.store(cval + dest, x, mask=ok)
        pos += tl.sum(sel.to(tl.int32), axis=0)
        gmin = tl.minimum(gmin, tl.where(msk & (k > hi), k, NONE_HI))
    return tl.min(gmin, axis=0)


@_helper
def _resolve_tau(cval, n, base_mass, thr, m, inv_t, gt_hi, CMAX: tl.constexpr,
                 JB: tl.constexpr):
    """tau from the buffer's n keys: the smallest with M(key) = base_mass + mass of the
    buffer keys above it < thr; if none, gt_hi (the smallest row key above the bracket)."""
    j = tl.arange(0, CMAX)
    valid = j < n
    x = tl.load(cval + j, mask=valid, other=float("-inf"))
    k = _key(x)
    e = tl.where(valid, tl.exp((x - m) * inv_t), 0.0)
    tau = tl.full((), NONE_HI, tl.int32)
    for j0 in range(0, n, JB):
        jj = j0 + tl.arange(0, JB)
        vj = jj < n
        kj = _key(tl.load(cval + jj, mask=vj, other=float("-inf")))
        mj = base_mass + tl.sum(tl.where(k[None, :] > kj[:, None], e[None, :], 0.0), axis=1)
        tau = tl.minimum(tau, tl.min(tl.where(vj & (mj < thr), kj, NONE_HI), axis=0))
    return tl.where(tau == NONE_HI, gt_hi, tau)


@_helper
def _finish_buffer(cidx, cval, n, row0, tau, m, r, inv_t, u, is_t0, GREEDY: tl.constexpr,
                   CMAX: tl.constexpr):
    """Scores and draw on the buffer (it holds every nucleus token, in vocabulary order)."""
    j = tl.arange(0, CMAX)
    valid = j < n
    idx = tl.load(cidx + j, mask=valid, other=0)
    x = tl.load(cval + j, mask=valid, other=float("-inf"))
    in_n = valid & (_key(x) >= tau) & (x > float("-inf"))
    y = tl.load(row0 + idx, mask=in_n, other=float("-inf")).to(tl.float32)
    y, _ = _sanitize(y)
    ok = in_n & (y > float("-inf"))
    a = tl.where(ok, _aligned(x, y, r), float("-inf"))
    n_in = tl.sum(in_n.to(tl.int32), axis=0)
    a_max = tl.max(a, axis=0)
    fallback = (a_max == float("-inf")) & (n_in > 0)  # banning emptied N: r taken as 0
    s = tl.where(fallback, tl.where(in_n, x, float("-inf")), a)
    s_max = tl.where(fallback, m, a_max)
    ref = tl.where(s_max == float("-inf"), 0.0, s_max)
    w = tl.exp((s - ref) * inv_t)
    s_sum = tl.sum(w, axis=0)
    first = tl.min(tl.where((s == s_max) & (s > float("-inf")), j, NO_IDX), axis=0)
    if GREEDY:
        pick = first
    else:
        cum = tl.cumsum(w, axis=0)
        hit = tl.min(tl.where((cum > u * s_sum) & (w > 0.0), j, NO_IDX), axis=0)
        last = tl.max(tl.where(w > 0.0, j, -1), axis=0)
        # Rounding can leave u * S just above the final running sum: take the last token.
        # T == 0 rows in a sampled batch are greedy.
        pick = tl.where(is_t0, first, tl.where(hit < NO_IDX, hit, last))
    token = tl.max(tl.where(j == pick, idx, -1), axis=0)
    s_tok = tl.max(tl.where(j == pick, s, float("-inf")), axis=0)
    return token, s_tok, s_max, s_sum, n_in, fallback


@_helper
def _draw_scores(rowp, row0, offs, V, tau, fallback, r_eff):
    # One block's scores for the draw: aligned on N (plain on N for a fallback row).
    msk = offs < V
    x = _load_row(rowp, offs, msk)
    in_n = msk & (_key(x) >= tau) & (x > float("-inf"))
    y = _load_row(row0, offs, in_n)
    ok = tl.where(fallback, in_n, in_n & (y > float("-inf")))
    return tl.where(ok, _aligned(x, y, r_eff), float("-inf"))


@_helper
def _finish_stream(rowp, row0, V, tau, m, r, inv_t, u, is_t0, GREEDY: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Scores and draw streaming over the whole row (a nucleus too large for the buffer)."""
    cols = tl.arange(0, BLOCK)
    a_max_l = tl.full((BLOCK,), float("-inf"), tl.float32)
    a_sum_l = tl.zeros((BLOCK,), tl.float32)
    a_arg_l = tl.full((BLOCK,), NO_IDX, tl.int32)
    p_sum_l = tl.zeros((BLOCK,), tl.float32)
    p_arg_l = tl.full((BLOCK,), NO_IDX, tl.int32)
    n_l = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        msk = offs < V
        x = _load_row(rowp, offs, msk)
        in_n = msk & (_key(x) >= tau) & (x > float("-inf"))
        y = _load_row(row0, offs, in_n)  # the without-branch only on the nucleus
        ok = in_n & (y > float("-inf"))
        a = tl.where(ok, _aligned(x, y, r), float("-inf"))
        n_l += in_n.to(tl.int32)
        a_arg_l = tl.where(a > a_max_l, offs, a_arg_l)  # strict: the lane's first max
        new = tl.maximum(a_max_l, a)
        ref = tl.where(new == float("-inf"), 0.0, new)
        a_sum_l = a_sum_l * tl.exp((a_max_l - ref) * inv_t) + tl.exp((a - ref) * inv_t)
        a_max_l = new
        p_sum_l += tl.where(in_n, tl.exp((x - m) * inv_t), 0.0)
        p_arg_l = tl.minimum(p_arg_l, tl.where(in_n & (x == m), offs, NO_IDX))
    n_in = tl.sum(n_l, axis=0)
    a_max = tl.max(a_max_l, axis=0)
    ref = tl.where(a_max == float("-inf"), 0.0, a_max)
    a_sum = tl.sum(a_sum_l * tl.exp((a_max_l - ref) * inv_t), axis=0)
    a_arg = tl.min(tl.where(a_max_l == a_max, a_arg_l, NO_IDX), axis=0)
    fallback = (a_max == float("-inf")) & (n_in > 0)
    r_eff = tl.where(fallback, 0.0, r)
    s_max = tl.where(fallback, m, a_max)
    s_sum = tl.where(fallback, tl.sum(p_sum_l, axis=0), a_sum)
    token = tl.where(fallback, tl.min(p_arg_l, axis=0), a_arg)
    s_tok = s_max
    if not GREEDY:
        # Inverse CDF in vocabulary order; blocks are scanned until the draw is found.
        target = u * s_sum
        carry = tl.zeros((), tl.float32)
        pick = tl.full((), NO_IDX, tl.int32)
        pick_s = tl.full((), float("-inf"), tl.float32)
        start = tl.zeros((), tl.int32)
        while (start < V) & (pick == NO_IDX):
            offs = start + cols
            s = _draw_scores(rowp, row0, offs, V, tau, fallback, r_eff)
            w = tl.exp((s - s_max) * inv_t)
            cum = carry + tl.cumsum(w, axis=0)
            hit = tl.min(tl.where((cum > target) & (w > 0.0), offs, NO_IDX), axis=0)
            pick_s = tl.max(tl.where(offs == hit, s, float("-inf")), axis=0)
            pick = hit
            carry += tl.sum(w, axis=0)
            start += BLOCK
        if pick == NO_IDX:
            # Rounding left u * S above the final running sum: take the last token.
            last_l = tl.full((BLOCK,), -1, tl.int32)
            last_s_l = tl.full((BLOCK,), float("-inf"), tl.float32)
            for start2 in range(0, V, BLOCK):
                offs = start2 + cols
                s = _draw_scores(rowp, row0, offs, V, tau, fallback, r_eff)
                live = tl.exp((s - s_max) * inv_t) > 0.0
                last_s_l = tl.where(live, s, last_s_l)
                last_l = tl.where(live, offs, last_l)
            pick = tl.max(last_l, axis=0)
            pick_s = tl.max(tl.where(last_l == pick, last_s_l, float("-inf")), axis=0)
        # T == 0 rows in a sampled batch are greedy: keep the first max.
        token = tl.where(is_t0, token, pick)
        s_tok = tl.where(is_t0, s_tok, pick_s)
    return token, s_tok, s_max, s_sum, n_in, fallback


@_helper
def _chunk(V, CHUNK):
    s = tl.program_id(1)
    lo_i = s * CHUNK
    return s, lo_i, tl.minimum(lo_i + CHUNK, V)


@_helper
def _split_reduce(ws_f, ws_i, row, S, WF, WI, L: tl.constexpr, SP: tl.constexpr):
    """Split path: (m, Z, bad, level counts) of a row from its chunks' partials, summed in
    chunk order (deterministic)."""
    ss = tl.arange(0, SP)
    live = ss < S
    wf = ws_f + row.to(tl.int64) * WF
    wi = ws_i + row.to(tl.int64) * WI
    m = tl.max(tl.load(wf + ss, mask=live, other=float("-inf")), axis=0)
    zsum = tl.sum(tl.load(wf + S + ss, mask=live, other=0.0), axis=0)
    bad = tl.max(tl.load(wi + ss, mask=live, other=0), axis=0)
    jj = tl.arange(0, L)
    cnt = tl.sum(tl.load(wi + S + ss[:, None] * L + jj[None, :], mask=live[:, None], other=0),
                 axis=0)
    return m, zsum, bad, cnt


@_helper
def _split_moments(ws_f, row, S, WF, inv_t, SP: tl.constexpr):
    """Split path, kl mode: the row's (W, mean, M2) from the chunks' moments (slots 2S..6S
    of the float workspace: m0, W, mean, M2 per chunk)."""
    ss = tl.arange(0, SP)
    live = ss < S
    wf = ws_f + row.to(tl.int64) * WF + 2 * S
    m0 = tl.load(wf + ss, mask=live, other=float("-inf"))
    w = tl.load(wf + S + ss, mask=live, other=0.0)
    mu = tl.load(wf + 2 * S + ss, mask=live, other=0.0)
    m2 = tl.load(wf + 3 * S + ss, mask=live, other=0.0)
    return _moments(m0, w, mu, m2, inv_t)


# ---------------------------------------------------------------------------- kernels
@triton.jit
def la_max_kernel(zp_ptr, z0_ptr, stride_p, stride_0, t_ptr, t_val, ws_f, ws_i, V, S, CHUNK,
                  WF, WI, T_PER_ROW: tl.constexpr, KL: tl.constexpr, BLOCK: tl.constexpr):
    # Split pass 1: per-chunk max and bad flag (and kl mode's moments) -> workspace.
    row = tl.program_id(0)
    s, lo_i, hi_i = _chunk(V, CHUNK)
    T = _row_param(t_ptr, t_val, row, T_PER_ROW)
    is_t0, inv_t = _temperature(T)
    m, bad, m0_l, w_l, mu_l, m2_l = _max_pass(zp_ptr + row.to(tl.int64) * stride_p,
                                              z0_ptr + row.to(tl.int64) * stride_0, lo_i,
                                              hi_i, inv_t, BLOCK, KL)
    wf = ws_f + row.to(tl.int64) * WF
    tl.store(wf + s, m)
    tl.store(ws_i + row.to(tl.int64) * WI + s, bad)
    if KL:
        # The chunk's moments relative to its own max of z_0 (combined by _split_moments).
        wsum, mu, m2 = _moments(m0_l, w_l, mu_l, m2_l, inv_t)
        tl.store(wf + 2 * S + s, tl.max(m0_l, axis=0))
        tl.store(wf + 3 * S + s, wsum)
        tl.store(wf + 4 * S + s, mu)
        tl.store(wf + 5 * S + s, m2)


@triton.jit
def la_ladder_kernel(zp_ptr, stride_p, t_ptr, t_val, ws_f, ws_i, V, S, CHUNK, WF, WI,
                     T_PER_ROW: tl.constexpr, BLOCK: tl.constexpr, L: tl.constexpr,
                     SP: tl.constexpr):
    # Split pass 2: the row max from the chunks, then this chunk's Z and level counts.
    row = tl.program_id(0)
    s, lo_i, hi_i = _chunk(V, CHUNK)
    T = _row_param(t_ptr, t_val, row, T_PER_ROW)
    is_t0, inv_t = _temperature(T)
    ss = tl.arange(0, SP)
    wf = ws_f + row.to(tl.int64) * WF
    m = tl.max(tl.load(wf + ss, mask=ss < S, other=float("-inf")), axis=0)
    cut = m - GAP * tl.where(is_t0, 0.0, T)
    lv = _levels(m, T, is_t0, cut, L)
    zsum, cnt = _ladder_pass(zp_ptr + row.to(tl.int64) * stride_p, lo_i, hi_i, m, inv_t, lv,
                             BLOCK, L)
    tl.store(wf + S + s, zsum)
    tl.store(ws_i + row.to(tl.int64) * WI + S + s * L + tl.arange(0, L), cnt)


@triton.jit
def la_compact_kernel(zp_ptr, stride_p, t_ptr, t_val, ws_f, ws_i, cidx_ptr, cval_ptr,
                      V, S, CHUNK, WF, WI, T_PER_ROW: tl.constexpr, BLOCK: tl.constexpr,
                      L: tl.constexpr, CMAX: tl.constexpr, SP: tl.constexpr):
    # Split compaction: the level the row's counts allow, then this chunk's logits at or
    # above it, at the offset given by the chunks before it (vocabulary order).
    row = tl.program_id(0)
    s, lo_i, hi_i = _chunk(V, CHUNK)
    T = _row_param(t_ptr, t_val, row, T_PER_ROW)
    is_t0, inv_t = _temperature(T)
    m, zsum, bad, cnt = _split_reduce(ws_f, ws_i, row, S, WF, WI, L, SP)
    cut = m - GAP * tl.where(is_t0, 0.0, T)
    lv = _levels(m, T, is_t0, cut, L)
    j, c, n = _pick_level(cnt, lv, CMAX, L)
    if (j >= 0) & (m > float("-inf")):
        ss = tl.arange(0, SP)
        jj = tl.arange(0, L)
        wi = ws_i + row.to(tl.int64) * WI
        per = tl.load(wi + S + ss[:, None] * L + jj[None, :],
                      mask=(ss[:, None] < s) & (jj == j)[None, :], other=0)
        base = tl.sum(tl.sum(per, axis=1), axis=0)
        lo = tl.maximum(_key(c) - 1, KEY_NEGINF)
        _compact(zp_ptr + row.to(tl.int64) * stride_p, lo_i, hi_i, lo, NONE_HI, NONE_HI, base,
                 cidx_ptr + row.to(tl.int64) * CMAX, cval_ptr + row.to(tl.int64) * CMAX, CMAX,
                 BLOCK)


# Seeds and offsets change from call to call: never specialise the kernel on their values
# (a decoding loop would otherwise compile new variants as the offset passes 1 or 16).
@triton.jit(do_not_specialize=["seed_val", "off_val"])
def la_step_kernel(
    zp_ptr, z0_ptr, stride_p, stride_0,
    r_ptr, r_val, t_ptr, t_val, p_ptr, p_val, e_ptr, e_val, x_ptr, x_val,
    u_ptr, seed_ptr, seed_val, off_ptr, off_val,
    tok_ptr, lp_ptr, nsz_ptr, status_ptr, ratio_ptr,
    cidx_ptr, cval_ptr, ws_f, ws_i,
    V, S, WF, WI, BKEY,
    R_PER_ROW: tl.constexpr, T_PER_ROW: tl.constexpr, P_PER_ROW: tl.constexpr,
    KL: tl.constexpr, E_PER_ROW: tl.constexpr, X_PER_ROW: tl.constexpr,
    RNG: tl.constexpr, OFF_PER_ROW: tl.constexpr, GREEDY: tl.constexpr,
    SPLIT: tl.constexpr, SP: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, NPIV: tl.constexpr, L: tl.constexpr,
    CMAX: tl.constexpr, JB: tl.constexpr,
):
    # One program per row. zp, z0: [B, V] (fp32/bf16/fp16, last dim contiguous); outputs:
    # [B] (ratio_ptr: the ratio used). cidx/cval: [B, CMAX] buffers. KL: kl mode,
    # r from the budget e (eps) and the cap x (max_ratio) instead of r_ptr/r_val. RNG (a
    # constants.RandomSource): RNG_UNIFORMS = uniforms given in u_ptr, RNG_SEED = one seed
    # (counter = row, offset), RNG_ROW_SEEDS = per-row seeds (counter = 0, offset),
    # RNG_DEVICE_SEED = one seed read from seed_ptr (counter = row, offset).
    row = tl.program_id(0)
    # int64 row offsets: row * stride overflows int32 once B * V passes 2**31.
    rowp = zp_ptr + row.to(tl.int64) * stride_p
    row0 = z0_ptr + row.to(tl.int64) * stride_0
    cidx = cidx_ptr + row.to(tl.int64) * CMAX
    cval = cval_ptr + row.to(tl.int64) * CMAX
    T = _row_param(t_ptr, t_val, row, T_PER_ROW)
    top_p = _row_param(p_ptr, p_val, row, P_PER_ROW)
    is_t0, inv_t = _temperature(T)

    # ---- passes 1 and 2: max, bad flag (kl mode: the moments), Z and the ladder ----
    if SPLIT:  # the chunks' partials (la_max_kernel, la_ladder_kernel)
        m, zsum, bad, cnt = _split_reduce(ws_f, ws_i, row, S, WF, WI, L, SP)
        if KL:
            wsum, mu, m2 = _split_moments(ws_f, row, S, WF, inv_t, SP)
    else:
        m, bad, m0_l, w_l, mu_l, m2_l = _max_pass(rowp, row0, 0, V, inv_t, BLOCK, KL)
        if KL:
            wsum, mu, m2 = _moments(m0_l, w_l, mu_l, m2_l, inv_t)
    if KL:
        r = _kl_ratio(wsum, m2, _row_param(e_ptr, e_val, row, E_PER_ROW),
                      _row_param(x_ptr, x_val, row, X_PER_ROW), is_t0)
    else:
        r = _row_param(r_ptr, r_val, row, R_PER_ROW)
    cut, lo, hi, need, empty = _search_init(m, T, top_p, is_t0)
    lv = _levels(m, T, is_t0, cut, L)
    if not SPLIT:
        zsum, cnt = _ladder_pass(rowp, 0, V, m, inv_t, lv, BLOCK_P, L)
    thr = top_p * zsum

    # ---- the candidate buffer: every logit at or above the loosest level that fits ----
    j, c, n = _pick_level(cnt, lv, CMAX, L)
    use_buf = (j >= 0) & ~empty
    whole = use_buf & (j < 0)  # (False) does the buffer hold the whole nucleus?
    n_buf = tl.zeros((), tl.int32)
    if use_buf:
        if not SPLIT:  # (split: la_compact_kernel filled it)
            _compact(rowp, 0, V, tl.maximum(_key(c) - 1, KEY_NEGINF), NONE_HI, NONE_HI,
                     tl.zeros((), tl.int32), cidx, cval, CMAX, BLOCK)
            tl.debug_barrier()  # the buffer is read back by other threads of this program
        # The level holds N if it is the cut, or if its own mass reaches top_p * Z (a token
        # below it has at least that mass above it, so it is out).
        whole = (j == L - 1) | (need & (_buffer_mass(cval, n, m, inv_t, CMAX) >= thr))
        n_buf = n
    tau = _key(cut)  # top_p >= 1 or T == 0: N is everything from the cut up

    # ---- otherwise (a nucleus of more than CMAX tokens): bracket the threshold ----
    if need & ~whole:
        m_hi = tl.zeros((), tl.float32)
        c_lo = tl.full((), CMAX + 1, tl.int32)
        c_hi = tl.zeros((), tl.int32)
        while _open(lo, hi, c_lo - c_hi, CMAX):
            piv = _pivots(lo, hi, NPIV)
            mass, pcnt = _pivot_sums(rowp, 0, V, piv, m, inv_t, BLOCK_P, NPIV)
            lo, hi, m_hi, c_lo, c_hi = _bracket(piv, mass, pcnt, thr, NPIV)
        whole = c_lo <= CMAX  # every key above lo fits: copy them all
        top = tl.where(whole, NONE_HI, hi)
        gt_hi = _compact(rowp, 0, V, lo, top, hi, tl.zeros((), tl.int32), cidx, cval, CMAX,
                         BLOCK)
        tl.debug_barrier()
        n_buf = tl.minimum(tl.where(whole, c_lo, c_lo - c_hi), CMAX)
        tau = _resolve_tau(cval, n_buf, tl.where(whole, 0.0, m_hi), thr, m, inv_t, gt_hi,
                           CMAX, JB)
    elif need:
        tau = _resolve_tau(cval, n_buf, 0.0, thr, m, inv_t, NONE_HI, CMAX, JB)

    # ---- one uniform per row ----
    u = tl.zeros((), tl.float32)
    if not GREEDY:
        if RNG == RNG_UNIFORMS:
            u = tl.load(u_ptr + row).to(tl.float32)
        else:
            if RNG == RNG_SEED:
                seed = seed_val
                ctr = row.to(tl.int64)
            elif RNG == RNG_DEVICE_SEED:
                seed = tl.load(seed_ptr)  # one seed kept on the device
                ctr = row.to(tl.int64)
            else:
                seed = tl.load(seed_ptr + row)
                ctr = tl.zeros((), tl.int64)
            if OFF_PER_ROW:
                off = tl.load(off_ptr + row).to(tl.int64)
            else:
                off = tl.full((), off_val, tl.int64)
            # Philox counter (c0, c1) = (ctr, offset): the low and high words of one int64.
            u = tl.rand(seed, ctr | (off << 32))

    # ---- pass 3: aligned scores on N and the token ----
    if whole:
        token, s_tok, s_max, s_sum, n_in, fallback = _finish_buffer(
            cidx, cval, n_buf, row0, tau, m, r, inv_t, u, is_t0, GREEDY, CMAX)
    else:
        token, s_tok, s_max, s_sum, n_in, fallback = _finish_stream(
            rowp, row0, V, tau, m, r, inv_t, u, is_t0, GREEDY, BLOCK)

    logprob = tl.where(is_t0, 0.0, (s_tok - s_max) * inv_t - tl.log(s_sum))
    status = tl.where(fallback, FALLBACK, 0) | tl.where((bad > 0) | empty, BAD_INPUT, 0)
    logprob = tl.where(empty, float("-inf"), logprob)
    # Whatever happened above, never return an id outside [0, V).
    token = tl.where((token >= 0) & (token < V) & ~empty, token, 0)
    tl.store(tok_ptr + row, token.to(tl.int64))
    tl.store(lp_ptr + row, logprob)
    tl.store(nsz_ptr + row, n_in)
    tl.store(status_ptr + row, status.to(tl.int32))
    tl.store(ratio_ptr + row, tl.where(fallback, 0.0, r))


# ---------------------------------------------------------------------------- launcher
K_PIVOTS = 16  # pivots per bracketing pass (2 ends, 7 in key space, 7 in value)
LEVELS = 16  # ladder levels of the candidate pass
CMAX_BUF = 1024  # candidate buffer per row (a nucleus up to about 1000 tokens is scored there)
# Candidates resolved at once in _resolve_tau: [JB, CMAX] in registers on a GPU; the
# interpreter pays per op, not per element, so it takes large slices.
JB_TAU = 128 if INTERPRETED else 8
SPLIT_BLOCK = 1024
MIN_CHUNK = 2048  # smallest chunk of a row worth its own program

if INTERPRETED:
    # The interpreter costs per executed op: few, large blocks; autotune needs a GPU.
    _CONFIGS = [triton.Config(dict(BLOCK=4096, BLOCK_P=2048), num_warps=4)]
else:
    _CONFIGS = [triton.Config(dict(BLOCK=1024, BLOCK_P=128), num_warps=4),
                triton.Config(dict(BLOCK=2048, BLOCK_P=256), num_warps=8)]


def _quick_bench(fn, quantiles):
    # Autotuning runs once per (V, batch bucket, dtypes); keep it short.
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


la_step_tuned = triton.autotune(_CONFIGS, key=["V", "BKEY", "SPLIT", "GREEDY", "KL"],
                                do_bench=None if INTERPRETED else _quick_bench)(la_step_kernel)


def _param(x, device, dtype):
    # A per-row parameter: (pointer tensor, scalar value, is_per_row).
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype).contiguous(), 0, True
    return _dummy(device, dtype), x, False


_DUMMIES = {}
_SMS = {}


def _dummy(device, dtype):
    import torch

    key = (device, dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.empty(1, device=device, dtype=dtype)
    return _DUMMIES[key]


def plan_split(B, V, device):
    """Chunks per row for the split path (1 = the fused kernel): enough programs to fill
    the GPU at small batch, chunks of at least MIN_CHUNK logits."""
    if device.type != "cuda":
        return 1
    if device not in _SMS:
        import torch

        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    sms = _SMS[device]
    if 2 * B >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, B), V // MIN_CHUNK))


def la_step(logits_p, logits_0, ratio, temperature, top_p, *, greedy, u=None, seed=None,
            offset=0, kl=None, split=None, block=None, split_block=SPLIT_BLOCK, pivots=K_PIVOTS,
            cmax=CMAX_BUF):
    """Launch the step over a [B, V] batch (no host synchronisation).

    logits_p, logits_0: [B, V] fp32/bf16/fp16 on one device, last dim contiguous.
    ratio, temperature, top_p: a Python number or a [B] tensor each (already validated).
    ``kl``: kl mode, ``(kl_budget, max_ratio)`` (numbers or [B] tensors): the ratio
    of each row is computed in pass 1 and ``ratio`` is ignored (may be None).
    Randomness (sampling only): ``u`` ([B] uniforms in [0, 1)), or ``seed`` (an int: the
    counter is (row, offset); the same for a 0-d int64 tensor, read on the device; or a [B]
    int64 tensor of per-row seeds: the counter is (0, offset)).
    ``offset``: an int or a [B] int64 tensor (e.g. the decoding position).
    ``split``: chunks per row (1: the fused one-launch kernel; None: ``plan_split``).
    ``block``: force the per-row kernel's block size (tests; default: autotuned).
    ``split_block``: block (and chunk granularity) of the split launches; ``pivots``, ``cmax``:
    pivots per pass and candidate buffer size (powers of two; small values in tests reach
    every branch of the search on small rows).
    Returns (tokens int64 [B], logprobs fp32 [B], nucleus_size int32 [B], status int32 [B],
    ratio fp32 [B]: the ratio each row used, 0 where it fell back).
    """
    import torch

    B, V = logits_p.shape
    dev = logits_p.device
    zp = logits_p if logits_p.stride(-1) == 1 else logits_p.contiguous()
    z0 = logits_0 if logits_0.stride(-1) == 1 else logits_0.contiguous()
    if B == 0:
        return (torch.empty(0, device=dev, dtype=torch.int64),
                torch.empty(0, device=dev, dtype=torch.float32),
                torch.empty(0, device=dev, dtype=torch.int32),
                torch.empty(0, device=dev, dtype=torch.int32),
                torch.empty(0, device=dev, dtype=torch.float32))
    r_t, r_v, r_row = _param(0.0 if ratio is None else ratio, dev, torch.float32)
    e_t, e_v, e_row = _param(0.0 if kl is None else kl[0], dev, torch.float32)
    x_t, x_v, x_row = _param(0.0 if kl is None else kl[1], dev, torch.float32)
    t_t, t_v, t_row = _param(temperature, dev, torch.float32)
    p_t, p_v, p_row = _param(top_p, dev, torch.float32)
    o_t, o_v, o_row = _param(offset, dev, torch.int64)
    dummy_i, dummy_f = _dummy(dev, torch.int64), _dummy(dev, torch.float32)
    source = constants.RandomSource
    if greedy:
        rng, u_t, s_t, s_v = source.UNIFORMS, dummy_f, dummy_i, 0
    elif u is not None:
        rng, u_t = source.UNIFORMS, u.to(device=dev, dtype=torch.float32).contiguous()
        s_t, s_v = dummy_i, 0
    elif isinstance(seed, torch.Tensor):
        s_t = seed.to(device=dev, dtype=torch.int64).contiguous()
        rng = source.DEVICE_SEED if seed.dim() == 0 else source.ROW_SEEDS
        u_t, s_v = dummy_f, 0
    else:
        rng, u_t, s_t, s_v = source.SEED, dummy_f, dummy_i, int(seed)
    S = plan_split(B, V, dev) if split is None else int(split)
    chunk = triton.cdiv(triton.cdiv(V, max(S, 1)), split_block) * split_block
    S = triton.cdiv(V, chunk) if S > 1 else 1
    NPIV, L, CMAX = pivots, LEVELS, cmax
    SP = triton.next_power_of_2(S)
    WF, WI = (6 if kl is not None else 2) * S, S + S * L
    tokens = torch.empty(B, device=dev, dtype=torch.int64)
    logprobs = torch.empty(B, device=dev, dtype=torch.float32)
    nsz = torch.empty(B, device=dev, dtype=torch.int32)
    status = torch.empty(B, device=dev, dtype=torch.int32)
    used = torch.empty(B, device=dev, dtype=torch.float32)
    # The workspace and the candidate buffer in one allocation (the outputs stay separate
    # tensors: a custom op's outputs may not alias each other).
    sizes = [B * WF, B * WI, B * CMAX, B * CMAX]
    ws_f, ws_i, cidx, cval = torch.empty(sum(sizes), device=dev, dtype=torch.int32).split(sizes)
    ws_f, cval = ws_f.view(torch.float32), cval.view(torch.float32)
    if S > 1:
        grid = (B, S)
        la_max_kernel[grid](zp, z0, zp.stride(0), z0.stride(0), t_t, float(t_v), ws_f, ws_i, V,
                            S, chunk, WF, WI, T_PER_ROW=t_row, KL=kl is not None,
                            BLOCK=split_block, num_warps=4)
        la_ladder_kernel[grid](zp, zp.stride(0), t_t, float(t_v), ws_f, ws_i, V, S, chunk, WF,
                               WI, T_PER_ROW=t_row, BLOCK=min(256, split_block), L=L, SP=SP,
                               num_warps=4)
        la_compact_kernel[grid](zp, zp.stride(0), t_t, float(t_v), ws_f, ws_i, cidx, cval, V, S,
                                chunk, WF, WI, T_PER_ROW=t_row, BLOCK=split_block, L=L,
                                CMAX=CMAX, SP=SP, num_warps=4)
    if block is None:
        kernel, cfg = la_step_tuned, {}
    else:
        kernel, cfg = la_step_kernel, dict(BLOCK=block, BLOCK_P=min(block, 256), num_warps=4)
    kernel[(B,)](
        zp, z0, zp.stride(0), z0.stride(0),
        r_t, float(r_v), t_t, float(t_v), p_t, float(p_v), e_t, float(e_v), x_t, float(x_v),
        u_t, s_t, s_v, o_t, int(o_v),
        tokens, logprobs, nsz, status, used,
        cidx, cval, ws_f, ws_i,
        V, S, WF, WI, triton.next_power_of_2(B),
        R_PER_ROW=r_row, T_PER_ROW=t_row, P_PER_ROW=p_row,
        KL=kl is not None, E_PER_ROW=e_row, X_PER_ROW=x_row, RNG=int(rng), OFF_PER_ROW=o_row,
        GREEDY=bool(greedy),
        SPLIT=S > 1, SP=SP, NPIV=NPIV, L=L, CMAX=CMAX, JB=min(JB_TAU, CMAX), **cfg,
    )
    return tokens, logprobs, nsz, status, used
