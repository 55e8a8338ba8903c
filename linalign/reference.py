"""The reference: SPEC sections 1 and 2 in plain, readable torch, one row at a time.

This is the oracle every test compares against; it is meant to be read, not to be fast.
It sorts, loops over rows and can compute in float64 (``dtype=torch.float64``; the inputs
are first rounded to fp32, as every backend does). Optimised paths live in
``linalign.torch_backend`` and ``linalign.kernels``.
"""
import torch

from .random import row_uniforms

GAP = 80.0  # tokens more than GAP * T below the principle max are never in the nucleus
FMAX = torch.finfo(torch.float32).max


def mass_above(zp: torch.Tensor, T: float) -> torch.Tensor:
    """For each token of one row, the mass of ``softmax(zp / T)`` on the tokens with a
    strictly larger logit (in ``zp.dtype``)."""
    pi = torch.softmax((zp - zp.max()) / T, dim=0)  # shifted first: zp / T may overflow
    # Sort ascending, take suffix sums, and look each value up after its last tie.
    values, order = torch.sort(zp)
    suffix = torch.cat([pi[order].flip(0).cumsum(0).flip(0), pi.new_zeros(1)])
    return suffix[torch.searchsorted(values, zp, right=True)]


def nucleus(zp: torch.Tensor, T: float, top_p: float) -> torch.Tensor:
    """SPEC 1.2: the bool [V] keep-set of one principle-branch row (fp32 logits ``zp``).

    Token i is kept when the mass of the tokens with a strictly larger logit is below
    top_p (so ties are kept together), and its logit is within GAP * T of the best.
    Masses are computed in ``zp.dtype``.
    """
    finite = zp > float("-inf")
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


def _sanitize(z):
    # NaN and +inf are bad input; they are treated as banned (-inf) so that even a bad row
    # (with check=False) yields a valid id. Returns (clean row, was it bad).
    bad = torch.isnan(z) | (z == float("inf"))
    return torch.where(bad, float("-inf"), z), bool(bad.any())


def row_scores(zp, z0, r, T, top_p):
    """SPEC 1.3 and 2 for one row: (aligned scores ``a`` with -inf off the allowed set,
    nucleus mask, fell back to r = 0). The distribution is ``softmax(a / T)``."""
    in_n = nucleus(zp, T, top_p)
    allowed = in_n & (z0 > float("-inf"))  # banned stays banned
    fallback = bool(in_n.any()) and not bool(allowed.any())
    if fallback:  # banning emptied N: plain top-p decoding of the principle branch
        allowed, r = in_n, 0.0
    a = aligned_scores(zp, torch.where(allowed, z0, zp), r)
    return torch.where(allowed, a, float("-inf")), in_n, fallback


def row_step(zp, z0, r, T, top_p, greedy, u):
    """One row: returns (token, logprob, nucleus_size, status) as Python numbers."""
    zp, bad_p = _sanitize(zp)
    z0, bad_0 = _sanitize(z0)
    if not bool((zp > float("-inf")).any()):
        return 0, float("-inf"), 0, 2  # no finite principle logit: nothing to choose
    a, in_n, fallback = row_scores(zp, z0, r, T, top_p)
    status = int(fallback) | (2 if bad_p or bad_0 else 0)
    return (*pick(a, T, greedy, u), int(in_n.sum()), status)


def pick(a, T, greedy, u):
    """SPEC 1.4 on one row of masked aligned scores ``a``: (token, its log-probability)."""
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


