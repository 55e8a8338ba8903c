"""The step's arguments, checked and normalised once for every backend, and what a step
returns.

``normalize`` turns what a caller passes to ``linalign.step`` into ``StepArgs``: K >= 1
principle branches as one [K, B, V] tensor, the without-branch [B, V], K ratios (or kl
mode's budget and cap), temperature, top-p, and the randomness, each parameter a Python
number or a [B] fp32 tensor on the logits' device. Every backend (``linalign.reference``,
``linalign.torch_backend``, ``linalign.triton_backend``) takes ``StepArgs`` and returns a
``StepOutput``. The rules of each parameter are ``linalign.options.RULES``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .constants import SEED_LIMIT, TINY_T, Status
from .options import NEUTRAL_PENALTIES, check_flag, check_number, rule_of

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class StepOutput(NamedTuple):
    """Result of one step, all [B] tensors on the logits' device."""

    tokens: torch.Tensor  # int64: the chosen token ids, always in [0, V)
    logprobs: torch.Tensor  # fp32: log-probability of each token under the masked aligned
    #                          distribution (0 for T = 0 rows, -inf for rows with no token)
    nucleus_size: torch.Tensor  # int32: |N|, the principle-branch nucleus (gap rule included)
    status: torch.Tensor  # int32: Status bits
    ratio: torch.Tensor = None  # fp32: the ratio the step used per row (0 on FALLBACK rows;
    #                             kl mode: r_eff = kappa - 1); [K, B] for K principles


@dataclass
class Penalties:
    """The penalties of a step (docs/semantics.md, "Penalties"): ``history`` [B, H] int64,
    the answer's tokens so far per row (entries < 0, or >= V with check=False, are
    padding); ``repetition``, ``presence``, ``frequency``: a number or a [B] fp32 tensor
    each."""

    history: torch.Tensor
    repetition: object
    presence: object
    frequency: object


@dataclass
class StepArgs:
    """Checked arguments of one step. ``logits``: [K, B, V] principle branches; ``logits_0``:
    [B, V]; ``ratios``: K numbers or [B] fp32 tensors (None in kl mode); ``kl``: (budget,
    cap), numbers or [B] tensors, or None; ``temperature``, ``top_p``: a number or a [B]
    tensor; ``seed``: None, an int, a [B] int64 tensor, or (Triton only) a 0-d int64 device
    tensor; ``offset``: an int or a [B] int64 tensor; ``penalties``: ``Penalties``, or None
    when they cannot change a logit (neutral values or an empty history)."""

    logits: torch.Tensor
    logits_0: torch.Tensor
    ratios: list | None
    kl: tuple | None
    temperature: object
    top_p: object
    greedy: bool
    generator: torch.Generator | None
    seed: object
    offset: object
    penalties: Penalties | None = None

    @property
    def K(self) -> int:
        return self.logits.shape[0]

    @property
    def B(self) -> int:
        return self.logits.shape[1]

    @property
    def device(self) -> torch.device:
        return self.logits.device

    def host_seed(self) -> StepArgs:
        """The same arguments with a 0-d seed tensor read back to an int (for the backends
        that draw their uniforms on the host side of torch)."""
        if isinstance(self.seed, torch.Tensor) and self.seed.dim() == 0:
            self.seed = int(self.seed.item())
        return self


def rows_text(mask: torch.Tensor) -> str:
    rows = mask.nonzero().flatten().tolist()
    return str(rows[:10]) + (" ..." if len(rows) > 10 else "")


def real_param(name, x, B, device, check):
    """A real per-row parameter: a Python number (checked against ``RULES``) or a [B] tensor
    (as fp32 on ``device``; its values checked when ``check``). A 0-d tensor on the logits'
    device becomes a [B] view when ``check`` is off (no host synchronisation); otherwise it
    is read back as a number."""
    if isinstance(x, torch.Tensor):
        if x.dim() == 0 and (check or x.device != device):
            return check_number(name, x.item())
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
            bound = rule_of(name)
            bad = ~bound.tensor_ok(x)
            if bool(bad.any()):
                raise ValueError(f"{name} must be {bound.words}; got {x[bad][:5].tolist()} "
                                 f"at rows {rows_text(bad)}")
        return x
    return check_number(name, x)


