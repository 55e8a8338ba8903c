"""Several principles at once (docs/semantics.md, "Several principles"): one elementwise Triton
pass that turns K principle branches and the base into the two branches of the one-principle
step.

For every token: ``d_k = z_k - z_0``, ``z_c = z_1 + sum_{k >= 2} d_k`` (the composed
principle branch, whose nucleus the step takes) and ``a = z_0 + sum_k (1 + r_k) d_k`` (the
composed aligned logits); it writes ``z_c`` and ``z_b = 2 z_c - a``, so that the step with
ratio 1 scores ``z_c + (z_c - z_b) = a``. A token that is not finite in every branch is
banned (-inf in both outputs); a row with NaN or +inf anywhere is flagged in ``bad``. The
same arithmetic as ``linalign.torch_backend.compose`` (the torch version, used on the CPU), in
one launch: K + 1 reads and two fp32 writes per token.
"""
import triton
import triton.language as tl

from .step import FMAX


@triton.jit
def la_compose_kernel(zs_ptr, z0_ptr, r_ptr, zc_ptr, zb_ptr, bad_ptr, V, stride_k, stride_b,
                      stride_0, K: tl.constexpr, BLOCK: tl.constexpr):
    # grid (B, cdiv(V, BLOCK)); zs: [K, B, V], z0: [B, V] (last dim contiguous); r: [K, B]
    # fp32; zc, zb: [B, V] fp32 contiguous; bad: [B] int32, zeroed by the caller.
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < V
    y = tl.load(z0_ptr + row.to(tl.int64) * stride_0 + offs, mask=msk, other=0.0).to(tl.float32)
    bad = (y != y) | (y == float("inf"))
    fin = (y == y) & (tl.abs(y) < float("inf"))
    y = tl.where(fin, y, 0.0)
    zc = tl.zeros((BLOCK,), tl.float32)
    a = y
    for k in tl.static_range(K):
        x = tl.load(zs_ptr + k * stride_k + row.to(tl.int64) * stride_b + offs, mask=msk,
                    other=0.0).to(tl.float32)
        bad = bad | (x != x) | (x == float("inf"))
        fin_k = (x == x) & (tl.abs(x) < float("inf"))
        fin = fin & fin_k
        d = tl.where(fin_k, x - y, 0.0)
        if k == 0:
            zc = tl.where(fin_k, x, 0.0)
        else:
            zc = zc + d
        r = tl.load(r_ptr + k * tl.num_programs(0) + row)
        a = tl.minimum(tl.maximum(a + (1.0 + r) * d, -FMAX), FMAX)
    zc = tl.minimum(tl.maximum(zc, -FMAX), FMAX)
    zb = tl.minimum(tl.maximum(2.0 * zc - a, -FMAX), FMAX)
    base = row.to(tl.int64) * V + offs
    tl.store(zc_ptr + base, tl.where(fin, zc, float("-inf")), mask=msk)
    tl.store(zb_ptr + base, tl.where(fin, zb, float("-inf")), mask=msk)
    tl.atomic_max(bad_ptr + row, tl.max((bad & msk).to(tl.int32), axis=0))


COMPOSE_BLOCK = 2048


def la_compose(logits, logits_0, ratios):
    """``logits`` [K, B, V], ``logits_0`` [B, V] (fp32/bf16/fp16, last dim contiguous),
    ``ratios`` a [K, B] fp32 tensor on their device -> (z_c, z_b, bad): two fp32 [B, V]
    tensors and the [B] bool rows with NaN or +inf. No host synchronisation."""
    import torch

    K, B, V = logits.shape
    zs = logits if logits.stride(-1) == 1 else logits.contiguous()
    z0 = logits_0 if logits_0.stride(-1) == 1 else logits_0.contiguous()
    zc = torch.empty((B, V), device=zs.device, dtype=torch.float32)
    zb = torch.empty_like(zc)
    bad = torch.zeros(B, device=zs.device, dtype=torch.int32)
    if B and V:
        grid = (B, triton.cdiv(V, COMPOSE_BLOCK))
        la_compose_kernel[grid](zs, z0, ratios.contiguous(), zc, zb, bad, V, zs.stride(0),
                                zs.stride(1), z0.stride(0), K=K, BLOCK=COMPOSE_BLOCK,
                                num_warps=8)
    return zc, zb, bad > 0
