"""The step inside compiled and captured decoding code (issue: graph and compile friendly).

- ``torch.compile(fullgraph=True)`` of a function that calls ``linalign.step`` traces without
  graph breaks (the Triton launches are one custom op, ``torch.ops.linalign.triton_step``),
  gives the eager tokens, and does not recompile when the seed and offset tensors change.
  On CPU this runs with the ``aot_eager`` backend (the op's fake implementation is used for
  tracing, the kernel runs through the interpreter); on a GPU with inductor.
- With ``check=False`` and device tensors for every per-row value the step makes no host
  synchronisation (GPU: ``torch.cuda.set_sync_debug_mode("error")``) and can be captured in
  a CUDA graph whose replays, on new logits, seeds and offsets, equal eager calls, at one
  row and at 512, on rows that finish in either launch (peaked and flat ones).
"""
import pytest
import torch

import linalign
from linalign.testing import two_branch
from helpers import capture_without_sync

LA = dict(ratio=3.0, temperature=0.5, top_p=0.8)
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def decode_step(zp, z0, seeds, offset, ratio):
    out = linalign.step(zp, z0, ratio=ratio, temperature=0.5, top_p=0.8, seed=seeds,
                        offset=offset, backend="triton", check=False)
    return out.tokens, out.logprobs, out.status


@pytest.mark.parametrize("seed_kind", ["per-row", "one"])
def test_compiles_fullgraph_without_recompiles(seed_kind, device):
    import torch._dynamo

    torch._dynamo.reset()
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    fn = torch.compile(decode_step, fullgraph=True, backend=backend)
    B, V = 3, 700
    ratio = torch.tensor([0.0, 3.0, -1.0], device=device)
    for i, offset in enumerate((0, 7, 123)):
        zp, z0 = two_branch(B, V, seed=i, temperature=0.5, device=device)
        if seed_kind == "per-row":
            seeds = torch.tensor([5 + i, 6, 7], device=device)
        else:
            seeds = torch.tensor(41 + i, device=device)
        off = torch.full((B,), offset, device=device, dtype=torch.int64)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = fn(zp, z0, seeds, off, ratio)
        want = decode_step(zp, z0, seeds, off, ratio)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        ref = linalign.step(zp, z0, ratio=ratio, temperature=0.5, top_p=0.8,
                            seed=seeds.cpu() if seeds.dim() else int(seeds), offset=offset,
                            backend="reference")
        assert torch.equal(got[0].cpu(), ref.tokens)


def test_zero_dim_device_tensors_are_not_read_back(device):
    # A 0-d seed on the device with check=False means one seed (counter = row), as an int.
    zp, z0 = two_branch(4, 500, seed=3, temperature=0.5, device=device)
    a = linalign.step(zp, z0, **LA, seed=torch.tensor(9, device=device),
                      offset=torch.tensor(2, device=device), check=False, backend="triton")
    b = linalign.step(zp, z0, **LA, seed=9, offset=2, backend="triton")
    assert torch.equal(a.tokens, b.tokens)
    c = linalign.step(zp, z0, ratio=torch.tensor(3.0, device=device),
                      temperature=torch.tensor(0.5, device=device), top_p=0.8, seed=9, offset=2,
                      check=False, backend="triton")
    assert torch.equal(c.tokens, b.tokens)
    for backend in ("torch", "reference"):
        d = linalign.step(zp, z0, **LA, seed=torch.tensor(9, device=device), offset=2,
                          check=False, backend=backend)
        assert torch.equal(d.tokens, b.tokens)


