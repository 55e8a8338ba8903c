"""kl mode (docs/semantics.md, "kl mode"): the closed-form step, r_eff = sqrt(2 eps / v) - 1 per
row.

Every backend against the reference on fresh random rows; the budget is spent (the measured
KL of the unmasked aligned distribution from the base is within 10 % of a small budget);
a zero difference is plain decoding of the principle branch; the decoder and its fast path
take kl_budget. The Triton kernel runs compiled on a GPU, through the interpreter on a CPU."""
import pytest
import torch

import linalign
from linalign import reference
from linalign.testing import ByteTokenizer, random_llama, two_branch

from helpers import naive_decode


def _rows(device, B=6, V=1500, seed=0):
    zp, z0 = two_branch(B, V, seed=seed, device=device, temperature=0.7)
    z0 = z0 + 4.0  # a constant offset between the branches changes nothing (softmax)
    zp[1, :40] = float("-inf")  # banned in the principle branch
    z0[2, 7::50] = float("-inf")  # banned in the without-branch
    return zp, z0


def _kl_of(zp, z0, T, r_eff):
    """KL(softmax(u + kappa g) || softmax(u)) in fp64, u = z_0 / T, g = (z_p - z_0) / T, over
    the tokens finite in both branches (the unmasked aligned distribution of docs/semantics.md,
    "kl mode")."""
    both = torch.isfinite(zp) & torch.isfinite(z0)
    u, g = z0[both].double() / T, (zp[both].double() - z0[both].double()) / T
    q = torch.log_softmax(u + (r_eff + 1) * g, 0)
    return float((q.exp() * (q - torch.log_softmax(u, 0))).sum())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ratio_matches_the_reference(device, backend):
    zp, z0 = _rows(device)
    T = torch.tensor([0.5, 1.0, 0.7, 0.0, 2.0, 0.5], device=device)
    eps = torch.tensor([0.05, 0.5, 0.01, 0.3, 2.0, 1e-4], device=device)
    cap = torch.tensor([10.0, 10.0, 0.5, 10.0, 3.0, 10.0], device=device)
    kw = dict(kl_budget=eps, max_ratio=cap, temperature=T, top_p=0.9)
    want = linalign.step(zp, z0, backend="reference", greedy=True, **kw)
    for greedy in (True, False):
        got = linalign.step(zp, z0, backend=backend, greedy=greedy, seed=11, **kw)
        torch.testing.assert_close(got.ratio, want.ratio, rtol=2e-4, atol=2e-5)
        assert got.ratio[3] == 0  # T = 0: greedy on the principle argmax, nothing to spend
        assert got.ratio[2] <= 0.5 + 1e-6  # the cap
        ref = linalign.step(zp, z0, backend="reference", greedy=greedy, seed=11, **kw)
        assert torch.equal(got.tokens.cpu(), ref.tokens.cpu())
        assert torch.equal(got.nucleus_size.cpu(), ref.nucleus_size.cpu())


def test_kernel_result_does_not_depend_on_the_split(device):
    """One chunk per row, or five whose moments are combined: the same r_eff."""
    from linalign import kernels

    zp, z0 = _rows(device, B=3, V=5000, seed=3)
    outs = [kernels.la_step(zp, z0, None, 0.6, 0.8, greedy=True, kl=(0.2, 10.0), chunk=c)
            for c in (8192, 1024)]
    torch.testing.assert_close(outs[0][4], outs[1][4], rtol=1e-5, atol=1e-6)
    assert torch.equal(outs[0][0], outs[1][0])


@pytest.mark.parametrize("eps", [1e-5, 1e-4, pytest.param(1e-3, marks=pytest.mark.xfail(
    strict=True, reason="a known limit of the second-order bound: at 1e-3 nats one row of 8 "
    "is 11 % off (the third-order term grows with the budget; docs/semantics.md, kl mode)"))])
