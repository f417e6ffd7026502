"""``python -m psiopt``: the command line (see :mod:`psiopt.experiments.cli`)."""

import sys

from .experiments.cli import main

sys.exit(main())
