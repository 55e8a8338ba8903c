"""The kernel compiles for the GPU machine's H100 (sm_90) even where there is no GPU.

The interpreter accepts code that the compiler rejects (globals that are not constexpr,
type mismatches in loop-carried values), so CPU-only CI compiles the kernel ahead of time to
a cubin, with the ptxas that ships in the Triton wheel, for every input dtype and sampling
mode. It runs in a subprocess because this test session imported the kernels under the
interpreter."""
import subprocess
import sys

import pytest

SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from linalign.kernels import INTERPRETED
from linalign.kernels.step import la_step_kernel

assert not INTERPRETED
dtype = sys.argv[1]
base = dict(zp_ptr="*" + dtype, z0_ptr="*" + dtype, stride_p="i64", stride_0="i64",
            r_ptr="*fp32", r_val="fp32", t_ptr="*fp32", t_val="fp32", p_ptr="*fp32",
            p_val="fp32", u_ptr="*fp32", seed_ptr="*i64", seed_val="i64", off_ptr="*i64",
            off_val="i64", tok_ptr="*i64", lp_ptr="*fp32", nsz_ptr="*i32", status_ptr="*i32",
            V="i32")
for greedy, rng, per_row in ((True, 0, False), (False, 0, True), (False, 1, False), (False, 2, True)):
    const = dict(R_PER_ROW=per_row, T_PER_ROW=per_row, P_PER_ROW=per_row, RNG=rng,
                 OFF_PER_ROW=per_row, GREEDY=greedy, BLOCK=1024, NPIV=16)
    sig = dict(base, **{k: "constexpr" for k in const})
    k = triton.compile(ASTSource(fn=la_step_kernel, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    assert len(k.asm["cubin"]) > 0
print("compiled")
"""


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_kernel_compiles_for_sm90(dtype):
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", SCRIPT, dtype], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
