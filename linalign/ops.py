"""``torch.ops.linalign.triton_step``: the Triton step as one opaque custom op.

``linalign.step(..., backend="triton")`` (the default on CUDA) goes through this op when it
runs under ``torch.compile``, so a decoding step that calls it compiles with
``fullgraph=True``: the compiler sees one call with a fake implementation (output shapes and
dtypes) instead of tracing the launcher's Python. Eagerly the launcher is called directly
(an op dispatch costs a few microseconds).

For a graph without recompiles or host synchronisation, pass ``check=False``, per-row
parameters as [B] tensors (or numbers that stay fixed), ``seed`` as a device tensor (0-d:
one seed, counter (row, offset); [B]: per-row seeds) and ``offset`` as a device tensor.
Python ints for seed or offset are constants to the compiler: a new value recompiles.
"""
from typing import Optional

import torch


@torch.library.custom_op("linalign::triton_step", mutates_args=())
def triton_step(logits_p: torch.Tensor, logits_0: torch.Tensor, ratio: torch.Tensor,
                temperature: torch.Tensor, top_p: torch.Tensor, seed: Optional[torch.Tensor],
                offset: torch.Tensor, u: Optional[torch.Tensor], greedy: bool,
                kl_budget: Optional[torch.Tensor], max_ratio: Optional[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import kernels

    kl = None if kl_budget is None else (kl_budget, max_ratio)
    return kernels.la_step(logits_p, logits_0, ratio, temperature, top_p, greedy=greedy, u=u,
                           seed=seed, offset=offset, kl=kl)


@triton_step.register_fake
def _(logits_p, logits_0, ratio, temperature, top_p, seed, offset, u, greedy, kl_budget,
      max_ratio):
    B = logits_p.shape[0]
    return (logits_p.new_empty(B, dtype=torch.int64), logits_p.new_empty(B, dtype=torch.float32),
            logits_p.new_empty(B, dtype=torch.int32), logits_p.new_empty(B, dtype=torch.int32),
            logits_p.new_empty(B, dtype=torch.float32))


def as_op_args(zp, z0, r, T, p, greedy, u, seed, offset, kl=None):
    """The step's normalised parameters as the op's arguments (numbers become [B] tensors)."""
    B, dev = zp.shape[0], zp.device

    def rows(x, dtype):
        if isinstance(x, torch.Tensor):
            return x.to(device=dev, dtype=dtype).expand(B)
        return torch.full((B,), x, device=dev, dtype=dtype)

    if seed is not None and not isinstance(seed, torch.Tensor):
        seed = torch.tensor(seed, device=dev, dtype=torch.int64)
    kl_args = (None, None) if kl is None else (rows(kl[0], torch.float32),
                                               rows(kl[1], torch.float32))
    return (zp, z0, rows(0.0 if r is None else r, torch.float32), rows(T, torch.float32),
            rows(p, torch.float32), seed, rows(offset, torch.int64), u, bool(greedy), *kl_args)
