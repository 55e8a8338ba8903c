"""The public step API: ``linalign.step`` and ``linalign.sample``.

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
    "kl" mode (SPEC section 3), instead of ``ratio``: a per-token budget eps >= 0 in nats
    (a number or a [B] tensor). Per row, ``v`` = the variance of ``g = (z_p - z_0) / T``
    under ``softmax(z_0 / T)`` and ``kappa = sqrt(2 eps / v)`` clipped to
    ``[0, 1 + max_ratio]``; the step runs with ``r = kappa - 1`` (``v = 0``: r = 0). To
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
    decoding step (e.g. the position), or every step draws the same uniform. ``generator``: a ``torch.Generator`` on
    the logits' device, used when no seed is given (default: torch's global generator).
backend
    "auto" (CUDA tensors -> "triton", CPU tensors -> "torch"), "triton", "torch",
    "reference".
check
    True (default): validate parameter values and raise ``ValueError`` on rows with NaN or
    +inf in either branch or no finite principle logit (this syncs with the device). False:
    no host synchronisation; such rows still get a valid token id and ``Status.BAD_INPUT``.
"""
import enum
import math
from typing import NamedTuple

import torch

from . import ops  # noqa: F401  (registers torch.ops.linalign.triton_step)
from .random import row_uniforms

BACKENDS = ("auto", "triton", "torch", "reference")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TINY_T = 1e-30


class Status(enum.IntFlag):
    """Per-row status bits of a step (``StepOutput.status`` holds them as int32)."""

    OK = 0
    #: Every nucleus token is -inf in the without-branch: the row fell back to plain
    #: top-p decoding of the principle branch (r taken as 0).
    FALLBACK = 1
    #: NaN or +inf in either branch, or no finite principle logit (only with check=False;
    #: the token is a valid id computed with those entries treated as -inf, or 0).
    BAD_INPUT = 2


MAX_RATIO = 10.0  # kl mode's default cap on r_eff (the branches nearly agree: v -> 0)


class StepOutput(NamedTuple):
    """Result of one step, all [B] tensors on the logits' device."""

    tokens: torch.Tensor  # int64: the chosen token ids, always in [0, V)
    logprobs: torch.Tensor  # fp32: log-probability of each token under the masked aligned
    #                          distribution (0 for T = 0 rows, -inf for rows with no token)
    nucleus_size: torch.Tensor  # int32: |N|, the principle-branch nucleus (gap rule included)
    status: torch.Tensor  # int32: Status bits
    ratio: torch.Tensor = None  # fp32: the ratio the step used per row (0 on FALLBACK rows;
    #                             kl mode: r_eff = kappa - 1); [K, B] for K principles


def _rows(mask):
    rows = mask.nonzero().flatten().tolist()
    return str(rows[:10]) + (" ..." if len(rows) > 10 else "")


#: What each per-row parameter must be: (test on a fp32 tensor, the words for the error).
#: The decoder validates with the same rules before its loop.
RULES = {
    "ratio": (torch.isfinite, "a finite number"),
    "temperature": (lambda t: torch.isfinite(t) & (t >= 0), "finite and >= 0"),
    "top_p": (lambda p: (p > 0) & (p <= 1), "in (0, 1]"),
    "kl_budget": (lambda e: torch.isfinite(e) & (e >= 0), "finite and >= 0 (nats)"),
    "max_ratio": (lambda r: torch.isfinite(r) & (r >= 0), "finite and >= 0"),
}


#: The same rules for Python numbers (no tensor ops: a step's fixed cost matters eagerly).
_NUMBER_RULES = {
    "ratio": math.isfinite,
    "temperature": lambda t: math.isfinite(t) and t >= 0,
    "top_p": lambda p: 0 < p <= 1,
    "kl_budget": lambda e: math.isfinite(e) and e >= 0,
    "max_ratio": lambda r: math.isfinite(r) and r >= 0,
}


