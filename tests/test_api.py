"""Argument validation (docs/errors.md): every bad argument raises with a message that names
the bad value and what was expected; importing linalign touches no GPU."""
import subprocess
import sys

import pytest
import torch

import linalign
from linalign.testing import two_branch


@pytest.fixture
def logits(device):
    return two_branch(3, 50, seed=0, device=device)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]; got 0.0"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]; got 1.5"),
    (dict(top_p=float("nan")), ValueError, r"top_p must be in \(0, 1\]; got nan"),
    (dict(temperature=-0.1), ValueError, r"temperature must be finite and >= 0; got -0.1"),
    (dict(temperature=float("inf")), ValueError, r"temperature must be finite"),
    (dict(ratio=float("nan")), ValueError, r"ratio must be a finite number; got nan"),
    (dict(ratio="3"), TypeError, r"ratio must be a number or a \[B\] tensor; got str"),
    (dict(backend="cuda"), ValueError, r"backend must be one of"),
    (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\); got -1"),
    (dict(seed=1.5), TypeError, r"seed must be an int"),
    (dict(seed=1, generator=torch.Generator()), ValueError, r"either seed or generator"),
    (dict(generator=3), TypeError, r"generator must be a torch.Generator"),
    (dict(greedy=1), TypeError, r"greedy must be True or False; got 1 \(int\)"),
    (dict(greedy="yes"), TypeError, r"greedy must be True or False; got 'yes' \(str\)"),
    (dict(greedy=torch.tensor(True)), TypeError, r"greedy must be True or False"),
    (dict(top_p=1e-46), ValueError, r"top_p must be in \(0, 1\]; got 1e-46 \(0 in fp32"),
])
def test_bad_parameters(logits, kwargs, error, message):
    zp, z0 = logits
    args = dict(ratio=1.0, temperature=1.0, top_p=0.9)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        linalign.step(zp, z0, **args)


def test_bad_per_row_parameters(logits, device):
    zp, z0 = logits
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]; got \[0.0\] at rows \[1\]"):
        linalign.step(zp, z0, ratio=1.0, top_p=torch.tensor([0.5, 0.0, 1.0], device=device))
    with pytest.raises(ValueError, match=r"ratio must be a number or a tensor of shape \[3\]; got shape \[2\]"):
        linalign.step(zp, z0, ratio=torch.ones(2, device=device))
    with pytest.raises(ValueError, match=r"temperature must be finite and >= 0; got \[-1.0\] at rows \[2\]"):
        linalign.step(zp, z0, ratio=1.0, temperature=torch.tensor([1.0, 0.0, -1.0], device=device))
    with pytest.raises(ValueError, match=r"seed must be an int or an int64 tensor of shape \[3\]"):
        linalign.step(zp, z0, ratio=1.0, seed=torch.ones(3, device=device))
    # With check=False tensor values are not inspected (no host synchronisation), and
    # the token ids still stay in range.
    out = linalign.step(zp, z0, ratio=1.0, check=False,
                        top_p=torch.tensor([0.5, 0.0, 1.0], device=device))
    assert ((out.tokens >= 0) & (out.tokens < 50)).all()


def test_bad_logits(device):
    zp, z0 = two_branch(2, 10, seed=0, device=device)
    with pytest.raises(ValueError, match=r"same shape \[B, V\]; got \[2, 10\] and \[2, 9\]"):
        linalign.step(zp, z0[:, :9], ratio=1.0)
    with pytest.raises(ValueError, match=r"must be 2-D \[B, V\]; got shape \[10\]"):
        linalign.step(zp[0], z0[0], ratio=1.0)
    with pytest.raises(ValueError, match=r"vocabulary is empty \(V = 0\)"):
        linalign.step(zp[:, :0], z0[:, :0], ratio=1.0)
    with pytest.raises(TypeError, match=r"must be float32, bfloat16 or float16; got torch.int64"):
        linalign.step(zp.long(), z0.long(), ratio=1.0)
    with pytest.raises(TypeError, match=r"logits_0 must be a torch.Tensor; got list"):
        linalign.step(zp, [1.0], ratio=1.0)
    with pytest.raises(TypeError, match="ratio"):
        linalign.step(zp, z0)  # ratio is required


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices (a GPU)")
def test_device_mismatch():
    zp, z0 = two_branch(2, 10, seed=0)
    with pytest.raises(ValueError, match="logits_p is on cpu but logits_0 is on cuda"):
        linalign.step(zp, z0.cuda(), ratio=1.0)


def test_triton_backend_on_cpu_without_interpreter():
    code = ("import torch, linalign; from linalign.testing import two_branch; "
            "zp, z0 = two_branch(1, 8); linalign.step(zp, z0, ratio=1.0, backend='triton')")
    env = {"TRITON_INTERPRET": "0", "PATH": ""}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert res.returncode != 0
    assert "the triton backend needs CUDA tensors, or TRITON_INTERPRET=1" in res.stderr


def test_import_touches_no_gpu_and_no_triton():
    code = ("import sys, linalign, torch; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_empty_batch(device):
    zp = torch.zeros(0, 5, device=device)
    for backend in ("torch", "triton", "reference"):
        out = linalign.step(zp, zp, ratio=1.0, backend=backend)
        assert out.tokens.shape == (0,) and out.tokens.dtype == torch.int64
