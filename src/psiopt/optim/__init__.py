"""The optimizer library (torch only): geometry, discovery, optimizers by family, registry,
diagnostics.

* :mod:`.geometry` -- grouped row views, per-group reductions, sphere maps;
* :mod:`.discovery` -- structural discovery of scale-invariant parameters and its check;
* :mod:`.groups` -- parameter groups for any optimizer (torch.optim, timm, Muon), weight decay
  placed by what it does;
* :mod:`.policies` -- norm policies (fixed, unit norm, tangent gradients) around any optimizer;
* :mod:`.base` -- the common optimizer machinery;
* :mod:`.quotient` -- PSI-SGD(M) on the quotient manifold (Yi);
* :mod:`.sphere` -- rows on the unit sphere: UN, SGDG, AdamG, AdamG*;
* :mod:`.euclidean` -- Euclidean steps corrected for the symmetry: PSGD, Adam-S, Adam-SRT, SGD-MRT;
* :mod:`.baselines` -- torch.optim SGD, Adam, AdamW as the registry's baselines;
* :mod:`.registry` -- optimizers by name with the papers' settings;
* :mod:`.diagnostics` -- norms and effective learning rates.
"""

from .base import ScaleInvariantOptimizer
from .discovery import (
    GroupCheck,
    InvarianceReport,
    NormStats,
    check_invariance,
    find_scale_invariant,
    param_groups,
    rescale_rows_,
    unit_normalize_,
)
from .euclidean import SGDMRT, AdamS, AdamSRT, ProjectedSGD
from .groups import optimizer_groups
from .policies import NormPolicy
from .quotient import PSISGD
from .registry import REGISTRY, create_optimizer, list_optimizers
from .sphere import SGDG, AdamG, AdamGStar, UnitNormSGD

__all__ = [
    "PSISGD", "UnitNormSGD", "ProjectedSGD", "SGDG", "AdamG", "AdamS", "AdamSRT", "SGDMRT",
    "AdamGStar", "ScaleInvariantOptimizer", "find_scale_invariant", "param_groups",
    "check_invariance", "unit_normalize_", "rescale_rows_", "NormStats", "InvarianceReport",
    "GroupCheck", "create_optimizer", "list_optimizers", "REGISTRY", "optimizer_groups",
    "NormPolicy",
]
