"""Checks shared by the test files: nucleus agreement within the rounding band, a
chi-square goodness-of-fit test of sampled tokens against the exact distribution, and a
CUDA-graph capture that first proves the call never synchronises with the host."""
import torch

from linalign.reference import mass_above

# Nucleus rounding band. Backends sum fp32 masses in different orders (blocks, pivots,
# radix bins), so a token whose exact mass-above lies within BAND of top_p may land on either
# side. Measured fp32 errors of a 49152-term sum are around 1e-7; the band leaves room.
BAND = 2e-5

# Chi-square test: false-alarm rate per test. The draws use fixed seeds, so a test either
# always passes or always fails; ALPHA is the chance that a correct sampler fails for the
# seeds chosen.
ALPHA = 1e-3


def assert_nucleus_sizes(zp, T, top_p, got, want):
    """Nuclei are the top-|N| logits (ties together), so equal sizes mean equal sets. Where
    sizes differ, every token between the two sizes must have its mass-above within BAND of
    top_p."""
    got, want = got.cpu(), want.cpu()
    for b in (got != want).nonzero().flatten().tolist():
        t = float(T[b]) if isinstance(T, torch.Tensor) else T
        p = float(top_p[b]) if isinstance(top_p, torch.Tensor) else top_p
        f = mass_above(zp[b].float().cpu().double(), t).sort().values
        lo, hi = sorted((int(got[b]), int(want[b])))
        near = (f[lo:hi] - p).abs()
        assert bool((near <= BAND).all()), (
            f"row {b}: nucleus size {int(got[b])} vs reference {int(want[b])}; the tokens in "
            f"between have mass-above {f[lo:hi].tolist()[:5]} vs top_p {p} (band {BAND})")


def chi_square(tokens, probs, alpha=ALPHA):
    """Goodness of fit of sampled ids [N] to an exact distribution [V] (fp64).

    Support is checked exactly (a token of probability 0 is never drawn). Bins with an
    expected count under 5 are pooled into one. Returns the p-value; asserts p > alpha.
    """
    tokens = tokens.cpu()
    probs = probs.cpu().double()
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    outside = counts[probs == 0].sum()
    assert outside == 0, f"{int(outside)} draws outside the support"
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    exp = exp * (obs.sum() / exp.sum())
    if obs.numel() < 2:
        return 1.0
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = obs.numel() - 1
    # Survival function of chi-square(df): the regularised upper incomplete gamma function.
    # (torch, not scipy: the GPU machine has no scipy.)
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2, dtype=torch.float64)))
    assert p > alpha, f"chi-square p = {p:.2e} <= {alpha} over {n} draws, {obs.numel()} bins"
    return p


def detectable_shift(n, bins, alpha=ALPHA, power=0.9):
    """The smallest chi-square distance sum((q - p)^2 / p) that n draws over ``bins`` bins
    detect with the given power at false-alarm rate alpha (noncentral chi-square). Used to
    write the test docstrings; needs scipy."""
    from scipy import stats

    crit = stats.chi2.ppf(1 - alpha, bins - 1)
    lo, hi = 0.0, 1e4
    for _ in range(100):
        mid = (lo + hi) / 2
        if stats.ncx2.sf(crit, bins - 1, mid) < power:
            lo = mid
        else:
            hi = mid
    return hi / n


# ----------------------------------------------------------------------------- decoder
def branch_logits(model, ids):
    """Next-token logits [1, V] of one unpadded sequence, recomputed from scratch (no cache,
    no padding, no mask): what the decoder's cached, padded, batched forward must match."""
    with torch.inference_mode():
        return model(torch.tensor([ids], device=model.device)).logits[:, -1, :].float()


def naive_decode(model, ids_with, ids_without, n, *, temperature, top_p, eos=(), **how):
    """Greedy Linear Alignment for one prompt the slow, obvious way: both branches recomputed
    from scratch every step, the reference step. ``how``: ``ratio=`` or ``kl_budget=`` (and
    ``max_ratio=``). ``ids_with`` may be K id lists (several principles; then
    ``ratio`` is K numbers). Returns (tokens, logprobs)."""
    from linalign import reference

    multi = bool(ids_with) and isinstance(ids_with[0], (list, tuple))
    a = [list(x) for x in ids_with] if multi else [list(ids_with)]
    b, toks, lps = list(ids_without), [], []
    for _ in range(n):
        zs = torch.stack([branch_logits(model, x) for x in a])  # [K, 1, V]
        out = reference.step(zs if multi else zs[0], branch_logits(model, b),
                             temperature=temperature, top_p=top_p, greedy=True, **how)
        t = int(out.tokens[0])
        toks.append(t)
        lps.append(float(out.logprobs[0]))
        for x in a:
            x.append(t)
        b.append(t)
        if t in eos:
            break
    return toks, lps


def near_tie(model, ids_with, ids_without, prefix, got, want, *, ratio, temperature, top_p):
    """Where two decoders first chose different tokens ``got`` and ``want`` after ``prefix``:
    how close the choice was, recomputed exactly. Returns the smaller of the gap between the
    two tokens' aligned scores and the distance of either token's mass-above from top_p (a
    nucleus boundary). fp32 rounding can only flip a choice when this is tiny."""
    from linalign.reference import aligned_scores, mass_above

    zp = branch_logits(model, list(ids_with) + prefix)[0].double()
    z0 = branch_logits(model, list(ids_without) + prefix)[0].double()
    a = aligned_scores(zp, z0, ratio)
    gap = float((a[got] - a[want]).abs())
    f = mass_above(zp, temperature)
    edge = float(torch.stack([(f[got] - top_p).abs(), (f[want] - top_p).abs()]).min())
    return min(gap, edge)


def assert_same_or_near_tie(model, ids_with, ids_without, got, want, *, ratio, temperature,
                            top_p, tol=1e-3):
    """Token lists equal; or, at the first difference, the choice was a near-tie (``near_tie``
    under ``tol``), which the message shows instead of hiding."""
    if got == want:
        return
    k = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), None)
    assert k is not None, f"one output is a prefix of the other: {got} vs {want}"
    gap = near_tie(model, ids_with, ids_without, want[:k], got[k], want[k], ratio=ratio,
                   temperature=temperature, top_p=top_p)
    assert gap < tol, (f"outputs differ at step {k} ({got[k]} vs {want[k]}) and it is not a "
                       f"near-tie: the decisive gap is {gap:.3g}")
    print(f"fp32 flip at step {k}: {got[k]} vs {want[k]}, decisive gap {gap:.2e} (near-tie)")


def capture_without_sync(run):
    """Run ``run`` once with any host synchronisation turned into an error, then capture it
    in a CUDA graph. Returns (the graph, the static outputs its replays overwrite)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static = run()
    return g, static
