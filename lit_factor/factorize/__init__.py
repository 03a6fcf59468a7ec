"""Pure-torch factorized replacements for ``nn.Linear`` (no Lightning, no transformers here)."""

from .base import FactorizedLinear, truncated_factors
from .blockwise import BlockLowRankLinear
from .budget import BudgetError, check_saves, structure_for_budget, weight_count
from .lowrank import LowRankLinear
from .monarch import MonarchLinear

#: method name (as used in plans and configs) -> layer class
METHODS: dict[str, type[FactorizedLinear]] = {
    cls.method: cls for cls in (LowRankLinear, MonarchLinear, BlockLowRankLinear)
}

__all__ = [
    "METHODS", "BlockLowRankLinear", "BudgetError", "FactorizedLinear", "LowRankLinear", "MonarchLinear",
    "check_saves", "structure_for_budget", "truncated_factors", "weight_count",
]