# ------------------------------------------------------------ SPEC section 3: "kl" mode
def kl_ratio(zp, z0, T, kl_budget, max_ratio) -> float:
    """SPEC 3 for one row: the effective ratio ``r_eff = kappa - 1``.

    ``g = (z_p - z_0) / T``; ``v`` = the variance of ``g`` under ``pi0 = softmax(z_0 / T)``,
    over the tokens that are finite in both branches (the only ones a step can choose; NaN
    and +inf count as banned, as everywhere); ``kappa = sqrt(2 eps / v)`` clipped to
    ``[0, 1 + max_ratio]``. ``v == 0`` (the branches agree up to a constant), no such token,
    or ``T == 0`` (greedy on the principle argmax: nothing to spend) give ``r_eff = 0``; a
    non-finite ``v`` (hostile logits) gives ``kappa = 0``. Computed in ``zp.dtype``, two
    passes (the mean, then the spread about it).
    """
    zp, _ = _sanitize(zp)
    z0, _ = _sanitize(z0)
    both = (zp > float("-inf")) & (z0 > float("-inf"))
    if T == 0 or not bool(both.any()):
        return 0.0
    g = (zp[both] - z0[both]) / T
    pi0 = torch.softmax((z0[both] - z0[both].max()) / T, dim=0)
    mean = (pi0 * g).sum()
    v = float((pi0 * (g - mean) ** 2).sum())
    if v == 0:
        return 0.0
    kappa = (2 * kl_budget / v) ** 0.5 if v == v and v != float("inf") else 0.0
    return min(max(kappa, 0.0), 1.0 + max_ratio) - 1.0


# ------------------------------------------------- SPEC section 4: several principles
def composed_row(zs, z0, T, top_p, ratios):
    """SPEC 4 for one row of K principle branches ``zs`` ([K, V]) and the base ``z0``: the
    nucleus of ``softmax(z_c / T)``, ``z_c = z_0 + sum_k (z_k - z_0)``, and the aligned
    logits ``z_0 + sum_k (1 + r_k) (z_k - z_0)`` on it. Returns (scores with -inf off the
    allowed set, nucleus mask, fell back).

    K = 1 is exactly ``row_scores``. For K >= 2 a token that is -inf in any branch is
    banned and outside the nucleus (``z_c`` is not defined there: the product of experts
    gives it no mass). If that empties the nucleus, nothing is left to fall back to: the
    row has no finite composed logit (like a principle row with no finite logit).
    """
    if zs.shape[0] == 1:
        return row_scores(zs[0], z0, ratios[0], T, top_p)
    ninf = float("-inf")
    finite = (zs > ninf).all(0) & (z0 > ninf)
    z0f = torch.where(finite, z0, 0.0)
    d = [torch.where(finite, z - z0f, 0.0) for z in zs]
    zc = zs[0].clone()
    for dk in d[1:]:
        zc = zc + dk  # z_1 + sum_{k >= 2} (z_k - z_0): the same order as linalign.compose
    zc = torch.where(finite, zc.clamp(-FMAX, FMAX), ninf)
    in_n = nucleus(zc, T, top_p)
    a = z0f
    for rk, dk in zip(ratios, d):
        a = (a + (1 + rk) * dk).clamp(-FMAX, FMAX)
    return torch.where(in_n, a, ninf), in_n, False


def composed_step(logits, logits_0, ratios, temperature, top_p, *, greedy, u=None):
    """The several-principles step (SPEC 4), one row at a time: ``logits`` [K, B, V],
    ``logits_0`` [B, V], ``ratios`` K numbers or [B] tensors, ``u`` the [B] uniforms of a
    sampled step. Returns (tokens, logprobs, nucleus sizes, status) as lists."""
    K, B, V = logits.shape
    per_row = lambda x, b: float(x[b]) if isinstance(x, torch.Tensor) else float(x)  # noqa: E731
    out = []
    for b in range(B):
        zs = torch.stack([_sanitize(logits[k, b].float())[0] for k in range(K)])
        z0, _ = _sanitize(logits_0[b].float())
        bad = any(_sanitize(logits[k, b].float())[1] for k in range(K)) or \
            _sanitize(logits_0[b].float())[1]
        T, p = per_row(temperature, b), per_row(top_p, b)
        a, in_n, fallback = composed_row(zs, z0, T, p, [per_row(r, b) for r in ratios])
        if not bool(in_n.any()):
            out.append((0, float("-inf"), 0, 2))
            continue
        tok, lp = pick(a, T, greedy, None if u is None else float(u[b]))
        out.append((tok, lp, int(in_n.sum()), int(fallback) | (2 if bad else 0)))
    return [list(x) for x in zip(*out)] if out else [[], [], [], []]


