"""Triton kernels for a Linear Alignment decoding step (docs/semantics.md), at one read of
both branches per row.

A row of V logits is cut into S chunks of CHUNK logits (4096 on a GPU up to V = 262144,
8192 past it, so that a row has at most 64 of them), and every chunk is one program of a
(S, B) grid, whatever B: the GPU is as full at B = 1 as at B = 100. All arithmetic is
fp32 after the load (bf16 and fp16 are converted at once). Two launches per step.

**Launch 1, ``la_chunk_kernel``**: each program loads its chunk of both branches once, as
one register tile, and computes from it:

- the bad-input flag (NaN or ``+inf`` in either branch: the without-branch is read whole
  here and nowhere else, except at nucleus tokens);
- the chunk max ``m_c`` and ``Z_c = sum exp((x - m_c) / T)``;
- in kl mode, the chunk's moments of ``g = (z_p - z_0) / T`` under ``softmax(z_0 / T)``
  (max ``m0_c`` of ``z_0``, weight sum ``W_c``, mean, sum of squared deviations ``M2_c``),
  two-pass in registers;
- its **cut** ``c_s``: the deepest of L = 16 levels ``m_c - d_j T`` (``d_j`` = 0.75, 1.5,
  ..., 9, then 12, 16, 24 and 80, the gap rule's distance) with at most KLOC finite logits
  at or above it (KLOC = 1024 / S slots, 16 at least), found by bisection over the levels
  (five block reductions); if even the tightest level holds more, the cut is just above
  ``m_c`` and the chunk emits nothing;
- the **candidates**: its logits at or above ``c_s``, with their ids and their
  without-branch logits, written in vocabulary order to the row's candidate buffer at
  slots ``s * KLOC ...`` (a ``cumsum`` gives each one its slot).

The program stores these partials, then takes a ticket from the row's arrival counter
(``atomic_add`` with acquire-release semantics, after a barrier, so that its stores are
visible to whoever arrives last). **The last program of the row to arrive finishes it**
(and resets the counter for the next call):

- it merges the chunks' partials in chunk order: ``m = max m_c``; ``Z = sum_c Z_c
  exp((m_c - m) / T)`` (online softmax: each partial sum was taken relative to its own
  max and is rescaled to the common one); the bad flag; kl mode's moments (the same
  rescaling of the weights, then the parallel-variance combination, Chan et al.);
- **the superset check**: let ``L* = max_c c_s``. Every logit at or above ``L*`` is at or
  above its own chunk's cut, so it is in the buffer. If ``L*`` is at or below the gap
  rule's cut ``m - 80 T``, the buffer holds every token that can be in the nucleus N. If
  the buffered mass at or above ``L*`` reaches ``top_p * Z``, a token below ``L*`` has at
  least that mass strictly above it, so it is out: again N is in the buffer. (T = 0: N is
  the ties at ``m``, in the buffer when no chunk overflowed at its max.) This check is
  exact, so the choice of levels is only a heuristic for how often it passes;
- the threshold: ``tau`` = the smallest key whose mass strictly above is below ``top_p *
  Z``, by bracketing on the buffer (``_tau_search``: two rounds of 16 pivots, half spread
  in key space, half in value, then the at most 64 candidates left in the bracket each
  tested exactly against the others; a bracket still holding more, of dense or tied
  candidates, goes to launch 2 as a SEARCH of that bracket). Keys are the order-preserving
  int32 images of the fp32 logits, so ties stay together and only the fp32 mass sums
  round;
- the aligned scores ``a = z_p + r (z_p - z_0)`` on N (the without-branch logits are in the
  buffer), banning and the fallback to ``r = 0``, the first argmax, the softmax sum and the
  inverse-CDF draw in vocabulary order with the counter-based uniform ``tl.rand(seed,
  ctr | (offset << 32))`` (the torch path and the reference draw the same uniform).

A row whose check fails (a flat row: a nucleus of thousands of tokens, or candidates
concentrated in a few chunks), or whose ``top_p = 1`` / ``T = 0`` nucleus overflows the
buffer, is handed to launch 2 with what is known: ``m``, ``Z``, ``r``, and a bracket
(lo, hi] of the threshold's key. Tokens with keys above hi (at or above ``L*``) are in N;
those at or below lo are out, by the gap rule or because ``V e(v) <= (1 - top_p) Z / 2``
below ``v = m + T ln((1 - top_p) Z / (2 V))``: then the mass at or above v is at least
``top_p * Z``.

**Launch 2, ``la_flat_kernel``**: chunk-parallel work on those rows, as a persistent grid
with a work queue (so it costs one load and an exit when no row needs it). A row's work
is a sequence of jobs of S chunk tasks each; the queue hands out tickets (``atomic_add``)
in order, the last task of a job to arrive (the same counter as above) decides the next
job and publishes it (``atomic_xchg`` with release semantics); waiting for a job that is
not yet published only ever waits on tasks that started earlier, so the queue cannot
deadlock whatever the number of resident programs (the decoupled look-back argument), and
the interpreter, which runs programs one after another, never waits. Jobs:

- SEARCH (lo, hi, 16 pivots): each chunk sums the mass above every pivot and copies its
  logits in (lo, hi], with their ids, to the row's flat buffer (FSLOT = 1024 / S slots per
  chunk); a chunk whose logits fitted also reduces its tokens above hi (in N whatever tau
  is) as a SCORE task does. The last task merges: if every chunk's logits fitted, ``tau``
  is resolved exactly on the flat buffer (``_tau_search`` again, with the mass above hi
  from the pivot sums) and the row is finished at once: N is the chunks' tokens above hi
  and the buffer's from tau up (their without-branch logits gathered then). Otherwise the
  pivots give a narrower bracket and the next SEARCH. Key-space pivots shrink the bracket
  at least eightfold per round, so a row takes at most 11 rounds (``max_jobs`` sizes the
  queue for that); a realistic flat row takes two.
- SCORE (tau known: top_p = 1, T = 0, or a bracket narrowed to one key): each chunk
  reduces its nucleus tokens (the without-branch read there only): count, max aligned
  score and its first id, the softmax sum relative to that max, and the same for the
  plain scores (the fallback).

The finish in launch 2 merges the chunks' reductions in chunk order, and for a sampled row
finds the chunk where the running mass crosses ``u`` times the total and scans that one
chunk in vocabulary order for the token.

No program reads more than two chunks of a row (its own, and for a sampled row finished in
launch 2 the one chunk its draw falls in) or more than one buffer of about 1024 entries.
Every cross-chunk reduction is a max, min or sum in chunk order, so results are
deterministic and depend on the split only through fp32 rounding of sums. Reads of what
other programs wrote bypass L1 (``cache_modifier=".cg"``); launch 2 polls with volatile
loads and acquires with an atomic.
"""
import collections
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
# A helper compiled as a function of its own (a persistent loop around an inlined body would
# keep the body's loop-invariant tiles in registers across the whole loop).
_noinline = (lambda fn: fn) if INTERPRETED else triton.jit(noinline=True)

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
# Pivots evaluated at once on a buffer ([PIV_GROUP, N] tiles; see _masses_above).
PIV_GROUP = tl.constexpr(4)
# Bracket entries tested exactly against each other ([NSMALL, NSMALL] tiles).
NSMALL = tl.constexpr(64)
# Bracketing rounds on a buffer before its last NSMALL entries are tested (see _tau_search).
BUF_ROUNDS = tl.constexpr(2)

# Workspace layout (per row; the launcher allocates it once per shape and stream):
# part_f [B, PF, SP]: per chunk m_c, Z_c, c_s and kl mode's m0, W, mean, M2;
# part_i [B, PI, SP]: per chunk the bad flag and the number of candidates emitted.
P_M = tl.constexpr(0)
P_Z = tl.constexpr(1)
P_CUT = tl.constexpr(2)
P_M0 = tl.constexpr(3)
P_W = tl.constexpr(4)
P_MU = tl.constexpr(5)
P_M2 = tl.constexpr(6)
PF = tl.constexpr(7)
I_BAD = tl.constexpr(0)
I_N = tl.constexpr(1)
PI = tl.constexpr(2)
# row_f [B, RF]: m, top_p * Z and the ratio used; row_i [B, RI]: the path the row took, the
# number of launch-2 jobs, the pending job's mode, the bracket (lo, hi], tau, the status
# bits known after launch 1, then the NPIV pivots of a SEARCH job.
R_M = tl.constexpr(0)
R_THR = tl.constexpr(1)
R_R = tl.constexpr(2)
RF = tl.constexpr(4)
S_PATH = tl.constexpr(0)
S_JOBS = tl.constexpr(1)
S_MODE = tl.constexpr(2)
S_LO = tl.constexpr(3)
S_HI = tl.constexpr(4)
S_TAU = tl.constexpr(5)
S_STATUS = tl.constexpr(6)
S_PIV = tl.constexpr(8)
RI0 = tl.constexpr(8)
# The paths (row_i[S_PATH]): finished on the candidate buffer by launch 1, or by launch 2
# with tau known (top_p = 1 or T = 0 with more candidates than the buffer holds), or by
# launch 2 after a threshold search.
PATH_BUFFER = tl.constexpr(0)
PATH_SCORE = tl.constexpr(1)
PATH_SEARCH = tl.constexpr(2)
MODE_SCORE = tl.constexpr(1)
MODE_SEARCH = tl.constexpr(2)
# k2_f [B, NPIV + 3, SP]: per chunk the mass above each pivot, then a SCORE job's max
# aligned score, its softmax sum and the plain (fallback) sum; k2_i [B, 4, SP]: the
# number of logits in the bracket, the nucleus count, the first argmax of the aligned and
# of the plain scores.
K_AMAX = tl.constexpr(0)
K_ASUM = tl.constexpr(1)
K_PSUM = tl.constexpr(2)
KF_EXTRA = tl.constexpr(3)
J_EMIT = tl.constexpr(0)
J_N = tl.constexpr(1)
J_AARG = tl.constexpr(2)
J_PARG = tl.constexpr(3)
KI = tl.constexpr(4)
# ctl [4]: the queue's head (tickets handed out), tail (jobs published), active rows and
# programs that left launch 2.
C_HEAD = tl.constexpr(0)
C_TAIL = tl.constexpr(1)
C_ACTIVE = tl.constexpr(2)
C_EXITS = tl.constexpr(3)


