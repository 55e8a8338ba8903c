"""Every backend of linalign.step against the reference (docs/semantics.md).

On a machine without a GPU the "triton" backend runs through Triton's interpreter (about
0.1 s per row), so its shapes stay small, with one realistic vocabulary (2 x 49152).
"""
import pytest
import torch

import linalign
from linalign import Status
from linalign.reference import distribution
from linalign.testing import two_branch
from helpers import assert_nucleus_sizes, chi_square

FAST = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LA = dict(ratio=3.0, temperature=0.5, top_p=0.8)  # the authors' HH setting


def reference(zp, z0, **kw):
    return linalign.step(zp, z0, backend="reference", **kw)


def reference64(zp, z0, **kw):
    return linalign.reference.step(zp, z0, dtype=torch.float64, **kw)


def assert_same_step(got, want, zp, T, top_p, *, logprob_atol=2e-4):
    """Tokens, status identical; nucleus sizes within the band; log-probs close."""
    assert torch.equal(got.tokens.cpu(), want.tokens.cpu()), (
        f"tokens differ at rows {(got.tokens.cpu() != want.tokens.cpu()).nonzero().flatten().tolist()}: "
        f"{got.tokens.tolist()} vs {want.tokens.tolist()}")
    assert torch.equal(got.status.cpu(), want.status.cpu())
    assert_nucleus_sizes(zp, T, top_p, got.nucleus_size, want.nucleus_size)
    torch.testing.assert_close(got.logprobs.cpu(), want.logprobs.cpu(), atol=logprob_atol,
                               rtol=1e-4)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (3, 5), (4, 1000), (3, 4099)])
@pytest.mark.parametrize("greedy", [True, False])
def test_matches_reference(backend, dtype, shape, greedy, device):
    B, V = shape
    zp, z0 = two_branch(B, V, seed=V + B, temperature=0.5, device=device, dtype=dtype)
    kw = dict(LA, greedy=greedy, seed=11, offset=3)
    got = linalign.step(zp, z0, backend=backend, **kw)
    assert got.tokens.dtype == torch.int64 and got.logprobs.dtype == torch.float32
    assert got.nucleus_size.dtype == torch.int32 and got.status.dtype == torch.int32
    assert got.tokens.device == zp.device and got.tokens.shape == (B,)
    assert_same_step(got, reference(zp, z0, **kw), zp, LA["temperature"], LA["top_p"])
    assert_nucleus_sizes(zp, 0.5, 0.8, got.nucleus_size, reference64(zp, z0, **kw).nucleus_size)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("greedy", [True, False])
def test_realistic_vocabulary(backend, greedy, device):
    # SmolLM2's vocabulary; one row peaked, one flat (a nucleus of thousands).
    zp, z0 = two_branch(2, 49152, seed=5, temperature=1.0, steepness=(1.0, 1.6), device=device)
    kw = dict(ratio=2.0, temperature=1.0, top_p=0.9, greedy=greedy, seed=2)
    got = linalign.step(zp, z0, backend=backend, **kw)
    assert_same_step(got, reference(zp, z0, **kw), zp, 1.0, 0.9)
    assert_nucleus_sizes(zp, 1.0, 0.9, got.nucleus_size, reference64(zp, z0, **kw).nucleus_size)


@pytest.mark.parametrize("backend", FAST)
def test_largest_vocabulary(backend, device):
    # V = 262144 (Gemma 3), not a multiple of any block once one token is dropped.
    zp, z0 = two_branch(1, 262143, seed=6, temperature=1.0, steepness=1.3, device=device,
                        dtype=torch.bfloat16)
    kw = dict(ratio=3.0, temperature=1.0, top_p=0.9, seed=4)
    for greedy in (True, False):
        got = linalign.step(zp, z0, backend=backend, greedy=greedy, **kw)
        assert_same_step(got, reference(zp, z0, greedy=greedy, **kw), zp, 1.0, 0.9)


