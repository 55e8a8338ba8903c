"""Linear layers with fp16 weights packed for FBGEMM: the fast way to run a small model on
the CPU.

On one CPU thread a decode forward of a small model is mostly its linear layers, and with
fp32 weights MKL's product with 2 rows costs about twice its product with one, so Linear
Alignment's 2-row forward cost almost two plain ones. ``pack_linears(model)`` replaces every
``nn.Linear`` of a model on the CPU, in place, by an ``Fp16Linear``: the weight rounded
once to fp16 and packed by FBGEMM (``torch.fbgemm_pack_gemm_matrix_fp16``), multiplied by
``torch.fbgemm_linear_fp16_weight``, which converts the weights to fp32 in registers. The
activations, the products' accumulation, the outputs and everything else in the model
(embeddings, norms, attention, the residual stream, the logits) stay fp32: the only change
is each weight's rounding to fp16 (a relative error of at most 2^-11). A 2-row product then
costs little more than a 1-row one, and both read half the bytes.

Measurements, the alternatives (bf16 weights and activations through oneDNN, the GGUF's
4-bit codes, prepacked fp32) and how many greedy tokens change: docs/decoder.md ("Packed
linear layers on the CPU").
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

#: The largest finite fp16 value: a layer with a larger weight is not packed.
FP16_MAX = 65504.0

# torch marks the FBGEMM fp16 functions deprecated (a warning once per process, at the first
# pack and the first product); they are what the pinned torch has for fp16 weights with fp32
# activations, and a command prints its answer, not that warning.
warnings.filterwarnings("ignore", message=r"fbgemm_\w+ is deprecated", category=UserWarning)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.fbgemm_pack_gemm_matrix_fp16(weight.detach().float().contiguous())


@functools.lru_cache(maxsize=1)
def cpu_can_pack() -> bool:
    """Whether this torch and CPU run FBGEMM's fp16-weight product (a torch built with
    FBGEMM on an x86 CPU with AVX2 or AVX-512), tried once on a small layer."""
    if not hasattr(torch, "fbgemm_pack_gemm_matrix_fp16"):
        return False
    try:
        out = Fp16Linear(nn.Linear(64, 32))(torch.ones(2, 64))
    except RuntimeError:  # "Your CPU does not support FBGEMM", a build without it
        return False
    return out.shape == (2, 32) and bool(torch.isfinite(out).all())


class Fp16Linear(nn.Module):
    """``nn.Linear`` with its weight rounded to fp16 and packed by FBGEMM; fp32 in and
    out (fp32 activations and accumulation)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _pack(linear.weight)
        # for code that reads a layer's shape (model.get_output_embeddings().weight.shape):
        # a tensor without storage, which fails loudly if anything computes with it
        self.weight = torch.empty(linear.weight.shape, device="meta")
        self.bias = torch.zeros(self.out_features) if linear.bias is None else \
            linear.bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] fp32 -> [..., out_features] fp32
        y = torch.fbgemm_linear_fp16_weight(x.reshape(-1, self.in_features).float(),
                                            self.packed, self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16 weight"

    def _apply(self, fn, recurse=True):
        # model.to(...), .cuda(), .half(): FBGEMM's packed weight lives on the CPU and takes
        # fp32 activations, so anything else is refused in one line, not failed later
        probe = fn(torch.zeros(1))
        if probe.device.type != "cpu" or probe.dtype != torch.float32:
            raise ValueError(f"a model packed for the CPU (linalign.packed_linear) cannot move "
                             f"to {probe.device.type} / {probe.dtype}: load it with "
                             "packed=False (load_default_model, load_model)")
        return super()._apply(fn, recurse)


def fits_fp16(linear: nn.Linear) -> bool:
    """The layer's weights are finite and within fp16's range (a NaN fails too)."""
    return float(linear.weight.detach().abs().max()) <= FP16_MAX


def packable(model) -> bool:
    """A model ``pack_linears`` speeds up: a module, its parameters fp32 on the CPU, with
    linear layers not packed yet, on a CPU and torch that run FBGEMM's fp16 product."""
    if not isinstance(model, nn.Module):
        return False
    params = list(model.parameters())
    return bool(params) and params[0].device.type == "cpu" and \
        params[0].dtype == torch.float32 and \
        any(type(m) is nn.Linear for m in model.modules()) and cpu_can_pack()


def pack_linears(model) -> int:
    """Replace every ``nn.Linear`` of ``model`` (fp32, on the CPU) in place by an
    ``Fp16Linear``; a layer whose weights do not fit fp16 stays as it is. A tied output
    layer gets its own packed copy (the input embedding keeps its fp32 table). Returns the
    number of layers packed (also kept as ``model.linalign_packed``)."""
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not fits_fp16(module):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, Fp16Linear(module))
        count += 1
    model.linalign_packed = count
    return count


def packed_layers(model) -> int:
    """How many linear layers ``pack_linears`` packed in ``model`` (0 when none)."""
    return getattr(model, "linalign_packed", 0)
