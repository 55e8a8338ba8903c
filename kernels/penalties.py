"""The penalties (docs/semantics.md, "Penalties") before the step, for the Triton path: a
pre-launch that writes penalised fp32 copies of every branch into a workspace, then the
unchanged step reads the workspace instead of the logits.

Per call: one copy of the K + 1 branches into the fp32 workspace (``torch.Tensor.copy_``,
one elementwise launch per branch group), then ``la_penalty_kernel`` over the history: each
program takes ``BLOCK_H`` history entries of one row and one branch, counts each entry's
token over the row's whole history (a [BLOCK_H, BLOCK_H] comparison per tile, O(H^2) a
row, which is nothing next to V), reads that token's logit from the **input** (never from
the workspace, which other programs of the row are writing) and stores the penalised
value. Entries of the same token store the same value, so duplicates do not race. No host
synchronisation: it captures in a CUDA graph. Bytes per call, B rows of V logits of s bytes:
2 B V s read and 2 B V 4 written by the copy, then the step reads 2 B V 4 instead of
2 B V s (docs/gpu.md, "Penalties").

The arithmetic is the reference's, in fp32, with contraction into fused multiply-adds
switched off (``enable_fp_fusion=False``) and an IEEE-rounded division (``tl.div_rn``:
Triton's ``/`` compiles to an approximate one), so that every backend rounds alike
(``tests/test_penalties.py`` reads the PTX).
"""
import triton
import triton.language as tl

from .step import FMAX, INTERPRETED


@triton.jit
def la_penalty_kernel(src_ptr, dst_ptr, hist_ptr, rep_ptr, pres_ptr, freq_ptr, rep_v, pres_v,
                      freq_v, H, V, stride_sk, stride_sb, stride_dk, stride_db, stride_h,
                      REP_PER_ROW: tl.constexpr, PRES_PER_ROW: tl.constexpr,
                      FREQ_PER_ROW: tl.constexpr, BLOCK_H: tl.constexpr):
    # grid (B, cdiv(H, BLOCK_H), K): src [K, B, V] (any dtype, last dim contiguous), dst
    # [K, B, V] fp32 holding a copy of src; hist [B, H] int64 (< 0 or >= V: padding);
    # rep, pres, freq: [B] fp32 when *_PER_ROW, else the scalar values.
    row = tl.program_id(0)
    k = tl.program_id(2)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    # int64 row offsets: rows * V overflows int32 at large B * V
    hrow = hist_ptr + row.to(tl.int64) * stride_h
    tok = tl.load(hrow + offs, mask=offs < H, other=-1)
    valid = (tok >= 0) & (tok < V)
    count = tl.zeros((BLOCK_H,), tl.int32)
    for i0 in range(0, H, BLOCK_H):
        cols = i0 + tl.arange(0, BLOCK_H)
        other = tl.load(hrow + cols, mask=cols < H, other=-1)
        count += tl.sum((tok[:, None] == other[None, :]).to(tl.int32), axis=1)
    if REP_PER_ROW:
        rep = tl.load(rep_ptr + row)
    else:
        rep = rep_v
    if PRES_PER_ROW:
        pres = tl.load(pres_ptr + row)
    else:
        pres = pres_v
    if FREQ_PER_ROW:
        freq = tl.load(freq_ptr + row)
    else:
        freq = freq_v
    col = tl.where(valid, tok, 0)
    z = tl.load(src_ptr + k.to(tl.int64) * stride_sk + row.to(tl.int64) * stride_sb + col,
                mask=valid, other=0.0).to(tl.float32)
    x = tl.where(z < 0, z * rep, tl.div_rn(z, rep))  # IEEE division (`/` is approximate)
    amount = tl.minimum(tl.maximum(freq * count.to(tl.float32) + pres, -FMAX), FMAX)
    out = tl.minimum(tl.maximum(x - amount, -FMAX), FMAX)
    finite = (z == z) & (tl.abs(z) < float("inf"))
    tl.store(dst_ptr + k.to(tl.int64) * stride_dk + row.to(tl.int64) * stride_db + col,
             out, mask=valid & finite)


BLOCK_H = 64
#: Compile options of the launch: no fused multiply-adds (see the module docstring); the
#: interpreter takes no compile options.
COMPILE_OPTIONS = {} if INTERPRETED else {"enable_fp_fusion": False}


def _scalar_or_rows(x, device):
    # (pointer tensor, scalar value, per row) of a number or a [B] tensor
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32).contiguous(), 0.0, True
    return torch.empty(1, device=device, dtype=torch.float32), float(x), False


def la_penalize(logits, history, repetition, presence, frequency, out=None):
    """Penalised fp32 copies of ``logits`` [K, B, V] (fp32/bf16/fp16, last dim contiguous),
    every branch with the same [B, H] int64 ``history``; ``repetition``, ``presence``,
    ``frequency``: a number or a [B] tensor each (already validated). ``out``: a [K, B, V]
    fp32 workspace to write (default: a new one). Returns it. No host synchronisation."""
    import torch

    K, B, V = logits.shape
    dev = logits.device
    if out is None:
        out = torch.empty((K, B, V), device=dev, dtype=torch.float32)
    out.copy_(logits)
    H = history.shape[1]
    if B == 0 or H == 0 or V == 0:
        return out
    h = history.to(torch.int64).contiguous()
    src = logits if logits.stride(-1) == 1 else logits.contiguous()
    r_t, r_v, r_row = _scalar_or_rows(repetition, dev)
    p_t, p_v, p_row = _scalar_or_rows(presence, dev)
    f_t, f_v, f_row = _scalar_or_rows(frequency, dev)
    la_penalty_kernel[(B, triton.cdiv(H, BLOCK_H), K)](
        src, out, h, r_t, p_t, f_t, r_v, p_v, f_v, H, V, src.stride(0), src.stride(1),
        out.stride(0), out.stride(1), h.stride(0), REP_PER_ROW=r_row, PRES_PER_ROW=p_row,
        FREQ_PER_ROW=f_row, BLOCK_H=BLOCK_H, num_warps=4, **COMPILE_OPTIONS)
    return out