def mixed_params(device):
    ratio = torch.tensor([-1.0, 0.0, 0.5, 3.0, 10.0, 3.0, 5.0], device=device)
    temperature = torch.tensor([0.0, 0.3, 0.5, 1.0, 2.0, 0.5, 1e-4], device=device)
    top_p = torch.tensor([0.5, 1.0, 0.8, 0.9, 1e-6, 0.8, 0.8], device=device)
    return dict(ratio=ratio, temperature=temperature, top_p=top_p)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("greedy", [True, False])
def test_per_row_parameters(backend, greedy, device):
    zp, z0 = two_branch(7, 777, seed=9, temperature=0.7, device=device)
    kw = dict(mixed_params(device), greedy=greedy, seed=torch.arange(7, device=device) * 13,
              offset=torch.arange(7, device=device) * 5 + 2)
    got = linalign.step(zp, z0, backend=backend, **kw)
    assert_same_step(got, reference(zp, z0, **kw), zp, kw["temperature"], kw["top_p"])


@pytest.mark.parametrize("tiers", [(4,), (4, "sized"), ("sized",)])
def test_torch_path_candidate_tiers(tiers, device):
    # The torch path tries a candidate set of 256, then one sized from a mass histogram,
    # then the full row. Force each route with a first try too small for these nuclei.
    from linalign.torch_backend import torch_step

    zp, z0 = two_branch(5, 3000, seed=4, temperature=1.0, steepness=(1.0, 1.3), device=device)
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.99, 0.9], device=device)
    for greedy in (True, False):
        args = (zp, z0, 2.0, 1.0, top_p)
        want = linalign.StepOutput(*torch_step(*args, greedy=greedy, seed=3))
        assert (want.nucleus_size > 4).all()
        got = linalign.StepOutput(*torch_step(*args, greedy=greedy, seed=3, candidates=tiers))
        assert torch.equal(got.tokens, want.tokens)
        assert torch.equal(got.nucleus_size, want.nucleus_size)
        ref = reference(zp, z0, ratio=2.0, temperature=1.0, top_p=top_p, greedy=greedy, seed=3)
        assert_same_step(got, ref, zp, 1.0, top_p)


def test_candidate_count_covers_the_nucleus():
    from linalign.torch_backend import BUCKETS, candidate_count

    zp, _ = two_branch(6, 5000, seed=14, temperature=1.0, steepness=(1.0, 2.0))
    T = torch.tensor([1.0, 1.0, 0.5, 2.0, 0.0, 1.0])
    p = torch.tensor([0.8, 0.95, 0.8, 0.5, 0.9, 1.0])
    want = reference64(zp, zp, ratio=0.0, temperature=T, top_p=p, greedy=True).nucleus_size
    t0 = T == 0
    inv_t = 1 / torch.where(t0, 1.0, T)
    m = zp.amax(-1, keepdim=True)
    e = ((zp - m) * inv_t[:, None]).exp()
    k = candidate_count(m - zp, e, inv_t, (p * e.sum(-1)).double(), t0, p)
    assert (k > want).all()
    # Not much more: the nucleus plus about two slices of the gap window.
    dist = (m - zp) * inv_t[:, None]
    for b in range(6):
        if p[b] < 1 and not t0[b]:
            edge = dist[b].sort().values[int(want[b]) - 1] + 2 * 80.0 / BUCKETS + 1e-4
            assert k[b] <= int((dist[b] <= edge).sum()) + 1


@pytest.mark.parametrize("backend", FAST)
def test_flat_one_hot_and_tied_rows(backend, device):
    V = 300
    g = torch.Generator().manual_seed(0)
    flat = 0.01 * torch.randn(V, generator=g)
    one_hot = torch.zeros(V)
    one_hot[123] = 50.0
    tied = torch.zeros(V)  # every token tied: all are kept, the lowest id wins ties
    tied_top = torch.randn(V, generator=g)
    tied_top[[7, 70, 200]] = 9.0  # three tied leaders
    zp = torch.stack([flat, one_hot, tied, tied_top]).to(device)
    z0 = (zp + torch.randn(4, V, generator=g).to(device)).clone()
    z0[2] = 0.0
    for greedy in (True, False):
        kw = dict(ratio=1.5, temperature=1.0, top_p=0.7, greedy=greedy, seed=8)
        got = linalign.step(zp, z0, backend=backend, **kw)
        assert_same_step(got, reference(zp, z0, **kw), zp, 1.0, 0.7)
        assert got.nucleus_size[1] == 1 and got.tokens[1] == 123
        assert got.nucleus_size[2] == V and got.nucleus_size[3] == 3
        if greedy:
            assert got.tokens[2] == 0


