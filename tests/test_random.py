"""The per-row uniforms: the torch replica of Triton's Philox stream is bit-identical to
tl.rand (run through the interpreter on CPU, compiled on a GPU); and the radix select of
the torch path against a sort."""
import torch

from linalign.random import philox_uniform, row_uniforms
from linalign.torch_backend import order_key, radix_threshold


def test_philox_replica_matches_tl_rand(device):
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(out_ptr, seed_ptr, ctr_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        seed = tl.load(seed_ptr + i)
        ctr = tl.load(ctr_ptr + i)
        tl.store(out_ptr + i, tl.rand(seed, ctr))

    g = torch.Generator().manual_seed(0)
    n = 256
    seeds = torch.randint(0, 2**62, (n,), generator=g)
    rows = torch.randint(0, 2**31, (n,), generator=g)
    offsets = torch.randint(0, 2**31, (n,), generator=g)
    seeds[:4] = torch.tensor([0, 1, 2**32 - 1, 2**32])
    out = torch.empty(n, device=device)
    rand_kernel[(1,)](out, seeds.to(device), (rows | (offsets << 32)).to(device), N=n)
    want = philox_uniform(seeds, rows, offsets)
    assert torch.equal(out.cpu(), want)
    assert ((want >= 0) & (want < 1)).all()


def test_row_uniforms():
    u = row_uniforms(5, "cpu", seed=3, offset=7)
    assert torch.equal(u, philox_uniform(torch.tensor(3), torch.arange(5), torch.tensor(7)))
    per_row = row_uniforms(3, "cpu", seed=torch.tensor([3, 3, 4]), offset=7)
    assert per_row[0] == per_row[1] != per_row[2]
    # Uniform enough: a Kolmogorov-Smirnov distance well inside the 0.1 % band.
    big = row_uniforms(20000, "cpu", seed=1).sort().values.double()
    ks = (big - torch.arange(20000).double() / 20000).abs().max()
    assert ks < 1.95 / 20000**0.5


def test_key_orders_like_the_floats():
    x = torch.tensor([float("-inf"), -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3e38,
                      float("inf")])
    k = order_key(x)
    assert k.dtype == torch.int32
    assert (k[1:] >= k[:-1]).all() and (k[1:4] > k[:3]).all() and (k[6:] > k[5:-1]).all()
    assert k[4] == k[5] == 0  # -0.0 == +0.0


def test_radix_threshold_against_sort():
    g = torch.Generator().manual_seed(1)
    R, W = 20, 500
    x = torch.randn(R, W, generator=g) * torch.rand(R, 1, generator=g) * 10
    x[:5] = x[:5].round()  # many ties
    w = torch.softmax(x, -1)
    w[:, ::7] = 0  # non-candidates
    thr = torch.rand(R, generator=g).double().clamp(0.05, 0.95)
    tau = radix_threshold(order_key(x), w, thr)
    for r in range(R):
        keys = order_key(x[r])
        cand = w[r] > 0
        # Smallest candidate key whose mass strictly above (in fp64) is below thr.
        above = torch.stack([w[r].double()[cand & (keys > k)].sum() for k in keys])
        ok = cand & (above < thr[r])
        assert tau[r] == keys[ok].min()
