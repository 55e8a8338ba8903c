"""What each row of ``linalign run`` runs with, and the batches.

``Settings`` are the command's: a ``SamplingParams`` (the defaults of lines that do not say,
with ``linalign.options``' defaults and bounds) and ``RunOptions`` (the rest). ``resolve``
gives a row its ratio or kl budget, ``max_new_tokens``, seed, penalties and
``no_repeat_ngram_size`` (a ``Job``); ``plan`` groups
jobs by what one ``generate`` call must share and cuts the groups into batches.
Rules: docs/run.md, "Input" and "Batches".
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..options import DEFAULT_RATIO, NEUTRAL_PENALTIES, SamplingParams
from .lines import Row
from .sharding import row_seed


@dataclass(frozen=True)
class RunOptions:
    """The command's settings that are not sampling options."""
    mode: str = "stacked"           # "stacked" or "two-caches"
    fast: bool = False              # static KV cache (and a CUDA graph on a GPU)
    system: str | None = None       # base system text of both branches
    model: str | None = None        # --model as given (None: the embedded model)
    token_ids: bool = False         # write the generated ids too


@dataclass(frozen=True)
class Settings:
    """The command's settings. ``params``: the sampling options, the defaults of lines that
    do not give their own; its ``ratio`` is None (``DEFAULT_RATIO``), one number, or one per
    principle; its ``seed`` is the base of the per-row seeds (``row_seed``)."""
    params: SamplingParams = field(default_factory=SamplingParams)
    options: RunOptions = field(default_factory=RunOptions)


@dataclass
class Job:
    """One row with its settings resolved."""
    row: Row
    kind: str                   # "ratio" or "kl"
    ratio: list[float] | None   # one per principle (None in kl mode)
    kl_budget: float | None
    max_new_tokens: int
    seed: int | None            # None when greedy
    penalties: dict = field(default_factory=dict)  # every penalty's value for this row
    no_repeat_ngram_size: int = 0

    @property
    def group(self):
        """What one generate() call must share (ratios, kl budgets, seeds and penalties are
        per row)."""
        return (len(self.row.principles), self.kind, self.max_new_tokens,
                self.no_repeat_ngram_size)


def default_ratios(ratio, K: int) -> list[float]:
    """The command's ratio (None, one number, or one per principle) for K principles;
    ``ValueError`` when it has a number of values that fits neither."""
    if ratio is None:
        return [DEFAULT_RATIO] * K
    if not isinstance(ratio, (list, tuple)):
        return [float(ratio)] * K
    if len(ratio) not in (1, K):
        raise ValueError(f"{K} principle(s) and no \"ratio\": --ratio is given {len(ratio)} "
                         f"times, for lines with {len(ratio)} principles")
    return [float(r) for r in ratio] if len(ratio) == K else [float(ratio[0])] * K


def defaults_problem(row: Row, params: SamplingParams) -> str | None:
    """Why the command's defaults do not fit a line that relies on them, or None: kl mode
    (``--kl-budget``) for a line with several principles, or ``--ratio`` given a number of
    times that is not the line's number of principles."""
    if row.ratio is not None or row.kl_budget is not None:
        return None
    K = len(row.principles)
    if params.kl_budget is not None:
        if K > 1:
            return (f"{K} principles and no \"ratio\": --kl-budget (kl mode) is for one "
                    "principle per prompt (docs/semantics.md, \"kl mode\")")
        return None
    try:
        default_ratios(params.ratio, K)
    except ValueError as e:
        return str(e)
    return None


def resolve(row: Row, s: Settings, base_seed: int | None) -> Job:
    """A row's job: its own ``kl_budget``, else its own ``ratio``, else the command's
    ``kl_budget``, else the command's ratio; its own ``max_new_tokens`` or the command's;
    when sampling, its own seed or ``row_seed(base_seed, id)``; each penalty and
    ``no_repeat_ngram_size`` its own or the command's."""
    p = s.params
    K = len(row.principles)
    kl = row.kl_budget if row.kl_budget is not None else \
        (p.kl_budget if row.ratio is None else None)
    ratio = None
    if kl is None:
        ratio = row.ratio or default_ratios(p.ratio, K)
    seed = None
    if not p.greedy:
        seed = row.seed if row.seed is not None else row_seed(base_seed, row.key)
    penalties = {name: float(getattr(p, name)) for name in NEUTRAL_PENALTIES}
    penalties.update(row.penalties or {})
    ngram = p.no_repeat_ngram_size if row.no_repeat_ngram_size is None else \
        row.no_repeat_ngram_size
    return Job(row, "kl" if kl is not None else "ratio", ratio, kl,
               p.max_new_tokens if row.max_new_tokens is None else row.max_new_tokens, seed,
               penalties, ngram)


def plan(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Batches: jobs grouped by ``Job.group`` (groups in order of first appearance), longest
    first inside a group (an out-of-memory shows up in the first batch, not the last), cut
    into ``batch_size`` rows."""
    groups: dict = {}
    for j in jobs:
        groups.setdefault(j.group, []).append(j)
    batches = []
    for members in groups.values():
        members = sorted(members, key=lambda j: (-j.row.length, j.row.line))
        batches += [members[i:i + batch_size] for i in range(0, len(members), batch_size)]
    return batches


def batch_params(batch: list[Job], params: SamplingParams) -> SamplingParams:
    """The ``SamplingParams`` of one ``generate`` call over ``batch`` (one group): the
    command's temperature, top_p, greedy, max_ratio and stop strings, the rows' ratios or kl
    budgets, max_new_tokens, seeds, penalties and no_repeat_ngram_size."""
    K = len(batch[0].row.principles)
    seeds = None if params.greedy else [j.seed for j in batch]
    params = SamplingParams.build(
        params, no_repeat_ngram_size=batch[0].no_repeat_ngram_size,
        **{name: [j.penalties[name] for j in batch] for name in NEUTRAL_PENALTIES})
    if batch[0].kind == "kl":
        return SamplingParams.build(params, ratio=None, kl_budget=[j.kl_budget for j in batch],
                                    max_new_tokens=batch[0].max_new_tokens, seed=seeds)
    return SamplingParams.build(params, ratio=[j.ratio[0] if K == 1 else j.ratio
                                               for j in batch],
                                kl_budget=None, max_new_tokens=batch[0].max_new_tokens,
                                seed=seeds)
