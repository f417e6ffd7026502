"""psiopt: optimizers that respect the scale symmetry of normalized neural networks.

The optimizer library lives in :mod:`psiopt.optim` (torch only); the experiment harness
(data, models, training, reports, recipes, command line, benchmark) in :mod:`psiopt.experiments`.
"""

from .optim import *  # noqa: F403
from .optim import __all__ as _optim_all

__version__ = "0.1.0"

__all__ = [*_optim_all, "__version__"]
