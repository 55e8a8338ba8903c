"""Several principles at once (docs/semantics.md, "Several principles"): K principle branches
and one base, ``aligned = z_0 + sum_k (1 + r_k) (z_k - z_0)`` on the nucleus of
``softmax((z_0 + sum_k (z_k - z_0)) / T)``.

The reference computes it directly, row by row; the torch path and the Triton kernel go through
``linalign.torch_backend.compose`` (two branches for the one-principle step). K = 1 is exactly
the one-principle step. The decoder runs the K + 1 branches in one forward."""
import pytest
import torch

import linalign
from linalign import reference
from linalign.testing import ByteTokenizer, random_llama, two_branch

from helpers import chi_square, naive_decode


def _branches(K, B=5, V=1200, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    zp, z0 = two_branch(B, V, seed=seed, temperature=0.7)
    zs = torch.stack([zp] + [zp + 0.4 * torch.randn(B, V, generator=g) for _ in range(K - 1)])
    zs[0, 1, :30] = float("-inf")
    if K > 1:
        zs[1, 2, 3::40] = float("-inf")
    z0[3, 5::60] = float("-inf")
    return zs.to(device), z0.to(device)


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_the_reference(device, K, backend):
    zs, z0 = _branches(K, device=device, seed=K)
    ratios = [torch.tensor([3.0, 0.0, 1.0, -0.5, 5.0], device=device)] + [1.5] * (K - 1)
    T = torch.tensor([0.5, 1.0, 0.7, 0.5, 0.0], device=device)
    for greedy in (True, False):
        kw = dict(ratio=ratios, temperature=T, top_p=0.85, greedy=greedy, seed=9)
        got = linalign.step(zs, z0, backend=backend, **kw)
        want = linalign.step(zs, z0, backend="reference", **kw)
        assert torch.equal(got.tokens.cpu(), want.tokens.cpu())
        assert torch.equal(got.nucleus_size.cpu(), want.nucleus_size.cpu())
        assert torch.equal(got.status.cpu(), want.status.cpu())
        torch.testing.assert_close(got.logprobs.cpu(), want.logprobs.cpu(), rtol=1e-4,
                                   atol=1e-4)
        assert got.ratio.shape == (K, 5)


def test_compose_kernel_equals_the_torch_compose(device):
    """kernels.la_compose (one Triton pass) and linalign.torch_backend.compose (torch ops)
    agree, bans and bad rows included: bit for bit through the interpreter; on a GPU to fp32
    rounding (the compiler may fuse a multiply and an add into one FMA)."""
    from linalign import kernels
    from linalign.torch_backend import compose

    zs, z0 = _branches(3, seed=4, device=device)
    zs[2, 4, 17] = float("nan")
    z0[0, 9] = float("inf")
    r0 = torch.tensor([1.0, 2.0, 3.0, -1.0, 0.0], device=device)
    ratios = [r0, 0.5, 7.0]
    want = compose(zs, z0, ratios)
    got = kernels.la_compose(zs, z0, torch.stack([r0, torch.full_like(r0, 0.5),
                                                  torch.full_like(r0, 7.0)]))
    for g, w in zip(got[:2], want[:2]):
        assert torch.equal(g == float("-inf"), w == float("-inf"))
        if device.type == "cuda":
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-5)
        else:
            assert torch.equal(g, w)
    assert got[2].tolist() == want[2].tolist() == [True, False, False, False, True]


def test_sampling_distribution():
    """The composed path draws from the reference's composed distribution (chi-square)."""
    zs, z0 = _branches(2, V=300, seed=7)
    zs, z0 = zs[:, 3:4], z0[3:4]  # the row with bans in the base
    zs, z0 = zs.expand(2, 4000, 300).contiguous(), z0.expand(4000, 300).contiguous()
    kw = dict(ratio=[2.0, 1.0], temperature=1.0, top_p=0.95)
    out = linalign.step(zs, z0, greedy=False, seed=123, backend="torch", **kw)
    p = reference.distribution(zs[:, :1], z0[:1], kw["ratio"], 1.0, 0.95)[0]
    chi_square(out.tokens, p)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_one_principle_is_the_single_step(device, backend):
    zs, z0 = _branches(1, device=device)
    kw = dict(temperature=0.5, top_p=0.8, greedy=False, seed=1, backend=backend)
    a = linalign.step(zs, z0, ratio=[3.0], **kw)
    b = linalign.step(zs[0], z0, ratio=3.0, **kw)
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x, y)
    assert a.ratio.shape == (1, 5) and torch.equal(a.ratio[0], b.ratio)


