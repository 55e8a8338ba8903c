"""The kernels compile for the GPU machine's H100 (sm_90) even where there is no GPU.

The interpreter accepts code that the compiler rejects (globals that are not constexpr,
type mismatches in loop-carried values), so CPU-only CI compiles the kernel ahead of time to
a cubin, with the ptxas that ships in the Triton wheel: every variant (sampling modes, split,
kl mode) for bf16 logits, two of them for fp32 and fp16 (the dtype only changes the loads).
It runs in a subprocess because this test session imported the kernels under the
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
from linalign.kernels import step as ks

assert not INTERPRETED
dtype = sys.argv[1]
TYPES = dict(zp_ptr="*" + dtype, z0_ptr="*" + dtype, r_ptr="*fp32", r_val="fp32",
             t_ptr="*fp32", t_val="fp32", p_ptr="*fp32", p_val="fp32", u_ptr="*fp32",
             seed_ptr="*i64", seed_val="i64", off_ptr="*i64", off_val="i64", tok_ptr="*i64",
             lp_ptr="*fp32", nsz_ptr="*i32", status_ptr="*i32", ratio_ptr="*fp32",
             e_ptr="*fp32", e_val="fp32", x_ptr="*fp32", x_val="fp32", cidx_ptr="*i32",
             cval_ptr="*fp32", ws_f="*fp32", ws_i="*i32", stride_p="i64", stride_0="i64")


def build(kernel, const, warps):
    sig = {a: ("constexpr" if a in const else TYPES.get(a, "i32")) for a in kernel.arg_names}
    k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    assert len(k.asm["cubin"]) > 0


K, L, CMAX = ks.K_PIVOTS, ks.LEVELS, ks.CMAX_BUF
configs = [(c.kwargs["BLOCK"], c.kwargs["BLOCK_P"], c.num_warps) for c in ks._CONFIGS]
# (greedy, RNG mode, per-row parameters, split, kl mode)
variants = ((True, 0, False, False, False), (False, 0, True, True, False),
            (False, 1, False, False, True), (False, 2, True, True, True),
            (False, 3, False, True, False), (True, 0, True, False, True))
if dtype != "bf16":  # the dtype only changes the loads: every variant once, in bf16
    variants = variants[1:3]
for i, (greedy, rng, per_row, split, kl) in enumerate(variants):
    blk, blk_p, warps = configs[i % len(configs)]  # every autotune config, every variant kind
    build(ks.la_step_kernel, dict(R_PER_ROW=per_row, T_PER_ROW=per_row, P_PER_ROW=per_row,
                                  KL=kl, E_PER_ROW=per_row, X_PER_ROW=not per_row,
                                  RNG=rng, OFF_PER_ROW=per_row, GREEDY=greedy, SPLIT=split,
                                  SP=32, BLOCK=blk, BLOCK_P=blk_p, NPIV=K, L=L, CMAX=CMAX,
                                  JB=ks.JB_TAU), warps)
for kl in (False, True):
    build(ks.la_max_kernel, dict(T_PER_ROW=kl, KL=kl, BLOCK=1024), 4)
build(ks.la_ladder_kernel, dict(T_PER_ROW=True, BLOCK=256, L=L, SP=64), 4)
build(ks.la_compact_kernel, dict(T_PER_ROW=False, BLOCK=1024, L=L, CMAX=CMAX, SP=64), 4)
from linalign.kernels import compose as kc
TYPES.update(zs_ptr="*" + dtype, zc_ptr="*fp32", zb_ptr="*fp32", bad_ptr="*i32",
             stride_k="i64", stride_b="i64")
build(kc.la_compose_kernel, dict(K=3, BLOCK=kc.COMPOSE_BLOCK), 8)
print("compiled")
"""


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_kernel_compiles_for_sm90(dtype):
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", SCRIPT, dtype], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
