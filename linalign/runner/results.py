"""The output of ``linalign run``: result lines appended one by one (each flushed and
fsync'ed), read back on a restart (a last line cut short by a crash is dropped), part files
of ``torchrun`` ranks, and the merge into one file in input order, every id once.
Rules: docs/run.md, "Output", "Restart" and "Several processes and machines".
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..cli_args import CommandError
from .lines import read_input

PART_NAME = re.compile(r"\.rank(\d+)-of-(\d+)$")


def read_results(path, *, repair: bool = False) -> list[dict]:
    """The result lines of an output file (none if it does not exist). A last line without
    its newline is what a crash leaves: it is ignored, and with ``repair=True`` cut off the
    file. Any other line that is not a result is a ``CommandError`` (not our file, or
    damaged): the run stops rather than append to it."""
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
            raise CommandError(f"{path} line {n} is not a linalign result line: it cannot be "
                               "resumed; move the file away or pick another --output")
        out.append(obj)
    return out


def result_ids(path, *, repair: bool = False) -> set[str]:
    """The ids (as text) of the result lines of ``path``."""
    return {str(o["id"]) for o in read_results(path, repair=repair)}


def part_path(output, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` appends its rows: ``OUTPUT.rank{r}-of-{N}``."""
    return Path(f"{output}.rank{rank}-of-{world}")


def part_paths(output) -> list[Path]:
    """The part files of OUTPUT that this machine sees (any world size), by (world, rank)."""
    output = Path(output)
    found = []
    for p in output.parent.glob(output.name + ".rank*-of-*"):
        m = PART_NAME.search(p.name)
        if m and p.name == part_path(output.name, int(m[1]), int(m[2])).name:
            found.append(((int(m[2]), int(m[1])), p))
    return [p for _, p in sorted(found)]


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


def write_atomic(path, lines: list[dict]):
    """Replace ``path`` by ``lines``: written to ``path.merging``, fsync'ed, renamed over."""
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


def missing_ids(rows, lines: list[dict]) -> list:
    """The ids of input ``rows`` that have no result among ``lines``."""
    done = {str(o["id"]) for o in lines}
    return [r.id for r in rows if r.key not in done]


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
            raise CommandError(f"part file {p}: no such file")
    groups = [read_results(output_path)] + [read_results(p) for p in parts]
    lines, extra = merge_results([r.key for r in rows], groups)
    write_atomic(output_path, lines)
    if remove_parts:
        for p in parts:
            p.unlink(missing_ok=True)
    return MergeSummary(len(lines), missing_ids(rows, lines), extra, [str(p) for p in parts])
