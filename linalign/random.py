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


def philox_uniform(seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, c0 | c1 << 32)`` for int64 tensors (broadcast together): fp32 in [0, 1)."""
    seed, c0, c1 = torch.broadcast_tensors(seed, c0, c1)
    # Philox state in pairs so each round is a handful of tensor ops:
    # x = (c0, c2), y = (c1, c3), key = (k0, k1); words are int64 holding uint32 values.
    x = torch.stack([c0 & _M32, torch.zeros_like(c0)])
    y = torch.stack([c1 & _M32, torch.zeros_like(c0)])
    key = torch.stack([seed & _M32, (seed >> 32) & _M32])
    mul = torch.tensor([_ROUND_B, _ROUND_A]).view(2, *([1] * c0.dim()))
    bump = torch.tensor([_KEY_A, _KEY_B]).view(2, *([1] * c0.dim()))
    for _ in range(_ROUNDS):
        # (B * c2, A * c0): a 64-bit product of two uint32 words. When it passes 2**63 the
        # int64 product wraps, which leaves the low word intact and the arithmetic shift
        # gives hi - 2**32, whose low 32 bits are hi again (checked bit for bit against
        # tl.rand in tests/test_random.py).
        prod = mul * x.flip(0)
        x, y = ((prod >> 32) & _M32) ^ y ^ key, prod & _M32
        key = (key + bump) & _M32
    v = x[0]
    v = torch.where(v >= 2**31, v - 2**32, v)  # bitcast to int32
    v = torch.where(v < 0, -v - 1, v)
    return v.to(torch.float32) * torch.tensor(_SCALE, dtype=torch.float32)


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
