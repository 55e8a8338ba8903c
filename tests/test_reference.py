"""The reference against a direct transcription of the authors' sort-based step, on tie-free
random rows: identical nucleus sets and greedy tokens."""
import pytest
import torch

import linalign
from linalign.authors import authors_step, authors_top_p
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
    # The authors keep a token when its fp32 principle probability is non-zero; the SPEC
    # keeps tokens within 80 T of the best. They agree on rows whose logits stay clear of the
    # 80..104 T band where fp32 probabilities underflow. (At top_p = 1 their top-p itself
    # also drops tail tokens once the fp32 running sum reaches 1.0; the SPEC keeps them.)
    g = torch.Generator().manual_seed(0)
    T = 0.5
    zp = torch.randn(4, 1000, generator=g) * 5  # a spread of about 60 T
    zp[:, 500:] -= 200.0 * T  # far below: zero in fp32 and outside the gap
    theirs = torch.softmax(zp / T, -1) != 0
    for b in range(4):
        assert torch.equal(nucleus(zp[b], T, 1.0), theirs[b])
        assert int(nucleus(zp[b], T, 1.0).sum()) == 500


def test_reference_float64_agrees_with_float32():
    zp, z0 = two_branch(16, 3000, seed=2, temperature=1.0)
    kw = dict(ratio=2.0, temperature=1.0, top_p=0.9, seed=1)
    a = linalign.reference.step(zp, z0, **kw)
    b = linalign.reference.step(zp, z0, dtype=torch.float64, **kw)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
