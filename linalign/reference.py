"""The reference: the contract (docs/semantics.md) in plain, readable torch, one row at a
time.

This is the oracle every test compares against; it is meant to be read, not to be fast.
It sorts, loops over rows and can compute in float64 (``dtype=torch.float64``; the inputs
are first rounded to fp32, as every backend does). It computes every mode itself: one
principle with a fixed ratio, kl mode, and several principles. It imports nothing from the
fast paths (``linalign.torch_backend``, ``linalign.kernels``) or from ``linalign.api``, so a
bug there cannot cancel out in the tests.
"""
import torch

from .arguments import StepArgs, StepOutput, normalize, raise_on_bad_rows, used_ratio
from .constants import FMAX, GAP, MAX_RATIO, Status
from .random import row_uniforms

NINF = float("-inf")


def mass_above(zp: torch.Tensor, T: float) -> torch.Tensor:
    """For each token of one row, the mass of ``softmax(zp / T)`` on the tokens with a
    strictly larger logit (in ``zp.dtype``)."""
    pi = torch.softmax((zp - zp.max()) / T, dim=0)  # shifted first: zp / T may overflow
    # Sort ascending, take suffix sums, and look each value up after its last tie.
    values, order = torch.sort(zp)
    suffix = torch.cat([pi[order].flip(0).cumsum(0).flip(0), pi.new_zeros(1)])
    return suffix[torch.searchsorted(values, zp, right=True)]


def nucleus(zp: torch.Tensor, T: float, top_p: float) -> torch.Tensor:
    """The nucleus (docs/semantics.md, "The nucleus"): the bool [V] keep-set of one
    principle-branch row.

    Token i is kept when the mass of the tokens with a strictly larger logit is below
    top_p (so ties are kept together), and its logit is within GAP * T of the best.
    Masses are computed in ``zp.dtype``.
    """
    finite = zp > NINF
    m = zp.max()
    if T == 0:  # the limit T -> 0: all the mass sits on the argmax
        return finite & (zp == m)
    # The gap rule is defined in fp32 arithmetic, the same in every backend.
    cut = m.float() - torch.tensor(GAP, dtype=torch.float32) * torch.tensor(T, dtype=torch.float32)
    keep = mass_above(zp, T) < top_p if top_p < 1 else torch.ones_like(finite)
    return keep & finite & (zp.float() >= cut)


def aligned_scores(zp, z0, r):
    """z_p + r (z_p - z_0), clamped to the finite fp32 range (hostile but finite inputs)."""
    d = (zp - z0).clamp(-FMAX, FMAX)
    return (zp + r * d).clamp(-FMAX, FMAX)


def sanitize(z):
    """(``z`` with NaN and +inf turned into -inf, whether it had any). They are bad input,
    treated as banned so that even a bad row (with check=False) yields a valid id."""
    bad = torch.isnan(z) | (z == float("inf"))
    return torch.where(bad, NINF, z), bool(bad.any())


def row_scores(zp, z0, r, T, top_p):
    """One row (docs/semantics.md, "Aligned scores" and "Banned tokens"): (aligned scores
    ``a`` with -inf off the allowed set, nucleus mask, fell back to r = 0). The distribution
    is ``softmax(a / T)``."""
    in_n = nucleus(zp, T, top_p)
    allowed = in_n & (z0 > NINF)  # banned stays banned
    fallback = bool(in_n.any()) and not bool(allowed.any())
    if fallback:  # banning emptied N: plain top-p decoding of the principle branch
        allowed, r = in_n, 0.0
    a = aligned_scores(zp, torch.where(allowed, z0, zp), r)
    return torch.where(allowed, a, NINF), in_n, fallback


def pick(a, T, greedy, u):
    """The token of one row of masked aligned scores ``a`` (docs/semantics.md, "Choosing the
    token"): (token, its log-probability)."""
    greedy_token = int(torch.argmax(a))  # torch.argmax returns the first maximal index
    if T == 0:
        return greedy_token, 0.0
    # Shifting by the max first changes nothing mathematically, and keeps a / T finite
    # when the aligned scores sit near the fp32 limit and T is small.
    logp = torch.log_softmax((a - a.max()) / T, dim=0)
    if greedy:
        token = greedy_token
    else:
        # Inverse CDF in vocabulary order: the first token whose running mass exceeds u.
        w = torch.exp(logp)
        cum = torch.cumsum(w, dim=0)
        over = (cum > u * cum[-1]) & (w > 0)
        token = int(over.nonzero()[0]) if bool(over.any()) else int((w > 0).nonzero()[-1])
    return token, float(logp[token])


