"""Several principles at once (SPEC section 4) on the fast backends.

K principle branches ``z_1..z_K`` and one base ``z_0`` with ratios ``r_k`` give the nucleus of
``softmax(z_c / T)``, ``z_c = z_0 + sum_k (z_k - z_0)``, and the aligned logits
``a = z_0 + sum_k (1 + r_k) (z_k - z_0)`` on it. ``compose`` turns the K + 1 branches into the
two that the one-principle step takes: ``z_c`` as the principle branch and
``z_b = 2 z_c - a`` as the without-branch, so that the step with ratio 1,
``z_c + 1 (z_c - z_b) = a``, scores exactly the composed logits (up to fp32 rounding) with
the composed nucleus. One elementwise pass over the K + 1 rows, then the usual step (its
Triton kernel on a GPU).

For K >= 2 a token that is -inf in any branch is banned and outside the nucleus (``z_c`` is
undefined there: the product of experts gives it no mass); NaN and +inf are bad input, as
everywhere: the row is flagged and the entry is treated as banned. K = 1 never comes here
(``linalign.step`` runs it as the one-principle step itself).
"""
import torch

from .reference import FMAX, _col

_INF = float("inf")


def compose(logits, logits_0, ratios):
    """``logits`` [K, B, V] and ``logits_0`` [B, V] (fp32/bf16/fp16), ``ratios`` K numbers
    or [B] tensors -> (``z_c``, ``z_b``, ``bad``): two fp32 [B, V] branches for the step with
    ratio 1, and the [B] bool rows that held NaN or +inf in some branch."""
    K, B, V = logits.shape
    dev = logits.device
    zs, z0 = logits.float(), logits_0.float()
    if dev.type == "cpu" and not torch.compiler.is_compiling():
        # On the CPU a check costs nothing: rows of finite logits (the usual case) skip
        # the masks, in place where possible (every fresh [B, V] buffer costs page faults).
        hi = torch.maximum(zs.amax((0, 2)), z0.amax(-1))  # NaN propagates
        lo = torch.minimum(zs.amin((0, 2)), z0.amin(-1))
        if bool(((hi < _INF) & (lo > -_INF)).all()):
            d = zs - z0  # [K, B, V]
            zc = zs[0].clone()
            for k in range(1, K):
                zc += d[k]  # z_1 + sum_{k >= 2} (z_k - z_0): the reference's order
            zc.clamp_(-FMAX, FMAX)
            a = z0.clone()
            for k in range(K):
                a.add_((1.0 + _col(ratios[k], B, dev)) * d[k]).clamp_(-FMAX, FMAX)
            zb = zc.mul(2.0).sub_(a).clamp_(-FMAX, FMAX)
            return zc, zb, torch.zeros(B, dtype=torch.bool, device=dev)
    bad_s = torch.isnan(zs) | (zs == _INF)
    bad_0 = torch.isnan(z0) | (z0 == _INF)
    bad = bad_s.any(-1).any(0) | bad_0.any(-1)
    finite = ((zs > -_INF) & ~bad_s).all(0) & (z0 > -_INF) & ~bad_0
    z0f = torch.where(finite, z0, 0.0)
    d = torch.where(finite, zs - z0f, 0.0)  # [K, B, V]
    zc = torch.where(finite, zs[0], 0.0)
    for k in range(1, K):
        zc = zc + d[k]  # z_1 + sum_{k >= 2} (z_k - z_0): the reference's order
    zc = zc.clamp(-FMAX, FMAX)
    a = z0f
    for k in range(K):
        a = (a + (1.0 + _col(ratios[k], B, dev)) * d[k]).clamp(-FMAX, FMAX)
    zb = (2.0 * zc - a).clamp(-FMAX, FMAX)
    return (torch.where(finite, zc, -_INF), torch.where(finite, zb, -_INF), bad)
