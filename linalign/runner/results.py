"""The output of ``linalign run``: result lines appended one by one (each written whole,
fsync'ed), read back on a restart, part files of ``torchrun`` ranks, and the merge into one
file in input order, every id once.

What makes a file a linalign results file (anything else is refused untouched): every
complete line is blank or a JSON object with the keys ``RESULT_KEYS``; its last line may
lack its newline if it is such an object too (the newline is added), or the start of such
a line as ``ResultWriter`` writes it (``{"id": ID, "prompt": ...``, not a complete JSON
value): what a crash leaves. That cut line is the one thing a restart removes, and only
after the whole file has been checked. Rules: docs/run.md, "Output", "Output files and
locks", "Restart" and "Several processes and machines".
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..cli_args import CommandError
from .lines import read_input

PART_NAME = re.compile(r"\.rank(\d+)-of-(\d+)$")
#: The keys every result line has (``result_line``): what tells a results file from a
#: prompts file (id, prompt, principle) or any other JSON-lines file.
RESULT_KEYS = ("id", "text", "finish_reason")
#: How every line ``ResultWriter`` writes begins (``json.dumps`` of ``result_line``).
LINE_START = '{"id": '
AFTER_ID = ', "prompt": '
_ID = re.compile(r'"(?:[^"\\]|\\.)*"|-?\d+')
_PARTIAL_ID = re.compile(r'"(?:[^"\\]|\\.)*\\?|-?\d*')


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "not a regular file"


def is_cut_line(tail: str) -> bool:
    """True when ``tail`` (a last line without its newline) is the start of a line
    ``ResultWriter`` wrote, cut short by a crash: ``{"id": ID, "prompt": ...`` or a prefix of
    it, and not a complete JSON value (a one-line JSON file is never taken for one)."""
    if len(tail) <= len(LINE_START):
        return LINE_START.startswith(tail)
    if not tail.startswith(LINE_START):
        return False
    try:
        json.loads(tail)
        return False  # complete: someone else's one-line file
    except ValueError:
        pass
    rest = tail[len(LINE_START):]
    m = _ID.match(rest)
    if m is None or m.end() == len(rest):
        return _PARTIAL_ID.fullmatch(rest) is not None or m is not None
    after = rest[m.end():]
    return after.startswith(AFTER_ID) or AFTER_ID.startswith(after)


def result_of(raw: bytes) -> dict | None:
    """The result a line holds, or None when it is not a result line."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) and all(k in obj for k in RESULT_KEYS) else None


def parse_results(data: bytes, path) -> tuple[list[dict], bytes | None]:
    """The result lines of a file's bytes, and how to repair its end: ``None`` (nothing to
    do), ``b""`` (cut the last line, a crash's leftover) or ``b"\\n"`` (a complete result
    line without its newline, e.g. after an edit: add it). ``CommandError`` (nothing
    changed) when the file is not a linalign results file."""
    def refuse(why):
        return CommandError(f"{path} is not a linalign results file ({why}): it was left "
                            "untouched; pick another --output, or move that file away")

    end = data.rfind(b"\n") + 1
    out, repair = [], None
    for n, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        obj = result_of(raw)
        if obj is None:
            raise refuse(f"line {n} is not a result line")
        out.append(obj)
    if end < len(data):
        tail = data[end:]
        obj = result_of(tail)
        if obj is not None:
            out.append(obj)
            repair = b"\n"
        else:
            try:
                cut = is_cut_line(tail.decode("utf-8"))
            except UnicodeDecodeError:
                cut = False
            if not cut:
                raise refuse("its last line has no newline and is not a result line")
            repair = b""
    return out, repair


def read_bytes(path, what: str = "file") -> bytes | None:
    """The bytes of a regular file (None when there is none); ``CommandError`` for a FIFO,
    a device, a directory or an unreadable file (a FIFO is never opened: that would
    block)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CommandError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CommandError(f"{what} {path} is {kind_of(st.st_mode)}, not a results file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CommandError(f"{what} {path}: cannot read it ({e.strerror})") from None


def read_results(path) -> list[dict]:
    """The result lines of an output or part file (none if it does not exist); a last line
    cut short by a crash is ignored. ``CommandError`` when it is not a results file."""
    data = read_bytes(path, "results file")
    return [] if data is None else parse_results(data, path)[0]


def result_ids(path) -> set[str]:
    """The ids (as text) of the result lines of ``path``."""
    return {str(o["id"]) for o in read_results(path)}


def part_path(output, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` appends its rows: ``OUTPUT.rank{r}-of-{N}``."""
    return Path(f"{output}.rank{rank}-of-{world}")


def part_paths(output) -> list[Path]:
    """The part files of OUTPUT that this machine sees (any world size), by (world, rank).
    Found by listing the folder, so any character in OUTPUT's name is fine."""
    output = Path(output)
    try:
        names = os.listdir(output.parent)
    except OSError:
        return []
    found = []
    for name in names:
        if not name.startswith(output.name + ".rank"):
            continue
        m = PART_NAME.search(name)
        if m and name == part_path(output.name, int(m[1]), int(m[2])).name:
            found.append(((int(m[2]), int(m[1])), output.parent / name))
    return [p for _, p in sorted(found)]


def encode_line(obj: dict) -> bytes:
    """One result line as written: JSON (non-ASCII kept) and a newline, UTF-8."""
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def write_all(fd: int, data: bytes):
    """``os.write`` until every byte is written (an error, e.g. ENOSPC, raises)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def named(e: OSError, path) -> OSError:
    """``e`` with ``path`` as its file name (``os.write`` on a descriptor names none)."""
    return OSError(e.errno, e.strerror, str(path)) if e.errno else e


class ResultWriter:
    """Appends result lines to the open file ``fd`` (opened with ``O_APPEND``; ``path`` names
    it in errors), each written with unbuffered writes and fsync'ed: a crash loses no
    written row and can only cut the line being written (dropped on restart). The caller
    owns ``fd``."""

    def __init__(self, fd: int, path):
        self.fd, self.path = fd, Path(path)
        self.written = 0

    def write(self, obj: dict):
        try:
            write_all(self.fd, encode_line(obj))
            os.fsync(self.fd)
        except OSError as e:
            raise named(e, self.path) from None
        self.written += 1


def write_atomic(path, lines: list[dict], *, keep_locked: bool = False) -> int | None:
    """Replace the regular file ``path`` (symlinks resolved by the caller) by ``lines``:
    written to a new temporary file beside it (the same mode), fsync'ed, renamed over. With
    ``keep_locked`` the new file is locked (``flock``) before the rename, so a run's lock
    carries over to it, and its open descriptor is returned. On any error the temporary
    file is removed and ``path`` is as it was."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".merging",
                                   dir=path.parent)
    except OSError as e:
        raise named(e, path) from None
    try:
        os.fchmod(fd, mode)
        write_all(fd, b"".join(encode_line(o) for o in lines))
        os.fsync(fd)
        if keep_locked:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody holds it
        os.replace(tmp, path)
        tmp = None
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException as e:
        os.close(fd)
        if tmp is not None:
            os.unlink(tmp)
        if isinstance(e, OSError):  # the temporary file's name means nothing to a user
            raise named(e, path) from None
        raise
    if keep_locked:
        return fd
    os.close(fd)
    return None


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


