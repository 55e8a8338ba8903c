"""Any memory layout gives the tokens of a contiguous copy, on every backend and path.

Hypothesis draws logits (peaked rows, flat rows whose nucleus holds thousands of tokens, ties,
-inf patterns), parameters at their edges (top_p = 1 and the smallest fp32 above 0, ratios up
to 3e38, temperatures from 0 to 3e38) in one of the step's modes (one principle, kl mode, two
principles), and lays every tensor out in memory another way: transposed, every other row
and every third column of a larger tensor, a column window of a wider one, one row expanded
over the batch (stride 0), the branches in different dtypes, per-row parameters as strided
views. The gaps of the larger tensors hold NaN, so a read outside the view would show as bad
input. The step on those views must return what it returns on contiguous fp32 copies (the
step computes in fp32, so a bf16 branch is its exact fp32 copy): the same tokens, statuses
and ratios, log-probabilities to the last bits, on the reference, the torch path and the
Triton kernel (through the interpreter on CPU). Greedy tokens also equal the reference's.

The runs are derandomised (the same examples every run) and sized for CI.
"""
import pytest
import torch

import linalign
from linalign.testing import two_branch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

LAYOUTS = ["contiguous", "transposed", "strided", "window", "expanded"]
TINY_TOP_P = float(torch.tensor(1e-45))  # the smallest positive fp32 (subnormal)
RATIOS = [-5.0, 0.0, 1.0, 3.0, 1e6, 1e30, 3e38]
TEMPERATURES = [0.0, 1e-30, 1e-4, 0.5, 1.0, 1e30, 3e38]
TOP_PS = [TINY_TOP_P, 1e-3, 0.5, 0.8, 0.95, 1.0]


