"""psiopt: optimizers that respect the scale symmetry of normalized neural networks."""

from .base import ScaleInvariantOptimizer
from .discovery import (
                        GroupCheck,
                        InvarianceReport,
                        check_invariance,
                        find_scale_invariant,
                        param_groups,
                        unit_normalize_,
)
from .grassmann import SGDG, AdamG
from .quotient import PSISGD
from .registry import REGISTRY, create_optimizer, list_optimizers
from .sphere import AdamGStar, ProjectedSGD, UnitNormSGD
from .transport import SGDMRT, AdamS, AdamSRT

__version__ = "0.1.0"

__all__ = [
    "PSISGD", "UnitNormSGD", "ProjectedSGD", "SGDG", "AdamG", "AdamS", "AdamSRT", "SGDMRT",
    "AdamGStar", "ScaleInvariantOptimizer", "find_scale_invariant", "param_groups",
    "check_invariance", "unit_normalize_", "InvarianceReport", "GroupCheck", "create_optimizer",
    "list_optimizers", "REGISTRY", "__version__",
]