def _param(name, x, B, device, check, valid, expected):
    """Validate a number or a [B] tensor; return it (tensors as fp32 on ``device``).

    A 0-d tensor on the logits' device becomes a [B] view when ``check`` is off (no host
    synchronisation); otherwise it is read back as a number."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0 and (check or x.device != device):
            x = x.item()
        else:
            if x.dim() == 0:
                x = x.expand(B)
            if x.shape != (B,):
                raise ValueError(f"{name} must be a number or a tensor of shape [{B}]; "
                                 f"got shape {list(x.shape)}")
            if x.device != device:
                raise ValueError(f"{name} is on {x.device} but the logits are on {device}")
            if x.dtype.is_complex or x.dtype == torch.bool:
                raise TypeError(f"{name} must be a real tensor; got {x.dtype}")
            x = x.to(torch.float32)
            if check:
                bad = ~valid(x)
                if bool(bad.any()):
                    raise ValueError(f"{name} must be {expected}; got {x[bad][:5].tolist()} "
                                     f"at rows {_rows(bad)}")
            return x
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number or a [B] tensor; got {type(x).__name__}")
    x = float(x)
    if not _NUMBER_RULES[name.split("[")[0]](x):
        raise ValueError(f"{name} must be {expected}; got {x}")
    return x


def _int_param(name, x, B, device, check=True):
    """An int or a [B] int64 tensor. A 0-d tensor on ``device`` with ``check`` off stays a
    0-d device tensor (no host synchronisation; the Triton path reads it in the kernel);
    otherwise it is read back as an int."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool or x.shape not in ((B,), ()):
            raise ValueError(f"{name} must be an int or an int64 tensor of shape [{B}]; got "
                             f"{x.dtype} of shape {list(x.shape)}")
        if x.dim() == 0:
            if check or x.device != device:
                return _int_param(name, int(x.item()), B, device)
            return x.to(torch.int64)
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the logits are on {device}")
        return x.to(dtype=torch.int64)
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int or a [B] int64 tensor; got {type(x).__name__}")
    if not 0 <= x < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63); got {x}")
    return x


def prepare(logits_p, logits_0, ratio, temperature, top_p, generator, seed, offset, check):
    """Validate the arguments of a step (SPEC section 2); return normalised parameters."""
    for name, z in (("logits_p", logits_p), ("logits_0", logits_0)):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(z).__name__}")
        if z.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16; got {z.dtype}")
        if z.dim() != 2:
            raise ValueError(f"{name} must be 2-D [B, V]; got shape {list(z.shape)} "
                             "(use .unsqueeze(0) for a single row)")
    if logits_p.shape != logits_0.shape:
        raise ValueError(f"logits_p and logits_0 must have the same shape [B, V]; got "
                         f"{list(logits_p.shape)} and {list(logits_0.shape)}")
    if logits_p.device != logits_0.device:
        raise ValueError(f"logits_p is on {logits_p.device} but logits_0 is on {logits_0.device}")
    B, V = logits_p.shape
    if V == 0:
        raise ValueError("the vocabulary is empty (V = 0); expected V >= 1")
    dev = logits_p.device
    if ratio is not None:
        ratio = _param("ratio", ratio, B, dev, check, *RULES["ratio"])
    temperature = _param("temperature", temperature, B, dev, check, *RULES["temperature"])
    top_p = _param("top_p", top_p, B, dev, check, *RULES["top_p"])
    if isinstance(temperature, torch.Tensor):
        temperature = torch.where((temperature > 0) & (temperature < TINY_T),
                                  torch.full_like(temperature, TINY_T), temperature)
    elif 0 < temperature < TINY_T:
        temperature = TINY_T
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        seed = _int_param("seed", seed, B, dev, check)
    offset = _int_param("offset", offset, B, dev, check)
    if isinstance(offset, torch.Tensor) and offset.dim() == 0:
        offset = offset.expand(B)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
    return ratio, temperature, top_p, seed, offset


def _resolve(backend, device):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def _run_triton(zp, z0, r, T, p, greedy, generator, seed, offset, kl=None):
    from . import kernels

    if zp.device.type != "cuda" and not kernels.INTERPRETED:
        raise ValueError("the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set "
                         "before linalign.kernels is first imported (to run on the CPU "
                         "through Triton's interpreter)")
    u = None
    if not greedy and seed is None:
        u = row_uniforms(zp.shape[0], zp.device, generator=generator)
    if torch.compiler.is_compiling():
        # Under torch.compile the launches go through one opaque custom op (linalign.ops).
        return torch.ops.linalign.triton_step(*ops.as_op_args(zp, z0, r, T, p, greedy, u, seed,
                                                          offset, kl))
    return kernels.la_step(zp, z0, r, T, p, greedy=greedy, u=u, seed=seed, offset=offset, kl=kl)


