"""Property-based tests of ``linalign.step`` on every backend (hypothesis).

Hypothesis draws a batch shape (B from 1, V from 1 up to a few thousand), a dtype, per-row
or shared parameters (ratios negative, zero and huge; temperatures 0, 1e-4 up to 100; top_p
from 1e-9 to 1) and hostile logits built from a seeded base row plus patterns: huge finite
values (+-1e30, 3e38), -inf patterns in either branch, whole rows of -inf, exact ties, NaN
and +inf, rows that differ from the other branch only in the last bits. Invariants, for
every row and backend:

- the token is an int64 id in [0, V); no output is NaN; the status is a valid bit set;
- BAD_INPUT is set exactly when docs/semantics.md, "Bad input", says (NaN or +inf in either
branch, or no
  finite principle logit), and ``check=True`` then raises;
- for a good row the token is finite in the principle branch, finite in the
  without-branch unless the row fell back, at or above the gap rule's cut, and in the
  nucleus (its exact fp64 mass-above is below top_p, up to the rounding band of
  ``helpers.BAND``); for a T = 0 row it is a principle-branch argmax;
- greedy tokens equal the reference's exactly.

The runs are derandomised (the same examples every run, so CI never flakes) and sized for
CI: the Triton kernel runs through the interpreter on CPU, so it gets fewer, smaller
examples. A failure that hypothesis finds is fixed and kept below as an explicit example.
"""
import pytest
import torch

import linalign
from linalign import Status
from linalign.reference import mass_above
from helpers import BAND

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PATTERNS = ["normal", "ties", "huge", "neginf_p", "neginf_0", "row_neginf", "nan", "posinf",
            "last_bits", "flat"]
RATIOS = [-5.0, -1.0, 0.0, 0.5, 3.0, 1e3, 1e6]
TEMPERATURES = [0.0, 1e-4, 0.3, 0.5, 1.0, 2.0, 100.0]
TOP_PS = [1e-9, 1e-3, 0.3, 0.8, 0.95, 0.999999, 1.0]


def build(seed, B, V, dtype, patterns, scale):
    """Logits [B, V] of both branches from a seed and a list of (row, branch, pattern)."""
    g = torch.Generator().manual_seed(seed)
    zp = torch.randn(B, V, generator=g) * scale
    z0 = zp + torch.randn(B, V, generator=g) * 0.5
    for row, branch, kind in patterns:
        row %= B
        z = zp if branch == 0 else z0
        pick = torch.rand(V, generator=g)
        if kind == "ties":
            z[row] = z[row].round()
        elif kind == "huge":
            z[row, pick < 0.2] = 1e30
            z[row, pick > 0.8] = -1e30
            if V > 2:
                z[row, 0] = 3e38
        elif kind in ("neginf_p", "neginf_0"):
            (zp if kind == "neginf_p" else z0)[row, pick < 0.5] = float("-inf")
        elif kind == "row_neginf":
            z[row] = float("-inf")
        elif kind == "nan":
            z[row, int(pick.argmax())] = float("nan")
        elif kind == "posinf":
            z[row, int(pick.argmax())] = float("inf")
        elif kind == "last_bits":
            z0[row] = torch.nextafter(zp[row], torch.tensor(float("inf")))
        elif kind == "flat":
            z[row] = 0.0
    return zp.to(dtype), z0.to(dtype)


@st.composite
def cases(draw, max_v):
    B = draw(st.integers(1, 4))
    V = draw(st.sampled_from([v for v in (1, 2, 3, 5, 17, 64, 257, 1000, 4099) if v <= max_v]))
    dtype = draw(st.sampled_from(DTYPES))
    patterns = draw(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1),
                                       st.sampled_from(PATTERNS)), max_size=3))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0, 30.0]))
    seed = draw(st.integers(0, 2**16))

    def param(values):
        if draw(st.booleans()):
            return draw(st.sampled_from(values))
        return torch.tensor([draw(st.sampled_from(values)) for _ in range(B)])

    kw = dict(ratio=param(RATIOS), temperature=param(TEMPERATURES), top_p=param(TOP_PS),
              greedy=draw(st.booleans()), seed=draw(st.integers(0, 2**31)),
              offset=draw(st.integers(0, 1000)))
    return build(seed, B, V, dtype, patterns, scale), kw


def row_value(x, b):
    return float(x[b]) if isinstance(x, torch.Tensor) else float(x)


def check_invariants(zp, z0, kw, out):
    B, V = zp.shape
    tok, lp, st_ = out.tokens.cpu(), out.logprobs.cpu(), out.status.cpu()
    assert tok.dtype == torch.int64 and tok.shape == (B,)
    assert bool(((tok >= 0) & (tok < V)).all()), tok
    assert not bool(torch.isnan(lp).any()), lp
    assert bool(((st_ >= 0) & (st_ <= 3)).all()), st_
    p32, o32 = zp.float(), z0.float()
    bad_in = (torch.isnan(p32) | (p32 == float("inf")) | torch.isnan(o32)
              | (o32 == float("inf"))).any(1)
    empty = ~torch.isfinite(p32).any(1)  # no finite principle logit
    want_bad = bad_in | empty
    assert torch.equal((st_ & int(Status.BAD_INPUT)) != 0, want_bad), (st_, want_bad)
    for b in range(B):
        if want_bad[b]:
            continue
        t, T, p = int(tok[b]), row_value(kw["temperature"], b), row_value(kw["top_p"], b)
        row = p32[b]
        m = float(row.max())
        assert row[t] > float("-inf"), f"row {b}: token {t} is banned in the principle branch"
        if not st_[b] & int(Status.FALLBACK):
            assert o32[b, t] > float("-inf"), f"row {b}: token {t} is banned without principle"
        if T == 0.0:
            assert float(row[t]) == m, f"row {b}: T = 0 but token {t} is not an argmax"
            continue
        cut = torch.tensor(m, dtype=torch.float32) - torch.tensor(80.0) * torch.tensor(
            T, dtype=torch.float32)
        assert row[t] >= cut, f"row {b}: token {t} is below the gap rule's cut"
        if p < 1.0:
            above = float(mass_above(row.double(), T)[t])
            assert above < p + BAND, f"row {b}: token {t} has mass-above {above} >= top_p {p}"


def run_case(backend, case):
    (zp, z0), kw = case
    out = linalign.step(zp, z0, backend=backend, check=False, **kw)
    check_invariants(zp, z0, kw, out)
    if kw["greedy"]:
        ref = linalign.step(zp, z0, backend="reference", check=False, **kw)
        assert torch.equal(out.tokens.cpu(), ref.tokens.cpu()), (out.tokens, ref.tokens)
    if bool(((out.status & int(Status.BAD_INPUT)) != 0).any()):
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            linalign.step(zp, z0, backend=backend, check=True, **kw)


SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("backend", ["torch", "reference"])
@settings(max_examples=300, **SETTINGS)
@given(case=cases(max_v=4099))
def test_step_properties(backend, case):
    run_case(backend, case)


@settings(max_examples=100, **SETTINGS)
@given(case=cases(max_v=1000))
def test_kernel_properties(case, device):
    (zp, z0), kw = case
    run_case("triton", ((zp.to(device), z0.to(device)), {
        k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}))
