"""The ``linalign`` command's entry point, outside the package: importing ``linalign``
imports torch first (a second or more), and a Ctrl-C then would end in Python's own
traceback. Here it ends as every other interruption of a command does: one line, exit code
130 (docs/errors.md)."""
import sys


def main() -> int:
    try:
        from linalign.cli import main as command
    except KeyboardInterrupt:
        try:
            print("linalign: interrupted", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        return 130
    return command()
