"""One fused Triton kernel for a Linear Alignment decoding step (SPEC sections 1 and 2).

One program handles one batch row and streams over the vocabulary in blocks of ``BLOCK``
logits. Everything is fp32 after the load. The passes over a row are:

1. **Statistics** (reads both branches once): the running max ``m`` and the rescaled sum
   ``Z = sum exp((z_p - m) / T)`` of the principle branch (online softmax, Milakov and
   Gimelshein 2018: when the running max grows, the running sum is multiplied by
   ``exp((m_old - m_new) / T)``), and the bad-input flag (NaN or ``+inf`` in either branch).
2. **Nucleus threshold, sort-free** (reads the principle branch only, typically 3 to 6
   times, at most about 12): the nucleus is ``N = {i : key(z_p[i]) >= tau}`` where ``key``
   is the order-preserving int32 image of an fp32 logit and ``tau`` is the smallest row key
   whose mass-above ``F(tau) = sum_{key_j > tau} exp((z_p[j] - m) / T)`` is below
   ``top_p * Z``. Each pass evaluates ``NPIV`` pivots at once (a multi-way bisection, in
   the spirit of the pivot searches of FlashInfer's sampling kernels): for every pivot the
   mass above it, the largest row key at or below it and the smallest row key above it.
   Half the pivots are spread evenly in value (fast on real rows), half evenly in key space
   (bounds the worst case: each pass shrinks the key range 8-fold, 32 bits in at most 11
   passes); the bracket ``[smin, smax]`` then snaps to real row keys, so it closes as soon
   as one distinct value is left. Exact: comparisons are on the logits themselves, so ties
   are kept together and only the fp32 mass sums round. Pass 2 is skipped when
   ``top_p >= 1`` or ``T == 0``.
3. **Aligned scores** (reads ``z_p``; ``z_0`` only where the row is in the nucleus):
   ``a = z_p + r (z_p - z_0)`` on ``N`` minus the tokens banned (``-inf``) in either branch;
   the running max, first argmax and rescaled sum of ``exp((a - max a) / T)``; the same for
   the plain principle branch in case banning empties ``N`` (then ``r`` is taken as 0).
4. **Inverse-CDF draw** (sampling only; same reads as 3): one uniform ``u`` per row from
   Triton's Philox stream keyed by (seed, row, offset) or given by the caller; the token is
   the first index whose running (``tl.cumsum``) mass exceeds ``u * S``.

Why this shape: passes 1, 3 and 4 are streaming reductions whose partial results (max,
rescaled sums, first argmax, per-partition masses for the inverse CDF) combine across
programs, and every pivot statistic of pass 2 is a sum, min or max, so a later change can
split a row over several programs at small batch with a tiny second reduction per pass.
The result does not depend on ``BLOCK`` beyond fp32 rounding of the sums.
"""
import os

import triton
import triton.language as tl

# Under Triton's interpreter every call of a nested @triton.jit function re-patches the
# language module (about 1 ms each, half the run time of a small row), while a plain Python
# helper runs with the caller's patched module and gives the same result. Compiled, the
# helpers are ordinary @triton.jit functions.
_helper = (lambda fn: fn) if os.environ.get("TRITON_INTERPRET", "0") == "1" else triton.jit

# Largest finite fp32: aligned scores are clamped to +-FMAX so that hostile but finite
# inputs (+-1e30 with a large ratio) never produce inf - inf = NaN.
FMAX = tl.constexpr(3.4028234663852886e38)
# A token whose principle logit is more than GAP * T below the row's best is never in N.
GAP = tl.constexpr(80.0)
# "No key" markers for the int32 order keys (no finite or -inf value maps to either).
NONE_LO = tl.constexpr(-(2**31))
NONE_HI = tl.constexpr(2**31 - 1)


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
def _load_nucleus(rowp, row0, offs, V, tau):
    # One block of a row on the nucleus: the principle logits x (the whole block, to test
    # membership key(x) >= tau), and the without-branch y, read only where the token is in N.
    msk = offs < V
    x = tl.load(rowp + offs, mask=msk, other=float("-inf")).to(tl.float32)
    x, _ = _sanitize(x)
    in_n = msk & (_key(x) >= tau) & (x > float("-inf"))
    y = tl.load(row0 + offs, mask=in_n, other=float("-inf")).to(tl.float32)
    y, _ = _sanitize(y)
    return x, y, in_n


@_helper
def _aligned(x, y, r):
    # a = z_p + r * (z_p - z_0), clamped to the finite range (see FMAX).
    d = tl.minimum(tl.maximum(x - y, -FMAX), FMAX)
    return tl.minimum(tl.maximum(x + r * d, -FMAX), FMAX)


