"""``python -m deltatune``: the command line (also the entry point for ``torchrun -m deltatune``)."""

import sys

from .cli import main

sys.exit(main())
