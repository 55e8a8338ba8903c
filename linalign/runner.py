"""``linalign run``: Linear Alignment over a file of prompts, resumable, on one process or
sharded across ``torchrun`` ranks.

    linalign run --input prompts.jsonl --output results.jsonl
    torchrun --nproc-per-node 4 -m linalign run --input prompts.jsonl --output results.jsonl

Every input line is a JSON object (``id``, ``prompt``, ``principle``, optional ``ratio``,
``kl_budget``, ``seed``, ``max_new_tokens``). Lines are grouped by what has to be equal
inside one ``generate`` call (number of principles, ratio or kl mode, kl budget,
max_new_tokens), sorted by length inside a group and cut into batches of ``--batch-size``.
A result line is written and flushed the moment its row finishes (its end-of-sequence token
or its last token), found through the decoder's streamer protocol; a restart reads the
output, drops a line cut short by a crash, and skips every id already there. Under
``torchrun`` rank r decodes the ids whose hash is r modulo the world size into
``OUTPUT.rank{r}-of-{N}``; the parts are gathered to rank 0 over torch.distributed (so no
shared filesystem is needed) and merged into OUTPUT in input order, every id once.
Format, restart and sharding rules: docs/run.md.

The command line lives here (``add_run_parser``, ``run_command``); ``linalign/cli.py`` adds
the ``run`` sub-command. ``python -m linalign.runner ...`` runs the same command standalone.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cli_args import MODES, integer, number as _rule_number
from .options import DEFAULT_RATIO, SamplingParams
from .prompts import decode_text

_DEFAULTS = SamplingParams()

#: ``--model`` value that builds the tiny random Llama of ``linalign.testing`` with its byte
#: tokenizer (no download, gibberish output): for tests of the command.
TINY_MODEL = "linalign:tiny-random"
#: Fields an input line may have. Anything else is reported (a typo like "principles" or
#: "max_tokens" would otherwise be silently ignored).
FIELDS = ("id", "prompt", "principle", "ratio", "kl_budget", "seed", "max_new_tokens")
#: torch.distributed timeout for the final gather: ranks finish their shards at different
#: times and wait there for the slowest one, which may take hours on a long job.
DIST_TIMEOUT_HOURS = 7 * 24


class RunError(Exception):
    """A bad argument, input line or output file: one line on stderr, exit code 2."""


class UnsupportedError(RunError):
    """The input asks for something this decoder does not do yet (several principles per
    prompt, kl mode)."""


# ----------------------------------------------------------------------------- input
@dataclass
class Row:
    """One valid input line."""
    id: object                  # as given: a str or an int
    key: str                    # str(id): how ids are compared (1 and "1" are the same id)
    line: int                   # 1-based line number in the input file
    prompt: str
    principles: list[str]
    ratio: list[float] | None = None   # one per principle, or None (the command's default)
    kl_budget: float | None = None
    seed: int | None = None
    max_new_tokens: int | None = None

    @property
    def length(self) -> int:
        """Characters of the prompt and principles: the batching proxy for prompt tokens
        (needs no tokenizer pass)."""
        return len(self.prompt) + sum(len(p) for p in self.principles)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_line(obj, line: int) -> Row:
    """An input line's JSON value as a ``Row``; ``ValueError`` saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object {{\"id\": ..., \"prompt\": ..., "
                         f"\"principle\": ...}}; got {type(obj).__name__}")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (the fields are {', '.join(FIELDS)})")
    for name in ("id", "prompt", "principle"):
        if name not in obj:
            raise ValueError(f"missing {name!r}")
    i = obj["id"]
    if not (isinstance(i, str) or _is_int(i)) or (isinstance(i, str) and not i.strip()):
        raise ValueError(f"\"id\" must be a non-empty string or an integer; got {i!r}")
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise ValueError(f"\"prompt\" must be a string; got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("\"prompt\" is empty")
    p = obj["principle"]
    principles = [p] if isinstance(p, str) else p
    if not isinstance(principles, list) or not principles or \
            not all(isinstance(x, str) for x in principles):
        raise ValueError("\"principle\" must be a string or a non-empty list of strings; got "
                         f"{p!r}")
    if not all(x.strip() for x in principles):
        raise ValueError("a principle is empty: with an empty principle both branches are the "
                         "same conversation")
    K = len(principles)
    row = Row(i, str(i), line, prompt, list(principles))
    if "ratio" in obj:
        r = obj["ratio"]
        if _is_number(r):
            row.ratio = [float(r)] * K
        elif isinstance(r, list) and len(r) == K and all(_is_number(x) for x in r):
            row.ratio = [float(x) for x in r]
        else:
            raise ValueError(f"\"ratio\" must be a finite number or a list of {K} finite "
                             f"numbers (one per principle); got {r!r}")
    if "kl_budget" in obj:
        b = obj["kl_budget"]
        if not _is_number(b) or b <= 0:
            raise ValueError(f"\"kl_budget\" must be a finite number > 0 (nats per token); "
                             f"got {b!r}")
        if row.ratio is not None:
            raise ValueError("give \"ratio\" or \"kl_budget\", not both (kl mode derives the "
                             "ratio from the budget)")
        if K > 1:
            raise ValueError(f"\"kl_budget\" is for one principle (SPEC section 3); this line "
                             f"has {K}: give \"ratio\" instead")
        row.kl_budget = float(b)
    if "seed" in obj:
        s = obj["seed"]
        if not _is_int(s) or not 0 <= s < 2**63:
            raise ValueError(f"\"seed\" must be an integer in [0, 2**63); got {s!r}")
        row.seed = s
    if "max_new_tokens" in obj:
        n = obj["max_new_tokens"]
        if not _is_int(n) or n < 0:
            raise ValueError(f"\"max_new_tokens\" must be an integer >= 0; got {n!r}")
        row.max_new_tokens = n
    return row


