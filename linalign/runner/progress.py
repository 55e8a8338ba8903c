"""The progress bar of ``linalign run`` on stderr (standard library only): rows done / rows
to do and generated tokens per second, redrawn in place on a terminal at most ten times a
second, or one line every 5 s without one. docs/run.md, "Progress"."""
from __future__ import annotations

import sys
import time


class Progress:
    """``rows done/total`` and tokens/s on ``stream`` (default stderr): redrawn in place on a
    terminal; with ``--progress`` and no terminal, one line every few seconds. Disabled, it
    still counts (``rows``, ``tokens``, ``tokens_per_second``)."""

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
