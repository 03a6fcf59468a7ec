"""Pure-torch factorized replacements for ``nn.Linear`` (no Lightning, no transformers here).

``METHODS`` is the one registry of structures: adding one is a new module with a
:class:`~lit_factor.factorize.base.FactorizedLinear` subclass plus one line below. Nothing else in lit-factor
names a structure.
"""

from lit_factor.factorize.base import FactorizedLinear, ProjectionStats, truncated_factors
from lit_factor.factorize.blockwise import BlockLowRankLinear
from lit_factor.factorize.budget import BudgetError, check_budget, check_saves, fit_rank
from lit_factor.factorize.lowrank import LowRankLinear
from lit_factor.factorize.monarch import MonarchLinear

#: method name (as used in plans and configs) -> layer class
METHODS: dict[str, type[FactorizedLinear]] = {
    cls.method: cls for cls in (LowRankLinear, MonarchLinear, BlockLowRankLinear)
}

__all__ = [
    "METHODS", "BlockLowRankLinear", "BudgetError", "FactorizedLinear", "LowRankLinear", "MonarchLinear",
    "ProjectionStats", "check_budget", "check_saves", "fit_rank", "truncated_factors",
]
