"""Shared fixtures. Without a GPU the Triton kernel runs through Triton's interpreter, which
must be switched on before linalign.kernels is first imported (decoration time decides)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)  # two cores, shared: one thread keeps tests steady

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device():
    """The device the tests run on: the GPU when there is one (compiled kernels), else the
    CPU (the Triton backend through the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def on_gpu(device):
    return device.type == "cuda"