@pytest.mark.parametrize("backend", FAST)
def test_ratio_zero_is_plain_top_p_of_principle(backend, device):
    zp, z0 = two_branch(6, 500, seed=1, temperature=1.0, device=device)
    other = torch.randn_like(z0) * 5
    for greedy in (True, False):
        kw = dict(ratio=0.0, temperature=1.0, top_p=0.8, greedy=greedy, seed=4)
        a = linalign.step(zp, z0, backend=backend, **kw)
        b = linalign.step(zp, other, backend=backend, **kw)  # z0 no longer matters
        assert torch.equal(a.tokens, b.tokens)
        torch.testing.assert_close(a.logprobs, b.logprobs)
    # Against plain top-p written out: softmax of the principle branch on its nucleus.
    probs = distribution(zp.cpu(), z0.cpu(), 0.0, 1.0, 0.8)
    pi = torch.softmax(zp.cpu().double(), -1)
    keep = probs > 0
    torch.testing.assert_close(probs[keep], (pi * keep / (pi * keep).sum(-1, keepdim=True))[keep])
    greedy = linalign.step(zp, z0, ratio=0.0, temperature=1.0, top_p=0.8, greedy=True,
                           backend=backend)
    assert torch.equal(greedy.tokens, zp.argmax(-1))


@pytest.mark.parametrize("backend", FAST)
def test_zero_temperature_rows_are_greedy(backend, device):
    zp, z0 = two_branch(4, 400, seed=2, device=device)
    T = torch.tensor([0.0, 1.0, 0.0, 1.0], device=device)
    got = linalign.step(zp, z0, ratio=3.0, temperature=T, top_p=0.9, seed=5, backend=backend)
    # The T -> 0 limit: the nucleus is the principle argmax, so the token is that argmax.
    assert got.tokens[0] == zp[0].argmax() and got.tokens[2] == zp[2].argmax()
    assert got.nucleus_size[0] == 1 and got.logprobs[0] == 0.0
    # A tiny temperature behaves the same.
    tiny = linalign.step(zp, z0, ratio=3.0, temperature=1e-4, top_p=0.9, seed=5, backend=backend)
    assert torch.equal(tiny.tokens, zp.argmax(-1))


@pytest.mark.parametrize("backend", FAST)
def test_banned_tokens_are_never_chosen(backend, device):
    zp, z0 = two_branch(3, 200, seed=6, temperature=1.0, device=device)
    z0 = z0.clone()
    zp = zp.clone()
    # Row 0: ban the aligned winner in the without-branch (with r > 0 it would be +inf).
    best = linalign.step(zp, z0, ratio=3.0, temperature=1.0, top_p=0.9, greedy=True,
                         backend=backend).tokens
    z0[0, best[0]] = float("-inf")
    # Row 1: ban the principle argmax in the principle branch itself.
    zp[1, zp[1].argmax()] = float("-inf")
    # Row 2: ban the whole nucleus in the without-branch: falls back to r = 0.
    in_n = linalign.reference.nucleus(zp[2].float().cpu(), 1.0, 0.9)
    z0[2, in_n.to(device)] = float("-inf")
    for greedy in (True, False):
        kw = dict(ratio=3.0, temperature=1.0, top_p=0.9, greedy=greedy, seed=1)
        got = linalign.step(zp, z0, backend=backend, **kw)
        assert_same_step(got, reference(zp, z0, **kw), zp, 1.0, 0.9)
        assert got.tokens[0] != best[0]
        assert zp[1, got.tokens[1]] > float("-inf")
        assert got.status.tolist() == [Status.OK, Status.OK, Status.FALLBACK]
        plain = linalign.step(zp[2:], z0[2:], backend=backend, **dict(kw, ratio=0.0))
        assert got.tokens[2] == plain.tokens[0]
    # Sampling many times never draws a banned token.
    rows = 32
    zz = zp[:1].expand(rows, -1).contiguous()
    oo = z0[:1].expand(rows, -1).contiguous()
    draws = linalign.step(zz, oo, ratio=3.0, temperature=1.0, top_p=0.9, seed=9,
                          backend=backend).tokens
    assert not (draws == best[0]).any()


