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
    greedy_token = int(torch.argmax(a))  # torch.argmax returns the first maximal index
    if T == 0:
        return greedy_token, 0.0, int(in_n.sum()), status
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
    return token, float(logp[token]), int(in_n.sum()), status


def distribution(logits_p, logits_0, ratio, temperature, top_p, dtype=torch.float64):
    """The exact masked aligned distribution of each row: [B, V] probabilities in ``dtype``
    (for T > 0 rows with finite inputs; what sampling must reproduce)."""
    B = logits_p.shape[0]
    per_row = lambda x, b: float(x[b]) if isinstance(x, torch.Tensor) else float(x)  # noqa: E731
    rows = []
    for b in range(B):
        zp, z0 = logits_p[b].float().to(dtype), logits_0[b].float().to(dtype)
        T = per_row(temperature, b)
        a, _, _ = row_scores(zp, z0, per_row(ratio, b), T, per_row(top_p, b))
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


def step(logits_p, logits_0, *, ratio, temperature=1.0, top_p=1.0, greedy=False,
         generator=None, seed=None, offset=0, check=True, dtype=torch.float32):
    """``linalign.step``'s contract, computed by the reference (``dtype=torch.float64`` for
    exact masses). Same arguments (see ``linalign.api``), no ``backend``."""
    from .api import StepOutput, prepare, raise_on_bad_rows
    from .api import step as api_step

    if dtype == torch.float32:
        return api_step(logits_p, logits_0, ratio=ratio, temperature=temperature, top_p=top_p,
                        greedy=greedy, generator=generator, seed=seed, offset=offset,
                        backend="reference", check=check)
    r, T, p, seed, offset = prepare(logits_p, logits_0, ratio, temperature, top_p, generator,
                                    seed, offset, check)
    out = StepOutput(*reference_step(logits_p, logits_0, r, T, p, greedy=greedy,
                                     generator=generator, seed=seed, offset=offset,
                                     dtype=dtype))
    if check:
        raise_on_bad_rows(out)
    return out
