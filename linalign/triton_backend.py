"""The Triton path: the fused kernels of ``linalign.kernels`` behind the backends' common
entry point ``run(args)``, for every mode.

- One principle (a fixed ratio, or kl mode, whose ratio the kernel derives in its first
  pass): ``kernels.la_step``.
- Several principles: ``kernels.la_compose`` (one elementwise launch over the K + 1
  branches; the torch ``compose`` under ``torch.compile``, which fuses it itself), then the
  one-principle kernel with ratio 1 (see ``linalign.torch_backend.compose``).
- Penalties (``args.penalties``): ``kernels.la_penalize`` first writes penalised fp32 copies
  of every branch, which the step then reads (the torch ``penalize`` under
  ``torch.compile``). Without penalties nothing of this runs.
- Under ``torch.compile`` the kernel launch is one opaque custom op
  (``torch.ops.linalign.triton_step``, ``linalign.ops``), so a decoding step compiles with
  ``fullgraph=True``.

Nothing here synchronises with the host: parameters, seeds and offsets may be device
tensors, and uniforms from a ``torch.Generator`` are drawn on the device.
"""
import dataclasses
import functools

import torch

from . import ops
from .arguments import StepArgs, StepOutput, used_ratio
from .random import row_uniforms
from .torch_backend import compose, flag_bad_rows, with_penalties


@functools.cache
def load_kernels():
    """``linalign.kernels``, imported on first use (importing linalign never imports
    Triton) and remembered (a step's host time counts)."""
    from . import kernels

    return kernels


def check_device(device):
    """``ValueError`` unless the kernels can run on ``device`` here."""
    if device.type != "cuda" and not load_kernels().INTERPRETED:
        raise ValueError("the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set "
                         "before linalign.kernels is first imported (to run on the CPU "
                         "through Triton's interpreter)")


def one_principle(zp, z0, ratio, temperature, top_p, *, greedy, generator, seed, offset,
                  kl=None):
    """The kernel on [B, V] branches: (tokens, logprobs, nucleus sizes, status, ratio used)."""
    u = None
    if not greedy and seed is None:
        u = row_uniforms(zp.shape[0], zp.device, generator=generator)
    if torch.compiler.is_compiling():
        return torch.ops.linalign.triton_step(*ops.as_op_args(zp, z0, ratio, temperature,
                                                              top_p, greedy, u, seed, offset,
                                                              kl))
    return load_kernels().la_step(zp, z0, ratio, temperature, top_p, greedy=greedy, u=u,
                                  seed=seed, offset=offset, kl=kl)


def penalized(args: StepArgs) -> StepArgs:
    """``args`` with every branch penalised (fp32 copies from ``kernels.la_penalize``), or
    ``args`` itself when it has no penalties."""
    pen = args.penalties
    if pen is None:
        return args
    if torch.compiler.is_compiling():
        return with_penalties(args)
    how = (pen.history, pen.repetition, pen.presence, pen.frequency)
    K = args.K
    both = _branch_workspace(K + 1, args.B, args)
    load_kernels().la_penalize(args.logits, *how, out=both[:K])
    load_kernels().la_penalize(args.logits_0[None], *how, out=both[K:])
    return dataclasses.replace(args, logits=both[:K], logits_0=both[K], penalties=None)


def _branch_workspace(G, B, args):
    # [G, B, V] fp32: the K principle branches then the base, written by la_penalize (from
    # torch's caching allocator: the same memory again at the next step of a decoding loop,
    # and a graph's own pool under CUDA graph capture)
    return torch.empty((G, B, args.logits.shape[-1]), device=args.device, dtype=torch.float32)


def run(args: StepArgs) -> StepOutput:
    """The step on checked arguments (every mode); ``ratio`` of the output is [K, B]."""
    check_device(args.device)
    args = penalized(args)
    kw = dict(greedy=args.greedy, generator=args.generator, seed=args.seed,
              offset=args.offset)
    if args.K == 1:
        r = None if args.kl is not None else args.ratios[0]
        *out, used = one_principle(args.logits[0], args.logits_0, r, args.temperature,
                                   args.top_p, kl=args.kl, **kw)
        return StepOutput(*out, ratio=used[None])
    B, dev = args.B, args.device
    if torch.compiler.is_compiling():
        zc, zb, bad = compose(args.logits, args.logits_0, args.ratios)
    else:
        r = torch.stack([x.to(torch.float32) if isinstance(x, torch.Tensor) else
                         torch.full((B,), x, device=dev, dtype=torch.float32)
                         for x in args.ratios])
        zc, zb, bad = load_kernels().la_compose(args.logits, args.logits_0, r)
    tokens, logprobs, sizes, status, _ = one_principle(zc, zb, 1.0, args.temperature,
                                                       args.top_p, **kw)
    status = flag_bad_rows(status, bad)
    return StepOutput(tokens, logprobs, sizes, status,
                      torch.stack([used_ratio(r, status) for r in args.ratios]))