def step(logits_p, logits_0, *, ratio=None, kl_budget=None, max_ratio=MAX_RATIO,
         temperature=1.0, top_p=1.0, greedy=False, generator=None, seed=None, offset=0,
         backend="auto", check=True) -> StepOutput:
    """One Linear Alignment decoding step over a batch (SPEC sections 1 to 4).

    Per row: nucleus ``N`` = top-p of ``softmax(z_p / T)`` (ties with the last kept token
    kept, tokens more than 80 T below the principle max never kept); aligned scores
    ``s = (z_p + r (z_p - z_0)) / T`` on ``N``, ``-inf`` elsewhere and on tokens that are
    ``-inf`` in either branch; the token is ``argmax s`` (greedy) or drawn from
    ``softmax(s)``. If banning empties ``N`` the row uses r = 0 (``Status.FALLBACK``).

    Give ``ratio`` (a fixed step) or ``kl_budget`` (the closed-form step of SPEC 3, r per
    row from the branches; ``max_ratio`` caps it). ``logits_p`` may hold K principle
    branches, [K, B, V] (or a list of K [B, V] tensors): SPEC 4, one ratio per principle;
    K = 1 is exactly the one-principle step.

    Arguments are described once in ``linalign.api``'s module docstring. Returns a
    ``StepOutput``. Raises ``TypeError``/``ValueError`` naming the bad value and the
    expected one.
    """
    if (ratio is None) == (kl_budget is None):
        # neither: a missing argument (TypeError, as Python's own); both: a bad combination
        raise (TypeError if ratio is None else ValueError)(
            "pass exactly one of ratio= (a fixed step along z_p - z_0) and kl_budget= (SPEC "
            "section 3: r per row from a budget in nats); got "
            + ("both" if ratio is not None else "neither"))
    if isinstance(logits_p, (list, tuple)):
        if not logits_p or not all(isinstance(z, torch.Tensor) for z in logits_p):
            raise TypeError("logits_p must be a tensor, or a non-empty list of K [B, V] "
                            "tensors (one per principle)")
        shapes = {tuple(z.shape) for z in logits_p}
        if len(shapes) != 1:
            raise ValueError(f"the K principle branches must have one shape [B, V]; got "
                             f"{sorted(shapes)}")
        logits_p = torch.stack(list(logits_p))
    if isinstance(logits_p, torch.Tensor) and logits_p.dim() == 3:
        K = logits_p.shape[0]
        if K == 0:
            raise ValueError("logits_p has K = 0 principle branches; expected K >= 1")
        if K > 1:
            if kl_budget is not None:
                raise ValueError("kl_budget is for one principle (SPEC section 3 defines the "
                                 f"closed-form step of one branch pair); got K = {K} "
                                 "principle branches: pass ratio= (one per principle)")
            return _composed(logits_p, logits_0, ratio, temperature, top_p, greedy,
                             generator, seed, offset, backend, check)
        ratio = _ratio_list(ratio, 1, logits_p.shape[1])[0] if ratio is not None else None
        out = step(logits_p[0], logits_0, ratio=ratio, kl_budget=kl_budget,
                   max_ratio=max_ratio, temperature=temperature, top_p=top_p, greedy=greedy,
                   generator=generator, seed=seed, offset=offset, backend=backend,
                   check=check)
        return out._replace(ratio=out.ratio[None])  # [K = 1, B], like K principles
    r, T, p, seed, offset = prepare(logits_p, logits_0, ratio, temperature, top_p,
                                    generator, seed, offset, check)
    kl = None
    if kl_budget is not None:
        B, dev = logits_p.shape[0], logits_p.device
        kl = (_param("kl_budget", kl_budget, B, dev, check, *RULES["kl_budget"]),
              _param("max_ratio", max_ratio, B, dev, check, *RULES["max_ratio"]))
    which = _resolve(backend, logits_p.device)
    if which != "triton" and isinstance(seed, torch.Tensor) and seed.dim() == 0:
        seed = int(seed.item())  # one seed kept on the device is read in the kernel only
    if which == "triton":
        out = StepOutput(*_run_triton(logits_p, logits_0, r, T, p, greedy, generator, seed,
                                      offset, kl))
    else:
        if kl is not None:
            r = _kl_ratio(which, logits_p, logits_0, T, *kl)
        if which == "torch":
            from .torch_backend import torch_step

            out = torch_step(logits_p, logits_0, r, T, p, greedy=greedy, generator=generator,
                             seed=seed, offset=offset)
        else:
            from .reference import reference_step

            out = reference_step(logits_p, logits_0, r, T, p, greedy=greedy,
                                 generator=generator, seed=seed, offset=offset)
        out = StepOutput(*out, ratio=_used_ratio(r, out[3]))
    if check:
        raise_on_bad_rows(out)
    return out


def _used_ratio(r, status):
    """The [B] fp32 ratio a step used: ``r``, and 0 where the row fell back."""
    fell = (status & int(Status.FALLBACK)) != 0
    if not isinstance(r, torch.Tensor):
        r = torch.full(status.shape, float(r), device=status.device, dtype=torch.float32)
    return torch.where(fell, 0.0, r.to(torch.float32))


def _kl_ratio(which, zp, z0, T, kl_budget, max_ratio):
    """kl mode on the torch and reference backends: r_eff per row, a [B] fp32 tensor."""
    if which == "torch":
        from .torch_backend import kl_ratio

        return kl_ratio(zp, z0, T, kl_budget, max_ratio)
    from .reference import kl_ratio

    per_row = lambda x, b: float(x[b]) if isinstance(x, torch.Tensor) else float(x)  # noqa: E731
    return torch.tensor([kl_ratio(zp[b].float(), z0[b].float(), per_row(T, b),
                                  per_row(kl_budget, b), per_row(max_ratio, b))
                         for b in range(zp.shape[0])], dtype=torch.float32, device=zp.device)