def test_small_budgets_are_spent(eps):
    """To second order KL = kappa^2 v / 2 = eps: within 10 % for small budgets. (On these
    rows the error is under 1 % at 1e-5 and under 4 % at 1e-4; at 1e-3 one row of 8 is 11 %
    off: the third-order term grows with the budget, a known failure kept as a strict
    xfail.)"""
    zp, z0 = two_branch(8, 4000, seed=5, temperature=1.0)
    out = linalign.step(zp, z0, kl_budget=eps, temperature=1.0, top_p=0.8, greedy=True,
                        backend="torch")
    for b in range(8):
        kl = _kl_of(zp[b], z0[b], 1.0, float(out.ratio[b]))
        assert abs(kl / eps - 1) < 0.1, (b, kl, eps)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_zero_difference_is_plain_decoding(device, backend):
    zp, _ = two_branch(4, 1000, seed=2, device=device)
    kw = dict(temperature=0.5, top_p=0.8, greedy=False, seed=4, backend=backend)
    out = linalign.step(zp, zp.clone(), kl_budget=0.5, **kw)
    plain = linalign.step(zp, zp.clone(), ratio=0.0, **kw)
    assert (out.ratio == 0).all()
    assert torch.equal(out.tokens, plain.tokens)


def test_reference_definition_by_hand():
    """One row, computed from the contract's formulas in fp64."""
    zp = torch.tensor([2.0, 1.0, 0.0, -1.0])
    z0 = torch.tensor([1.0, 1.5, 0.0, -2.0])
    T, eps = 0.5, 0.1
    g = ((zp - z0) / T).double()
    pi0 = torch.softmax(z0.double() / T, 0)
    v = float((pi0 * g * g).sum() - (pi0 * g).sum() ** 2)
    want = min((2 * eps / v) ** 0.5, 11.0) - 1
    assert abs(reference.kl_ratio(zp, z0, T, eps, 10.0) - want) < 1e-5
    assert reference.kl_ratio(zp, z0, T, eps, 0.0) == pytest.approx(min(want, 0.0))


def test_errors():
    zp, z0 = two_branch(2, 50, seed=0)
    with pytest.raises(ValueError, match="got both"):
        linalign.step(zp, z0, ratio=1.0, kl_budget=0.1)
    with pytest.raises(TypeError, match="got neither"):
        linalign.step(zp, z0)
    with pytest.raises(ValueError, match=r"kl_budget must be finite and >= 0"):
        linalign.step(zp, z0, kl_budget=-0.1)
    with pytest.raises(ValueError, match=r"max_ratio must be finite and >= 0"):
        linalign.step(zp, z0, kl_budget=0.1, max_ratio=float("nan"))
    with pytest.raises(ValueError, match="kl_budget is for one principle"):
        linalign.step(torch.stack([zp, zp]), z0, kl_budget=0.1)


# ----------------------------------------------------------------------------- decoder
@pytest.fixture(scope="module")
def aligner(device):
    return linalign.LinearAligner(random_llama("tiny", logit_std=1.5, device=device),
                                  ByteTokenizer())


@pytest.mark.parametrize("mode", ["stacked", "two-caches"])
def test_decoder_matches_a_slow_decoder(aligner, mode):
    prompts, eps = ["hello there, how are you?", "a", "Tell me about the sea."], [0.2, 1.0, 5.0]
    ids_with, ids_without = aligner.branches(prompts, "Be kind.")
    out = aligner.generate_ids(ids_with, ids_without, kl_budget=eps, max_ratio=8.0,
                               temperature=0.7, top_p=0.9, max_new_tokens=8, mode=mode)
    for i in range(3):
        want, _ = naive_decode(aligner.model, ids_with[i], ids_without[i], 8,
                               kl_budget=eps[i], max_ratio=8.0, temperature=0.7, top_p=0.9,
                               eos=(ByteTokenizer.eos_token_id,))
        assert out.token_ids[i] == want
    assert len(out.extra["ratio"]) == 3 and all(-1 <= r <= 8 for r in out.extra["ratio"])


def test_decoder_fast_and_errors(aligner):
    kw = dict(kl_budget=0.5, max_new_tokens=8, greedy=False, seed=3)
    a = aligner.generate(["hello", "the sea"], "Be kind.", **kw)
    b = aligner.generate(["hello", "the sea"], "Be kind.", fast=True, **kw)
    assert a.token_ids == b.token_ids
    with pytest.raises(ValueError, match="not both"):
        aligner.generate("hi", "Be kind.", ratio=2.0, kl_budget=0.5)
    with pytest.raises(ValueError, match="kl_budget must be finite and >= 0"):
        aligner.generate("hi", "Be kind.", kl_budget=-1.0)
    with pytest.raises(ValueError, match="kl_budget is for one principle"):
        aligner.generate("hi", [["Be kind.", "Be brief."]], kl_budget=0.5)
