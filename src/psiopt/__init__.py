"""psiopt: optimizers that respect the scale symmetry of normalized neural networks.

The optimizer library lives in :mod:`psiopt.optim` (torch only); the experiment harness
(data, models, training, reports, recipes, command line, benchmark) in :mod:`psiopt.experiments`;
a BatchNorm synchronised across data-parallel ranks on any device in :mod:`psiopt.parallel`.
"""

from .optim import *  # noqa: F403
from .optim import __all__ as _optim_all
from .parallel import SyncBatchNorm, convert_sync_batchnorm

__version__ = "0.1.0"

__all__ = [*_optim_all, "SyncBatchNorm", "convert_sync_batchnorm", "__version__"]
