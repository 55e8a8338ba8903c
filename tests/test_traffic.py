"""How many bytes of the two branches the step kernels read, per launch and per row.

Through Triton's interpreter every load goes through one method of its builder
(``InterpreterBuilder.create_masked_load``), with the addresses and the mask of every lane;
the test wraps it (``monkeypatch``, for the test only) and counts the bytes each launch
reads inside each branch's tensor, row by row. The floor is one read of both branches,
``2 V`` logits per row.

On the benchmark's rows (``linalign.testing.two_branch(B, V, temperature=0.5)``: Zipf rows
whose 0.8 nucleus at T = 0.5 holds a handful to a few hundred tokens; T = 0.5, top_p =
0.8, ratio 3; bf16), cut into 8 chunks of 1024 logits so that a row spans several
programs, measured on 2026-11-28 (triton 3.6.0):

- this kernel: **1.00 times the floor** (each branch read once by launch 1; launch 2 reads
  nothing). The candidates' without-branch logits ride in the buffer, so the finish reads
  neither branch again;
- the kernel it replaced (a max pass, a ladder pass and a compaction pass over the principle
  branch, the without-branch read whole by the max pass and again at the nucleus),
  measured with the same harness on the same rows: **2.00 to 2.01 times the floor**
  (principle branch three times, without-branch once plus the nucleus), fused or split
  into 8 chunks alike.

kl mode reads the same bytes: its moments come from launch 1's one read.

On flat rows (Zipf steepness 1.0: 0.8 nuclei of 1272 and 1077 of 8192 tokens, more than the
candidate buffer holds), launch 2 searches the threshold chunk-parallel, and the second
SEARCH job, whose bracket fits its buffer, also scores: **2.14 and 2.15 times the floor**
here (principle branch once in launch 1, once in each SEARCH job, and one chunk for the
draw; without-branch once, plus nucleus tokens); the replaced kernel read those rows at
4.35 and 4.86 times the floor (7.5 and 8.5 reads of the principle branch, by one program
per row).
"""
import numpy as np
import pytest
import torch

from linalign.testing import two_branch

triton = pytest.importorskip("triton")
from linalign.kernels import INTERPRETED, la_step  # noqa: E402

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="counts the interpreter's loads")

LA = dict(ratio=3.0, temperature=0.5, top_p=0.8)


@pytest.fixture
def reads(monkeypatch):
    """``reads(named)``: a log of (kernel name, {tensor name: bytes read per row}) per
    launch, for the [B, V] tensors in ``named``."""
    from triton.runtime import interpreter

    log, ranges, current = [], {}, {}
    load, call = interpreter.InterpreterBuilder.create_masked_load, interpreter.GridExecutor.__call__

    def counting_load(self, ptrs, mask, other, *args, **kwargs):
        addr = ptrs.data.astype(np.uint64).ravel()
        on = np.broadcast_to(mask.data, ptrs.data.shape).ravel().astype(bool)
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        for name, (lo, hi, row_bytes) in ranges.items():
            sel = on & (addr >= lo) & (addr < hi)
            if sel.any():
                rows = ((addr[sel] - lo) // row_bytes).astype(np.int64)
                np.add.at(current[name], rows, size)
        return load(self, ptrs, mask, other, *args, **kwargs)

    def counting_call(self, *args, **kwargs):
        for name in ranges:
            current[name][:] = 0
        try:
            return call(self, *args, **kwargs)
        finally:
            log.append((self.fn.__name__, {n: c.copy() for n, c in current.items()}))

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", counting_load)
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", counting_call)

    def start(named):
        log.clear()
        for name, t in named.items():
            assert t.is_contiguous() and t.device.type == "cpu"
            ranges[name] = (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(),
                            t.stride(0) * t.element_size())
            current[name] = np.zeros(t.shape[0], dtype=np.int64)
        return log

    return start


def per_row(log, name, kernel=None):
    return sum(d[name] for k, d in log if kernel in (None, k))


@pytest.mark.parametrize("dtype,greedy,kl", [(torch.bfloat16, True, False),
                                             (torch.bfloat16, False, False),
                                             (torch.float32, False, False),
                                             (torch.bfloat16, False, True)])
def test_one_read_of_both_branches(reads, dtype, greedy, kl):
    """Benchmark rows: each branch is read exactly once, by launch 1 (1.00 times the floor)."""
    B, V = 4, 8192
    zp, z0 = two_branch(B, V, seed=3, temperature=0.5, dtype=dtype)
    log = reads(dict(zp=zp, z0=z0))
    *out, paths = la_step(zp, z0, LA["ratio"], LA["temperature"], LA["top_p"], greedy=greedy,
                          seed=5, chunk=1024, paths=True, kl=(0.5, 10.0) if kl else None)
    assert [k for k, _ in log] == ["la_chunk_kernel", "la_flat_kernel"]
    assert (paths[:, 0] == 0).all(), paths  # every row finished on its candidates
    row = V * zp.element_size()
    assert (per_row(log, "zp", "la_chunk_kernel") == row).all()
    assert (per_row(log, "z0", "la_chunk_kernel") == row).all()
    assert (per_row(log, "zp", "la_flat_kernel") == 0).all()
    assert (per_row(log, "z0", "la_flat_kernel") == 0).all()
    ratio = (per_row(log, "zp") + per_row(log, "z0")) / (2 * row)
    print(f"{dtype} greedy={greedy} kl={kl}: {ratio.tolist()} times the floor; nuclei "
          f"{out[2].tolist()}")
    assert np.allclose(ratio, 1.0)


def test_flat_rows_cost_a_bounded_number_of_reads(reads):
    """Flat rows go through launch 2, chunk-parallel: the principle branch once a job (and
    one chunk for a sampled row's draw); the without-branch beyond launch 1 only at nucleus
    tokens, at most once a job and once more for the draw's chunk."""
    B, V, chunk = 2, 8192, 1024
    zp, z0 = two_branch(B, V, seed=4, temperature=0.5, steepness=1.0, dtype=torch.bfloat16)
    log = reads(dict(zp=zp, z0=z0))
    *out, paths = la_step(zp, z0, LA["ratio"], LA["temperature"], LA["top_p"], greedy=False,
                          seed=5, chunk=chunk, paths=True)
    assert (paths[:, 0] == 2).all(), paths  # a threshold search in launch 2
    jobs = paths[:, 1].numpy()
    size = zp.element_size()
    row = V * size
    nucleus = out[2].numpy()
    assert (nucleus > 1000).all()
    assert (per_row(log, "zp", "la_chunk_kernel") == row).all()
    assert (per_row(log, "z0", "la_chunk_kernel") == row).all()
    zp2, z02 = per_row(log, "zp", "la_flat_kernel"), per_row(log, "z0", "la_flat_kernel")
    assert (zp2 <= jobs * row + chunk * size).all(), (zp2, jobs)
    assert ((z02 > 0) & (z02 <= (jobs + 1) * nucleus * size)).all(), (z02, nucleus)
    ratio = (per_row(log, "zp") + per_row(log, "z0")) / (2 * row)
    print(f"flat rows: jobs {jobs.tolist()}, nuclei {nucleus.tolist()}, "
          f"{ratio.round(3).tolist()} times the floor")
    assert (ratio <= 2.2).all()
