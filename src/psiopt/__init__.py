"""psiopt: optimizers that respect the scale symmetry of normalized neural networks.

The optimizer library lives in :mod:`psiopt.optim` (torch only); the experiment harness
(data, models, training, reports, recipes, command line, benchmark) in :mod:`psiopt.experiments`;
a BatchNorm synchronised across data-parallel ranks on any device in :mod:`psiopt.parallel`;
normalisation layers exactly invariant in the weight that feeds them (Arora eq. 8) and the eps
diagnostic in :mod:`psiopt.norms`.
"""

from . import norms  # noqa: F401  (psiopt.norms.exact_norms_, eps_ratios, EpsMonitor)
from .optim import *  # noqa: F403
from .optim import __all__ as _optim_all
from .parallel import SyncBatchNorm, convert_sync_batchnorm

__version__ = "0.1.0"

__all__ = [*_optim_all, "SyncBatchNorm", "convert_sync_batchnorm", "__version__"]