@pytest.mark.parametrize("backend", FAST + ["reference"])
@pytest.mark.parametrize("where", ["nan_p", "inf_0", "nan_0", "all_neg_inf_p"])
def test_bad_input(backend, where, device):
    zp, z0 = two_branch(4, 64, seed=3, device=device)
    zp, z0 = zp.clone(), z0.clone()
    if where == "nan_p":
        zp[2, 5] = float("nan")
    elif where == "inf_0":
        z0[2, 7] = float("inf")
    elif where == "nan_0":
        z0[2, :] = float("nan")
    else:
        zp[2, :] = float("-inf")
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        linalign.step(zp, z0, **LA, backend=backend)
    seeds = torch.arange(4, device=device) + 1
    for greedy in (True, False):
        out = linalign.step(zp, z0, **LA, greedy=greedy, seed=seeds, backend=backend,
                            check=False)
        assert ((out.tokens >= 0) & (out.tokens < 64)).all()
        # Row 2 is flagged (an all-NaN without-branch also bans the whole nucleus, so that
        # row falls back too); the others are fine.
        assert out.status[[0, 1, 3]].tolist() == [0, 0, 0]
        assert out.status[2] & Status.BAD_INPUT
        assert not torch.isnan(out.logprobs).any()
        # The other rows are untouched by the bad one.
        rows = [0, 1, 3]
        good = linalign.step(zp[rows], z0[rows], **LA, greedy=greedy, seed=seeds[rows],
                             backend=backend)
        assert torch.equal(out.tokens[rows], good.tokens)


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_seeds(backend, device):
    zp, z0 = two_branch(12, 300, seed=7, temperature=1.0, steepness=1.0, device=device)
    kw = dict(ratio=1.0, temperature=1.0, top_p=0.95, backend=backend)
    a = linalign.sample(zp, z0, seed=123, **kw)
    assert torch.equal(a, linalign.sample(zp, z0, seed=123, **kw))
    b = linalign.sample(zp, z0, seed=124, **kw)
    c = linalign.sample(zp, z0, seed=123, offset=1, **kw)
    assert (a != b).sum() >= 6 and (a != c).sum() >= 6  # flat rows: most draws change
    # Per-row seeds: a row's token does not depend on the rest of the batch.
    seeds = torch.arange(100, 112, device=device)
    full = linalign.sample(zp, z0, seed=seeds, **kw)
    part = linalign.sample(zp[5:9], z0[5:9], seed=seeds[5:9], **kw)
    assert torch.equal(full[5:9], part)
    # A torch.Generator in the same state gives the same tokens.
    g1 = torch.Generator(device=device).manual_seed(5)
    g2 = torch.Generator(device=device).manual_seed(5)
    assert torch.equal(linalign.sample(zp, z0, generator=g1, **kw),
                       linalign.sample(zp, z0, generator=g2, **kw))


def test_seeded_backends_draw_the_same_tokens(device):
    # The torch path and the reference reproduce the kernel's Philox stream exactly, so with
    # the same seed all three draw the same token (unless u * S falls within fp32 rounding
    # of a CDF step, which these fixed seeds do not hit).
    zp, z0 = two_branch(48, 200, seed=8, temperature=1.0, steepness=(1.0, 1.5), device=device)
    kw = dict(ratio=2.0, temperature=1.0, top_p=0.95, seed=77, offset=5)
    tri = linalign.sample(zp, z0, backend="triton", **kw)
    assert torch.equal(tri, linalign.sample(zp, z0, backend="torch", **kw))
    assert torch.equal(tri, linalign.sample(zp, z0, backend="reference", **kw))
    # The same holds for uniforms drawn from a torch.Generator in the same state.
    kw.pop("seed")
    draws = [linalign.sample(zp, z0, backend=b, **kw,
                             generator=torch.Generator(device=device).manual_seed(3))
             for b in ("triton", "torch", "reference")]
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])


