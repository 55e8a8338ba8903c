"""The baselines (linalign.baselines): the reference against a direct transcription of the
authors' sort-based step on tie-free random rows (identical nucleus sets and greedy tokens),
and the vectorised reference against the reference on hostile rows."""
import pytest
import torch

import linalign
from linalign.baselines import authors_as_step, authors_step, authors_top_p, vectorized_step
from linalign.random import row_uniforms
from linalign.reference import mass_above, nucleus
from linalign.testing import two_branch
from helpers import BAND


@pytest.mark.parametrize("ratio,temperature,top_p", [
    (3.0, 0.5, 0.8),  # the authors' HH setting
    (5.0, 0.5, 0.8),  # their personal-preference setting
    (1.0, 1.0, 0.95),
    (-0.5, 0.7, 0.5),
])
def test_reference_matches_authors(ratio, temperature, top_p):
    zp, z0 = two_branch(32, 2000, seed=13, temperature=temperature)
    # The authors' nucleus: principle probabilities left non-zero by their top-p.
    theirs = authors_top_p(torch.softmax(zp / temperature, -1), top_p) != 0
    checked = 0
    for b in range(zp.shape[0]):
        ours = nucleus(zp[b], temperature, top_p)
        f = mass_above(zp[b].double(), temperature)
        clear = (f - top_p).abs() > BAND  # tokens not within rounding of the boundary
        assert torch.equal(ours[clear], theirs[b][clear]), f"row {b}"
        checked += int(clear.sum())
    assert checked > 0.99 * zp.numel()
    ref = linalign.step(zp, z0, ratio=ratio, temperature=temperature, top_p=top_p,
                        greedy=True, backend="reference")
    assert torch.equal(ref.tokens, authors_step(zp, z0, ratio=ratio, temperature=temperature,
                                                top_p=top_p, greedy=True))


def test_authors_zero_mask_agrees_with_the_gap_rule_away_from_the_edge():
    # The authors keep a token when its fp32 principle probability is non-zero; the contract
    # keeps tokens within 80 T of the best. They agree on rows whose logits stay clear of the
    # 80..104 T band where fp32 probabilities underflow. (At top_p = 1 their top-p itself
    # also drops tail tokens once the fp32 running sum reaches 1.0; the contract keeps them.)
    g = torch.Generator().manual_seed(0)
    T = 0.5
    zp = torch.randn(4, 1000, generator=g) * 5  # a spread of about 60 T
    zp[:, 500:] -= 200.0 * T  # far below: zero in fp32 and outside the gap
    theirs = torch.softmax(zp / T, -1) != 0
    for b in range(4):
        assert torch.equal(nucleus(zp[b], T, 1.0), theirs[b])
        assert int(nucleus(zp[b], T, 1.0).sum()) == 500


# ---------------------------------------------------- the batched form (benchmark baseline)


def _hostile(zp, z0, seed):
    """Ties, bans in either branch, a row whose nucleus is all banned (fallback), a row with
    no finite principle logit and a NaN row (check=False)."""
    g = torch.Generator().manual_seed(seed)
    B, V = zp.shape
    zp, z0 = zp.clone(), z0.clone()
    zp[::3] = (zp[::3] * 2).round() / 2  # many ties, also at the nucleus edge
    ban = torch.rand(B, V, generator=g) < 0.05
    zp[ban] = float("-inf")
    ban = torch.rand(B, V, generator=g) < 0.05
    z0[ban] = float("-inf")
    if B >= 4:
        z0[1, zp[1] >= zp[1].max() - 5.0] = float("-inf")  # empties N: fallback
        zp[2] = float("-inf")  # nothing to choose
        zp[3, 0] = float("nan")  # bad input
    return zp, z0


