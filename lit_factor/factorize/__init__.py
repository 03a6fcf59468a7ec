"""Pure-torch factorized replacements for ``nn.Linear`` (no Lightning, no transformers here).

``METHODS`` is the one registry of structures: adding one is a new module with a
:class:`~lit_factor.factorize.base.FactorizedLinear` subclass plus one line below. Nothing else in lit-factor
names a structure.
"""

from .base import FactorizedLinear, ProjectionStats, truncated_factors
from .blockwise import BlockLowRankLinear
from .budget import BudgetError, check_budget, check_saves, fit_rank
from .lowrank import LowRankLinear
from .monarch import MonarchLinear

#: method name (as used in plans and configs) -> layer class
METHODS: dict[str, type[FactorizedLinear]] = {
    cls.method: cls for cls in (LowRankLinear, MonarchLinear, BlockLowRankLinear)
}

__all__ = [
    "METHODS", "BlockLowRankLinear", "BudgetError", "FactorizedLinear", "LowRankLinear", "MonarchLinear",
    "ProjectionStats", "check_budget", "check_saves", "fit_rank", "truncated_factors",
]
