"""``python -m linalign``: the same as the ``linalign`` command."""
import sys

from .cli import main

sys.exit(main())