@triton.jit
def la_step_kernel(
    zp_ptr, z0_ptr, stride_p, stride_0,
    r_ptr, r_val, t_ptr, t_val, p_ptr, p_val,
    u_ptr, seed_ptr, seed_val, off_ptr, off_val,
    tok_ptr, lp_ptr, nsz_ptr, status_ptr,
    V,
    R_PER_ROW: tl.constexpr, T_PER_ROW: tl.constexpr, P_PER_ROW: tl.constexpr,
    RNG: tl.constexpr, OFF_PER_ROW: tl.constexpr, GREEDY: tl.constexpr,
    BLOCK: tl.constexpr, NPIV: tl.constexpr,
):
    # zp, z0: [B, V] (fp32/bf16/fp16, last dim contiguous); outputs: [B]
    # RNG: 0 = uniforms given in u_ptr, 1 = one seed (counter = row, offset),
    #      2 = per-row seeds (counter = 0, offset)
    row = tl.program_id(0)
    # int64 row offsets: row * stride overflows int32 once B * V passes 2**31.
    rowp = zp_ptr + row.to(tl.int64) * stride_p
    row0 = z0_ptr + row.to(tl.int64) * stride_0
    cols = tl.arange(0, BLOCK)

    if R_PER_ROW:
        r = tl.load(r_ptr + row).to(tl.float32)
    else:
        r = tl.full((), r_val, tl.float32)
    if T_PER_ROW:
        T = tl.load(t_ptr + row).to(tl.float32)
    else:
        T = tl.full((), t_val, tl.float32)
    if P_PER_ROW:
        top_p = tl.load(p_ptr + row).to(tl.float32)
    else:
        top_p = tl.full((), p_val, tl.float32)
    # T == 0 is greedy (the limit T -> 0): N collapses onto the principle argmax. Sums
    # computed below with T = 1 for such rows are never used.
    is_t0 = T == 0.0
    inv_t = 1.0 / tl.where(is_t0, 1.0, T)

    # ---- pass 1: online max / rescaled sum of the principle branch, bad-input flag ----
    m = tl.full((), float("-inf"), tl.float32)
    zsum = tl.zeros((), tl.float32)
    bad = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        msk = offs < V
        x = tl.load(rowp + offs, mask=msk, other=float("-inf")).to(tl.float32)
        y = tl.load(row0 + offs, mask=msk, other=float("-inf")).to(tl.float32)
        x, bx = _sanitize(x)
        y, by = _sanitize(y)
        bad = tl.maximum(bad, tl.max((bx | by).to(tl.int32), axis=0))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # avoid -inf - -inf
        zsum = zsum * tl.exp((m - m_ref) * inv_t) + tl.sum(tl.exp((x - m_ref) * inv_t), axis=0)
        m = m_new
    empty = m == float("-inf")  # no finite principle logit: nothing can be chosen

    # ---- pass 2: nucleus threshold tau by multi-pivot bracketing in key space ----
    thr = top_p * zsum
    cut = m - GAP * tl.where(is_t0, 0.0, T)  # the gap rule, in fp32 like every backend
    # Keys are int32 (every finite or -inf key lies strictly inside the int32 range, so
    # INT32_MIN / INT32_MAX serve as "none"); pivot arithmetic is done in int64.
    smin = _key(cut)
    smax = _key(m)
    # top_p >= 1 keeps every token that passes the gap rule; empty rows skip the search.
    smax = tl.where((top_p >= 1.0) | empty, smin, smax)
    HALF: tl.constexpr = NPIV // 2
    kk = tl.arange(0, NPIV)
    while smin < smax:
        d = smax.to(tl.int64) - smin.to(tl.int64)
        by_key = (smin.to(tl.int64) + (d * kk) // HALF).to(tl.int32)  # kk < HALF: from smin
        vmin = _unkey(smin)
        vmax = _unkey(smax)
        frac = (kk - HALF + 1).to(tl.float32) / (HALF + 1)
        by_val = _key(vmin + (vmax - vmin) * frac)  # evenly in value
        piv = tl.where(kk < HALF, by_key, by_val)
        piv = tl.minimum(tl.maximum(piv, smin), smax - 1)  # any pivot in range is valid
        mass = tl.zeros((NPIV,), tl.float32)
        le_max = tl.full((NPIV,), NONE_LO, tl.int32)  # largest row key in [smin, pivot]
        gt_min = tl.full((NPIV,), NONE_HI, tl.int32)  # smallest row key in (pivot, smax]
        for start in range(0, V, BLOCK):
            offs = start + cols
            x = tl.load(rowp + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            x, _ = _sanitize(x)
            k = _key(x)
            e = tl.exp((x - m) * inv_t)
            above = k[:, None] > piv[None, :]
            mass += tl.sum(tl.where(above, e[:, None], 0.0), axis=0)
            kb = tl.broadcast_to(k[:, None], (BLOCK, NPIV))
            le_max = tl.maximum(le_max, tl.max(tl.where(~above & (kb >= smin), kb, NONE_LO), axis=0))
            gt_min = tl.minimum(gt_min, tl.min(tl.where(above & (kb <= smax), kb, NONE_HI), axis=0))
        keep = mass < thr  # pivot p is "in": every key at or above it is in N
        lo_piv = tl.max(tl.where(keep, NONE_LO, piv), axis=0)  # largest pivot that is out
        hi_piv = tl.min(tl.where(keep, piv, NONE_HI), axis=0)  # smallest pivot that is in
        new_min = tl.min(tl.where(~keep & (piv == lo_piv), gt_min, NONE_HI), axis=0)
        new_max = tl.max(tl.where(keep & (piv == hi_piv), le_max, NONE_LO), axis=0)
        first_in = tl.min(tl.where(keep & (piv == hi_piv), gt_min, NONE_HI), axis=0)
        # Out pivot: keys at or below it are out; the bracket starts at the next row key.
        smin = tl.where(lo_piv > NONE_LO, new_min, smin)
        # In pivot: the largest row key at or below it is in. If there is none in the
        # bracket, the smallest key above the pivot is tau.
        has_in = hi_piv < NONE_HI
        no_key = new_max == NONE_LO
        smax = tl.where(has_in & ~no_key, new_max, smax)
        smin = tl.where(has_in & no_key, first_in, smin)
        smax = tl.where(has_in & no_key, first_in, smax)
    tau = smax

    # ---- pass 3: aligned scores on N; stats of the aligned and the plain distribution ----
    a_max = tl.full((), float("-inf"), tl.float32)
    a_sum = tl.zeros((), tl.float32)
    a_arg = tl.zeros((), tl.int32)
    p_sum = tl.zeros((), tl.float32)  # plain principle branch on N (the fallback)
    p_arg = tl.full((), 2**30, tl.int32)
    n_in = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        x, y, in_n = _load_nucleus(rowp, row0, offs, V, tau)
        ok = in_n & (y > float("-inf"))
        a = tl.where(ok, _aligned(x, y, r), float("-inf"))
        n_in += tl.sum(in_n.to(tl.int32), axis=0)
        b_max = tl.max(a, axis=0)
        b_arg = tl.min(tl.where(ok & (a == b_max), offs, 2**30), axis=0)
        new_max = tl.maximum(a_max, b_max)
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        a_sum = a_sum * tl.exp((a_max - ref) * inv_t) + tl.sum(tl.exp((a - ref) * inv_t), axis=0)
        a_arg = tl.where(b_max > a_max, b_arg, a_arg)  # strict: earlier block wins ties
        a_max = new_max
        p_sum += tl.sum(tl.where(in_n, tl.exp((x - m) * inv_t), 0.0), axis=0)
        p_arg = tl.minimum(p_arg, tl.min(tl.where(in_n & (x == m), offs, 2**30), axis=0))
    fallback = (a_max == float("-inf")) & (n_in > 0)  # banning emptied N: r taken as 0
    r_eff = tl.where(fallback, 0.0, r)
    s_max = tl.where(fallback, m, a_max)
    s_sum = tl.where(fallback, p_sum, a_sum)
    token = tl.where(fallback, p_arg, a_arg)
    s_tok = s_max

    # ---- pass 4: inverse-CDF draw in vocabulary order ----
    if not GREEDY:
        if RNG == 0:
            u = tl.load(u_ptr + row).to(tl.float32)
        else:
            if RNG == 1:
                seed = seed_val
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
        target = u * s_sum
        carry = tl.zeros((), tl.float32)
        pick = tl.full((), 2**30, tl.int32)
        pick_s = tl.full((), float("-inf"), tl.float32)
        last = tl.full((), -1, tl.int32)
        last_s = tl.full((), float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            x, y, in_n = _load_nucleus(rowp, row0, offs, V, tau)
            ok = tl.where(fallback, in_n, in_n & (y > float("-inf")))
            s = tl.where(ok, _aligned(x, y, r_eff), float("-inf"))
            w = tl.exp((s - s_max) * inv_t)
            cum = carry + tl.cumsum(w, axis=0)
            hit = tl.min(tl.where((cum > target) & (w > 0.0), offs, 2**30), axis=0)
            hit_s = tl.max(tl.where(offs == hit, s, float("-inf")), axis=0)
            take = (pick == 2**30) & (hit < 2**30)
            pick = tl.where(take, hit, pick)
            pick_s = tl.where(take, hit_s, pick_s)
            b_last = tl.max(tl.where(w > 0.0, offs, -1), axis=0)
            last_s = tl.where(b_last > last, tl.max(tl.where(offs == b_last, s, float("-inf")), axis=0), last_s)
            last = tl.maximum(last, b_last)
            carry += tl.sum(w, axis=0)
        # Rounding can leave u * S just above the final running sum: take the last token.
        no_pick = pick == 2**30
        sampled = tl.where(is_t0, token, tl.where(no_pick, last, pick))
        s_tok = tl.where(is_t0, s_max, tl.where(no_pick, last_s, pick_s))
        token = sampled

    logprob = tl.where(is_t0, 0.0, (s_tok - s_max) * inv_t - tl.log(s_sum))
    status = tl.where(fallback, 1, 0) | tl.where((bad > 0) | empty, 2, 0)
    logprob = tl.where(empty, float("-inf"), logprob)
    # Whatever happened above, never return an id outside [0, V).
    token = tl.where((token >= 0) & (token < V) & ~empty, token, 0)
    tl.store(tok_ptr + row, token.to(tl.int64))
    tl.store(lp_ptr + row, logprob)
    tl.store(nsz_ptr + row, n_in)
    tl.store(status_ptr + row, status.to(tl.int32))


# Pivots per bracketing pass: 8 spread in key space, 8 in value.
NPIV = 16


def _block_for(V, device):
    # Under the interpreter every tl op costs a fixed overhead, so fewer, larger blocks are
    # faster; compiled, [BLOCK, NPIV] intermediates must stay in registers. The GPU issue
    # replaces this with triton.autotune.
    if device.type == "cuda":
        return 1024, 8
    return min(4096, triton.next_power_of_2(V)), 4


def _param(x, device, dtype):
    # A per-row parameter: (pointer tensor, scalar value, is_per_row).
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype).contiguous(), 0, True
    dummy = torch.empty(1, device=device, dtype=dtype)
    return dummy, x, False


def la_step(logits_p, logits_0, ratio, temperature, top_p, *, greedy, u=None, seed=None,
            offset=0, block=None):
    """Launch ``la_step_kernel`` once over a [B, V] batch.

    logits_p, logits_0: [B, V] fp32/bf16/fp16 on one device, last dim contiguous.
    ratio, temperature, top_p: a Python number or a [B] tensor each (already validated).
    Randomness (sampling only): ``u`` ([B] uniforms in [0, 1)), or ``seed`` (an int: the
    counter is (row, offset); or a [B] int64 tensor of per-row seeds: the counter is
    (0, offset)). ``offset``: an int or a [B] int64 tensor (e.g. the decoding position).
    Returns (tokens int64 [B], logprobs fp32 [B], nucleus_size int32 [B], status int32 [B]).
    """
    import torch

    B, V = logits_p.shape
    dev = logits_p.device
    zp = logits_p if logits_p.stride(-1) == 1 else logits_p.contiguous()
    z0 = logits_0 if logits_0.stride(-1) == 1 else logits_0.contiguous()
    tokens = torch.empty(B, device=dev, dtype=torch.int64)
    logprobs = torch.empty(B, device=dev, dtype=torch.float32)
    nsz = torch.empty(B, device=dev, dtype=torch.int32)
    status = torch.empty(B, device=dev, dtype=torch.int32)
    if B == 0:
        return tokens, logprobs, nsz, status
    r_t, r_v, r_row = _param(ratio, dev, torch.float32)
    t_t, t_v, t_row = _param(temperature, dev, torch.float32)
    p_t, p_v, p_row = _param(top_p, dev, torch.float32)
    o_t, o_v, o_row = _param(offset, dev, torch.int64)
    dummy_i = torch.empty(1, device=dev, dtype=torch.int64)
    if greedy:
        rng, u_t, s_t, s_v = 0, logprobs, dummy_i, 0
    elif u is not None:
        rng, u_t, s_t, s_v = 0, u.to(device=dev, dtype=torch.float32).contiguous(), dummy_i, 0
    elif isinstance(seed, torch.Tensor):
        rng, u_t, s_t, s_v = 2, logprobs, seed.to(device=dev, dtype=torch.int64).contiguous(), 0
    else:
        rng, u_t, s_t, s_v = 1, logprobs, dummy_i, int(seed)
    blk, warps = _block_for(V, dev) if block is None else (block, 4)
    la_step_kernel[(B,)](
        zp, z0, zp.stride(0), z0.stride(0),
        r_t, float(r_v), t_t, float(t_v), p_t, float(p_v),
        u_t, s_t, s_v, o_t, int(o_v),
        tokens, logprobs, nsz, status,
        V,
        R_PER_ROW=r_row, T_PER_ROW=t_row, P_PER_ROW=p_row,
        RNG=rng, OFF_PER_ROW=o_row, GREEDY=bool(greedy),
        BLOCK=blk, NPIV=NPIV, num_warps=warps,
    )
    return tokens, logprobs, nsz, status