def int_param(name, x, B, device, check=True):
    """An int in [0, 2**63) or a [B] int64 tensor. A 0-d tensor on ``device`` with ``check``
    off stays a 0-d device tensor (no host synchronisation; the Triton path reads it in the
    kernel); otherwise it is read back as an int."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool or x.shape not in ((B,), ()):
            raise ValueError(f"{name} must be an int or an int64 tensor of shape [{B}]; got "
                             f"{x.dtype} of shape {list(x.shape)}")
        if x.dim() == 0:
            if check or x.device != device:
                return int_param(name, int(x.item()), B, device)
            return x.to(torch.int64)
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the logits are on {device}")
        return x.to(dtype=torch.int64)
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int or a [B] int64 tensor; got {type(x).__name__}")
    if not 0 <= x < SEED_LIMIT:
        raise ValueError(f"{name} must be in [0, 2**63); got {x}")
    return x


def _check_logits(name, z):
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(z).__name__}")
    if z.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16; got {z.dtype}")


def _principle_branches(logits_p) -> torch.Tensor:
    """``logits_p`` as a [K, B, V] tensor: a [B, V] tensor (K = 1), a [K, B, V] tensor or a
    list of K [B, V] tensors."""
    if isinstance(logits_p, (list, tuple)):
        if not logits_p or not all(isinstance(z, torch.Tensor) for z in logits_p):
            raise TypeError("logits_p must be a tensor, or a non-empty list of K [B, V] "
                            "tensors (one per principle)")
        shapes = {tuple(z.shape) for z in logits_p}
        if len(shapes) != 1:
            raise ValueError(f"the K principle branches must have one shape [B, V]; got "
                             f"{sorted(shapes)}")
        logits_p = torch.stack(list(logits_p))
    _check_logits("logits_p", logits_p)
    if logits_p.dim() == 3:
        if logits_p.shape[0] == 0:
            raise ValueError("logits_p has K = 0 principle branches; expected K >= 1")
        return logits_p
    if logits_p.dim() != 2:
        raise ValueError(f"logits_p must be 2-D [B, V]; got shape {list(logits_p.shape)} "
                         "(use .unsqueeze(0) for a single row)")
    return logits_p[None]


def ratio_list(ratio, K, B) -> list:
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


def penalty_args(history, penalties: dict, B, V, device, check) -> Penalties | None:
    """The penalties as ``Penalties``, or None when they change nothing: every value a
    neutral number (``NEUTRAL_PENALTIES``), no history, or an empty one. ``history``: an
    integer [B, H] tensor on the logits' device; with ``check`` its ids must be < V."""
    neutral = all(not isinstance(x, torch.Tensor) and x == NEUTRAL_PENALTIES[name]
                  for name, x in penalties.items())
    if history is None:
        if not neutral:
            raise ValueError("repetition_penalty, presence_penalty and frequency_penalty need "
                             "history= (the [B, H] int64 tokens generated so far per row)")
        return None
    if not isinstance(history, torch.Tensor) or history.dtype.is_floating_point or \
            history.dtype.is_complex or history.dtype == torch.bool or history.dim() != 2 \
            or history.shape[0] != B:
        what = f"{history.dtype} of shape {list(history.shape)}" if isinstance(
            history, torch.Tensor) else type(history).__name__
        raise ValueError(f"history must be an int64 tensor of shape [B, H] = [{B}, H] (the "
                         f"tokens generated so far, < 0 for padding); got {what}")
    if history.device != device:
        raise ValueError(f"history is on {history.device} but the logits are on {device}")
    values = {name: real_param(name, x, B, device, check) for name, x in penalties.items()}
    if neutral or history.shape[1] == 0:
        return None
    history = history.to(torch.int64)
    if check and history.numel() and bool((history >= V).any()):
        bad = (history >= V).any(1)
        raise ValueError(f"history has token ids >= V = {V} at rows {rows_text(bad)}; "
                         "expected ids in [0, V), or < 0 for padding")
    return Penalties(history, values["repetition_penalty"], values["presence_penalty"],
                     values["frequency_penalty"])


