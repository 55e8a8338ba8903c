"""Decoding the jobs of ``linalign run`` in batches, a result line written the moment its
row finishes.

Each batch is one ``LinearAligner.generate`` call whose ``on_finished`` callback writes a
row as soon as the decoding loop sees it end, at the loop's own host checks (every step on
the CPU, every few steps on a GPU): no per-step host synchronisation. A batch that runs
out of memory is retried in halves, one the decoder refuses row by row.
docs/run.md, "When a line is written" and "Batches".
"""
from __future__ import annotations

import sys

from ..prompts import decode_text
from .jobs import Job, Settings, batch_params, plan
from .progress import Progress


def result_line(job: Job, ids: list[int], text: str, reason: str, s: Settings,
                rank: int) -> dict:
    """The output line of a finished row (docs/run.md, "Output")."""
    r, p, o = job.row, s.params, s.options
    out = {"id": r.id, "prompt": r.prompt, "principles": r.principles, "text": text,
           "new_tokens": len(ids), "finish_reason": reason}
    if o.token_ids:
        out["token_ids"] = ids
    out["settings"] = {
        "ratio": job.ratio, "kl_budget": job.kl_budget,
        "max_ratio": p.max_ratio if job.kind == "kl" else None,
        "temperature": p.temperature, "top_p": p.top_p, "greedy": p.greedy,
        "max_new_tokens": job.max_new_tokens, "seed": job.seed, "mode": o.mode,
        "system": o.system, **job.penalties,
        "no_repeat_ngram_size": job.no_repeat_ngram_size, "stop": list(p.stop)}
    out["model"] = o.model or "default"
    out["rank"] = rank
    return out


class FinishedRows:
    """The ``on_finished`` callback of one batch: writes each row's result line as the
    decoding loop reports it, and remembers which rows are done."""

    def __init__(self, batch: list[Job], s: Settings, tokenizer, write, progress: Progress,
                 rank: int):
        self.batch, self.s, self.tokenizer = batch, s, tokenizer
        self.write, self.progress, self.rank = write, progress, rank
        self.done = [False] * len(batch)

    def __call__(self, i: int, ids: list[int], reason: str, text: str | None = None):
        if self.done[i]:
            return
        if text is None:
            text = decode_text(self.tokenizer, ids)
        self.write(result_line(self.batch[i], list(ids), text, reason, self.s, self.rank))
        self.done[i] = True
        self.progress.update(rows=1, tokens=len(ids))

    @property
    def unfinished(self) -> list[Job]:
        return [j for j, d in zip(self.batch, self.done) if not d]


def generate_batch(aligner, batch: list[Job], s: Settings, on_finished):
    """One ``generate`` call over ``batch`` (jobs of one group), rows reported through
    ``on_finished``."""
    K = len(batch[0].row.principles)
    principle = [j.row.principles[0] if K == 1 else j.row.principles for j in batch]
    return aligner.generate([j.row.prompt for j in batch], principle,
                            params=batch_params(batch, s.params), mode=s.options.mode,
                            fast=s.options.fast, on_finished=on_finished)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def decode_jobs(aligner, jobs: list[Job], s: Settings, write, *, batch_size: int = 8,
                rank: int = 0, progress: Progress | None = None, log=None,
                strict: bool = False, failed: list | None = None) -> int:
    """Decode ``jobs`` in batches (``plan``) and ``write(result line)`` each row as soon as
    it finishes. Returns the number of rows written.

    A batch that runs out of memory is retried in halves, its finished rows kept (one row
    that does not fit raises). A batch that the decoder refuses (``ValueError``: e.g. a
    prompt longer than the model's context) is retried row by row; a row refused on its own
    is reported through ``log``, appended to ``failed`` as (job, message) and skipped, or
    with ``strict`` raised.
    """
    log = log or (lambda msg: print(f"linalign: {msg}", file=sys.stderr))
    progress = progress or Progress(len(jobs), False)
    written = 0
    queue = plan(jobs, batch_size)
    while queue:
        batch = queue.pop(0)
        rows = FinishedRows(batch, s, aligner.tokenizer, write, progress, rank)
        try:
            result = generate_batch(aligner, batch, s, rows)
        except MemoryError as e:
            left = rows.unfinished
            if len(left) <= 1:
                raise
            half = (len(left) + 1) // 2
            log(f"out of memory with {len(batch)} rows per batch; retrying its "
                f"{len(left)} unfinished rows {half} at a time (lower --batch-size to avoid "
                f"this) [{_first_line(e)}]")
            queue[:0] = [left[:half], left[half:]]
        except ValueError as e:  # refused (before any compute, in practice)
            if strict:
                raise
            left = rows.unfinished
            if len(left) > 1:
                queue[:0] = [[j] for j in left]
            elif left:
                r = left[0].row
                log(f"input line {r.line} (id {r.id!r}): {e}; row skipped")
                if failed is not None:
                    failed.append((left[0], str(e)))
                progress.update(rows=1)
        else:
            for i in range(len(batch)):  # rows the loop did not report (it reports all)
                rows(i, result.token_ids[i], result.finish_reasons[i], result.texts[i])
        written += sum(rows.done)
    return written