# The kernel joins the 20000-draw test where it runs compiled; through the interpreter
# (0.1 s a row) it is tested by token identity with the torch path below.
SAMPLERS = ["torch", "reference"] + (["triton"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("backend", SAMPLERS)
@pytest.mark.parametrize("setting", ["authors", "mixed", "wide"])
def test_sampling_distribution(backend, setting, device):
    """Chi-square goodness of fit of 20000 draws against the exact masked distribution.

    Design: one row replicated 20000 times, one seed, so each row draws an independent
    uniform (counter = row). Bins with expected count < 5 pooled. False-alarm rate
    ALPHA = 1e-3 (fixed seeds: the outcome is deterministic). With 10 bins it detects (power
    0.9) a chi-square distance sum((q - p)^2 / p) of 1.7e-3 (tests/helpers.detectable_shift),
    e.g. 0.016 of mass moved between two tokens of probability 0.3 (5 % of each); the
    reference backend gets 2000 draws (a distance of 1.7e-2).
    "mixed" draws rows with different parameters in one batch and tests each; "wide" is a
    flatter row with a large nucleus (387 tokens: many bins, each with few draws)
    and a mild ratio. The whole design is in docs/statistics.md.
    """
    n = 2000 if backend == "reference" else 20000
    if setting == "authors":
        zp, z0 = two_branch(1, 1000, seed=21, temperature=0.5, steepness=1.2, device=device)
        params = [dict(ratio=3.0, temperature=0.5, top_p=0.8)]
    elif setting == "mixed":
        zp, z0 = two_branch(1, 500, seed=22, temperature=1.0, steepness=1.3, device=device)
        params = [dict(ratio=-0.5, temperature=1.0, top_p=0.95),
                  dict(ratio=5.0, temperature=2.0, top_p=0.6)]
    else:
        zp, z0 = two_branch(1, 400, seed=23, temperature=1.0, steepness=1.0, device=device)
        params = [dict(ratio=1.0, temperature=1.5, top_p=0.99)]
    k = len(params)
    ratio = torch.tensor([p["ratio"] for p in params], device=device).repeat_interleave(n)
    temp = torch.tensor([p["temperature"] for p in params], device=device).repeat_interleave(n)
    top_p = torch.tensor([p["top_p"] for p in params], device=device).repeat_interleave(n)
    tokens = linalign.sample(zp.expand(k * n, -1), z0.expand(k * n, -1), ratio=ratio,
                             temperature=temp, top_p=top_p, seed=2024, backend=backend)
    for i, p in enumerate(params):
        probs = distribution(zp.cpu(), z0.cpu(), p["ratio"], p["temperature"], p["top_p"])[0]
        assert (probs > 0).sum() >= 3, "the test needs a nucleus of several tokens"
        chi_square(tokens[i * n:(i + 1) * n], probs)


def test_kernel_samples_the_torch_paths_distribution(device):
    """The kernel's draws (through the interpreter on CPU) are token-for-token those of the
    torch path for the same uniforms, so they share its distribution (tested above with
    20000 draws); a direct chi-square on 200 kernel draws (0.1 s each through the
    interpreter) backs that up, though it only detects a chi-square distance of about 0.13
    (0.14 of mass moved between two tokens of probability 0.3)."""
    n = 200
    zp, z0 = two_branch(1, 300, seed=21, temperature=0.5, steepness=1.2, device=device)
    zz, oo = zp.expand(n, -1), z0.expand(n, -1)
    tri = linalign.sample(zz, oo, **LA, seed=99, backend="triton")
    assert torch.equal(tri, linalign.sample(zz, oo, **LA, seed=99, backend="torch"))
    chi_square(tri, distribution(zp.cpu(), z0.cpu(), **LA)[0])


def test_triton_result_does_not_depend_on_the_split(device):
    # One chunk of 8192 logits (the whole row), 5 of 1024, 20 of 256 (S = 32 with padding).
    from linalign.kernels import la_step

    zp, z0 = two_branch(3, 5000, seed=12, temperature=1.0, steepness=(1.0, 1.4), device=device)
    outs = [la_step(zp, z0, 2.0, 1.0, 0.9, greedy=False, seed=5, chunk=c) for c in (256, 1024, 8192)]
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b) or torch.allclose(a.float(), b.float(), atol=1e-5)
        assert torch.equal(outs[0][0], other[0]) and torch.equal(outs[0][2], other[2])


def test_auto_backend_and_sample(device):
    zp, z0 = two_branch(2, 100, seed=1, device=device)
    want = "triton" if device.type == "cuda" else "torch"
    got = linalign.step(zp, z0, **LA, greedy=True)
    assert torch.equal(got.tokens, linalign.step(zp, z0, **LA, greedy=True, backend=want).tokens)
    assert torch.equal(linalign.sample(zp, z0, **LA, greedy=True), got.tokens)


def hostile_row(V, g, kind):
    z = torch.randn(V, generator=g) * [0.1, 1.0, 5.0][int(torch.randint(3, (1,), generator=g))]
    pick = torch.rand(V, generator=g)
    if kind == "ties":
        z = z.round()
    elif kind == "huge":
        z[pick < 0.3] = [1e30, -1e30, 3e38][int(torch.randint(3, (1,), generator=g))]
    elif kind == "neginf":
        z[pick < 0.5] = float("-inf")
    elif kind == "flat":
        z = torch.zeros(V)
    elif kind == "signed_zeros":
        z[pick < 0.5] = -0.0
        z[pick > 0.7] = 0.0
    return z


KINDS = ["normal", "ties", "huge", "neginf", "flat", "signed_zeros"]


@pytest.mark.parametrize("case", range(40))
def test_hostile_mix(case, device):
    """Seeded mixes of ties, +-1e30 and 3e38, -inf patterns, signed zeros and flat rows, with
    extreme parameters: every backend (and the kernel with 16-logit chunks, so rows span many
    chunks, also with 2 candidate slots per chunk, which sends most rows to the second
    launch) agrees with the reference on tokens, status and log-probs."""
    from linalign.kernels import la_step

    g = torch.Generator().manual_seed(case)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    B, V = pick([1, 2, 3]), pick([1, 2, 3, 7, 33, 130])
    zp = torch.stack([hostile_row(V, g, pick(KINDS)) for _ in range(B)])
    z0 = torch.stack([hostile_row(V, g, pick(KINDS)) for _ in range(B)])
    if case % 3 == 0:
        z0 = zp + 0.1 * torch.randn(B, V, generator=g)
    zp, z0 = zp.to(device), z0.to(device)
    kw = dict(ratio=pick([-2.0, 0.0, 0.5, 3.0, 1e6]), temperature=pick([0.0, 1e-4, 0.5, 100.0]),
              top_p=pick([1e-9, 0.3, 0.8, 1.0]), greedy=bool(case % 2), seed=case)
    want = linalign.step(zp, z0, backend="reference", check=False, **kw)
    outs = [linalign.step(zp, z0, backend=b, check=False, **kw) for b in FAST]
    for extra in (dict(chunk=16), dict(chunk=16, kloc=2, fslot=2, pivots=4, nprog=3)):
        outs.append(linalign.StepOutput(*la_step(zp, z0, kw["ratio"], kw["temperature"],
                                                 kw["top_p"], greedy=kw["greedy"], seed=case,
                                                 **extra)))
    for got in outs:
        assert ((got.tokens >= 0) & (got.tokens < V)).all()
        assert not torch.isnan(got.logprobs).any()
        if kw["temperature"] == 0:
            assert torch.equal(got.nucleus_size.cpu(), want.nucleus_size.cpu())
        assert_same_step(got, want, zp, kw["temperature"] or 1.0, kw["top_p"],
                         logprob_atol=1e-3)


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_scores_near_the_fp32_limit(backend, device):
    # Aligned scores clamp at the largest fp32; with a small T, a / T would overflow, so
    # every backend scales the distance to the max instead (a regression found by fuzzing).
    zp = torch.tensor([[3e38, 1e38, -1e30, 0.0]], device=device)
    z0 = torch.tensor([[-3e38, 0.0, 1e30, 0.0]], device=device)
    for greedy in (True, False):
        out = linalign.step(zp, z0, ratio=1e6, temperature=1e-4, top_p=1.0, greedy=greedy,
                            seed=0, backend=backend)
        assert out.tokens.tolist() == [0] and out.logprobs.tolist() == [0.0]
        # A nucleus taken on such a row: top_p < 1 must not overflow z_p / T either.
        out = linalign.step(zp, z0, ratio=1.0, temperature=1e-4, top_p=0.5, greedy=greedy,
                            seed=0, backend=backend)
        assert out.tokens.tolist() == [0] and out.nucleus_size.tolist() == [1]


@pytest.mark.parametrize("case", range(12))
def test_search_branches(case, device):
    """The kernel's paths with small buffers and 4 pivots per round, on rows where the
    candidate check fails (a nucleus of hundreds: the second launch's threshold search
    over chunk-parallel rounds, its flat buffer overflowing or not), the bracketing takes
    several rounds, or ties straddle the bracket; one chunk or many: the same tokens,
    status and nucleus as the reference."""
    from linalign.kernels import la_step

    g = torch.Generator().manual_seed(1000 + case)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=g))]  # noqa: E731
    B, V = pick([1, 2, 3]), pick([300, 1000, 2500])
    kind = pick(["peaked", "flat", "ties", "neginf", "normal"])
    zp, z0 = two_branch(B, V, seed=case, temperature=1.0, steepness=(1.0, 1.6))
    if kind == "flat":
        zp = zp * 0.05
    elif kind == "ties":
        zp = (zp * 2).round() / 2
    elif kind == "neginf":
        z0[torch.rand(B, V, generator=g) < 0.5] = float("-inf")
    elif kind == "normal":
        zp = torch.randn(B, V, generator=g) * pick([0.5, 2.0])
    zp, z0 = zp.to(device), z0.to(device)
    kw = dict(ratio=pick([-1.0, 0.0, 3.0]), temperature=pick([0.5, 1.0, 2.0]),
              top_p=pick([0.3, 0.8, 0.95, 0.999]), greedy=bool(case % 2), seed=case)
    want = linalign.step(zp, z0, backend="reference", check=False, **kw)
    for extra in (dict(chunk=4096, kloc=16), dict(chunk=pick([64, 256, 512]), kloc=4,
                                                  fslot=pick([4, 16]), nprog=pick([1, 3]))):
        got = linalign.StepOutput(*la_step(zp, z0, kw["ratio"], kw["temperature"], kw["top_p"],
                                           greedy=kw["greedy"], seed=case, pivots=4, **extra))
        assert_same_step(got, want, zp, kw["temperature"], kw["top_p"], logprob_atol=1e-3)


