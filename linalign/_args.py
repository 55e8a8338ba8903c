"""Argument types shared by the ``linalign`` sub-commands (generate, run, eval): a bad
value becomes argparse's one-line error, which the command prints with exit code 2."""
import argparse
import math


def integer(lo=0):
    """An int >= ``lo``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}; got {value}")
        return value
    return parse


def number(lo=None, hi=None, lo_open=False, what="a finite number"):
    """A finite float in [lo, hi] ((lo, hi] with ``lo_open``); ``what`` words the range."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
        if not math.isfinite(value) or (lo is not None and (value < lo or
                                                            (lo_open and value == lo))) \
                or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {what}; got {text}")
        return value
    return parse
