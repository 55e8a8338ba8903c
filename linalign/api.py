"""The public step API: ``linalign.step`` and ``linalign.sample``.

``step`` checks its arguments once (``linalign.arguments.normalize``) and hands them to one
of three backends with the same entry point, ``run(StepArgs) -> StepOutput``:
``linalign.triton_backend`` (the fused kernels), ``linalign.torch_backend`` (vectorised,
sort-free) and ``linalign.reference`` (the readable oracle). Each computes every mode itself:
one principle, kl mode, several principles.

Shared parameter text (referred to by every docstring in the package):

logits_p, logits_0
    [B, V] next-token logits of the branch with the principle in the system prompt (``p``)
    and of the same conversation without it (``0``); fp32, bf16 or fp16, same shape and
    device; all arithmetic is fp32.
ratio
    r: how far to push along ``z_p - z_0``: a finite number or a [B] tensor. Aligned scores
    are ``z_p + r (z_p - z_0)``; r = 0 is plain top-p decoding of the principle branch.
    With several principles (``logits_p`` [K, B, V]): one number for all, or a list of K
    (numbers or [B] tensors), or a [K, B] tensor.
kl_budget, max_ratio
    kl mode (docs/semantics.md, "kl mode"), instead of ``ratio``: a per-token budget eps >= 0
    in nats (a number or a [B] tensor). Per row, ``v`` = the variance of
    ``g = (z_p - z_0) / T`` under ``softmax(z_0 / T)`` and ``kappa = sqrt(2 eps / v)`` clipped
    to ``[0, 1 + max_ratio]``; the step runs with ``r = kappa - 1`` (``v = 0``: r = 0). To
    second order the aligned distribution is eps nats from the base one. ``max_ratio``
    (>= 0, default 10) caps r where the branches nearly agree. One principle only.
temperature
    T >= 0, a number or a [B] tensor. T scales the principle branch before the nucleus is
    taken and the aligned scores before the softmax. T = 0 is the limit T -> 0: greedy, and
    the nucleus collapses onto the principle branch's argmax (so r only breaks exact ties).
    For Linear-Alignment greedy decoding use ``greedy=True`` with the T that sets the
    nucleus (the authors use 0.5). 0 < T < 1e-30 is treated as 1e-30.
top_p
    Nucleus mass in (0, 1], a number or a [B] tensor, taken on ``softmax(z_p / T)``.
greedy
    True: the token is the argmax of the aligned scores on the nucleus (lowest id on a tie).
generator, seed, offset
    Randomness for sampling. ``seed``: an int in [0, 2**63) (or a 0-d int64 tensor: with
    ``check=False`` and on the logits' device it is read in the kernel, not by the host) or
    a [B] int64 tensor of per-row seeds; the draw for a row comes from Triton's Philox stream
    keyed by the seed, with counter (row, offset) for one seed and (0, offset) for per-row
    seeds, identical on every backend. ``offset`` (int, 0-d or [B] tensor): advance it every
    decoding step (e.g. the position), or every step draws the same uniform. ``generator``:
    a ``torch.Generator`` on the logits' device, used when no seed is given (default:
    torch's global generator).
history, repetition_penalty, presence_penalty, frequency_penalty
    Penalties (docs/semantics.md, "Penalties"), applied to every branch before anything
    else. ``history``: [B, H] int64, the tokens of each row's answer so far (entries < 0 are
    padding; with ``check`` an id >= V is a ``ValueError``, without it padding). Each penalty
    is a number or a [B] tensor: with ``c`` the count of a token in the row's history, a
    token with ``c > 0`` first has its logit divided by ``repetition_penalty`` (> 0) when
    positive and multiplied by it when negative (Hugging Face's rule), then lowered by
    ``frequency_penalty * c + presence_penalty`` (the OpenAI rule). A finite logit stays
    finite (clamped to the fp32 range), ``-inf`` stays ``-inf``. Neutral values (1, 0, 0,
    the defaults, as numbers) or no history leave the step exactly as without them.
backend
    "auto" (CUDA tensors -> "triton", CPU tensors -> "torch"), "triton", "torch",
    "reference".
check
    True (default): validate parameter values and raise ``ValueError`` on rows with NaN or
    +inf in either branch or no finite principle logit (this syncs with the device). False:
    no host synchronisation; such rows still get a valid token id and ``Status.BAD_INPUT``.
"""
import functools

import torch

from . import ops  # noqa: F401  (registers torch.ops.linalign.triton_step)
from .arguments import StepOutput, normalize, raise_on_bad_rows
from .constants import MAX_RATIO

BACKENDS = ("auto", "triton", "torch", "reference")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs: ``"auto"`` is Triton for CUDA tensors, the torch path else."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


@functools.cache
def _backend_module(name):
    # imported on first use (the Triton path imports Triton only when it runs), remembered
    if name == "triton":
        from . import triton_backend as module
    elif name == "torch":
        from . import torch_backend as module
    else:
        from . import reference as module
    return module


def step(logits_p, logits_0, *, ratio=None, kl_budget=None, max_ratio=MAX_RATIO,
         temperature=1.0, top_p=1.0, greedy=False, generator=None, seed=None, offset=0,
         history=None, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
         backend="auto", check=True) -> StepOutput:
    """One Linear Alignment decoding step over a batch (docs/semantics.md).

    Per row: nucleus ``N`` = top-p of ``softmax(z_p / T)`` (ties with the last kept token
    kept, tokens more than 80 T below the principle max never kept); aligned scores
    ``s = (z_p + r (z_p - z_0)) / T`` on ``N``, ``-inf`` elsewhere and on tokens that are
    ``-inf`` in either branch; the token is ``argmax s`` (greedy) or drawn from
    ``softmax(s)``. If banning empties ``N`` the row uses r = 0 (``Status.FALLBACK``).
    Penalties from ``history`` change both branches' logits first.

    Give ``ratio`` (a fixed step) or ``kl_budget`` (kl mode: r per row from the branches;
    ``max_ratio`` caps it). ``logits_p`` may hold K principle branches, [K, B, V] (or a list
    of K [B, V] tensors), with one ratio per principle; K = 1 is exactly the one-principle
    step.

    Arguments are described once in ``linalign.api``'s module docstring. Returns a
    ``StepOutput`` (its ``ratio`` is [B] for [B, V] logits, [K, B] for K branches). Raises
    ``TypeError``/``ValueError`` naming the bad value and the expected one
    (docs/errors.md).
    """
    args = normalize(logits_p, logits_0, ratio=ratio, kl_budget=kl_budget,
                     max_ratio=max_ratio, temperature=temperature, top_p=top_p, greedy=greedy,
                     generator=generator, seed=seed, offset=offset, check=check,
                     history=history, repetition_penalty=repetition_penalty,
                     presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    out = _backend_module(resolve_backend(backend, args.device)).run(args)
    if isinstance(logits_p, torch.Tensor) and logits_p.dim() == 2:
        out = out._replace(ratio=out.ratio[0])
    if check:
        raise_on_bad_rows(out)
    return out


def sample(logits_p, logits_0, **kwargs) -> torch.Tensor:
    """Same arguments as ``step``; returns only the int64 [B] token ids."""
    return step(logits_p, logits_0, **kwargs).tokens
