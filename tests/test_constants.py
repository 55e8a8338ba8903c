"""The contract's numbers live in linalign/constants.py, which imports neither torch nor
Triton; the kernels' compile-time copies are pinned to them here, and the other backends
use the module itself."""
import subprocess
import sys
from pathlib import Path

from linalign import constants, reference, torch_backend


def test_constants_import_nothing_heavy():
    path = Path(constants.__file__)
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('c', {str(path)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "assert 'torch' not in sys.modules and 'triton' not in sys.modules; print(m.GAP)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "80.0", res.stderr


def test_kernel_constants_are_the_contracts():
    from linalign.kernels import step as ks

    assert ks.GAP.value == constants.GAP and ks.FMAX.value == constants.FMAX
    assert ks.FALLBACK.value == constants.Status.FALLBACK
    assert ks.BAD_INPUT.value == constants.Status.BAD_INPUT
    source = constants.RandomSource
    assert (ks.RNG_UNIFORMS.value, ks.RNG_SEED.value, ks.RNG_ROW_SEEDS.value,
            ks.RNG_DEVICE_SEED.value) == (source.UNIFORMS, source.SEED, source.ROW_SEEDS,
                                          source.DEVICE_SEED)


def test_backends_read_the_same_module():
    assert reference.GAP is constants.GAP and torch_backend.GAP is constants.GAP
    assert reference.FMAX is constants.FMAX and torch_backend.FMAX is constants.FMAX
    assert constants.FMAX == float.fromhex("0x1.fffffep+127")  # the largest finite fp32