def test_composition_by_hand():
    """One row by the contract's formulas: scores and nucleus."""
    z1 = torch.tensor([2.0, 1.0, 0.0, -1.0])
    z2 = torch.tensor([1.0, 2.5, 0.0, -1.0])
    z0 = torch.tensor([1.0, 1.0, 0.5, -1.0])
    zc = z0 + (z1 - z0) + (z2 - z0)  # [2.0, 2.5, -0.5, -1.0]
    a = z0 + 3 * (z1 - z0) + 1.5 * (z2 - z0)
    scores, in_n, _ = reference.composed_row(torch.stack([z1, z2]), z0, 1.0, 0.5, [2.0, 0.5])
    assert in_n.tolist() == [False, True, False, False]  # the composed argmax holds > 0.5
    assert scores[1] == a[1]
    out = linalign.step([z1[None], z2[None]], z0[None], ratio=[2.0, 0.5], temperature=1.0,
                        top_p=1.0, greedy=True, backend="torch")
    assert int(out.tokens) == int(torch.argmax(a))
    assert float(zc.max()) == 2.5


def test_bad_input_and_errors():
    zs, z0 = _branches(2)
    zs[1, 0, 5] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        linalign.step(zs, z0, ratio=1.0, backend="torch")
    out = linalign.step(zs, z0, ratio=1.0, backend="torch", check=False)
    assert out.status[0] & linalign.Status.BAD_INPUT and not out.status[1:].any()
    with pytest.raises(ValueError, match="2 entries for 3 principle"):
        linalign.step(torch.cat([zs, zs[:1]]), z0, ratio=[1.0, 2.0])
    with pytest.raises(ValueError, match="ambiguous"):
        linalign.step(zs, z0, ratio=torch.ones(5))
    with pytest.raises(ValueError, match="logits_0 must be"):
        linalign.step(zs, z0[:, :10], ratio=1.0)


# ----------------------------------------------------------------------------- decoder
@pytest.fixture(scope="module")
def aligner(device):
    return linalign.LinearAligner(random_llama("tiny", logit_std=1.5, device=device),
                                  ByteTokenizer())


PROMPTS = ["hello there, how are you?", "a", "Tell me about the sea."]
PRINCIPLES = [["Be kind.", "Be brief."], ["Use French.", "Be kind."], ["Be brief.", "Rhyme."]]


@pytest.mark.parametrize("mode", ["stacked", "two-caches"])
def test_decoder_matches_a_slow_decoder(aligner, mode):
    ratio = [[3.0, 1.0], 2.0, [0.0, 4.0]]
    out = aligner.generate(PROMPTS, PRINCIPLES, ratio=ratio, temperature=0.6, top_p=0.9,
                           max_new_tokens=8, mode=mode)
    ids_with, ids_without = aligner.branches(PROMPTS, PRINCIPLES)
    for i in range(3):
        r = ratio[i] if isinstance(ratio[i], list) else [ratio[i]] * 2
        want, _ = naive_decode(aligner.model, [ids_with[k][i] for k in range(2)],
                               ids_without[i], 8, ratio=r, temperature=0.6, top_p=0.9,
                               eos=(ByteTokenizer.eos_token_id,))
        assert out.token_ids[i] == want


def test_decoder_one_principle_lists_and_fast(aligner):
    kw = dict(max_new_tokens=8, greedy=False, seed=5)
    a = aligner.generate(PROMPTS, [["Be kind."]] * 3, **kw)
    b = aligner.generate(PROMPTS, "Be kind.", **kw)
    assert a.token_ids == b.token_ids
    c = aligner.generate(PROMPTS, PRINCIPLES, **kw)
    d = aligner.generate(PROMPTS, PRINCIPLES, fast=True, **kw)
    assert c.token_ids == d.token_ids
    with pytest.raises(ValueError, match="same number of principles"):
        aligner.generate(PROMPTS[:2], [["Be kind."], ["Be kind.", "Be brief."]])
    with pytest.raises(ValueError, match=r"ratio\[0\] has 3 values for 2 principles"):
        aligner.generate(PROMPTS, PRINCIPLES, ratio=[[1, 2, 3], 1, 1])


@pytest.mark.parametrize("args, message", [
    (["--principle", "x", "--ratio", "1", "--kl-budget", "0.5"], "not both"),
    (["--principle", "x", "--principle", "y", "--kl-budget", "0.5"], "one --principle"),
    (["--principle", "x", "--principle", "y", "--ratio", "1", "--ratio", "2", "--ratio", "3"],
     "--ratio given 3 times for 2 principles"),
    (["--principle", "x", "--principle", " "], "--principle is empty"),
    (["--principle", "x", "--kl-budget", "-1"], "--kl-budget"),
])
def test_command_bad_arguments(capsys, args, message):
    from linalign import cli

    assert cli.main(["generate", "hi", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