def merge_outputs(input_path, output_path, parts=None, *, remove_parts=False,
                  files=None) -> MergeSummary:
    """Merge OUTPUT and its part files into OUTPUT, in input order, every id once.

    parts: the part files (default: every ``OUTPUT.rank*-of-*`` beside OUTPUT). For a
    multi-node job whose ranks wrote to local disks, copy the parts next to OUTPUT first, or
    name them. Every file is checked before anything is written; the output is replaced
    atomically (``write_atomic``); parts are removed only with ``remove_parts``. ``files``:
    the run's ``RunFiles``, which then holds the lock of the new OUTPUT. Input lines that
    do not parse are ignored here (``run`` reports them).
    """
    rows, _ = read_input(input_path)
    parts = part_paths(output_path) if parts is None else [Path(p) for p in parts]
    for p in parts:
        if not p.exists():
            raise CommandError(f"part file {p}: no such file")
    groups = [read_results(output_path)] + [read_results(p) for p in parts]
    lines, extra = merge_results([r.key for r in rows], groups)
    fd = write_atomic(output_path, lines, keep_locked=files is not None)
    if files is not None:
        files.adopt(output_path, fd)
    if remove_parts:
        for p in parts:
            p.unlink(missing_ok=True)
    return MergeSummary(len(lines), missing_ids(rows, lines), extra, [str(p) for p in parts])