def _ratio_list(ratio, K, B):
    """The ratios of K principles as a list of K numbers or [B] tensors."""
    if isinstance(ratio, torch.Tensor) and ratio.dim() == 2:
        if ratio.shape[0] != K:
            raise ValueError(f"ratio has shape {list(ratio.shape)}; expected [{K}, {B}] "
                             f"(one row of ratios per principle)")
        return list(ratio.unbind(0))
    if isinstance(ratio, (list, tuple)):
        if len(ratio) != K:
            raise ValueError(f"ratio has {len(ratio)} entries for {K} principle branches; "
                             "expected one per principle")
        return list(ratio)
    if isinstance(ratio, torch.Tensor) and ratio.dim() == 1 and K > 1:
        raise ValueError(f"a 1-D ratio tensor is ambiguous with K = {K} principles: pass one "
                         f"number, a list of {K} (numbers or [B] tensors), or a [{K}, {B}] "
                         "tensor")
    return [ratio] * K


def _composed(logits, logits_0, ratio, temperature, top_p, greedy, generator, seed, offset,
              backend, check):
    """SPEC 4 with K >= 2 principle branches ``logits`` [K, B, V]."""
    if not isinstance(logits_0, torch.Tensor) or logits_0.dim() != 2 or \
            tuple(logits_0.shape) != tuple(logits.shape[1:]):
        got = list(logits_0.shape) if isinstance(logits_0, torch.Tensor) else type(logits_0)
        raise ValueError(f"logits_0 must be [B, V] = {list(logits.shape[1:])} like each "
                         f"principle branch; got {got}")
    K, B, V = logits.shape
    dev = logits.device
    # Validate the logits and the shared parameters once, on the first branch.
    _, T, p, seed, offset = prepare(logits[0], logits_0, 0.0, temperature, top_p, generator,
                                    seed, offset, check)
    ratios = [_param(f"ratio[{k}]", x, B, dev, check, *RULES["ratio"])
              for k, x in enumerate(_ratio_list(ratio, K, B))]
    which = _resolve(backend, dev)
    if which == "reference":
        from . import reference

        if isinstance(seed, torch.Tensor) and seed.dim() == 0:
            seed = int(seed.item())
        u = None if greedy else row_uniforms(B, dev, generator=generator, seed=seed,
                                             offset=offset)
        tok, lp, size, status = reference.composed_step(logits, logits_0, ratios, T, p,
                                                        greedy=greedy, u=u)
        out = (torch.tensor(tok, dtype=torch.int64, device=dev),
               torch.tensor(lp, dtype=torch.float32, device=dev),
               torch.tensor(size, dtype=torch.int32, device=dev),
               torch.tensor(status, dtype=torch.int32, device=dev))
    else:
        if which == "triton" and not torch.compiler.is_compiling():
            # one fused elementwise launch (kernels/compose.py); under torch.compile the
            # torch version below, which the compiler fuses itself
            from . import kernels

            r = torch.stack([x.to(torch.float32) if isinstance(x, torch.Tensor) else
                             torch.full((B,), x, device=dev, dtype=torch.float32)
                             for x in ratios])
            zc, zb, bad = kernels.la_compose(logits, logits_0, r)
        else:
            from .compose import compose

            zc, zb, bad = compose(logits, logits_0, ratios)
        one = step(zc, zb, ratio=1.0, temperature=T, top_p=p, greedy=greedy,
                   generator=generator, seed=seed, offset=offset, backend=which, check=False)
        out = (*one[:3], one.status | torch.where(bad, int(Status.BAD_INPUT), 0).to(torch.int32))
    out = StepOutput(*out, ratio=torch.stack([_used_ratio(r, out[3]) for r in ratios]))
    if check:
        raise_on_bad_rows(out)
    return out


def raise_on_bad_rows(out: StepOutput):
    """The check=True behaviour: ValueError naming the rows flagged BAD_INPUT."""
    bad = (out.status & int(Status.BAD_INPUT)) != 0
    if out.status.numel() and bool(bad.any()):
        raise ValueError(f"rows {_rows(bad)}: NaN or +inf in logits_p or logits_0, or no "
                         "finite logit in logits_p; expected finite logits (-inf allowed "
                         "to ban a token). Pass check=False to get Status.BAD_INPUT "
                         "instead.")


def sample(logits_p, logits_0, **kwargs) -> torch.Tensor:
    """Same arguments as ``step``; returns only the int64 [B] token ids."""
    return step(logits_p, logits_0, **kwargs).tokens
