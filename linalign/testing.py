"""Synthetic two-branch logits that look like real next-token distributions, for tests and
benchmarks (never time or test a sampler on uniform noise: real rows are peaked).

Model of a row: the vocabulary in a random order, logit of the token of rank k
``T * (-s * log(k) + 0.3 * N(0, 1))`` (Zipf's law, as language-model rows roughly follow),
with a steepness ``s`` drawn per row and ``T`` the temperature the rows are meant for. At
that temperature, with V = 49152, a steepness of 1.2 gives a 0.8 nucleus of 250 to 450
tokens, 1.5 about a dozen, 2.0 three to five; 1.0 is a flat row (thousands). The without-branch is the same row
moved by ``0.5 * N(0, 1)`` per token plus a principle-like shift of +-2 on 20 tokens among
the 200 most likely.
"""
import torch


def zipf_logits(B, V, *, steepness=(1.2, 2.0), temperature=1.0, generator=None, device="cpu",
                dtype=torch.float32):
    """[B, V] principle-branch logits; ``steepness`` is a number or a (low, high) range."""
    g = generator
    lo, hi = (steepness, steepness) if isinstance(steepness, (int, float)) else steepness
    s = lo + (hi - lo) * torch.rand(B, 1, generator=g)
    ranks = torch.argsort(torch.rand(B, V, generator=g), dim=-1).float() + 1.0
    z = temperature * (-s * torch.log(ranks) + 0.3 * torch.randn(B, V, generator=g)) + 5.0
    return z.to(device=device, dtype=dtype)


def without_branch(logits_p, *, generator=None):
    """Logits of the same conversation without the principle (see the module docstring)."""
    g = generator
    zp = logits_p.float().cpu()
    B, V = zp.shape
    z0 = zp + 0.5 * torch.randn(B, V, generator=g)
    k = min(V, 200)
    top = zp.topk(k, dim=-1).indices
    pick = torch.argsort(torch.rand(B, k, generator=g), dim=-1)[:, : min(20, k)]
    cols = top.gather(-1, pick)
    shift = 2.0 * (torch.randint(0, 2, cols.shape, generator=g).float() * 2 - 1)
    z0.scatter_add_(-1, cols, shift)
    return z0.to(device=logits_p.device, dtype=logits_p.dtype)


def two_branch(B, V, *, seed=0, device="cpu", dtype=torch.float32, **kw):
    """(logits_p, logits_0) drawn with a fixed seed; keyword arguments go to zipf_logits."""
    g = torch.Generator().manual_seed(seed)
    zp = zipf_logits(B, V, generator=g, device=device, dtype=dtype, **kw)
    return zp, without_branch(zp, generator=g)
