"""How the commands talk to the terminal when things go wrong: every failure is one line on
stderr (docs/errors.md), never a traceback.

- ``say``: a line on stderr that never raises (stderr may be a closed pipe).
- ``interrupted``: whether an exception was caused by a Ctrl-C.
- ``os_error_line``: an ``OSError`` (disk full, read-only file system, permission denied) as
  one line that names the path and says what to do.
- ``check_text``: a command-line text is UTF-8 (bytes that are not arrive as lone
  surrogates, which no tokenizer and no output file can take).
- ``quiet_broken_pipe``: after stdout's reader went away (``generate --stream | head``),
  point stdout at /dev/null so that Python's final flush does not fail again.
"""
from __future__ import annotations

import errno
import os
import signal
import sys

from .cli_args import CommandError

#: Exit code when stdout's reader went away (128 + SIGPIPE, what a shell reports for a
#: program killed by it).
EXIT_BROKEN_PIPE = 141

#: What to do, by errno, for the errors the file system gives a running command.
ADVICE = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota exceeded)",
    errno.EROFS: "the file system is read-only: pick a writable place",
    errno.EACCES: "permission denied: pick a writable place",
    errno.EPERM: "permission denied: pick a writable place",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f)",
    errno.EIO: "the disk reported an I/O error",
}


def interrupted(e: BaseException) -> bool:
    """Whether a ``KeyboardInterrupt`` is what caused ``e`` (somewhere in its chain of
    causes and contexts): transformers' lazy imports turn a Ctrl-C into an ImportError."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def say(line: str):
    """``line`` on stderr; never raises (a closed stderr loses the line, nothing else)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def os_error_line(e: OSError) -> str:
    """``e`` in one line: what failed, on which path, and what to do."""
    what = e.strerror or str(e)
    where = f" ({e.filename})" if e.filename else ""
    advice = ADVICE.get(e.errno)
    return f"{what}{where}" + (f": {advice}" if advice else "")


def check_text(name: str, value) -> None:
    """``CommandError`` when a command-line text is not valid UTF-8 (Python hands such bytes
    over as lone surrogates); None and valid text pass."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start].encode("utf-8", "surrogateescape")
        raise CommandError(f"{name} is not valid UTF-8 text (byte 0x{bad.hex()} at character "
                           f"{e.start}): pass it in UTF-8") from None


def quiet_broken_pipe():
    """stdout's reader is gone: send what is left of stdout to /dev/null (Python flushes
    stdout at exit, which would fail again with a traceback)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def ignore_sigint():
    """Ignore Ctrl-C from now on (a second one while a command cleans up after the first);
    returns the handler to restore (None off the main thread, where none can be set)."""
    try:
        return signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        return None
