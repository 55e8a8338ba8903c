"""linalign: fast Linear Alignment decoding (Gao et al., ICML 2024).

``linalign.step`` / ``linalign.sample`` run one decoding step over a batch of two-branch
logits (with and without the principle) on one of three backends: the fused Triton kernel
(``linalign.kernels``), a vectorised torch path, or the readable reference
(``linalign.reference``). ``linalign.LinearAligner`` decodes with a Hugging Face causal LM;
``linalign.SamplingParams`` holds the options of a generation and their defaults. Importing
linalign touches no GPU and does not import Triton or transformers.
"""
from . import reference
from .api import BACKENDS, sample, step
from .arguments import StepOutput
from .constants import Status
from .options import SamplingParams

__version__ = "0.1.0"
__all__ = ["step", "sample", "StepOutput", "Status", "BACKENDS", "SamplingParams", "reference",
           "LinearAligner", "GenerationResult", "load_default_model", "load_model", "hf"]


def __getattr__(name):
    # The decoder and the model loaders import transformers: only when first asked for.
    if name in ("LinearAligner", "GenerationResult"):
        from . import decoder
        return getattr(decoder, name)
    if name in ("load_default_model", "load_model"):
        from . import models
        return getattr(models, name)
    if name == "hf":  # Hugging Face generate integration (imports transformers)
        import importlib
        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'linalign' has no attribute {name!r}")