def distribution(logits_p, logits_0, ratio, temperature, top_p, dtype=torch.float64):
    """The exact masked aligned distribution of each row: [B, V] probabilities in ``dtype``
    (for T > 0 rows with finite inputs; what sampling must reproduce). ``logits_p`` may be
    [K, B, V] (several principles, SPEC 4) with ``ratio`` a list of K numbers or [B]
    tensors."""
    multi = logits_p.dim() == 3
    B = logits_p.shape[-2]
    per_row = lambda x, b: float(x[b]) if isinstance(x, torch.Tensor) else float(x)  # noqa: E731
    rows = []
    for b in range(B):
        z0 = logits_0[b].float().to(dtype)
        T = per_row(temperature, b)
        if multi:
            zs = logits_p[:, b].float().to(dtype)
            a, _, _ = composed_row(zs, z0, T, per_row(top_p, b),
                                   [per_row(r, b) for r in ratio])
        else:
            a, _, _ = row_scores(logits_p[b].float().to(dtype), z0, per_row(ratio, b), T,
                                 per_row(top_p, b))
        rows.append(torch.softmax((a - a.max()) / T, dim=0))
    return torch.stack(rows)


def reference_step(logits_p, logits_0, ratio, temperature, top_p, *, greedy, generator=None,
                   seed=None, offset=0, dtype=torch.float32):
    """The step on validated arguments (see ``step``); returns four [B] tensors."""
    B, V = logits_p.shape
    dev = logits_p.device
    zp_all = logits_p.float().to(dtype)
    z0_all = logits_0.float().to(dtype)
    u = None if greedy else row_uniforms(B, dev, generator=generator, seed=seed, offset=offset)
    per_row = lambda x, b: float(x[b]) if isinstance(x, torch.Tensor) else x  # noqa: E731
    rows = []
    for b in range(B):
        rows.append(row_step(zp_all[b], z0_all[b], per_row(ratio, b), per_row(temperature, b),
                             per_row(top_p, b), greedy, None if u is None else float(u[b])))
    tokens, logprobs, sizes, status = zip(*rows) if rows else ((), (), (), ())
    return (torch.tensor(tokens, dtype=torch.int64, device=dev),
            torch.tensor(logprobs, dtype=torch.float32, device=dev),
            torch.tensor(sizes, dtype=torch.int32, device=dev),
            torch.tensor(status, dtype=torch.int32, device=dev))


def step(logits_p, logits_0, *, ratio=None, kl_budget=None, max_ratio=10.0, temperature=1.0,
         top_p=1.0, greedy=False, generator=None, seed=None, offset=0, check=True,
         dtype=torch.float32):
    """``linalign.step``'s contract, computed by the reference (``dtype=torch.float64`` for
    exact masses: one principle, fixed ratio). Same arguments (see ``linalign.api``), no
    ``backend``."""
    from .api import StepOutput, prepare, raise_on_bad_rows
    from .api import step as api_step

    if dtype == torch.float32:
        return api_step(logits_p, logits_0, ratio=ratio, kl_budget=kl_budget,
                        max_ratio=max_ratio, temperature=temperature, top_p=top_p,
                        greedy=greedy, generator=generator, seed=seed, offset=offset,
                        backend="reference", check=check)
    if kl_budget is not None or ratio is None or logits_p.dim() != 2:
        raise ValueError("the reference's float64 mode is for one principle and a fixed "
                         "ratio; use dtype=torch.float32 for kl mode and several principles")
    r, T, p, seed, offset = prepare(logits_p, logits_0, ratio, temperature, top_p, generator,
                                    seed, offset, check)
    out = StepOutput(*reference_step(logits_p, logits_0, r, T, p, greedy=greedy,
                                     generator=generator, seed=seed, offset=offset,
                                     dtype=dtype))
    if check:
        raise_on_bad_rows(out)
    return out