def test_kernel_paths_and_reused_workspace(device):
    """Peaked rows finish in launch 1 on their candidates; flat rows (a nucleus of
    thousands), top_p = 1 rows with more candidates than the buffer, and T = 0 rows with
    more ties at the max than a chunk's slots take launch 2 (a threshold search, or a SCORE
    with the threshold known). The workspace kept for a cut of the row serves later calls
    with fewer rows, and every launch leaves its counters and queue as it found them, so
    the same calls give the same results again, in any order."""
    from linalign.kernels import step as ks

    V = 3000
    peaked, _ = two_branch(2, V, seed=31, temperature=0.5)
    flat, _ = two_branch(2, V, seed=32, temperature=0.5, steepness=1.0)
    ties = torch.zeros(1, V)
    ties[0, ::2] = 4.0  # 1500 tokens tied at the max, 512 a chunk
    zp = torch.cat([peaked, flat, flat[:1], ties]).to(device)
    z0 = (zp + 0.5 * torch.randn(zp.shape, generator=torch.Generator().manual_seed(0))
          .to(device))
    T = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.0], device=device)
    top_p = torch.tensor([0.8, 0.8, 0.95, 0.9, 1.0, 0.9], device=device)
    kw = dict(greedy=False, seed=torch.arange(6, device=device) + 1, chunk=1024, nprog=3)
    *got, paths = ks.la_step(zp, z0, 3.0, T, top_p, paths=True, **kw)
    assert paths[:, 0].tolist() == [0, 0, 2, 2, 1, 1], paths
    want = linalign.step(zp, z0, ratio=3.0, temperature=T, top_p=top_p, greedy=False,
                         seed=kw["seed"], backend="reference")
    assert_same_step(linalign.StepOutput(*got), want, zp, T, top_p)
    counts = ks.step_paths(zp, z0, 3.0, T, top_p, **kw)
    assert counts["buffer"] == 2 and counts["search"] == 2 and counts["score"] == 2
    assert counts["jobs"] == int(paths[:, 1].sum()) >= 4
    ws = next(w for k, w in ks._WORKSPACES.items() if k[2].chunk == 1024 and k[0] == zp.device)
    for part in (ws["ctr"], ws["ctl"]):
        assert (part == 0).all(), part  # reset by the last program of each launch
    assert (ws["q"] == -1).all()
    # Fewer rows (the flat ones first) on the same workspace, then all of them again.
    part = ks.la_step(zp[2:4], z0[2:4], 3.0, T[2:4], top_p[2:4], greedy=False,
                      seed=kw["seed"][2:4], chunk=1024, nprog=3)
    assert torch.equal(part[0], got[0][2:4]) and torch.equal(part[2], got[2][2:4])
    again = ks.la_step(zp, z0, 3.0, T, top_p, **kw)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="reorders the interpreter's programs")