def normalize(logits_p, logits_0, *, ratio, kl_budget, max_ratio, temperature, top_p,
              greedy, generator, seed, offset, check, history=None, repetition_penalty=1.0,
              presence_penalty=0.0, frequency_penalty=0.0) -> StepArgs:
    """Check every argument of a step (docs/errors.md lists the errors); return
    ``StepArgs``."""
    if (ratio is None) == (kl_budget is None):
        # neither: a missing argument (TypeError, as Python's own); both: a bad combination
        raise (TypeError if ratio is None else ValueError)(
            "pass exactly one of ratio= (a fixed step along z_p - z_0) and kl_budget= (kl "
            "mode: a ratio per row from a budget in nats); got "
            + ("both" if ratio is not None else "neither"))
    zs = _principle_branches(logits_p)
    K, B, V = zs.shape
    _check_logits("logits_0", logits_0)
    if logits_0.dim() != 2:
        raise ValueError(f"logits_0 must be 2-D [B, V]; got shape {list(logits_0.shape)} "
                         "(use .unsqueeze(0) for a single row)")
    if tuple(logits_0.shape) != (B, V):
        if isinstance(logits_p, torch.Tensor) and logits_p.dim() == 2:
            raise ValueError(f"logits_p and logits_0 must have the same shape [B, V]; got "
                             f"{[B, V]} and {list(logits_0.shape)}")
        raise ValueError(f"logits_0 must be [B, V] = {[B, V]} like each principle branch; "
                         f"got {list(logits_0.shape)}")
    if zs.device != logits_0.device:
        raise ValueError(f"logits_p is on {zs.device} but logits_0 is on {logits_0.device}")
    if V == 0:
        raise ValueError("the vocabulary is empty (V = 0); expected V >= 1")
    dev = zs.device
    ratios = kl = None
    if kl_budget is not None:
        if K > 1:
            raise ValueError("kl_budget is for one principle (kl mode bounds the step of one "
                             f"branch pair); got K = {K} principle branches: pass ratio= (one "
                             "per principle)")
        kl = (real_param("kl_budget", kl_budget, B, dev, check),
              real_param("max_ratio", max_ratio, B, dev, check))
    else:
        ratios = [real_param("ratio" if K == 1 else f"ratio[{k}]", x, B, dev, check)
                  for k, x in enumerate(ratio_list(ratio, K, B))]
    temperature = real_param("temperature", temperature, B, dev, check)
    top_p = real_param("top_p", top_p, B, dev, check)
    if isinstance(temperature, torch.Tensor):
        temperature = torch.where((temperature > 0) & (temperature < TINY_T),
                                  torch.full_like(temperature, TINY_T), temperature)
    elif 0 < temperature < TINY_T:
        temperature = TINY_T
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        seed = int_param("seed", seed, B, dev, check)
    offset = int_param("offset", offset, B, dev, check)
    if isinstance(offset, torch.Tensor) and offset.dim() == 0:
        offset = offset.expand(B)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
    penalties = penalty_args(history, dict(repetition_penalty=repetition_penalty,
                                           presence_penalty=presence_penalty,
                                           frequency_penalty=frequency_penalty),
                             B, V, dev, check)
    return StepArgs(zs, logits_0, ratios, kl, temperature, top_p, check_flag("greedy", greedy),
                    generator, seed, offset, penalties)


def used_ratio(r, status: torch.Tensor) -> torch.Tensor:
    """The [B] fp32 ratio a step used: ``r`` (a number or a [B] tensor), 0 where the row
    fell back."""
    fell = (status & int(Status.FALLBACK)) != 0
    if not isinstance(r, torch.Tensor):
        r = torch.full(status.shape, float(r), device=status.device, dtype=torch.float32)
    return torch.where(fell, 0.0, r.to(torch.float32))


def raise_on_bad_rows(out: StepOutput):
    """The check=True behaviour: ValueError naming the rows flagged BAD_INPUT."""
    bad = (out.status & int(Status.BAD_INPUT)) != 0
    if out.status.numel() and bool(bad.any()):
        raise ValueError(f"rows {rows_text(bad)}: NaN or +inf in logits_p or logits_0, or no "
                         "finite logit in logits_p; expected finite logits (-inf allowed "
                         "to ban a token). Pass check=False to get Status.BAD_INPUT "
                         "instead.")