def lay_out(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``x`` (contiguous, any number of dims) with the same values in another layout."""
    if kind == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided":  # every other row, every third column of a NaN-filled tensor
        big = torch.full((*x.shape[:-2], 2 * x.shape[-2], 3 * x.shape[-1]), float("nan"),
                         dtype=x.dtype)
        big[..., ::2, ::3] = x
        return big[..., ::2, ::3]
    if kind == "window":  # columns 7 .. 7 + V of a wider NaN-filled tensor
        big = torch.full((*x.shape[:-1], x.shape[-1] + 11), float("nan"), dtype=x.dtype)
        big[..., 7:7 + x.shape[-1]] = x
        return big[..., 7:7 + x.shape[-1]]
    return x


def lay_out_param(x, kind):
    """A [B] parameter tensor as a strided view (numbers stay numbers)."""
    if not isinstance(x, torch.Tensor) or kind == "contiguous":
        return x
    big = torch.full((2 * x.shape[0],), float("nan"), dtype=x.dtype)
    big[::2] = x
    return big[::2]


def rows(seed, B, V, kinds):
    """Both branches [B, V] (fp32, contiguous): one kind of row each."""
    peaked, peaked0 = two_branch(B, V, seed=seed, temperature=0.5)
    flat, flat0 = two_branch(B, V, seed=seed + 1, temperature=0.5, steepness=1.0)
    zp, z0 = peaked.clone(), peaked0.clone()
    for b, kind in enumerate(kinds):
        if kind == "flat":
            zp[b], z0[b] = flat[b], flat0[b]
        elif kind == "ties":
            zp[b] = zp[b].round()
        elif kind == "neginf":
            zp[b, ::5] = float("-inf")
            z0[b, 1::7] = float("-inf")
    return zp, z0


@st.composite
def cases(draw, max_v):
    B = draw(st.integers(1, 3))
    V = draw(st.sampled_from([v for v in (7, 300, 2000, 5000) if v <= max_v]))
    kinds = [draw(st.sampled_from(["peaked", "flat", "ties", "neginf"])) for _ in range(B)]
    mode = draw(st.sampled_from(["ratio", "kl", "two principles"]))
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**16))

    def param(values):
        if draw(st.booleans()):
            return draw(st.sampled_from(values))
        return torch.tensor([draw(st.sampled_from(values)) for _ in range(B)])

    kw = dict(temperature=param(TEMPERATURES), top_p=param(TOP_PS), greedy=draw(st.booleans()),
              seed=draw(st.integers(0, 2**31)), offset=draw(st.integers(0, 1000)))
    if mode == "kl":
        kw.update(kl_budget=param([0.0, 1e-4, 0.1, 3e38]), max_ratio=param([0.0, 10.0, 1e30]))
    elif mode == "two principles":
        kw["ratio"] = [param(RATIOS), param(RATIOS)]
    else:
        kw["ratio"] = param(RATIOS)
    return dict(seed=seed, B=B, V=V, kinds=kinds, mode=mode, layout=layout,
                dtype_p=draw(st.sampled_from([torch.float32, torch.bfloat16])),
                dtype_0=draw(st.sampled_from([torch.float32, torch.float16])), kw=kw)


def inputs(case):
    """(logits_p, logits_0, kwargs) laid out as the case says, and the same values as
    contiguous fp32 tensors with contiguous parameters."""
    zp, z0 = rows(case["seed"], case["B"], case["V"], case["kinds"])
    if case["mode"] == "two principles":
        zp = torch.stack([zp, zp.flip(-1)])
    if case["layout"] == "expanded":  # the first row over the whole batch (stride 0)
        zp, z0 = zp[..., :1, :].expand(zp.shape), z0[:1].expand(z0.shape)
    zp, z0 = zp.to(case["dtype_p"]), z0.to(case["dtype_0"])
    laid_p, laid_0 = lay_out(zp, case["layout"]), lay_out(z0, case["layout"])
    if case["layout"] == "strided":
        assert not laid_p.is_contiguous() and not laid_0.is_contiguous()
    kw = case["kw"]
    laid_kw = {k: ([lay_out_param(x, case["layout"]) for x in v] if isinstance(v, list)
                   else lay_out_param(v, case["layout"])) for k, v in kw.items()}
    return (laid_p, laid_0, laid_kw), (zp.float().contiguous(), z0.float().contiguous(), kw)


def assert_same(got, want):
    assert torch.equal(got.tokens, want.tokens), (got.tokens, want.tokens)
    assert torch.equal(got.status, want.status), (got.status, want.status)
    assert torch.equal(got.ratio, want.ratio), (got.ratio, want.ratio)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-6)


def check_case(backend, case):
    (lp, l0, lkw), (cp, c0, ckw) = inputs(case)
    got = linalign.step(lp, l0, backend=backend, check=False, **lkw)
    want = linalign.step(cp, c0, backend=backend, check=False, **ckw)
    assert_same(got, want)
    if ckw["greedy"] and backend != "reference":
        ref = linalign.step(cp, c0, backend="reference", check=False, **ckw)
        assert torch.equal(got.tokens, ref.tokens), (got.tokens, ref.tokens)


SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("backend", ["torch", "reference"])
@settings(max_examples=60, **SETTINGS)
@given(case=cases(max_v=5000))
def test_layouts_give_the_tokens_of_a_contiguous_copy(backend, case):
    check_case(backend, case)


@settings(max_examples=25, **SETTINGS)
@given(case=cases(max_v=5000))
def test_kernel_layouts_give_the_tokens_of_a_contiguous_copy(case, device):
    if device.type != "cpu":
        pytest.skip("the layouts are built on the CPU; the GPU suite runs test_step")
    check_case("triton", case)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_each_layout_on_flat_rows_and_two_principles(backend, layout):
    """Every layout at least once on flat rows (launch 2 of the kernel), with top_p = 1, and
    with two principles, whatever hypothesis drew."""
    for mode, top_p in (("ratio", 0.95), ("ratio", 1.0), ("two principles", 0.8)):
        kw = dict(temperature=0.5, top_p=top_p, greedy=False, seed=5, offset=3)
        kw["ratio"] = [1.0, 2.0] if mode == "two principles" else 3.0
        check_case(backend, dict(seed=11, B=2, V=5000, kinds=["flat", "peaked"], mode=mode,
                                 layout=layout, dtype_p=torch.bfloat16,
                                 dtype_0=torch.float32, kw=kw))