@gpu_only
@pytest.mark.parametrize("B", [1, 512])
def test_no_host_sync_and_cuda_graph_capture(B):
    from linalign.kernels.step import plan

    dev = torch.device("cuda")
    V = 32000
    rows = dict(temperature=0.5, steepness=(1.0, 2.0), device=dev, dtype=torch.bfloat16)
    zp, z0 = two_branch(B, V, seed=B, **rows)
    seeds = torch.arange(B, device=dev) * 7 + 1
    offset = torch.zeros(B, device=dev, dtype=torch.int64)
    ratio = torch.full((B,), 3.0, device=dev)
    assert plan(B, V, dev).S > 1  # every row is cut into chunks, whatever B
    run = lambda: decode_step(zp, z0, seeds, offset, ratio)  # noqa: E731
    for _ in range(3):
        run()  # compile outside the capture
    g, static = capture_without_sync(run)
    for i in range(3):
        new_p, new_0 = two_branch(B, V, seed=100 + i, **rows)
        zp.copy_(new_p)
        z0.copy_(new_0)
        offset.fill_(i + 1)
        g.replay()
        want = run()
        for a, b in zip(static, want):
            assert torch.equal(a, b)


def variant_step(zp, z0, zq, seeds, offset, eps):
    """kl mode and two principles in one compiled function."""
    kl = linalign.step(zp, z0, kl_budget=eps, temperature=0.5, top_p=0.8, seed=seeds,
                       offset=offset, backend="triton", check=False)
    two = linalign.step(torch.stack([zp, zq]), z0, ratio=[3.0, 1.0], temperature=0.5,
                        top_p=0.8, seed=seeds, offset=offset, backend="triton", check=False)
    return kl.tokens, kl.ratio, two.tokens, two.logprobs


def test_kl_and_principles_compile_and_capture(device):
    """fullgraph without recompiles across offsets; on a GPU also no host sync and a CUDA
    graph whose replays on new logits equal eager calls."""
    import torch._dynamo

    torch._dynamo.reset()
    B, V = 3, 900
    eps = torch.tensor([0.1, 1.0, 5.0], device=device)
    seeds = torch.tensor([1, 2, 3], device=device)
    bufs = [two_branch(B, V, seed=s, temperature=0.5, device=device) for s in (1, 2)]
    zp, z0, zq = bufs[0][0], bufs[0][1], bufs[1][0]
    fn = torch.compile(variant_step, fullgraph=True,
                       backend="inductor" if device.type == "cuda" else "aot_eager")
    for i in range(2):
        off = torch.full((B,), i, device=device, dtype=torch.int64)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = fn(zp, z0, zq, seeds, off, eps)
        want = variant_step(zp, z0, zq, seeds, off, eps)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
        torch.testing.assert_close(got[1], want[1])
    if device.type != "cuda":
        return
    off = torch.zeros(B, device=device, dtype=torch.int64)
    run = lambda: variant_step(zp, z0, zq, seeds, off, eps)  # noqa: E731
    run()  # compile outside the capture
    g, static = capture_without_sync(run)
    for i in range(2):
        new = [two_branch(B, V, seed=10 + i + s, temperature=0.5, device=device) for s in (0, 5)]
        zp.copy_(new[0][0])
        z0.copy_(new[0][1])
        zq.copy_(new[1][0])
        off.fill_(i + 1)
        g.replay()
        for a, b in zip(static, run()):
            assert torch.equal(a, b)


@gpu_only
def test_compiled_with_cuda_graphs():
    # mode="reduce-overhead": inductor captures the compiled step in CUDA graphs.
    import torch._dynamo

    torch._dynamo.reset()
    dev = torch.device("cuda")
    fn = torch.compile(decode_step, fullgraph=True, mode="reduce-overhead")
    B, V = 8, 32000
    ratio = torch.full((B,), 3.0, device=dev)
    seeds = torch.arange(B, device=dev)
    for i in range(4):
        zp, z0 = two_branch(B, V, seed=i, temperature=0.5, device=dev, dtype=torch.bfloat16)
        off = torch.full((B,), i, device=dev, dtype=torch.int64)
        got = [t.clone() for t in fn(zp, z0, seeds, off, ratio)]
        want = decode_step(zp, z0, seeds, off, ratio)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