# ---------------------------------------------------------------------------- helpers
@_helper
def _sanitize(x):
    # NaN and +inf are bad input: the row is flagged, and the value is treated as -inf
    # (banned) so that even a bad row with check=False yields a valid token id. One compare:
    # x < +inf is false exactly for NaN and +inf.
    ok = x < float("inf")
    return tl.where(ok, x, float("-inf")), ~ok


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
def _uniform(u_ptr, seed_ptr, seed_val, off_ptr, off_val, row, RNG: tl.constexpr,
             OFF_PER_ROW: tl.constexpr):
    """The row's uniform: given (RNG_UNIFORMS), or Philox with the counter (c0, c1) =
    (row or 0, offset): the low and high words of one int64 (docs/semantics.md,
    "Randomness")."""
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
        u = tl.rand(seed, ctr | (off << 32))
    return u


@_helper
def _level(m_c, j, Tl, L: tl.constexpr):
    """Level j (0 = tightest) of a chunk's ladder: m_c - d_j T, d_j = 0.75 (j + 1) up to 9,
    then 12, 16, 24 and GAP (the gap rule's distance; L = 16)."""
    d = tl.where(j < L - 4, 0.75 * (j + 1).to(tl.float32),
                 tl.where(j == L - 4, 12.0, tl.where(j == L - 3, 16.0,
                                                     tl.where(j == L - 2, 24.0, GAP))))
    return m_c - d * Tl


@_helper
def _chunk_cut(x, m_c, Tl, KLOC: tl.constexpr, L: tl.constexpr, NBIS: tl.constexpr):
    """The deepest ladder level with at most KLOC finite logits of the chunk at or above it,
    by bisection over the levels (the counts grow with the level); just above m_c (nothing)
    if even the tightest holds more; -inf for a chunk with no finite logit."""
    lo = tl.full((), -1, tl.int32)  # the deepest level known to fit (-1: none)
    hi = tl.full((), L, tl.int32)  # the tightest level known not to fit (L: none)
    for _ in tl.static_range(NBIS):
        mid = (lo + hi) // 2
        # The emission's comparison, so the count is what will be emitted.
        c = tl.sum(((x >= _level(m_c, mid, Tl, L)) & (x > float("-inf"))).to(tl.int32),
                   axis=0)
        live = hi - lo > 1
        lo = tl.where(live & (c <= KLOC), mid, lo)
        hi = tl.where(live & (c > KLOC), mid, hi)
    cut = tl.where(lo >= 0, _level(m_c, tl.maximum(lo, 0), Tl, L), _unkey(_key(m_c) + 1))
    return tl.where(m_c == float("-inf"), float("-inf"), cut)


@_helper
def _moments(m0_l, w_l, mu_l, m2_l, inv_t):
    """Combine per-chunk moments of g: (W, mean, M2) of the whole row, with the weights
    relative to the row's max of z_0 (each chunk's were relative to its own max). Sums in
    a fixed order (deterministic)."""
    mx = tl.max(m0_l, axis=0)
    ref = tl.where(mx == float("-inf"), 0.0, mx)
    a = tl.where(m0_l > float("-inf"), tl.exp((m0_l - ref) * inv_t), 0.0)
    w = w_l * a
    wsum = tl.sum(w, axis=0)
    mu = tl.sum(w * mu_l, axis=0) / tl.where(wsum > 0.0, wsum, 1.0)
    dev = mu_l - mu
    m2 = tl.sum(m2_l * a, axis=0) + tl.sum(tl.where(w > 0.0, w * dev * dev, 0.0), axis=0)
    return wsum, mu, m2


@_helper
def _kl_ratio(wsum, m2, eps, max_ratio, is_t0):
    """kl mode: r_eff = kappa - 1, kappa = sqrt(2 eps / v) clipped to [0, 1 + max_ratio],
    v = M2 / W. v == 0 (or no token finite in both branches, or T == 0): r = 0; a
    non-finite v (hostile logits): kappa = 0."""
    v = m2 / tl.where(wsum > 0.0, wsum, 1.0)
    finite = (v == v) & (v < float("inf"))  # before the clamp: Triton's maximum drops NaN
    v = tl.where(finite, tl.maximum(v, 0.0), v)
    kappa = tl.where(finite, tl.sqrt(2.0 * eps / tl.where(v > 0.0, v, 1.0)), 0.0)
    kappa = tl.minimum(tl.maximum(kappa, 0.0), 1.0 + max_ratio)
    return tl.where(is_t0 | (wsum == 0.0) | (v == 0.0), 0.0, kappa - 1.0)