# ---------------------------------------------------------------------------- penalties
def penalized_row(z, history, repetition, presence, frequency):
    """One row's logits after the penalties (docs/semantics.md, "Penalties"), in fp32.

    ``z`` [V] fp32; ``history`` [H] the answer's ids so far (< 0 or >= V: padding). Each
    token with count ``c > 0`` in the history: Hugging Face's repetition penalty (divided
    by it when positive, multiplied when negative), then the OpenAI rule
    ``- (frequency * c + presence)``. A finite logit stays finite (clamped to the fp32
    range); -inf, +inf and NaN are left as they are.
    """
    f32 = dict(dtype=torch.float32)
    rep, pres, freq = (torch.tensor(x, **f32) for x in (repetition, presence, frequency))
    counts = {}
    for t in history.tolist():
        if 0 <= t < z.numel():
            counts[t] = counts.get(t, 0) + 1
    out = z.clone()
    for t, c in counts.items():
        x = z[t]
        if not bool(torch.isfinite(x)):
            continue
        x = x * rep if x < 0 else x / rep
        amount = (freq * torch.tensor(c, **f32) + pres).clamp(-FMAX, FMAX)
        out[t] = (x - amount).clamp(-FMAX, FMAX)
    return out


def penalized(zs, z0, penalties):
    """Every branch of a batch after the penalties: ``zs`` [K, B, V] and ``z0`` [B, V] fp32,
    ``penalties`` a ``linalign.arguments.Penalties`` (or None: unchanged)."""
    if penalties is None:
        return zs, z0
    zs, z0 = zs.clone(), z0.clone()
    for b in range(z0.shape[0]):
        values = [_at(x, b) for x in (penalties.repetition, penalties.presence,
                                      penalties.frequency)]
        h = penalties.history[b]
        z0[b] = penalized_row(z0[b], h, *values)
        for k in range(zs.shape[0]):
            zs[k, b] = penalized_row(zs[k, b], h, *values)
    return zs, z0


# ------------------------------------------------------------------------------ kl mode
def kl_ratio(zp, z0, T, kl_budget, max_ratio=MAX_RATIO) -> float:
    """kl mode for one row (docs/semantics.md, "kl mode"): the effective ratio
    ``r_eff = kappa - 1``.

    ``g = (z_p - z_0) / T``; ``v`` = the variance of ``g`` under ``pi0 = softmax(z_0 / T)``,
    over the tokens that are finite in both branches (the only ones a step can choose; NaN
    and +inf count as banned, as everywhere); ``kappa = sqrt(2 eps / v)`` clipped to
    ``[0, 1 + max_ratio]``. ``v == 0`` (the branches agree up to a constant), no such token,
    or ``T == 0`` (greedy on the principle argmax: nothing to spend) give ``r_eff = 0``; a
    non-finite ``v`` (hostile logits) gives ``kappa = 0``. Computed in ``zp.dtype``, two
    passes (the mean, then the spread about it).
    """
    zp, _ = sanitize(zp)
    z0, _ = sanitize(z0)
    both = (zp > NINF) & (z0 > NINF)
    if T == 0 or not bool(both.any()):
        return 0.0
    g = (zp[both] - z0[both]) / T
    pi0 = torch.softmax((z0[both] - z0[both].max()) / T, dim=0)
    live = pi0 > 0  # a token of probability 0 adds nothing, even where g overflowed
    mean = torch.where(live, pi0 * g, 0.0).sum()
    v = float(torch.where(live, pi0 * (g - mean) ** 2, 0.0).sum())
    if v == 0:
        return 0.0
    kappa = (2 * kl_budget / v) ** 0.5 if v == v and v != float("inf") else 0.0
    return min(max(kappa, 0.0), 1.0 + max_ratio) - 1.0


# -------------------------------------------------------------------- several principles
def composed_row(zs, z0, T, top_p, ratios):
    """Several principles for one row (docs/semantics.md, "Several principles"): K principle
    branches ``zs`` ([K, V]) and the base ``z0``. The nucleus of ``softmax(z_c / T)``,
    ``z_c = z_0 + sum_k (z_k - z_0)``, and the aligned logits ``z_0 + sum_k (1 + r_k)
    (z_k - z_0)`` on it. Returns (scores with -inf off the allowed set, nucleus mask, fell
    back).

    K = 1 is exactly ``row_scores``. For K >= 2 a token that is -inf in any branch is
    banned and outside the nucleus (``z_c`` is not defined there: the product of experts
    gives it no mass). If that empties the nucleus, nothing is left to fall back to: the
    row has no finite composed logit (like a principle row with no finite logit).
    """
    if zs.shape[0] == 1:
        return row_scores(zs[0], z0, ratios[0], T, top_p)
    finite = (zs > NINF).all(0) & (z0 > NINF)
    z0f = torch.where(finite, z0, 0.0)
    d = [torch.where(finite, z - z0f, 0.0) for z in zs]
    zc = zs[0].clone()
    for dk in d[1:]:
        zc = zc + dk  # z_1 + sum_{k >= 2} (z_k - z_0), in this order on every backend
    zc = torch.where(finite, zc.clamp(-FMAX, FMAX), NINF)
    in_n = nucleus(zc, T, top_p)
    a = z0f
    for rk, dk in zip(ratios, d):
        a = (a + (1 + rk) * dk).clamp(-FMAX, FMAX)
    return torch.where(in_n, a, NINF), in_n, False


