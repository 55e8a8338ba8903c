"""The ``linalign`` command's entry point, outside the package: importing ``linalign``
imports torch first (a second or so), and a Ctrl-C inside a library's import can leave that
library half-initialised and end in its own traceback. Here a Ctrl-C during that import is
held until the import is done, then ends the command as every other interruption does: one
line, exit code 130 (docs/errors.md)."""
import signal
import sys


def main() -> int:
    pressed = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    except ValueError:  # not the main thread: nothing to hold
        previous = None
    try:
        from linalign.cli import main as command
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if pressed:
        try:
            print("linalign: interrupted", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        return 130
    return command()