@_helper
def _pivots(lo, hi, NPIV: tl.constexpr):
    """NPIV pivots in the bracket: lo, NPIV - 2 interior ones (half spread in key space, which
    shrinks the bracket at least (NPIV - 2) / 2 + 1 fold a round, half in value), hi. Needs
    hi - lo >= 2."""
    H: tl.constexpr = (NPIV - 2) // 2
    kk = tl.arange(0, NPIV)
    d = hi.to(tl.int64) - lo.to(tl.int64)
    by_key = (lo.to(tl.int64) + (d * kk) // (H + 1)).to(tl.int32)
    vlo = _unkey(tl.maximum(lo, KEY_NEGINF + 1))
    vhi = _unkey(hi)
    frac = (kk - H).to(tl.float32) / (NPIV - 1 - H)
    by_val = _key(vlo + (vhi - vlo) * frac)
    piv = tl.where(kk <= H, by_key, by_val)
    piv = tl.minimum(tl.maximum(piv, lo + 1), hi - 1)  # any interior pivot is valid
    return tl.where(kk == 0, lo, tl.where(kk == NPIV - 1, hi, piv))


@_helper
def _bracket(piv, mass, thr, NPIV: tl.constexpr):
    """The new bracket (lo, hi] from the mass strictly above each pivot: piv[0] (the old lo)
    stays out and piv[NPIV - 1] (the old hi) in by construction; the mass is monotone in
    the pivot (fp32 sums of the same non-negative terms in the same order), so lo < hi."""
    kk = tl.arange(0, NPIV)
    keep = ((mass < thr) & (kk > 0)) | (kk == NPIV - 1)
    lo = tl.max(tl.where(keep, NONE_LO, piv), axis=0)
    hi = tl.min(tl.where(keep, piv, NONE_HI), axis=0)
    return lo, hi


@_helper
def _masses_above(piv, k, e, live, base, NPIV: tl.constexpr, G: tl.constexpr):
    """base + the mass of the live entries with keys strictly above each pivot: [NPIV] from
    [G, N] tiles (a whole [NPIV, N] tile would hold NPIV values of the buffer per thread)."""
    ii = tl.arange(0, NPIV)
    gg = tl.arange(0, G)
    mass = tl.zeros((NPIV,), tl.float32)
    for g in tl.static_range(NPIV // G):
        pg = tl.sum(tl.where(ii[None, :] == gg[:, None] + g * G, piv[None, :], 0), axis=1)
        mg = tl.sum(tl.where(live[None, :] & (k[None, :] > pg[:, None]), e[None, :], 0.0), axis=1)
        mass += tl.sum(tl.where(ii[:, None] == gg[None, :] + g * G, mg[None, :], 0.0), axis=1)
    return base + mass


@_helper
def _tau_search(k, e, live, lo, hi, thr, base, scr_k, scr_e, NPIV: tl.constexpr,
                G: tl.constexpr, NS: tl.constexpr, ROUNDS: tl.constexpr):
    """The threshold key on a buffer of candidates (keys k, masses e, ``live`` entries).

    Given: the mass strictly above hi is ``base`` plus that of the live keys above hi and
    is below thr (tokens above hi are in N), and every key in (lo, hi] is a live entry;
    tokens at or below lo are out (their mass-above reaches thr, or the gap rule).
    Returns (tau, done, lo, hi): tau is the smallest key in (lo, hi] whose mass strictly
    above is below thr (hi + 1 if none; lo + 1 if the mass above lo is already below thr).

    ROUNDS bracketing rounds with NPIV pivots on the whole buffer, then the at most NS entries
    left in the bracket are compacted through ``scr_k``, ``scr_e`` (NS words each) and
    each is tested exactly against the others ([NS, NS]). If more than NS entries of more
    than one key are left (rare: dense or tied candidates), ``done`` is False and (lo, hi]
    is the narrower bracket, for a SEARCH job of launch 2. No loop: a loop here would keep
    buffer-sized values in registers across it, in every program of launch 1."""
    f_lo = base + tl.sum(tl.where(live & (k > lo), e, 0.0), axis=0)
    inb = live & (k > lo) & (k <= hi)
    cnt = tl.sum(inb.to(tl.int32), axis=0)
    for _ in tl.static_range(ROUNDS):  # unrolled: straight-line code
        if (f_lo >= thr) & (cnt > NS) & (hi.to(tl.int64) - lo.to(tl.int64) > 1):
            piv = _pivots(lo, hi, NPIV)
            lo, hi = _bracket(piv, _masses_above(piv, k, e, live, base, NPIV, G), thr, NPIV)
            inb = live & (k > lo) & (k <= hi)
            cnt = tl.sum(inb.to(tl.int32), axis=0)
    done = (f_lo < thr) | (cnt <= NS) | (hi.to(tl.int64) - lo.to(tl.int64) <= 1)
    # At most NS entries in (lo, hi], or all of one key (then the first NS stand for all).
    f_hi = base + tl.sum(tl.where(live & (k > hi), e, 0.0), axis=0)
    pos = tl.cumsum(inb.to(tl.int32), axis=0) - 1
    put = inb & (pos < NS)
    tl.store(scr_k + pos, k, mask=put)
    tl.store(scr_e + pos, e, mask=put)
    tl.debug_barrier()  # the scratch is read back by other threads of this program
    js = tl.arange(0, NS)
    vs = js < cnt
    ck = tl.load(scr_k + js, mask=vs, other=NONE_LO)
    ce = tl.load(scr_e + js, mask=vs, other=0.0)
    mass = f_hi + tl.sum(tl.where(vs[None, :] & (ck[None, :] > ck[:, None]), ce[None, :], 0.0),
                         axis=1)
    tau = tl.min(tl.where(vs & (mass < thr), ck, NONE_HI), axis=0)
    tl.debug_barrier()  # (the scratch may be written again by this program)
    tau = tl.where(tau == NONE_HI, hi + 1, tau)
    return tl.where(f_lo < thr, lo + 1, tau), done, lo, hi


@_helper
def _score_buffer(bi, bx, by, valid, tau, m, r, inv_t, u, is_t0, GREEDY: tl.constexpr,
                  N: tl.constexpr):
    """Scores and the token on a buffer that holds every nucleus token in vocabulary order
    (ids bi, logits bx and by of both branches, ``valid`` entries): the aligned scores on N,
    the fallback to r = 0 when banning empties N, the first argmax and the inverse-CDF draw."""
    j = tl.arange(0, N)
    in_n = valid & (_key(bx) >= tau) & (bx > float("-inf"))
    ok = in_n & (by > float("-inf"))
    a = tl.where(ok, _aligned(bx, by, r), float("-inf"))
    n_in = tl.sum(in_n.to(tl.int32), axis=0)
    a_max = tl.max(a, axis=0)
    fallback = (a_max == float("-inf")) & (n_in > 0)  # banning emptied N: r taken as 0
    s = tl.where(fallback, tl.where(in_n, bx, float("-inf")), a)
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
    token = tl.max(tl.where(j == pick, bi, -1), axis=0)
    s_tok = tl.max(tl.where(j == pick, s, float("-inf")), axis=0)
    return token, s_tok, s_max, s_sum, n_in, fallback


@_helper
def _store_outputs(tok_ptr, lp_ptr, nsz_ptr, status_ptr, ratio_ptr, row, V, token, s_tok,
                   s_max, s_sum, n_in, fallback, r, inv_t, is_t0, status, empty):
    logprob = tl.where(is_t0, 0.0, (s_tok - s_max) * inv_t - tl.log(s_sum))
    status = status | tl.where(fallback, FALLBACK, 0) | tl.where(empty, BAD_INPUT, 0)
    logprob = tl.where(empty, float("-inf"), logprob)
    # Whatever happened above, never return an id outside [0, V).
    token = tl.where((token >= 0) & (token < V) & ~empty, token, 0)
    tl.store(tok_ptr + row, token.to(tl.int64))
    tl.store(lp_ptr + row, logprob)
    tl.store(nsz_ptr + row, n_in)
    tl.store(status_ptr + row, status.to(tl.int32))
    tl.store(ratio_ptr + row, tl.where(fallback, 0.0, r))


@_helper
def _publish(row, ctl_ptr, q_ptr):
    # Queue a job of the row for launch 2: its state is written (a barrier orders every
    # thread's stores before the release).
    tl.debug_barrier()
    j = tl.atomic_add(ctl_ptr + C_TAIL, 1, sem="acq_rel")
    tl.atomic_xchg(q_ptr + j, row, sem="release")


@_helper
def _arrive(ctr_ptr, row, S):
    """Count this program's arrival at the row; True for the last one, which resets the
    counter. The barrier and the acquire-release make every program's stores visible to the
    last one (whose own reads of them bypass L1: cache_modifier=".cg")."""
    tl.debug_barrier()
    prev = tl.atomic_add(ctr_ptr + row, 1, sem="acq_rel")
    last = prev == S - 1
    if last:
        tl.atomic_xchg(ctr_ptr + row, 0, sem="relaxed")
    return last


# ------------------------------------------------------------------- launch 1: the finish
@_helper
def _finish_row(row, S, V, t_ptr, t_val, p_ptr, p_val, r_ptr, r_val, e_ptr, e_val, x_ptr, x_val,
                u_ptr, seed_ptr, seed_val, off_ptr, off_val,
                tok_ptr, lp_ptr, nsz_ptr, status_ptr, ratio_ptr,
                part_f, part_i, buf_x, buf_y, buf_i, row_f, row_i, scr_k, scr_e, ctl_ptr, q_ptr,
                R_PER_ROW: tl.constexpr, T_PER_ROW: tl.constexpr, P_PER_ROW: tl.constexpr,
                KL: tl.constexpr,
                E_PER_ROW: tl.constexpr,
                X_PER_ROW: tl.constexpr, RNG: tl.constexpr, OFF_PER_ROW: tl.constexpr,
                GREEDY: tl.constexpr, KLOC: tl.constexpr, SP: tl.constexpr,
                NPIV: tl.constexpr):
    """The last chunk of a row to arrive: merge the partials, check the candidate superset,
    and finish the row on the buffer, or hand it to launch 2."""
    row64 = row.to(tl.int64)
    # (Parameters read again here: keeping them live from the chunk's work costs registers.)
    T = _row_param(t_ptr, t_val, row, T_PER_ROW)
    is_t0, inv_t = _temperature(T)
    top_p = _row_param(p_ptr, p_val, row, P_PER_ROW)
    ss = tl.arange(0, SP)
    live = ss < S
    pf = part_f + row64 * (PF * SP)
    pi = part_i + row64 * (PI * SP)
    m_s = tl.load(pf + P_M * SP + ss, mask=live, other=float("-inf"), cache_modifier=".cg")
    z_s = tl.load(pf + P_Z * SP + ss, mask=live, other=0.0, cache_modifier=".cg")
    c_s = tl.load(pf + P_CUT * SP + ss, mask=live, other=float("-inf"), cache_modifier=".cg")
    bad = tl.max(tl.load(pi + I_BAD * SP + ss, mask=live, other=0, cache_modifier=".cg"), axis=0)
    m = tl.max(m_s, axis=0)
    # Online softmax: Z_c was summed relative to m_c; rescale each to the row max.
    ref = tl.where(m == float("-inf"), 0.0, m)
    zsum = tl.sum(tl.where(m_s > float("-inf"), z_s * tl.exp((m_s - ref) * inv_t), 0.0), axis=0)
    if KL:
        wsum, mu, m2 = _moments(
            tl.load(pf + P_M0 * SP + ss, mask=live, other=float("-inf"), cache_modifier=".cg"),
            tl.load(pf + P_W * SP + ss, mask=live, other=0.0, cache_modifier=".cg"),
            tl.load(pf + P_MU * SP + ss, mask=live, other=0.0, cache_modifier=".cg"),
            tl.load(pf + P_M2 * SP + ss, mask=live, other=0.0, cache_modifier=".cg"), inv_t)
        r = _kl_ratio(wsum, m2, _row_param(e_ptr, e_val, row, E_PER_ROW),
                      _row_param(x_ptr, x_val, row, X_PER_ROW), is_t0)
    else:
        r = _row_param(r_ptr, r_val, row, R_PER_ROW)
    empty = m == float("-inf")  # no finite principle logit: nothing can be chosen
    cut = m - GAP * tl.where(is_t0, 0.0, T)  # in fp32, like every backend
    # top_p >= 1 keeps every token that passes the gap rule; T = 0 the ties at m.
    need = (top_p < 1.0) & ~empty & ~is_t0
    thr = top_p * zsum
    l_star = tl.max(c_s, axis=0)

    # The candidates: chunk s at slots s * KLOC + [0, n_s), in vocabulary order.
    NB: tl.constexpr = SP * KLOC
    jb = tl.arange(0, NB)
    ch = jb // KLOC
    n_e = tl.load(pi + I_N * SP + ch, mask=ch < S, other=0, cache_modifier=".cg")
    valid = (ch < S) & ((jb % KLOC) < n_e)
    bb = row64 * NB
    bx = tl.load(buf_x + bb + jb, mask=valid, other=float("-inf"), cache_modifier=".cg")
    k = _key(bx)
    e = tl.where(valid, tl.exp((bx - m) * inv_t), 0.0)
    mass = tl.sum(tl.where(valid & (bx >= l_star), e, 0.0), axis=0)
    # The superset check (module docstring).
    whole = (l_star <= cut) | (need & (mass >= thr))
    status = tl.where(bad > 0, BAD_INPUT, 0)
    rf = row_f + row64 * RF
    ri = row_i + row64 * (RI0 + NPIV)
    # The bracket (lo, hi] of tau's key: keys above hi are in N, keys at or below lo out.
    hi = _key(m)
    lo = tl.maximum(_key(tl.maximum(l_star, cut)) - 1, KEY_NEGINF)
    tau = _key(cut)  # top_p >= 1 or T == 0: N is everything from the cut up
    done = whole
    if whole & need:
        tau, done, lo, hi = _tau_search(k, e, valid, lo, hi, thr, 0.0, scr_k + row64 * NSMALL,
                                        scr_e + row64 * NSMALL, NPIV, PIV_GROUP, NSMALL, BUF_ROUNDS)
    if done:
        u = tl.zeros((), tl.float32)
        if not GREEDY:
            u = _uniform(u_ptr, seed_ptr, seed_val, off_ptr, off_val, row, RNG, OFF_PER_ROW)
        bi = tl.load(buf_i + bb + jb, mask=valid, other=0, cache_modifier=".cg")
        by = tl.load(buf_y + bb + jb, mask=valid, other=float("-inf"), cache_modifier=".cg")
        token, s_tok, s_max, s_sum, n_in, fallback = _score_buffer(
            bi, bx, by, valid, tau, m, r, inv_t, u, is_t0, GREEDY, NB)
        _store_outputs(tok_ptr, lp_ptr, nsz_ptr, status_ptr, ratio_ptr, row, V, token, s_tok,
                       s_max, s_sum, n_in, fallback, r, inv_t, is_t0, status, empty)
        tl.store(ri + S_PATH, PATH_BUFFER)
        tl.store(ri + S_JOBS, 0)
    else:
        if ~whole:
            # The candidates do not hold N: keys at or above L* are in N (their mass-above
            # is below the buffer's, which is below thr); keys at or below the gap rule's
            # cut, or below the mass bound vb of the module docstring, are out (a margin of
            # 2 for fp32 rounding).
            arg = (1.0 - top_p) * zsum / (2.0 * V)
            vb = tl.where(arg > 0.0, m + T * tl.log(tl.where(arg > 0.0, arg, 1.0)),
                          float("-inf"))
            lo = tl.maximum(_key(tl.maximum(cut, vb)) - 1, KEY_NEGINF)
            hi = tl.minimum(_key(l_star) - 1, _key(m))
        # Hand the row to launch 2: a SEARCH of (lo, hi], or a SCORE when tau is known.
        search = need & (hi.to(tl.int64) - lo.to(tl.int64) > 1)
        tau = tl.where(need, lo + 1, _key(cut))
        tl.store(rf + R_M, m)
        tl.store(rf + R_THR, thr)
        tl.store(rf + R_R, r)
        tl.store(ri + S_PATH, tl.where(search, PATH_SEARCH, PATH_SCORE))
        tl.store(ri + S_JOBS, 1)
        tl.store(ri + S_MODE, tl.where(search, MODE_SEARCH, MODE_SCORE))
        tl.store(ri + S_LO, lo)
        tl.store(ri + S_HI, hi)
        tl.store(ri + S_TAU, tau)
        tl.store(ri + S_STATUS, status)
        if search:
            tl.store(ri + S_PIV + tl.arange(0, NPIV), _pivots(lo, hi, NPIV))
        tl.atomic_add(ctl_ptr + C_ACTIVE, 1, sem="relaxed")
        _publish(row, ctl_ptr, q_ptr)


# ---------------------------------------------------------------------------- launch 1
# Seeds and offsets change from call to call: never specialise the kernel on their values
# (a decoding loop would otherwise compile new variants as the offset passes 1 or 16).
@triton.jit(do_not_specialize=["seed_val", "off_val"])
def la_chunk_kernel(
    zp_ptr, z0_ptr, stride_p, stride_0,
    r_ptr, r_val, t_ptr, t_val, p_ptr, p_val, e_ptr, e_val, x_ptr, x_val,
    u_ptr, seed_ptr, seed_val, off_ptr, off_val,
    tok_ptr, lp_ptr, nsz_ptr, status_ptr, ratio_ptr,
    part_f, part_i, buf_x, buf_y, buf_i, row_f, row_i, scr_k, scr_e, ctr_ptr, ctl_ptr, q_ptr,
    V, S, ROW0,
    R_PER_ROW: tl.constexpr, T_PER_ROW: tl.constexpr, P_PER_ROW: tl.constexpr,
    KL: tl.constexpr, E_PER_ROW: tl.constexpr, X_PER_ROW: tl.constexpr,
    RNG: tl.constexpr, OFF_PER_ROW: tl.constexpr, GREEDY: tl.constexpr,
    CHUNK: tl.constexpr, KLOC: tl.constexpr, SP: tl.constexpr, NPIV: tl.constexpr,
    L: tl.constexpr, NBIS: tl.constexpr,
):
    # Grid (S, rows): program (s, i) reads logits [s * CHUNK, (s + 1) * CHUNK) of row
    # ROW0 + i of both branches (the launcher launches at most 65535 rows at a time).
    # zp, z0: [B, V] (fp32/bf16/fp16, last dim contiguous); outputs: [B] (ratio_ptr: the
    # ratio used). KL: kl mode, r from the budget e (eps) and the cap x (max_ratio) instead
    # of r_ptr/r_val. RNG (a constants.RandomSource): RNG_UNIFORMS = uniforms given in
    # u_ptr, RNG_SEED = one seed (counter = row, offset), RNG_ROW_SEEDS = per-row seeds
    # (counter = 0, offset), RNG_DEVICE_SEED = one seed read from seed_ptr (counter = row,
    # offset). The workspace (part_*, buf_*, row_*) and the counters (ctr, ctl, q) are
    # described at the top of this module.
    s = tl.program_id(0)
    row = tl.program_id(1) + ROW0  # (a grid's second axis stops at 65535)
    # int64 row offsets: row * stride overflows int32 once B * V passes 2**31.
    row64 = row.to(tl.int64)

    # ---- the one read of both branches: the chunk as one register tile ----
    offs = s * CHUNK + tl.arange(0, CHUNK)
    msk = offs < V
    x = tl.load(zp_ptr + row64 * stride_p + offs, mask=msk, other=float("-inf"),
                eviction_policy="evict_first").to(tl.float32)
    y = tl.load(z0_ptr + row64 * stride_0 + offs, mask=msk, other=float("-inf"),
                eviction_policy="evict_first").to(tl.float32)
    T = _row_param(t_ptr, t_val, row, T_PER_ROW)
    is_t0, inv_t = _temperature(T)
    x, bx = _sanitize(x)
    y, by = _sanitize(y)
    bad = tl.max((bx | by).to(tl.int32), axis=0)
    m_c = tl.max(x, axis=0)
    ref = tl.where(m_c == float("-inf"), 0.0, m_c)
    z_c = tl.sum(tl.exp((x - ref) * inv_t), axis=0)
    pf = part_f + row64 * (PF * SP) + s
    pi = part_i + row64 * (PI * SP) + s
    if KL:
        # The chunk's moments of g = (z_p - z_0) / T under softmax(z_0 / T), over the tokens
        # finite in both branches, relative to the chunk's max m0 of z_0: two passes over
        # the tile (the mean, then the spread about it; nothing like E[g^2] - E[g]^2).
        both = (x > float("-inf")) & (y > float("-inf"))
        m0 = tl.max(tl.where(both, y, float("-inf")), axis=0)
        ref0 = tl.where(m0 == float("-inf"), 0.0, m0)
        w = tl.where(both, tl.exp((y - ref0) * inv_t), 0.0)
        g = tl.where(both, (x - y) * inv_t, 0.0)
        wsum = tl.sum(w, axis=0)
        mu = tl.sum(tl.where(w > 0.0, w * g, 0.0), axis=0) / tl.where(wsum > 0.0, wsum, 1.0)
        dev = g - mu
        m2 = tl.sum(tl.where(w > 0.0, w * dev * dev, 0.0), axis=0)
        tl.store(pf + P_M0 * SP, m0)
        tl.store(pf + P_W * SP, wsum)
        tl.store(pf + P_MU * SP, mu)
        tl.store(pf + P_M2 * SP, m2)

    # ---- the chunk's candidates, in vocabulary order, at its slots of the buffer ----
    c_s = _chunk_cut(x, m_c, tl.where(is_t0, 0.0, T), KLOC, L, NBIS)
    sel = msk & (x >= c_s) & (x > float("-inf"))
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    put = sel & (pos < KLOC)
    dst = row64 * (SP * KLOC) + s * KLOC + pos
    tl.store(buf_x + dst, x, mask=put)
    tl.store(buf_y + dst, y, mask=put)
    tl.store(buf_i + dst, offs, mask=put)
    tl.store(pf + P_M * SP, m_c)
    tl.store(pf + P_Z * SP, z_c)
    tl.store(pf + P_CUT * SP, c_s)
    tl.store(pi + I_BAD * SP, bad)
    tl.store(pi + I_N * SP, tl.minimum(tl.sum(sel.to(tl.int32), axis=0), KLOC))

    # ---- the last chunk of the row to arrive finishes it ----
    if _arrive(ctr_ptr, row, S):
        _finish_row(row, S, V, t_ptr, t_val, p_ptr, p_val, r_ptr, r_val, e_ptr, e_val, x_ptr,
                    x_val, u_ptr, seed_ptr, seed_val, off_ptr, off_val,
                    tok_ptr, lp_ptr, nsz_ptr, status_ptr, ratio_ptr,
                    part_f, part_i, buf_x, buf_y, buf_i, row_f, row_i, scr_k, scr_e, ctl_ptr,
                    q_ptr, R_PER_ROW, T_PER_ROW, P_PER_ROW, KL, E_PER_ROW, X_PER_ROW, RNG,
                    OFF_PER_ROW, GREEDY, KLOC, SP, NPIV)


# ---------------------------------------------------------------------------- launch 2
@_helper
def _search_task(rowp, row0, s, V, m, r, inv_t, lo, hi, ri, kf, ki, flat, flat_i,
                 CHUNK: tl.constexpr, FSLOT: tl.constexpr, NPIV: tl.constexpr,
                 SP: tl.constexpr):
    """A SEARCH job's chunk task: the mass strictly above each pivot, and the chunk's logits
    in (lo, hi] with their ids copied to its slots of the flat buffer (as many as fit; the
    count is kept). If they all fit, also the SCORE reductions of the chunk's tokens above
    hi (in N whatever tau is): the job's last task can then finish the row at once."""
    offs = s * CHUNK + tl.arange(0, CHUNK)
    msk = offs < V
    x = _load_row(rowp, offs, msk)
    k = _key(x)
    e = tl.exp((x - m) * inv_t)
    for i in tl.static_range(NPIV):
        p = tl.load(ri + S_PIV + i, cache_modifier=".cg")
        tl.store(kf + i * SP + s, tl.sum(tl.where(k > p, e, 0.0), axis=0))
    sel = msk & (k > lo) & (k <= hi) & (x > float("-inf"))
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    put = sel & (pos < FSLOT)
    tl.store(flat + s * FSLOT + pos, x, mask=put)
    tl.store(flat_i + s * FSLOT + pos, offs, mask=put)
    n_sel = tl.sum(sel.to(tl.int32), axis=0)
    tl.store(ki + J_EMIT * SP + s, n_sel)
    if n_sel <= FSLOT:
        _score_reduce(row0, x, k > hi, offs, msk, s, m, r, inv_t, kf, ki, NPIV, SP)


@_helper
def _score_reduce(row0, x, keep, offs, msk, s, m, r, inv_t, kf, ki, NPIV: tl.constexpr,
                  SP: tl.constexpr):
    """The chunk's tokens in ``keep`` (nucleus tokens) reduced to their count, max aligned
    score and first argmax, softmax sum relative to that max, and the plain scores' sum and
    first argmax (for a row that falls back); the without-branch is read at them only."""
    in_n = msk & keep & (x > float("-inf"))
    y = _load_row(row0, offs, in_n)
    ok = in_n & (y > float("-inf"))
    a = tl.where(ok, _aligned(x, y, r), float("-inf"))
    a_max = tl.max(a, axis=0)
    ref = tl.where(a_max == float("-inf"), 0.0, a_max)
    tl.store(kf + (NPIV + K_AMAX) * SP + s, a_max)
    tl.store(kf + (NPIV + K_ASUM) * SP + s, tl.sum(tl.exp((a - ref) * inv_t), axis=0))
    tl.store(kf + (NPIV + K_PSUM) * SP + s,
             tl.sum(tl.where(in_n, tl.exp((x - m) * inv_t), 0.0), axis=0))
    tl.store(ki + J_N * SP + s, tl.sum(in_n.to(tl.int32), axis=0))
    tl.store(ki + J_AARG * SP + s,
             tl.min(tl.where((a == a_max) & (a > float("-inf")), offs, NO_IDX), axis=0))
    tl.store(ki + J_PARG * SP + s, tl.min(tl.where(in_n & (x == m), offs, NO_IDX), axis=0))


@_helper
def _score_task(rowp, row0, s, V, m, r, inv_t, tau, kf, ki, CHUNK: tl.constexpr,
                NPIV: tl.constexpr, SP: tl.constexpr):
    """A SCORE job's chunk task: the reductions of the chunk's nucleus tokens (keys >= tau)."""
    offs = s * CHUNK + tl.arange(0, CHUNK)
    msk = offs < V
    x = _load_row(rowp, offs, msk)
    _score_reduce(row0, x, _key(x) >= tau, offs, msk, s, m, r, inv_t, kf, ki, NPIV, SP)


@_helper
def _flat_entries(S, ki, flat, FSLOT: tl.constexpr, SP: tl.constexpr):
    """A row's flat buffer: chunk c's entries at slots c * FSLOT + [0, count), in vocabulary
    order. Returns (slot indices, which slots hold an entry, their logits; -inf elsewhere)."""
    NF: tl.constexpr = SP * FSLOT
    jf = tl.arange(0, NF)
    ch = jf // FSLOT
    cnt = tl.load(ki + J_EMIT * SP + ch, mask=ch < S, other=0, cache_modifier=".cg")
    valid = (ch < S) & ((jf % FSLOT) < cnt)
    x = tl.load(flat + jf, mask=valid, other=float("-inf"), cache_modifier=".cg")
    return jf, valid, x


@_helper
def _search_merge(row, S, m, inv_t, thr, ri, kf, ki, flat, scr_k, scr_e, FSLOT: tl.constexpr,
                  NPIV: tl.constexpr, SP: tl.constexpr):
    """The last task of a SEARCH job: tau on the flat buffer if every chunk's bracket
    fitted, else a narrower bracket. Returns (done, tau): done when tau is resolved, so that
    the row is finished from the chunks' reductions of their tokens above hi and the
    buffer's tokens from tau; otherwise the next job (SCORE or SEARCH) is in the row state."""
    ss = tl.arange(0, SP)
    live = ss < S
    ii = tl.arange(0, NPIV)
    mass = tl.sum(tl.load(kf + ii[:, None] * SP + ss[None, :], mask=live[None, :], other=0.0,
                          cache_modifier=".cg"), axis=1)
    n_e = tl.load(ki + J_EMIT * SP + ss, mask=live, other=0, cache_modifier=".cg")
    fits = tl.max(n_e, axis=0) <= FSLOT
    piv = tl.load(ri + S_PIV + ii, cache_modifier=".cg")
    lo = tl.load(ri + S_LO, cache_modifier=".cg")
    hi = tl.load(ri + S_HI, cache_modifier=".cg")
    done = tl.zeros((), tl.int1)
    if fits:
        jf, valid, fx = _flat_entries(S, ki, flat, FSLOT, SP)
        e = tl.where(valid, tl.exp((fx - m) * inv_t), 0.0)
        f_hi = tl.sum(tl.where(ii == NPIV - 1, mass, 0.0), axis=0)  # the last pivot is hi
        tau, done, lo, hi = _tau_search(_key(fx), e, valid, lo, hi, thr, f_hi, scr_k, scr_e,
                                        NPIV, PIV_GROUP, NSMALL, BUF_ROUNDS)
    else:
        lo, hi = _bracket(piv, mass, thr, NPIV)
        tau = lo + 1  # (lo, hi] = {hi} when it is not searched any more
    more = ~done & (hi.to(tl.int64) - lo.to(tl.int64) > 1)
    if more:
        tl.store(ri + S_PIV + ii, _pivots(lo, hi, NPIV))
    tl.store(ri + S_LO, lo)
    tl.store(ri + S_HI, hi)
    tl.store(ri + S_TAU, tl.where(done, tau, lo + 1))
    tl.store(ri + S_MODE, tl.where(more, MODE_SEARCH, MODE_SCORE))
    return done, tau


@_helper
def _score_merge(row, S, V, m, r, inv_t, tau, is_t0, rowp, row0, kf, ki, flat, flat_i,
                 has_buf, u_ptr, seed_ptr, seed_val, off_ptr, off_val,
                 tok_ptr, lp_ptr, nsz_ptr, status_ptr, ratio_ptr, status,
                 RNG: tl.constexpr, OFF_PER_ROW: tl.constexpr, GREEDY: tl.constexpr,
                 CHUNK: tl.constexpr, NPIV: tl.constexpr, SP: tl.constexpr,
                 FSLOT: tl.constexpr):
    """The row's finish in launch 2: merge the chunks' reductions in chunk order (has_buf:
    and the nucleus tokens of the flat buffer, tau and up, which a SEARCH job's chunks left
    out of theirs); for a sampled row, find the chunk where the running mass crosses u times
    the total and scan that one chunk in vocabulary order."""
    ss = tl.arange(0, SP)
    live = ss < S
    n_in = tl.sum(tl.load(ki + J_N * SP + ss, mask=live, other=0, cache_modifier=".cg"), axis=0)
    amax_s = tl.load(kf + (NPIV + K_AMAX) * SP + ss, mask=live, other=float("-inf"),
                     cache_modifier=".cg")
    asum_s = tl.load(kf + (NPIV + K_ASUM) * SP + ss, mask=live, other=0.0, cache_modifier=".cg")
    psum_s = tl.load(kf + (NPIV + K_PSUM) * SP + ss, mask=live, other=0.0, cache_modifier=".cg")
    aarg_s = tl.load(ki + J_AARG * SP + ss, mask=live, other=NO_IDX, cache_modifier=".cg")
    parg_s = tl.load(ki + J_PARG * SP + ss, mask=live, other=NO_IDX, cache_modifier=".cg")
    a_max = tl.max(amax_s, axis=0)
    a_arg = tl.min(tl.where((amax_s == a_max) & (amax_s > float("-inf")), aarg_s, NO_IDX),
                   axis=0)
    p_arg = tl.min(parg_s, axis=0)
    # The buffer's entries (has_buf): chunk c at slots c * FSLOT + [0, count), vocabulary
    # order. Their weights are taken relative to the merged max and added to their chunks'.
    wa_b = tl.zeros((SP,), tl.float32)
    wp_b = tl.zeros((SP,), tl.float32)
    if has_buf:
        jf, valid, bx = _flat_entries(S, ki, flat, FSLOT, SP)
        bi = tl.load(flat_i + jf, mask=valid, other=0, cache_modifier=".cg")
        b_in = valid & (_key(bx) >= tau) & (bx > float("-inf"))
        by = _load_row(row0, bi, b_in)  # the without-branch at these nucleus tokens only
        ba = tl.where(b_in & (by > float("-inf")), _aligned(bx, by, r), float("-inf"))
        n_in += tl.sum(b_in.to(tl.int32), axis=0)
        b_max = tl.max(ba, axis=0)
        b_arg = tl.min(tl.where((ba == b_max) & (ba > float("-inf")), bi, NO_IDX), axis=0)
        a_arg = tl.where(b_max > a_max, b_arg,
                         tl.where(b_max == a_max, tl.minimum(a_arg, b_arg), a_arg))
        a_max = tl.maximum(a_max, b_max)
        p_arg = tl.minimum(p_arg, tl.min(tl.where(b_in & (bx == m), bi, NO_IDX), axis=0))
        ref_b = tl.where(a_max == float("-inf"), 0.0, a_max)
        wa_b = tl.sum(tl.reshape(tl.exp((ba - ref_b) * inv_t), (SP, FSLOT)), axis=1)
        wp_b = tl.sum(tl.reshape(tl.where(b_in, tl.exp((bx - m) * inv_t), 0.0), (SP, FSLOT)),
                      axis=1)
    ref = tl.where(a_max == float("-inf"), 0.0, a_max)
    wa_s = tl.where(amax_s > float("-inf"), asum_s * tl.exp((amax_s - ref) * inv_t), 0.0) + wa_b
    wp_s = psum_s + wp_b
    fallback = (a_max == float("-inf")) & (n_in > 0)  # banning emptied N: r taken as 0
    r_eff = tl.where(fallback, 0.0, r)
    w_s = tl.where(fallback, wp_s, wa_s)
    s_sum = tl.sum(w_s, axis=0)
    s_max = tl.where(fallback, m, a_max)
    token = tl.where(fallback, p_arg, a_arg)
    s_tok = s_max
    if not GREEDY:
        u = _uniform(u_ptr, seed_ptr, seed_val, off_ptr, off_val, row, RNG, OFF_PER_ROW)
        target = u * s_sum
        cum = tl.cumsum(w_s, axis=0)
        hit = tl.min(tl.where((cum > target) & (w_s > 0.0), ss, SP), axis=0)
        last = tl.max(tl.where(w_s > 0.0, ss, -1), axis=0)
        sc = tl.where(hit < SP, hit, last)  # the chunk to scan
        before = tl.sum(tl.where(ss == sc - 1, cum, 0.0), axis=0)
        offs = sc * CHUNK + tl.arange(0, CHUNK)
        msk = (offs < V) & (sc >= 0)
        x = _load_row(rowp, offs, msk)
        in_n = msk & (_key(x) >= tau) & (x > float("-inf"))
        y = _load_row(row0, offs, in_n)
        ok = tl.where(fallback, in_n, in_n & (y > float("-inf")))
        sv = tl.where(ok, _aligned(x, y, r_eff), float("-inf"))
        w = tl.exp((sv - s_max) * inv_t)
        c = before + tl.cumsum(w, axis=0)
        at = tl.min(tl.where((c > target) & (w > 0.0), offs, NO_IDX), axis=0)
        end = tl.max(tl.where(w > 0.0, offs, -1), axis=0)
        # Rounding can leave u * S just above the final running sum: take the last token.
        pick = tl.where((hit < SP) & (at < NO_IDX), at, end)
        pick_s = tl.max(tl.where(offs == pick, sv, float("-inf")), axis=0)
        # T == 0 rows in a sampled batch are greedy: keep the first max.
        draw = ~is_t0 & (sc >= 0)
        token = tl.where(draw, pick, token)
        s_tok = tl.where(draw, pick_s, s_tok)
    _store_outputs(tok_ptr, lp_ptr, nsz_ptr, status_ptr, ratio_ptr, row, V, token, s_tok,
                   s_max, s_sum, n_in, fallback, r, inv_t, is_t0, status, m == float("-inf"))


@_noinline
def _flat_task(row, s, zp_ptr, z0_ptr, stride_p, stride_0, t_ptr, t_val, V,
               row_f, row_i, k2_f, k2_i, flat, flat_i,
               T_PER_ROW: tl.constexpr, CHUNK: tl.constexpr, FSLOT: tl.constexpr,
               SP: tl.constexpr, NPIV: tl.constexpr):
    """One chunk task of a launch-2 job (its row's state says which)."""
    row64 = row.to(tl.int64)
    rf = row_f + row64 * RF
    ri = row_i + row64 * (RI0 + NPIV)
    kf = k2_f + row64 * ((NPIV + KF_EXTRA) * SP)
    ki = k2_i + row64 * (KI * SP)
    T = _row_param(t_ptr, t_val, row, T_PER_ROW)
    is_t0, inv_t = _temperature(T)
    m = tl.load(rf + R_M, cache_modifier=".cg")
    r = tl.load(rf + R_R, cache_modifier=".cg")
    rowp = zp_ptr + row64 * stride_p
    row0 = z0_ptr + row64 * stride_0
    if tl.load(ri + S_MODE, cache_modifier=".cg") == MODE_SEARCH:
        _search_task(rowp, row0, s, V, m, r, inv_t, tl.load(ri + S_LO, cache_modifier=".cg"),
                     tl.load(ri + S_HI, cache_modifier=".cg"), ri, kf, ki,
                     flat + row64 * (SP * FSLOT), flat_i + row64 * (SP * FSLOT), CHUNK, FSLOT,
                     NPIV, SP)
    else:
        _score_task(rowp, row0, s, V, m, r, inv_t, tl.load(ri + S_TAU, cache_modifier=".cg"),
                    kf, ki, CHUNK, NPIV, SP)


@_noinline
def _flat_merge(row, zp_ptr, z0_ptr, stride_p, stride_0, t_ptr, t_val, V, S,
                u_ptr, seed_ptr, seed_val, off_ptr, off_val,
                tok_ptr, lp_ptr, nsz_ptr, status_ptr, ratio_ptr,
                row_f, row_i, k2_f, k2_i, flat, flat_i, scr_k, scr_e, ctl_ptr, q_ptr,
                T_PER_ROW: tl.constexpr, RNG: tl.constexpr, OFF_PER_ROW: tl.constexpr,
                GREEDY: tl.constexpr, CHUNK: tl.constexpr, FSLOT: tl.constexpr,
                SP: tl.constexpr, NPIV: tl.constexpr):
    """The last task of a launch-2 job to arrive: merge, then publish the row's next job or
    write its outputs. (A function of its own: what the task held is dead here.)"""
    row64 = row.to(tl.int64)
    rowp = zp_ptr + row64 * stride_p
    row0 = z0_ptr + row64 * stride_0
    rf = row_f + row64 * RF
    ri = row_i + row64 * (RI0 + NPIV)
    kf = k2_f + row64 * ((NPIV + KF_EXTRA) * SP)
    ki = k2_i + row64 * (KI * SP)
    fl = flat + row64 * (SP * FSLOT)
    fli = flat_i + row64 * (SP * FSLOT)
    T = _row_param(t_ptr, t_val, row, T_PER_ROW)
    is_t0, inv_t = _temperature(T)
    m = tl.load(rf + R_M, cache_modifier=".cg")
    r = tl.load(rf + R_R, cache_modifier=".cg")
    tau = tl.load(ri + S_TAU, cache_modifier=".cg")
    status = tl.load(ri + S_STATUS, cache_modifier=".cg")
    finish = tl.load(ri + S_MODE, cache_modifier=".cg") != MODE_SEARCH
    has_buf = tl.zeros((), tl.int1)
    if ~finish:
        finish, tau = _search_merge(row, S, m, inv_t, tl.load(rf + R_THR, cache_modifier=".cg"),
                                    ri, kf, ki, fl, scr_k + row64 * NSMALL,
                                    scr_e + row64 * NSMALL, FSLOT, NPIV, SP)
        # Resolved: N is the chunks' tokens above the job's hi (reduced by the chunks
        # already) and the buffer's tokens from tau up.
        has_buf = finish
        if ~finish:
            tl.store(ri + S_JOBS, tl.load(ri + S_JOBS, cache_modifier=".cg") + 1)
            _publish(row, ctl_ptr, q_ptr)
    if finish:
        _score_merge(row, S, V, m, r, inv_t, tau, is_t0, rowp, row0, kf, ki, fl, fli, has_buf,
                     u_ptr, seed_ptr, seed_val, off_ptr, off_val,
                     tok_ptr, lp_ptr, nsz_ptr, status_ptr, ratio_ptr, status, RNG,
                     OFF_PER_ROW, GREEDY, CHUNK, NPIV, SP, FSLOT)
        tl.debug_barrier()
        tl.atomic_add(ctl_ptr + C_ACTIVE, -1, sem="release")


@triton.jit(do_not_specialize=["seed_val", "off_val"])
def la_flat_kernel(
    zp_ptr, z0_ptr, stride_p, stride_0, t_ptr, t_val,
    u_ptr, seed_ptr, seed_val, off_ptr, off_val,
    tok_ptr, lp_ptr, nsz_ptr, status_ptr, ratio_ptr,
    row_f, row_i, k2_f, k2_i, flat, flat_i, scr_k, scr_e, ctr_ptr, ctl_ptr, q_ptr,
    V, S, NPROG, QMAX,
    T_PER_ROW: tl.constexpr, RNG: tl.constexpr, OFF_PER_ROW: tl.constexpr,
    GREEDY: tl.constexpr, CHUNK: tl.constexpr, FSLOT: tl.constexpr, SP: tl.constexpr,
    NPIV: tl.constexpr, QBLOCK: tl.constexpr,
):
    # A persistent grid of NPROG programs serving the job queue that launch 1 filled (the
    # rows it could not finish on its candidate buffer); see the module docstring. When
    # launch 1 queued nothing, every program reads the tail and leaves.
    tail0 = tl.load(ctl_ptr + C_TAIL, cache_modifier=".cg")
    if tail0 > 0:
        go = tl.full((), 1, tl.int32)
        while go > 0:
            t = tl.atomic_add(ctl_ptr + C_HEAD, 1, sem="relaxed")
            j = t // S
            s = t - j * S
            state = tl.zeros((), tl.int32)  # 0: waiting, 1: job j is published, 2: no more
            row = tl.full((), -1, tl.int32)
            while state == 0:
                # Poll with volatile loads (L2, no atomics on the hot addresses); read the
                # tail before the active count (see the module docstring).
                tail = tl.load(ctl_ptr + C_TAIL, volatile=True)
                qv = tl.load(q_ptr + tl.minimum(j, QMAX - 1), volatile=True)
                act = tl.load(ctl_ptr + C_ACTIVE, volatile=True)
                state = tl.where((j < tail) & (qv >= 0), 1,
                                 tl.where((j >= tail) & (act == 0), 2, 0))
                row = qv
            if state == 1:
                # Acquire: the publisher's release covered the row's state.
                row = tl.atomic_add(q_ptr + j, 0, sem="acquire")
                _flat_task(row, s, zp_ptr, z0_ptr, stride_p, stride_0, t_ptr, t_val, V,
                           row_f, row_i, k2_f, k2_i, flat, flat_i, T_PER_ROW, CHUNK, FSLOT,
                           SP, NPIV)
                if _arrive(ctr_ptr, row, S):
                    _flat_merge(row, zp_ptr, z0_ptr, stride_p, stride_0, t_ptr, t_val, V, S,
                                u_ptr, seed_ptr, seed_val, off_ptr, off_val,
                                tok_ptr, lp_ptr, nsz_ptr, status_ptr, ratio_ptr,
                                row_f, row_i, k2_f, k2_i, flat, flat_i, scr_k, scr_e, ctl_ptr,
                                q_ptr, T_PER_ROW, RNG, OFF_PER_ROW, GREEDY, CHUNK, FSLOT, SP,
                                NPIV)
            go = tl.where(state == 1, 1, 0)
        # The last program to leave resets the queue for the next call.
        tl.debug_barrier()
        gone = tl.atomic_add(ctl_ptr + C_EXITS, 1, sem="acq_rel")
        if gone == NPROG - 1:
            n = tl.atomic_xchg(ctl_ptr + C_TAIL, 0, sem="acq_rel")
            for start in range(0, n, QBLOCK):
                jq = start + tl.arange(0, QBLOCK)
                tl.store(q_ptr + jq, tl.full((QBLOCK,), -1, tl.int32), mask=jq < n)
            tl.atomic_xchg(ctl_ptr + C_HEAD, 0, sem="relaxed")
            tl.atomic_xchg(ctl_ptr + C_EXITS, 0, sem="release")


# ---------------------------------------------------------------------------- launcher
LEVELS = 16  # ladder levels of a chunk (d = 0.75 T ... 9 T, 12, 16, 24, 80)
BISECT = 5  # bisection steps over LEVELS + 1 states
K_PIVOTS = 16  # pivots per bracketing round (2 ends, 7 in key space, 7 in value)
BUF_SLOTS = 1024  # candidate slots per row (KLOC = BUF_SLOTS / chunks, at least MIN_KLOC)
FLAT_SLOTS = 1024  # flat-buffer slots per row for a SEARCH job's bracket
MIN_KLOC = 16
MIN_FSLOT = 16
MAX_CHUNKS = 64  # chunks per row at most (CHUNK grows past MIN_CHUNK for larger V)
MIN_CHUNK = 4096
QBLOCK = 256
MAX_GRID_ROWS = 65535  # rows a launch of la_chunk_kernel takes (its grid's second axis)
WORKSPACES = 8  # workspaces kept (per device, stream and cut of the row)


#: How a [B, V] step is cut: logits per chunk, chunks per row S and their power of two SP,
#: candidate slots per chunk, flat-buffer slots per chunk, warps, launch-2 programs.
Plan = collections.namedtuple("Plan", "chunk S SP kloc fslot warps nprog")


_SMS = {}


def _sm_count(device):
    if device not in _SMS:
        import torch

        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


_PLANS = {}


def plan(B, V, device, chunk=None, kloc=None, fslot=None, nprog=None):
    """The cut of a row (module docstring): chunks of MIN_CHUNK logits or more, at most
    MAX_CHUNKS per row, every chunk a program of launch 1 whatever B (which the cut does not
    depend on). ``chunk``, ``kloc``, ``fslot`` and ``nprog`` override the defaults (powers
    of two; tests use small ones)."""
    key = (V, device, chunk, kloc, fslot, nprog)
    p = _PLANS.get(key)
    if p is None:
        p = _PLANS[key] = _plan(V, device, chunk, kloc, fslot, nprog)
    return p


def _plan(V, device, chunk, kloc, fslot, nprog):
    if chunk is None:
        chunk = max(MIN_CHUNK, triton.next_power_of_2(triton.cdiv(V, MAX_CHUNKS)))
        chunk = min(chunk, max(16, triton.next_power_of_2(V)))
    S = triton.cdiv(V, chunk)
    SP = triton.next_power_of_2(S)
    if kloc is None:
        kloc = min(chunk, max(MIN_KLOC, BUF_SLOTS // SP))
    if fslot is None:
        fslot = min(chunk, max(MIN_FSLOT, FLAT_SLOTS // SP))
    # 16 logits a thread: 126 registers at 4096 logits and 8 warps (sm_90,
    # tests/test_compile.py), so two programs an SM. (Past V = 262144 the chunks grow to
    # 8192 logits and 16 warps, where a few registers spill.)
    warps = min(16, max(4, chunk // 512))
    if nprog is None:
        nprog = _sm_count(device) if device.type == "cuda" else 2
    return Plan(chunk, S, SP, kloc, fslot, warps, nprog)


def _param(x, device, dtype):
    # A per-row parameter: (pointer tensor, scalar value, is_per_row).
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype).contiguous(), 0, True
    return _dummy(device, dtype), x, False


_DUMMIES = {}
_WORKSPACES = {}


def _dummy(device, dtype):
    import torch

    key = (device, dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.empty(1, device=device, dtype=dtype)
    return _DUMMIES[key]


def max_jobs(NPIV):
    """The most launch-2 jobs a row can take: SEARCH rounds until the bracket spans one key
    (the NPIV / 2 - 1 key-space pivots cut it into NPIV / 2 parts a round, from at most
    2**32 keys), then one SCORE; one more for safety."""
    bits = ((NPIV - 2) // 2 + 1).bit_length() - 1  # log2 of the parts a round
    return -(-32 // bits) + 2


def _new_workspace(B, p, NPIV, device):
    """The workspace and the counters of B rows (module docstring). Counters start at zero
    and the queue at -1; each launch leaves them so for the next call."""
    import torch

    sizes = dict(part_f=PF.value * p.SP, part_i=PI.value * p.SP, buf_x=p.SP * p.kloc,
                 buf_y=p.SP * p.kloc, buf_i=p.SP * p.kloc, row_f=RF.value,
                 row_i=RI0.value + NPIV, k2_f=(NPIV + KF_EXTRA.value) * p.SP,
                 k2_i=KI.value * p.SP, flat=p.SP * p.fslot, flat_i=p.SP * p.fslot,
                 scr_k=NSMALL.value,
                 scr_e=NSMALL.value)
    # One allocation, every region 16-element aligned (Triton specialises on alignment).
    per = {k: triton.cdiv(B * v, 16) * 16 for k, v in sizes.items()}
    words = torch.empty(sum(per.values()), device=device, dtype=torch.int32)
    ws, at = {"rows": B}, 0
    for k, n in per.items():
        view = words[at:at + n]
        ws[k] = view.view(torch.float32) if k in ("part_f", "buf_x", "buf_y", "row_f",
                                                  "k2_f", "flat", "scr_e") else view
        at += n
    qmax = B * max_jobs(NPIV)
    ctl = torch.zeros(triton.cdiv(B + 4, 16) * 16 + qmax, device=device, dtype=torch.int32)
    ws["ctr"], ws["ctl"], ws["q"] = ctl[:B], ctl[B:B + 4], ctl[-qmax:]
    ws["q"].fill_(-1)
    ws["qmax"] = qmax
    return ws


def _stream_id(device):
    import torch

    if device.type != "cuda":
        return 0
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # a plain int, no object
    index = device.index if device.index is not None else torch.cuda.current_device()
    return get(index) if get is not None else torch.cuda.current_stream(device).cuda_stream


def _workspace(B, p, NPIV, device):
    """A workspace for at least B rows of this cut, reused by later calls on the same
    stream (launches on one stream run in order, so a call never overwrites what an
    earlier one still reads; a smaller batch uses the first rows of a larger workspace). A
    call being captured in a CUDA graph gets one of its own, which the graph keeps (its
    allocation and zeroing are captured too). At most WORKSPACES are kept."""
    import torch

    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _new_workspace(B, p, NPIV, device)
    key = (device, _stream_id(device), p, NPIV)
    ws = _WORKSPACES.pop(key, None)
    if ws is None or ws["rows"] < B:
        ws = _new_workspace(triton.cdiv(B, 64) * 64, p, NPIV, device)
    _WORKSPACES[key] = ws  # most recently used last
    while len(_WORKSPACES) > WORKSPACES:
        _WORKSPACES.pop(next(iter(_WORKSPACES)))
    return ws


def la_step(logits_p, logits_0, ratio, temperature, top_p, *, greedy, u=None, seed=None,
            offset=0, kl=None, chunk=None, kloc=None, fslot=None, nprog=None, pivots=K_PIVOTS,
            paths=False, events=None):
    """Launch the step over a [B, V] batch (no host synchronisation): two launches.

    logits_p, logits_0: [B, V] fp32/bf16/fp16 on one device, last dim contiguous.
    ratio, temperature, top_p: a Python number or a [B] tensor each (already validated).
    ``kl``: kl mode, ``(kl_budget, max_ratio)`` (numbers or [B] tensors): the ratio
    of each row is computed from launch 1's moments and ``ratio`` is ignored (may be None).
    Randomness (sampling only): ``u`` ([B] uniforms in [0, 1)), or ``seed`` (an int: the
    counter is (row, offset); the same for a 0-d int64 tensor, read on the device; or a [B]
    int64 tensor of per-row seeds: the counter is (0, offset)).
    ``offset``: an int or a [B] int64 tensor (e.g. the decoding position).
    Test knobs (powers of two; small values reach every path on small rows): ``chunk``
    (logits per program), ``kloc`` (candidate slots per chunk), ``fslot`` (flat-buffer
    slots per chunk), ``nprog`` (programs of launch 2), ``pivots`` (per bracketing round,
    at least 4); ``paths=True`` also returns an
    int32 [B, 2] tensor: the path each row took (0: finished on the candidate buffer by
    launch 1; 1: finished by launch 2 with the threshold known; 2: by launch 2 after a
    threshold search) and its number of launch-2 jobs. ``events``: three CUDA events,
    recorded before launch 1, between the launches and after launch 2
    (benchmarks/kernel_paths.py times each launch with them).
    Returns (tokens int64 [B], logprobs fp32 [B], nucleus_size int32 [B], status int32 [B],
    ratio fp32 [B]: the ratio each row used, 0 where it fell back).
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
    used = torch.empty(B, device=dev, dtype=torch.float32)
    if B == 0 or V == 0:
        out = (tokens, logprobs, nsz, status, used)
        return out + (torch.zeros(B, 2, device=dev, dtype=torch.int32),) if paths else out
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
    p = plan(B, V, dev, chunk, kloc, fslot, nprog)
    ws = _workspace(B, p, pivots, dev)
    rand = (u_t, s_t, s_v, o_t, int(o_v))
    outs = (tokens, logprobs, nsz, status, used)
    if events is not None:
        events[0].record()
    for row0 in range(0, B, MAX_GRID_ROWS):
        la_chunk_kernel[(p.S, min(B - row0, MAX_GRID_ROWS))](
            zp, z0, zp.stride(0), z0.stride(0),
            r_t, float(r_v), t_t, float(t_v), p_t, float(p_v), e_t, float(e_v), x_t,
            float(x_v), *rand, *outs,
            ws["part_f"], ws["part_i"], ws["buf_x"], ws["buf_y"], ws["buf_i"], ws["row_f"],
            ws["row_i"], ws["scr_k"], ws["scr_e"], ws["ctr"], ws["ctl"], ws["q"],
            V, p.S, row0,
            R_PER_ROW=r_row, T_PER_ROW=t_row, P_PER_ROW=p_row, KL=kl is not None,
            E_PER_ROW=e_row, X_PER_ROW=x_row, RNG=int(rng), OFF_PER_ROW=o_row,
            GREEDY=bool(greedy), CHUNK=p.chunk, KLOC=p.kloc, SP=p.SP, NPIV=pivots, L=LEVELS,
            NBIS=BISECT, num_warps=p.warps,
        )
    if events is not None:
        events[1].record()
    la_flat_kernel[(p.nprog,)](
        zp, z0, zp.stride(0), z0.stride(0), t_t, float(t_v), *rand, *outs,
        ws["row_f"], ws["row_i"], ws["k2_f"], ws["k2_i"], ws["flat"], ws["flat_i"],
        ws["scr_k"], ws["scr_e"], ws["ctr"], ws["ctl"], ws["q"], V, p.S, p.nprog, ws["qmax"],
        T_PER_ROW=t_row, RNG=int(rng), OFF_PER_ROW=o_row, GREEDY=bool(greedy),
        CHUNK=p.chunk, FSLOT=p.fslot, SP=p.SP, NPIV=pivots, QBLOCK=QBLOCK,
        num_warps=p.warps,
    )
    if events is not None:
        events[2].record()
    if paths:
        return outs + (ws["row_i"][:B * (RI0.value + pivots)].view(B, -1)[:, :2].clone(),)
    return outs


def step_paths(logits_p, logits_0, ratio, temperature, top_p, **kw):
    """Which path each row of a step takes, for the GPU suite and the tests: a dict of row
    counts ``{"buffer": ..., "score": ..., "search": ...}`` and the total number of
    launch-2 jobs, from one ``la_step`` call with the same arguments (``kw``: greedy, seed,
    kl, ... as for ``la_step``). Synchronises with the host."""
    *_, pth = la_step(logits_p, logits_0, ratio, temperature, top_p, paths=True, **kw)
    pth = pth.cpu()
    names = ("buffer", "score", "search")
    counts = {n: int((pth[:, 0] == i).sum()) for i, n in enumerate(names)}
    counts["jobs"] = int(pth[:, 1].sum())
    return counts
