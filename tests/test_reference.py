"""The reference (linalign.reference) on its own: float64 against float32. Its agreement with
the authors' step is in tests/test_baselines.py; every backend is checked against it in
tests/test_step.py, tests/test_kl.py and tests/test_principles.py."""
import torch

import linalign
from linalign.testing import two_branch


def test_reference_float64_agrees_with_float32():
    zp, z0 = two_branch(16, 3000, seed=2, temperature=1.0)
    kw = dict(ratio=2.0, temperature=1.0, top_p=0.9, seed=1)
    a = linalign.reference.step(zp, z0, **kw)
    b = linalign.reference.step(zp, z0, dtype=torch.float64, **kw)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)


def test_reference_float64_in_kl_mode_and_with_several_principles():
    """Every mode runs in float64 too, with the float32 tokens (tie-free rows)."""
    zp, z0 = two_branch(6, 2000, seed=4, temperature=0.5)
    for kw in (dict(kl_budget=0.3), dict(ratio=[2.0, 0.5])):
        zs = zp if "kl_budget" in kw else torch.stack([zp, zp + 0.3 * torch.randn(zp.shape)])
        a = linalign.reference.step(zs, z0, temperature=0.5, top_p=0.8, greedy=True, **kw)
        b = linalign.reference.step(zs, z0, temperature=0.5, top_p=0.8, greedy=True,
                                    dtype=torch.float64, **kw)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.nucleus_size, b.nucleus_size)
        torch.testing.assert_close(a.ratio, b.ratio, atol=1e-5, rtol=1e-5)