CASES = [  # B, V, dtype, hostile, ratio, temperature, top_p
    (8, 2000, torch.float32, False, 3.0, 0.5, 0.8),
    (6, 1, torch.float32, False, 3.0, 0.5, 0.8),
    (16, 3000, torch.bfloat16, False, 5.0, 0.5, 0.8),
    (12, 1500, torch.float32, True, 1.0, 1.0, 0.95),
    (12, 1500, torch.float16, True, -0.5, 0.7, 1.0),
    (9, 700, torch.float32, True, "rows", "rows", "rows"),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("greedy", [True, False])
def test_vectorized_step_matches_the_reference(case, greedy):
    B, V, dtype, hostile, r, T, p = CASES[case]
    zp, z0 = two_branch(B, V, seed=100 + case, temperature=0.5, dtype=dtype)
    if hostile:
        zp, z0 = _hostile(zp, z0, case)
    if r == "rows":  # per-row parameters, including r = 0, T tiny, top_p = 1
        g = torch.Generator().manual_seed(case)
        r = torch.linspace(-1.0, 6.0, B)
        r[0] = 0.0
        T = torch.rand(B, generator=g) * 1.5 + 0.05
        p = torch.rand(B, generator=g) * 0.9 + 0.1
        p[1] = 1.0
    kw = dict(ratio=r, temperature=T, top_p=p, greedy=greedy)
    seed = 1234 + case
    ref = linalign.step(zp, z0, backend="reference", seed=seed, check=False, **kw)
    u = row_uniforms(B, zp.device, seed=seed)  # what the reference draws for this seed
    out = vectorized_step(zp, z0, r, T, p, greedy=greedy, u=u)
    assert torch.equal(out[0], ref.tokens)
    torch.testing.assert_close(out[1], ref.logprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[2], ref.nucleus_size)
    assert torch.equal(out[3], ref.status)


@pytest.mark.parametrize("greedy", [True, False])
def test_vectorized_step_traces_as_one_graph(greedy):
    # fullgraph=True fails on any graph break (a host sync, .item(), data-dependent shapes).
    # backend="eager" checks the trace without a C++ compiler; the GPU suite compiles it
    # with inductor in the benchmarks.
    torch._dynamo.reset()
    compiled = torch.compile(vectorized_step, backend="eager", fullgraph=True, dynamic=True)
    for B, V in ((4, 500), (7, 900)):
        zp, z0 = two_branch(B, V, seed=B)
        u = row_uniforms(B, zp.device, seed=B)
        want = vectorized_step(zp, z0, 3.0, 0.5, 0.8, greedy=greedy, u=u)
        got = compiled(zp, z0, 3.0, 0.5, 0.8, greedy=greedy, u=u)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="the GPU suite compiles it with inductor on CUDA (bench_step --grid)")
@pytest.mark.skipif(__import__("shutil").which("g++") is None and
                    __import__("shutil").which("c++") is None,
                    reason="inductor on CPU needs a C++ compiler")
def test_vectorized_step_compiles_with_inductor():
    # The default backend, as the benchmark uses it: about 35 s of compiling on one CPU
    # thread, so one mode only (sampling: the larger graph) and one shape.
    torch._dynamo.reset()
    compiled = torch.compile(vectorized_step, dynamic=True, fullgraph=True)
    zp, z0 = _hostile(*two_branch(8, 2000, seed=5, temperature=0.5), 5)
    u = row_uniforms(8, zp.device, seed=5)
    want = linalign.step(zp, z0, ratio=3.0, temperature=0.5, top_p=0.8, greedy=False,
                         seed=5, backend="reference", check=False)
    got = compiled(zp, z0, 3.0, 0.5, 0.8, greedy=False, u=u)
    assert torch.equal(got[0], want.tokens)
    assert torch.equal(got[2], want.nucleus_size)
    assert torch.equal(got[3], want.status)
    torch.testing.assert_close(got[1], want.logprobs, atol=1e-5, rtol=1e-5)


def test_authors_as_step_has_the_step_interface():
    """The authors' step behind linalign.step's keywords (the decoder's step= parameter):
    the same tokens as the authors' step, per-row tensors accepted."""
    zp, z0 = two_branch(5, 800, seed=3, temperature=0.5)
    out = authors_as_step(zp, z0, ratio=torch.full((5,), 3.0), temperature=torch.full((5,), 0.5),
                          top_p=torch.full((5,), 0.8), greedy=True, seed=None, offset=0,
                          backend="auto", check=False)
    assert torch.equal(out.tokens, authors_step(zp, z0, ratio=3.0, temperature=0.5, top_p=0.8,
                                                greedy=True))
    ref = linalign.step(zp, z0, ratio=3.0, temperature=0.5, top_p=0.8, greedy=True,
                        backend="reference")
    assert torch.equal(out.tokens, ref.tokens)  # tie-free rows: the two agree