# ------------------------------------------------------------ the batched form, to compile
def _col(x, B, device):
    """A Python number stays a number; a [B] tensor becomes an fp32 [B, 1] column."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32).reshape(B, 1)
    return float(x)


def vectorized_step(logits_p, logits_0, ratio, temperature, top_p, *, greedy, u=None):
    """SPEC section 1 (and the edge cases of section 2) for the whole batch at once: the
    same answers as ``reference_step`` in fp32, as one sort-based graph without host syncs.

    It exists to be compiled, as the "torch.compile of the reference" baseline of the
    benchmarks (``torch.compile(vectorized_step, dynamic=True)``); no backend uses it.
    Arguments are validated ones (as ``linalign.api.prepare`` returns them): [B, V] fp32,
    bf16 or fp16 logits; ``ratio``, ``temperature``, ``top_p`` Python numbers or [B]
    tensors; ``u`` the [B] uniforms of a sampled step (``linalign.random.row_uniforms``),
    ignored when ``greedy``. Temperatures must be > 0 (T = 0 rows are not handled here; the
    reference and the backends treat them as greedy). Returns (tokens int64, log-probs fp32,
    nucleus sizes int32, status int32), each [B], like ``reference_step``.

    How, per row, without a Python loop: sort the principle branch once (descending); the
    exclusive running sum of its softmax gives the mass strictly above each sorted position;
    with k = the number of positions whose running mass is below top_p, the nucleus is every
    token whose logit is >= the k-th largest (which keeps all ties of the last kept token:
    a tied token's mass-above is the running mass at the first of its ties), and within
    80 T of the best. The rest is elementwise, plus ``argmax`` (first maximal index) or an
    inverse-CDF draw in vocabulary order (first token whose running mass exceeds u times
    the total), as in ``row_step``.
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

    # SPEC 1.1-1.2: the nucleus of softmax(zp / T).
    m = zp.max(-1, keepdim=True).values
    m = torch.where(any_p, m, torch.zeros_like(m))  # rows without a finite logit: no NaN
    pi = torch.softmax((zp - m) / T, dim=-1)
    values, order = torch.sort(zp, dim=-1, descending=True)
    run = torch.cumsum(pi.gather(-1, order), dim=-1)
    above = torch.cat([torch.zeros_like(run[:, :1]), run[:, :-1]], dim=-1)  # strictly above
    ones = torch.ones((B, 1), device=dev, dtype=torch.float32)
    below = (above < p * ones) | (p * ones >= 1.0)  # top_p = 1 keeps everything (as row_step)
    k = below.sum(-1, keepdim=True).clamp(min=1)
    tau = values.gather(-1, k - 1)
    cut = m - GAP * (T * ones)  # the gap rule in fp32
    in_n = finite_p & (zp >= tau) & (zp >= cut)

    # SPEC 1.3 and 2: banned stays banned; fall back to r = 0 when that empties N.
    allowed = in_n & (z0 > ninf)
    fallback = in_n.any(-1, keepdim=True) & ~allowed.any(-1, keepdim=True)
    allowed = torch.where(fallback, in_n, allowed)
    r_eff = torch.where(fallback, torch.zeros_like(ones), r * ones)
    a = aligned_scores(zp, torch.where(allowed, z0, zp), r_eff)
    a = torch.where(allowed, a, ninf)

    # SPEC 1.4.
    greedy_token = torch.argmax(a, dim=-1)
    amax = a.max(-1, keepdim=True).values
    amax = torch.where(amax > ninf, amax, torch.zeros_like(amax))
    logp = torch.log_softmax((a - amax) / T, dim=-1)
    if greedy:
        token = greedy_token
    else:
        w = torch.exp(logp)
        cum = torch.cumsum(w, dim=-1)
        pos = w > 0
        over = (cum > u.to(device=dev, dtype=torch.float32).reshape(B, 1) * cum[:, -1:]) & pos
        first = torch.argmax(over.to(torch.int8), dim=-1)
        ids = torch.arange(V, device=dev).expand(B, V)
        last = torch.where(pos, ids, 0).max(-1).values
        token = torch.where(over.any(-1), first, last)
    token = torch.where(any_p[:, 0], token, 0)
    logprob = torch.where(any_p[:, 0], logp.gather(-1, token[:, None])[:, 0], ninf)
    size = torch.where(any_p[:, 0], in_n.sum(-1).to(torch.int32), 0)
    status = fallback[:, 0].to(torch.int32) | (bad.to(torch.int32) * 2)
    status = torch.where(any_p[:, 0], status, 2)
    return token, logprob, size, status