def test_kernel_result_does_not_depend_on_the_order_programs_run_in(monkeypatch):
    """On a GPU the chunks of a row finish in any order and any one of them may be the last
    to arrive, the one that finishes the row. The interpreter runs programs in grid order;
    here it runs them in shuffled orders (its builder's grid index is remapped), and the
    results are the same, bit for bit, on peaked and flat rows, greedy and sampled."""
    from triton.runtime import interpreter

    from linalign.kernels import la_step

    zp, z0 = two_branch(4, 3000, seed=41, temperature=0.5, steepness=(1.0, 2.0))
    kw = dict(greedy=False, seed=torch.arange(4) + 3, chunk=512, paths=True)
    want = la_step(zp, z0, 2.0, 0.5, 0.9, **kw)
    assert (want[5][:, 0] == 0).any() and (want[5][:, 0] == 2).any()  # both launches finish rows
    set_dim, set_idx = interpreter.InterpreterBuilder.set_grid_dim, interpreter.InterpreterBuilder.set_grid_idx
    for order_seed in range(3):
        g = torch.Generator().manual_seed(order_seed)
        state = {}

        def grid_dim(self, x, y, z, state=state, g=g):
            state["order"] = [(i, j, k) for i in range(x) for j in range(y) for k in range(z)]
            state["perm"] = torch.randperm(len(state["order"]), generator=g).tolist()
            state["n"] = 0
            return set_dim(self, x, y, z)

        def grid_idx(self, x, y, z, state=state):
            n = state["n"]
            state["n"] = n + 1
            return set_idx(self, *state["order"][state["perm"][n]])

        monkeypatch.setattr(interpreter.InterpreterBuilder, "set_grid_dim", grid_dim)
        monkeypatch.setattr(interpreter.InterpreterBuilder, "set_grid_idx", grid_idx)
        got = la_step(zp, z0, 2.0, 0.5, 0.9, **kw)
        monkeypatch.undo()
        assert state["n"] == len(state["order"]) > 1  # the reordering ran
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_kernel_batches_beyond_one_grid(monkeypatch, device):
    """A grid's second axis stops at 65535 programs: larger batches take launch 1 in slices
    of rows (here slices of 3, so that a small batch needs three), with the same results."""
    from linalign.kernels import step as ks

    zp, z0 = two_branch(7, 4000, seed=51, temperature=0.5, steepness=(1.0, 2.0), device=device)
    kw = dict(greedy=False, seed=9, offset=4, chunk=512, paths=True)
    want = ks.la_step(zp, z0, 3.0, 0.5, 0.95, **kw)
    monkeypatch.setattr(ks, "MAX_GRID_ROWS", 3)
    got = ks.la_step(zp, z0, 3.0, 0.5, 0.95, **kw)
    assert (want[5][:, 0] == 0).any() and (want[5][:, 0] == 2).any()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