# ------------------------------------------------------------------------------ a batch
def _at(x, b):
    """Row b's value of a per-row parameter (a number or a [B] tensor)."""
    return float(x[b]) if isinstance(x, torch.Tensor) else float(x)


def row_step(zs, z0, ratios, T, top_p, greedy, u):
    """One row of any mode: ``zs`` [K, V] principle branches, ``z0`` [V], ``ratios`` K numbers.
    Returns (token, logprob, nucleus_size, status) as Python numbers."""
    clean = [sanitize(z) for z in zs]
    zs = torch.stack([z for z, _ in clean])
    z0, bad_0 = sanitize(z0)
    bad = bad_0 or any(b for _, b in clean)
    a, in_n, fallback = composed_row(zs, z0, T, top_p, ratios)
    if not bool(in_n.any()):  # no finite (composed) principle logit: nothing to choose
        return 0, NINF, 0, int(Status.BAD_INPUT)
    status = (Status.FALLBACK if fallback else Status.OK) | \
        (Status.BAD_INPUT if bad else Status.OK)
    return (*pick(a, T, greedy, u), int(in_n.sum()), int(status))


def run(args: StepArgs, dtype=torch.float32) -> StepOutput:
    """The step on checked arguments (``linalign.arguments.StepArgs``), one row at a time,
    in ``dtype`` after rounding the inputs to fp32. Returns a ``StepOutput`` whose ``ratio``
    is [K, B]."""
    args.host_seed()
    K, B = args.K, args.B
    dev = args.device
    zs_all, z0_all = penalized(args.logits.float(), args.logits_0.float(), args.penalties)
    zs_all, z0_all = zs_all.to(dtype), z0_all.to(dtype)
    u = None if args.greedy else row_uniforms(B, dev, generator=args.generator,
                                              seed=args.seed, offset=args.offset)
    rows, ratios = [], []
    for b in range(B):
        T, p = _at(args.temperature, b), _at(args.top_p, b)
        if args.kl is None:
            r = [_at(x, b) for x in args.ratios]
        else:
            r = [kl_ratio(zs_all[0, b], z0_all[b], T, _at(args.kl[0], b), _at(args.kl[1], b))]
        ratios.append(r)
        rows.append(row_step(zs_all[:, b], z0_all[b], r, T, p, args.greedy,
                             None if u is None else float(u[b])))
    tokens, logprobs, sizes, status = zip(*rows) if rows else ((), (), (), ())
    status = torch.tensor(status, dtype=torch.int32, device=dev)
    r = torch.tensor(ratios, dtype=torch.float32, device=dev).reshape(B, K).T
    return StepOutput(torch.tensor(tokens, dtype=torch.int64, device=dev),
                      torch.tensor(logprobs, dtype=torch.float32, device=dev),
                      torch.tensor(sizes, dtype=torch.int32, device=dev), status,
                      torch.stack([used_ratio(r[k], status) for k in range(K)]))


def step(logits_p, logits_0, *, ratio=None, kl_budget=None, max_ratio=MAX_RATIO,
         temperature=1.0, top_p=1.0, greedy=False, generator=None, seed=None, offset=0,
         history=None, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
         check=True, dtype=torch.float32) -> StepOutput:
    """``linalign.step``'s contract computed by the reference (``dtype=torch.float64`` for
    exact masses). The same arguments and errors as ``linalign.step`` (without
    ``backend``)."""
    args = normalize(logits_p, logits_0, ratio=ratio, kl_budget=kl_budget,
                     max_ratio=max_ratio, temperature=temperature, top_p=top_p, greedy=greedy,
                     generator=generator, seed=seed, offset=offset, check=check,
                     history=history, repetition_penalty=repetition_penalty,
                     presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    out = run(args, dtype)
    if not isinstance(logits_p, (list, tuple)) and logits_p.dim() == 2:
        out = out._replace(ratio=out.ratio[0])
    if check:
        raise_on_bad_rows(out)
    return out


def distribution(logits_p, logits_0, ratio, temperature, top_p, dtype=torch.float64):
    """The exact masked aligned distribution of each row: [B, V] probabilities in ``dtype``
    (for T > 0 rows with finite inputs; what sampling must reproduce). ``logits_p`` may be
    [K, B, V] (several principles) with ``ratio`` a list of K numbers or [B] tensors."""
    zs_all = logits_p if logits_p.dim() == 3 else logits_p[None]
    ratios = ratio if logits_p.dim() == 3 else [ratio]
    rows = []
    for b in range(zs_all.shape[1]):
        T = _at(temperature, b)
        a, _, _ = composed_row(zs_all[:, b].float().to(dtype), logits_0[b].float().to(dtype),
                               T, _at(top_p, b), [_at(r, b) for r in ratios])
        rows.append(torch.softmax((a - a.max()) / T, dim=0))
    return torch.stack(rows)
