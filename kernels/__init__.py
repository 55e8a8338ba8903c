"""Triton kernels of linalign, installed as ``linalign.kernels``.

Importing this package imports Triton and defines the kernels; nothing touches a device
until a kernel is launched. On a machine without a GPU, set ``TRITON_INTERPRET=1`` before
the first import to run the kernels through Triton's interpreter.
"""
import os

from .step import la_step, la_step_kernel

# Decoration time decides whether a kernel is interpreted; remember what it was.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["la_step", "la_step_kernel", "INTERPRETED"]
