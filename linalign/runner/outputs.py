"""The files ``linalign run`` writes, made safe: ``--output`` is checked before anything is
read, cut or written (a regular file or a new one; symlinks followed, so the target is
written and the link stays), and every file the run writes (OUTPUT, its own part file) is
held under an advisory lock for the whole run, so a second run on the same output is refused
instead of losing or duplicating rows.

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the file itself (no lock file beside it):
the kernel drops it when the process ends, however it ends, so a killed run leaves nothing
behind. The merge replaces OUTPUT by renaming a new file over it; that new file is locked
before the rename, so the lock carries over. A file renamed over or removed between its
``open`` and its lock is opened again (the lock is only good on the file the name points
at). Rules: docs/run.md, "Output files and locks".
"""
from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from ..cli_args import CommandError
from .results import kind_of, parse_results, write_all

_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def check_output(path) -> Path:
    """The file ``--output`` names, symlinks followed: an existing regular file or a new one
    in an existing folder. ``CommandError`` (one line, nothing touched) for a directory, a
    FIFO, a device, a socket, a folder that does not exist or a file that cannot be
    opened for writing. Whether an existing file is a results file is checked when it is
    opened (``open_results``)."""
    try:
        st = os.stat(path)  # symlinks followed, /dev/stdout and /proc/self/fd/N too
        real = Path(os.path.realpath(path))
    except (FileNotFoundError, NotADirectoryError):
        real = Path(os.path.realpath(path))  # a new file, or a dangling link's target
        if not real.parent.is_dir():
            raise CommandError(f"--output {path}: folder {real.parent} does not exist") from None
        if read_only(real.parent):
            raise CommandError(f"--output {path}: {real.parent} is on a read-only file "
                               "system: pick a writable place") from None
        if not os.access(real.parent, os.W_OK | os.X_OK):
            raise CommandError(f"--output {path}: cannot create files in {real.parent} "
                               "(permission denied): pick a writable folder") from None
        return real
    except OSError as e:
        raise CommandError(f"--output {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CommandError(f"--output {path} is {kind_of(st.st_mode)}: linalign run writes "
                           "its results to a regular file; give a file path")
    if read_only(real.parent):
        raise CommandError(f"--output {path} is on a read-only file system (the run appends "
                           "to it and renames a new file over it): pick a writable place")
    if not os.access(real, os.R_OK | os.W_OK):
        raise CommandError(f"--output {path}: permission denied (the run reads and appends "
                           "to it)")
    return real


def read_only(folder: Path) -> bool:
    """Whether ``folder`` is on a file system mounted read-only."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def lock_fd(path: Path, what: str) -> int:
    """``path`` opened (created if missing) read-write for appending, exclusively locked;
    returns the descriptor. ``CommandError`` when another process holds the lock, or when
    ``path`` is not a regular file or cannot be opened."""
    while True:
        try:
            fd = os.open(path, _OPEN_FLAGS, 0o666)
        except OSError as e:
            raise CommandError(f"{what} {path}: cannot open it for writing ({e.strerror}); "
                               "pick a writable place") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CommandError(f"{what} {path} is {kind_of(st.st_mode)}: give a file path")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CommandError(
                    f"{what} {path} is in use by another linalign run (it holds the file's "
                    "lock): wait for that run to end, or pick another --output") from None
            os.set_blocking(fd, True)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            return fd
        os.close(fd)  # renamed over or removed meanwhile: lock the file the name now names


def read_fd(fd: int) -> bytes:
    """The whole content of an open regular file."""
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class RunFiles:
    """The locked files of one run: ``open_results`` locks a file, checks it is a results
    file, cuts a line left by a crash (or ends a complete last line with its missing
    newline) and returns its results; ``adopt`` keeps another
    locked descriptor (the merged OUTPUT); ``close`` releases them all."""

    def __init__(self):
        self.fds: dict[Path, int] = {}

    def open_results(self, path, what: str = "--output", *, repair: bool = True
                     ) -> list[dict]:
        path = Path(path)
        fd = lock_fd(path, what)
        self.fds[path] = fd
        data = read_fd(fd)
        lines, fix = parse_results(data, path)  # refuses before changing anything
        if repair and fix is not None:
            if fix:
                write_all(fd, fix)  # O_APPEND: at the end
            else:
                os.ftruncate(fd, data.rfind(b"\n") + 1)
            os.fsync(fd)
        return lines

    def fd(self, path) -> int:
        return self.fds[Path(path)]

    def adopt(self, path, fd: int) -> bool:
        """Keep ``fd`` (the new file at ``path``) locked instead of the old one."""
        old = self.fds.get(Path(path))
        self.fds[Path(path)] = fd
        if old is not None:
            os.close(old)
        return True

    def release(self, path):
        fd = self.fds.pop(Path(path), None)
        if fd is not None:
            os.close(fd)

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
