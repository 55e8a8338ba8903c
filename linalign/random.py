"""Per-row uniforms for the inverse-CDF draw, the same on every backend.

A step draws one uniform ``u`` per row. With a ``seed`` the uniform comes from Triton's
counter-based Philox-4x32-10 stream (``tl.rand``): key = the 64-bit seed, counter
``(c0, c1, c2, c3) = (row, offset, 0, 0)`` for one integer seed, ``(0, offset, 0, 0)`` for
per-row seeds (so a row's draws do not depend on the rest of the batch). This module
computes exactly the same numbers in torch integer arithmetic, so the torch path and the
reference sample the same tokens as the kernel for the same seed. With a
``torch.Generator`` (or neither), the uniforms come from ``torch.rand`` instead.
"""
import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_ROUNDS = 10
# Triton's uint_to_uniform_float scale: the largest value with MAX_INT * scale < 1 in fp32.
_SCALE = 4.6566127342e-10


def _mul_hi_lo(a: int, b: torch.Tensor):
    # (hi, lo) 32-bit words of the 64-bit product a * b, a < 2**32 constant, b: int64 in
    # [0, 2**32). Split b into 16-bit halves so no partial product overflows int64.
    b_lo, b_hi = b & 0xFFFF, b >> 16
    ll, hl = a * b_lo, a * b_hi  # each < 2**48
    lo = (ll + ((hl & 0xFFFF) << 16)) & _M32
    hi = (hl + (ll >> 16)) >> 16
    return hi, lo


def philox_uniform(seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, c0 | c1 << 32)`` for int64 tensors (broadcast together): fp32 in [0, 1)."""
    seed, c0, c1 = torch.broadcast_tensors(seed, c0, c1)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1 = c0 & _M32, c1 & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_SCALE, dtype=torch.float32)


def row_uniforms(B, device, *, generator=None, seed=None, offset=0) -> torch.Tensor:
    """One uniform in [0, 1) per row: [B] fp32 on ``device`` (see the module docstring)."""
    if seed is None:
        return torch.rand(B, generator=generator, device=device, dtype=torch.float32)
    off = offset.to(torch.int64) if isinstance(offset, torch.Tensor) else torch.tensor(offset)
    if isinstance(seed, torch.Tensor):
        s, c0 = seed.to(torch.int64), torch.zeros((), dtype=torch.int64)
    else:
        s, c0 = torch.tensor(int(seed)), torch.arange(B)
    u = philox_uniform(s.cpu(), c0.cpu(), off.cpu())
    return u.expand(B).to(device)
