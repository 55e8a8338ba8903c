"""Triton kernels of linalign, installed as ``linalign.kernels``.

Importing this package imports Triton and defines the kernels; nothing touches a device
until a kernel is launched. On a machine without a GPU, set ``TRITON_INTERPRET=1`` before
the first import to run the kernels through Triton's interpreter (decoration time decides;
``INTERPRETED`` remembers what it was).
"""
from .compose import la_compose, la_compose_kernel
from .penalties import la_penalize, la_penalty_kernel
from .step import INTERPRETED, la_chunk_kernel, la_flat_kernel, la_step, step_paths

__all__ = ["la_step", "step_paths", "la_chunk_kernel", "la_flat_kernel", "la_compose",
           "la_compose_kernel", "la_penalize", "la_penalty_kernel", "INTERPRETED"]