def read_input(path) -> tuple[list[Row], list[tuple[int, str]]]:
    """The valid rows of a JSON-lines file, in file order, and the problems of the others as
    ``(line number, message)``. Blank lines are neither rows nor problems."""
    rows, problems, seen = [], [], {}
    with open(path, "rb") as f:
        data = f.read()
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append((n, f"not UTF-8 ({e.reason} at byte {e.start})"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append((n, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        try:
            row = parse_line(obj, n)
        except ValueError as e:
            problems.append((n, str(e)))
            continue
        if row.key in seen:
            problems.append((n, f"id {row.id!r} is already on line {seen[row.key]} (every id "
                             "must be unique)"))
            continue
        seen[row.key] = n
        rows.append(row)
    return rows, problems


# ----------------------------------------------------------------------------- output
def read_results(path, *, repair: bool = False) -> list[dict]:
    """The result lines of an output file (none if it does not exist). A last line without
    its newline is what a crash leaves: it is ignored, and with ``repair=True`` cut off the
    file. Any other line that is not a result is an error (not our file, or damaged)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        os.truncate(path, end)
    out = []
    for n, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        if not isinstance(obj, dict) or "id" not in obj:
            raise RunError(f"{path} line {n} is not a linalign result line: it cannot be "
                           "resumed; move the file away or pick another --output")
        out.append(obj)
    return out


_PART = re.compile(r"\.rank(\d+)-of-(\d+)$")


def part_path(output, rank: int, world: int) -> Path:
    return Path(f"{output}.rank{rank}-of-{world}")


def part_paths(output) -> list[Path]:
    """The part files of OUTPUT that this machine sees (any world size), by (world, rank)."""
    output = Path(output)
    found = []
    for p in output.parent.glob(output.name + ".rank*-of-*"):
        m = _PART.search(p.name)
        if m and p.name == part_path(output.name, int(m[1]), int(m[2])).name:
            found.append(((int(m[2]), int(m[1])), p))
    return [p for _, p in sorted(found)]


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def shard_of(key: str, world: int) -> int:
    """The rank that decodes id ``key``: a stable hash (blake2b, not Python's salted hash),
    the same on every rank, every run and every machine."""
    return _digest(key) % world


def row_seed(base: int, key: str) -> int:
    """A row's sampling seed from the command's ``--seed`` and its id: independent of the
    batch, the shard and the order the rows run in."""
    return _digest(f"{base}\x00{key}") % 2**63


class ResultWriter:
    """Appends result lines to one file, each flushed and fsync'ed as it is written: a crash
    loses no written row and can only cut the line being written (dropped on restart)."""

    def __init__(self, path):
        self.path = Path(path)
        self.file = open(self.path, "a", encoding="utf-8")
        self.written = 0

    def write(self, obj: dict):
        self.file.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.written += 1

    def close(self):
        self.file.close()


def _write_atomic(path, lines: list[dict]):
    path = Path(path)
    tmp = path.with_name(path.name + ".merging")
    with open(tmp, "w", encoding="utf-8") as f:
        for obj in lines:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class MergeSummary:
    rows: int                   # result lines in the merged output
    missing: list = field(default_factory=list)    # input ids with no result
    extra: list = field(default_factory=list)      # result ids not in the input
    parts: list = field(default_factory=list)      # part files merged


def merge_results(order: list[str], groups: list[list[dict]]) -> tuple[list[dict], list]:
    """One result per id, the first met (groups in order), sorted by ``order`` (input keys);
    ids not in ``order`` go last, as met. Returns (lines, extra ids)."""
    first = {}
    for group in groups:
        for obj in group:
            first.setdefault(str(obj["id"]), obj)
    rank = {k: i for i, k in enumerate(order)}
    keys = sorted(first, key=lambda k: rank.get(k, len(rank)))
    return [first[k] for k in keys], [first[k]["id"] for k in keys if k not in rank]


def merge_outputs(input_path, output_path, parts=None, *, remove_parts=False) -> MergeSummary:
    """Merge OUTPUT and its part files into OUTPUT, in input order, every id once.

    parts: the part files (default: every ``OUTPUT.rank*-of-*`` beside OUTPUT). For a
    multi-node job whose ranks wrote to local disks, copy the parts next to OUTPUT first, or
    name them. The output is replaced atomically; parts are removed only with
    ``remove_parts``. Input lines that do not parse are ignored here (``run`` reports them).
    """
    rows, _ = read_input(input_path)
    parts = part_paths(output_path) if parts is None else [Path(p) for p in parts]
    for p in parts:
        if not p.exists():
            raise RunError(f"part file {p}: no such file")
    groups = [read_results(output_path)] + [read_results(p) for p in parts]
    lines, extra = merge_results([r.key for r in rows], groups)
    _write_atomic(output_path, lines)
    if remove_parts:
        for p in parts:
            p.unlink(missing_ok=True)
    done = {str(o["id"]) for o in lines}
    return MergeSummary(len(lines), [r.id for r in rows if r.key not in done], extra,
                        [str(p) for p in parts])


# ----------------------------------------------------------------------------- plan
@dataclass
class Settings:
    """The command's settings: defaults for what a line does not say."""
    ratio: float | None = None          # None: DEFAULT_RATIO, unless kl_budget is given
    kl_budget: float | None = None
    max_ratio: float | None = None
    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    greedy: bool = _DEFAULTS.greedy
    max_new_tokens: int = _DEFAULTS.max_new_tokens
    seed: int | None = None             # base of the per-row seeds (sampling)
    mode: str = "stacked"
    system: str | None = None
    model: str | None = None
    token_ids: bool = False


@dataclass
class Job:
    """One row with its settings resolved."""
    row: Row
    kind: str                   # "ratio" or "kl"
    ratio: list[float] | None
    kl_budget: float | None
    max_new_tokens: int
    seed: int | None

    @property
    def group(self):
        # what one generate() call must share (ratios, kl budgets and seeds are per row)
        return (len(self.row.principles), self.kind, self.max_new_tokens)


def resolve(row: Row, s: Settings, base_seed: int | None) -> Job:
    K = len(row.principles)
    kl = row.kl_budget if row.kl_budget is not None else \
        (s.kl_budget if row.ratio is None else None)
    ratio = None
    if kl is None:
        ratio = row.ratio or [DEFAULT_RATIO if s.ratio is None else s.ratio] * K
    seed = None
    if not s.greedy:
        seed = row.seed if row.seed is not None else row_seed(base_seed, row.key)
    return Job(row, "kl" if kl is not None else "ratio", ratio, kl,
               s.max_new_tokens if row.max_new_tokens is None else row.max_new_tokens, seed)


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


# ----------------------------------------------------------------------------- progress
class Progress:
    """``rows done/total`` and tokens/s on stderr: redrawn in place on a terminal; with
    ``--progress`` and no terminal, one line every few seconds."""

    def __init__(self, total: int, enabled: bool, label: str = "", stream=None):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total, self.enabled, self.label = total, enabled, label
        self.rows = self.tokens = 0
        self.t0 = time.perf_counter()
        self.last = 0.0

    @property
    def tokens_per_second(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.tokens / dt if dt > 0 else 0.0

    def line(self) -> str:
        width = 24
        filled = width * self.rows // self.total if self.total else width
        return (f"{self.label}[{'#' * filled}{'.' * (width - filled)}] {self.rows}/"
                f"{self.total} rows, {self.tokens_per_second:.1f} tokens/s")

    def update(self, rows: int = 0, tokens: int = 0, force: bool = False):
        self.rows += rows
        self.tokens += tokens
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < (0.1 if self.tty else 5.0):
            return
        self.last = now
        self.stream.write(("\r" + self.line() + "\x1b[K") if self.tty else self.line() + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.update(force=True)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()


# ----------------------------------------------------------------------------- decoding
def supports(aligner, what: str) -> str | None:
    """None when ``aligner.generate`` does ``what`` ("several" principles per prompt, "kl"
    mode), else why not. Probed with max_new_tokens=0: no decoding step runs."""
    cache = aligner.__dict__.setdefault("_linalign_run_support", {})
    if what not in cache:
        if what == "kl" and "kl_budget" not in inspect.signature(aligner.generate).parameters:
            cache[what] = "LinearAligner.generate has no kl_budget argument"
        else:
            kw = dict(principle=[["Be brief.", "Be kind."]], ratio=[[1.0, 1.0]]) \
                if what == "several" else dict(principle=["Be brief."], ratio=None,
                                               kl_budget=0.1)
            try:
                aligner.generate(["Hello."], max_new_tokens=0, **kw)
                cache[what] = None
            except (TypeError, ValueError) as e:
                cache[what] = f"{type(e).__name__}: {e}"
    return cache[what]


def check_supported(aligner, jobs: list[Job]):
    """Before any decoding: ``UnsupportedError`` naming the lines that need several
    principles or kl mode when this decoder lacks them."""
    needs = [("several", "have several principles (composition, SPEC section 4)",
              [j for j in jobs if len(j.row.principles) > 1]),
             ("kl", "ask for kl mode (kl_budget, SPEC section 3)",
              [j for j in jobs if j.kind == "kl"])]
    for what, words, which in needs:
        if which:
            why = supports(aligner, what)
            if why is not None:
                lines = ", ".join(str(j.row.line) for j in which[:8]) + \
                    (", ..." if len(which) > 8 else "")
                raise UnsupportedError(f"input line{'s' if len(which) > 1 else ''} {lines} "
                                       f"{words}, which this linalign's "
                                       f"decoder does not do yet ({why})")


class _RowStreamer:
    """The ``streamer`` of one ``generate`` call: follows every row's tokens and calls
    ``finish(i, ids, reason)`` the step a row ends (end of sequence, or max_new_tokens)."""

    def __init__(self, B, eos_ids, max_new_tokens, finish, tokens):
        self.ids = [[] for _ in range(B)]
        self.done = [max_new_tokens == 0] * B
        self.eos, self.n = set(eos_ids), max_new_tokens
        self.finish, self.tokens = finish, tokens

    def put(self, value):
        if value.dim() != 1:  # the prompt ids [B, L], sent first
            return
        new = 0
        for i, tok in enumerate(value.tolist()):
            if self.done[i]:
                continue
            self.ids[i].append(tok)
            new += 1
            if tok in self.eos or len(self.ids[i]) == self.n:
                self.done[i] = True
                self.finish(i, list(self.ids[i]), "eos" if tok in self.eos else "length")
        self.tokens(new)

    def end(self):
        pass


def result_line(job: Job, ids: list[int], text: str, reason: str, s: Settings,
                rank: int, max_ratio=None) -> dict:
    r = job.row
    out = {"id": r.id, "prompt": r.prompt, "principles": r.principles, "text": text,
           "new_tokens": len(ids), "finish_reason": reason}
    if s.token_ids:
        out["token_ids"] = ids
    out["settings"] = {
        "ratio": job.ratio, "kl_budget": job.kl_budget,
        "max_ratio": (s.max_ratio if s.max_ratio is not None else max_ratio)
        if job.kind == "kl" else None,
        "temperature": s.temperature, "top_p": s.top_p, "greedy": s.greedy,
        "max_new_tokens": job.max_new_tokens, "seed": job.seed, "mode": s.mode,
        "system": s.system}
    out["model"] = s.model or "default"
    out["rank"] = rank
    return out


def _generate_batch(aligner, batch: list[Job], s: Settings, streamer):
    K, kind = len(batch[0].row.principles), batch[0].kind
    kw = dict(temperature=s.temperature, top_p=s.top_p, greedy=s.greedy,
              max_new_tokens=batch[0].max_new_tokens,
              seed=None if s.greedy else [j.seed for j in batch], mode=s.mode,
              streamer=streamer)
    principle = [j.row.principles[0] if K == 1 else j.row.principles for j in batch]
    if kind == "kl":
        kw.update(ratio=None, kl_budget=[j.kl_budget for j in batch])
        if s.max_ratio is not None:
            kw["max_ratio"] = s.max_ratio
    else:
        kw["ratio"] = [j.ratio[0] if K == 1 else j.ratio for j in batch]
    return aligner.generate([j.row.prompt for j in batch], principle, **kw)


def decode_jobs(aligner, jobs: list[Job], s: Settings, write, *, batch_size: int = 8,
                rank: int = 0, progress: Progress | None = None, log=None,
                strict: bool = False, failed: list | None = None) -> int:
    """Decode ``jobs`` in batches (``plan``) and ``write(result line)`` each row the step it
    finishes. Returns the number of rows written.

    A batch that runs out of memory is retried in halves, its finished rows kept. A batch
    that the decoder refuses (``ValueError``: e.g. a prompt longer than the model's context)
    is retried row by row; a row refused on its own is reported through ``log``, appended to
    ``failed`` as (job, message) and skipped, or with ``strict`` raised.
    """
    log = log or (lambda msg: print(f"linalign: {msg}", file=sys.stderr))
    check_supported(aligner, jobs)
    progress = progress or Progress(len(jobs), False)
    # kl mode records the decoder's default cap when --max-ratio is not given
    cap = inspect.signature(aligner.generate).parameters.get("max_ratio")
    cap = None if cap is None or cap.default is inspect.Parameter.empty else cap.default
    written = 0
    queue = plan(jobs, batch_size)
    while queue:
        batch = queue.pop(0)
        finished = [False] * len(batch)

        def finish(i, ids, reason, text=None):
            nonlocal written
            if text is None:
                text = decode_text(aligner.tokenizer, ids)
            write(result_line(batch[i], ids, text, reason, s, rank, cap))
            finished[i] = True
            written += 1
            progress.update(rows=1)

        streamer = _RowStreamer(len(batch), aligner.eos_ids, batch[0].max_new_tokens, finish,
                                lambda n: progress.update(tokens=n))
        try:
            result = _generate_batch(aligner, batch, s, streamer)
        except MemoryError as e:
            left = [j for j, f in zip(batch, finished) if not f]
            if len(left) <= 1:
                raise
            half = (len(left) + 1) // 2
            log(f"out of memory with {len(batch)} rows per batch; retrying its "
                f"{len(left)} unfinished rows {half} at a time (lower --batch-size to avoid "
                f"this) [{str(e).splitlines()[0] if str(e) else type(e).__name__}]")
            queue[:0] = [left[:half], left[half:]]
            continue
        except ValueError as e:  # refused before any compute: no row of it has finished
            if strict:
                raise
            if len(batch) > 1:
                queue[:0] = [[j] for j in batch]
                continue
            r = batch[0].row
            log(f"input line {r.line} (id {r.id!r}): {e}; row skipped")
            if failed is not None:
                failed.append((batch[0], str(e)))
            progress.update(rows=1)
            continue
        for i in range(len(batch)):
            ids, reason = result.token_ids[i], result.finish_reasons[i]
            if not finished[i]:  # rows the streamer did not see end (max_new_tokens=0)
                finish(i, ids, reason, result.texts[i])
            elif streamer.ids[i] != ids:  # pragma: no cover - a decoder bug
                log(f"warning: row {batch[i].row.id!r}: streamed tokens differ from the "
                    "batch result; the streamed ones were written")
    return written


# ----------------------------------------------------------------------------- the command




DESCRIPTION = ("Decode every line of --input (JSON objects with id, prompt, principle and "
               "optional ratio, kl_budget, seed, max_new_tokens) and append one result line "
               "per row to --output the moment the row finishes. Rerun the same command to "
               "resume: ids already in the output are skipped. Under torchrun the input is "
               "sharded across ranks and merged into --output. See docs/run.md.")


def add_run_parser(subparsers):
    """Add ``run`` to the ``linalign`` command's sub-commands (the parser class is the one
    given to ``add_subparsers``, so bad arguments are one line and exit code 2)."""
    r = subparsers.add_parser("run", help="align many prompts from a JSON-lines file "
                              "(resumable, torchrun-aware)", description=DESCRIPTION)
    add_run_arguments(r)
    r.set_defaults(run_command=run_command)
    return r


def add_run_arguments(r):
    r.add_argument("--input", required=True, metavar="JSONL", help="prompts, one JSON object "
                   "per line")
    r.add_argument("--output", required=True, metavar="JSONL", help="results, one JSON object "
                   "per line (appended to; existing ids are skipped)")
    r.add_argument("--model", default=None, metavar="PATH", help="a local Hugging Face "
                   "causal-LM folder or .gguf file (default: the embedded SmolLM2)")
    r.add_argument("--ratio", type=_rule_number("ratio"), default=None,
                   help=f"ratio of lines that give none (default {DEFAULT_RATIO})")
    r.add_argument("--kl-budget", type=_rule_number("kl_budget"),
                   default=None, help="kl mode for lines that give no ratio: per-token "
                   "budget in nats (SPEC section 3)")
    r.add_argument("--max-ratio", type=_rule_number("max_ratio"), default=None,
                   help="kl mode: clip the derived ratio to this (default: the decoder's)")
    r.add_argument("--temperature", type=_rule_number("temperature"),
                   default=_DEFAULTS.temperature, help="default %(default)s")
    r.add_argument("--top-p", type=_rule_number("top_p"),
                   default=_DEFAULTS.top_p, help="nucleus of the principle branch (default "
                   "%(default)s)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--greedy", dest="greedy", action="store_true", default=True,
                   help="argmax inside the nucleus (default)")
    g.add_argument("--sample", dest="greedy", action="store_false",
                   help="sample from the aligned distribution")
    r.add_argument("--max-new-tokens", type=integer(), default=_DEFAULTS.max_new_tokens,
                   help="for lines that give none (default %(default)s)")
    r.add_argument("--seed", type=integer(), default=None, help="--sample: base of the per-row "
                   "seeds, mixed with each id (default: a fresh one); a line's own seed wins")
    r.add_argument("--batch-size", type=integer(1), default=8,
                   help="rows per generate call (default %(default)s)")
    r.add_argument("--strict", action="store_true", help="stop (exit code 2) at a malformed "
                   "input line instead of reporting and skipping it")
    r.add_argument("--threads", type=integer(1), default=None,
                   help="torch CPU threads per process (default: torch's choice)")
    r.add_argument("--mode", choices=MODES, default="stacked",
                   help="one forward of 2B rows (stacked, default) or two caches")
    r.add_argument("--system", default=None, help="base system text of both branches "
                   "(default: the chat template's own)")
    r.add_argument("--device", default=None, help="default: cuda (the local rank's GPU under "
                   "torchrun) when there is one, else cpu")
    r.add_argument("--token-ids", action="store_true",
                   help="also write the generated token ids of every row")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    r.add_argument("--merge", nargs="*", default=None, metavar="PART",
                   help="decode nothing: merge --output and the part files (default: every "
                   "OUTPUT.rank*-of-* beside it) into --output in input order")
    # test hook: stop as if interrupted once this many rows are written
    r.add_argument("--stop-after", type=integer(1), default=None, help=argparse.SUPPRESS)


def _settings(args) -> Settings:
    if args.ratio is not None and args.kl_budget is not None:
        raise RunError("give --ratio or --kl-budget, not both (kl mode derives the ratio from "
                       "the budget)")
    return Settings(ratio=args.ratio, kl_budget=args.kl_budget, max_ratio=args.max_ratio,
                    temperature=args.temperature, top_p=args.top_p, greedy=args.greedy,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, mode=args.mode,
                    system=args.system, model=args.model, token_ids=args.token_ids)


def _check_paths(args):
    inp, out = Path(args.input), Path(args.output)
    if not inp.is_file():
        raise RunError(f"--input {args.input}: no such file")
    if not out.parent.is_dir():
        raise RunError(f"--output {args.output}: folder {out.parent} does not exist")
    if out.exists() and inp.resolve() == out.resolve():
        raise RunError("--output is the --input file")
    if args.model not in (None, TINY_MODEL) and \
            not os.path.exists(os.path.expanduser(args.model)):
        raise RunError(f"--model {args.model}: no such folder or file")


_TINY = {}


def load_aligner(model_path, device, system=None):
    """A ``LinearAligner`` for ``--model`` (``TINY_MODEL``: the tiny random Llama)."""
    from .decoder import LinearAligner

    if model_path == TINY_MODEL:
        from .testing import ByteTokenizer, random_llama

        if device not in _TINY:  # built once per process: tests run the command many times
            _TINY[device] = random_llama("tiny", logit_std=1.5, device=device)
        return LinearAligner(_TINY[device], ByteTokenizer(), system=system)
    from transformers.utils import logging as hf_logging

    from . import models
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    model, tokenizer = models.load_model(model_path, device=device)
    return LinearAligner(model, tokenizer, system=system)


class _Dist:
    """torch.distributed under torchrun (WORLD_SIZE > 1), else a world of one."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.on = self.world > 1

    def init(self):
        if not self.on:
            return
        import datetime

        import torch.distributed as dist

        # gloo on every device: the ranks only exchange a few small objects (the parts, a
        # flag), never tensors of the model, and gloo needs no GPU set-up and works across
        # nodes over TCP; each rank decodes on its own device.
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=DIST_TIMEOUT_HOURS))

    def gather(self, obj):
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.on:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _device(args, dist: _Dist) -> str:
    import torch

    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError:
            raise RunError(f"--device {args.device}: expected a torch device such as cpu, "
                           "cuda or cuda:1") from None
        return args.device

    if torch.cuda.is_available():
        return f"cuda:{dist.local_rank % torch.cuda.device_count()}"
    return "cpu"


def _run(args, dist: _Dist, log) -> int:
    s = _settings(args)
    _check_paths(args)
    if args.merge is not None:
        if dist.on:
            raise RunError("--merge runs on one process, not under torchrun")
        summary = merge_outputs(args.input, args.output, args.merge or None)
        log(f"merged {summary.rows} rows from {len(summary.parts)} part file(s) into "
            f"{args.output}" + (f"; {len(summary.missing)} input ids have no result yet"
                                if summary.missing else ""))
        return 0
    rows, problems = read_input(args.input)
    if s.kl_budget is not None:  # kl mode is for one principle per prompt (SPEC section 3)
        multi = [r for r in rows if len(r.principles) > 1 and r.ratio is None]
        problems = sorted(problems + [(r.line, f"{len(r.principles)} principles and no "
                                       "\"ratio\": --kl-budget (kl mode) is for one principle "
                                       "per prompt (SPEC section 3)") for r in multi])
        rows = [r for r in rows if len(r.principles) == 1 or r.ratio is not None]
    if problems and args.strict:
        n, msg = problems[0]
        raise RunError(f"{args.input} line {n}: {msg} (--strict)")
    if dist.rank == 0:
        for n, msg in problems:
            log(f"{args.input} line {n}: {msg}; line skipped")
    out = Path(args.output)
    # what is done: the merged output and every part this machine sees; this rank's own
    # output (the part, or OUTPUT on one process) is repaired if a crash cut its last line
    own = part_path(out, dist.rank, dist.world) if dist.on else out
    done = set()
    for p in [out] + part_paths(out):
        done |= {str(o["id"]) for o in read_results(p, repair=p == own)}
    dist.init()
    if dist.on:  # rank 0's view too: OUTPUT may be on its disk only (no shared filesystem)
        done |= dist.broadcast(done if dist.rank == 0 else None)
    base_seed = s.seed if s.seed is not None else int.from_bytes(os.urandom(8), "big") % 2**63
    mine = [r for r in rows if not dist.on or shard_of(r.key, dist.world) == dist.rank]
    todo = [resolve(r, s, base_seed) for r in mine if r.key not in done]
    label = f"rank {dist.rank}/{dist.world} " if dist.on else ""
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    progress = Progress(len(todo), bool(show) and dist.rank == 0, label)
    failed = []
    if todo:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        aligner = load_aligner(args.model, _device(args, dist), s.system)
        progress.t0 = time.perf_counter()
        writer = ResultWriter(own)
        stop_after = args.stop_after

        def write(obj):
            writer.write(obj)
            if stop_after is not None and writer.written >= stop_after:
                raise KeyboardInterrupt  # the test hook: an interruption after N rows

        try:
            decode_jobs(aligner, todo, s, write, batch_size=args.batch_size, rank=dist.rank,
                        progress=progress, log=log, strict=args.strict, failed=failed)
        finally:
            writer.close()
            progress.close()
    if failed:
        log(f"{len(failed)} row(s) refused by the decoder (reported above) have no result")
    if dist.on:
        code = _gather_and_merge(args, dist, own, rows, log)
        return code or (1 if failed else 0)
    summary = merge_outputs(args.input, out, remove_parts=True)  # input order, parts folded in
    skipped = f", {len(problems)} malformed input line(s) skipped" if problems else ""
    log(f"{len(todo) - len(failed)} rows decoded ({len(mine) - len(todo)} already done)"
        f"{skipped}; {summary.rows} rows in {args.output}" +
        (f", {progress.tokens_per_second:.1f} tokens/s" if todo else ""))
    return 1 if failed else 0


def _gather_and_merge(args, dist: _Dist, own: Path, rows, log) -> int:
    """Every rank sends its part's lines to rank 0 (no shared filesystem needed); rank 0
    merges them with OUTPUT and the parts it sees, then every rank removes its part."""
    lines = read_results(own)
    got = dist.gather((str(own), lines))
    ok = True
    if dist.rank == 0:
        out = Path(args.output)
        try:
            seen = part_paths(out)
            merged, extra = merge_results([r.key for r in rows],
                                          [read_results(out)] + [g[1] for g in got] +
                                          [read_results(p) for p in seen])
            _write_atomic(out, merged)
            for p in seen:
                p.unlink(missing_ok=True)
            done = {str(o["id"]) for o in merged}
            missing = [r.id for r in rows if r.key not in done]
            log(f"{dist.world} ranks: {sum(len(g[1]) for g in got)} rows from the parts; "
                f"{len(merged)} rows in {args.output}" +
                (f"; {len(missing)} input ids have no result" if missing else "") +
                (f"; {len(extra)} ids not in the input (kept last)" if extra else ""))
        except Exception as e:
            log(f"error: merging the parts into {args.output} failed: {e}; the parts are "
                "kept: rerun, or merge them with `linalign run --merge`")
            ok = False
    ok = dist.broadcast(ok)
    if ok:
        own.unlink(missing_ok=True)
    return 0 if ok else 1


def run_command(args) -> int:
    """The ``linalign run`` command: returns the exit code (0 done; 1 out of memory, rows
    the decoder refused, or a failed merge; 2 bad arguments, input or output; 130
    interrupted). Errors are one line on stderr."""
    dist = _Dist()
    prefix = f"linalign [rank {dist.rank}]" if dist.on else "linalign"

    def log(msg):
        print(f"{prefix}: {msg}", file=sys.stderr, flush=True)

    try:
        return _run(args, dist, log)
    except (RunError, ValueError) as e:
        # ValueError: bad values found past the parser (a model that does not load, a
        # prompt too long for the model's context with --strict)
        if dist.rank == 0 or not isinstance(e, RunError):
            log(f"error: {e}")
        return 2
    except MemoryError as e:
        log(f"error: {str(e).splitlines()[0] if str(e) else 'out of memory'}")
        return 1
    except KeyboardInterrupt:
        log(f"interrupted; finished rows are in the output: rerun the same command to "
            "resume")
        return 130
    finally:
        dist.close()


def main(argv=None) -> int:
    """``python -m linalign.runner ...``: the ``run`` command on its own (torchrun's ``-m``)."""
    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise RunError(message)

    parser = _Parser(prog="linalign run", description=DESCRIPTION)
    add_run_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except RunError as e:
        print(f"linalign run: error: {e}", file=sys.stderr)
        return 2
    return run_command(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
