"""``python -m linalign.runner ...`` (and ``torchrun ... -m linalign.runner ...``): the
``linalign run`` command on its own."""
import sys

from .command import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
