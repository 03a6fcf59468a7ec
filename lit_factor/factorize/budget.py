"""Budget pieces every structure shares; each structure's own rule is its ``structure_for_budget``.

**Budget semantics** (used everywhere in lit-factor): the budget f is the fraction of a targeted linear
layer's *weight* parameters that is kept (bias excluded; embeddings, norms and the classifier are untouched
unless targeted). A structure is accepted only if it keeps strictly fewer weights than the dense layer.

A structure whose weights grow linearly with a rank (r (m + n) for low rank, b^2 R (p + q) for b x b blocks)
fits its budget with :func:`fit_rank`: the largest rank whose weights fit in f m n, rounded *down* to a multiple
of ``rank_multiple`` (GPUs want aligned ranks, see docs/speed.md). Rounding down keeps the kept fraction <= f and
within one rank step of it.
"""

from __future__ import annotations

import math


class BudgetError(ValueError):
    """A requested structure that cannot be built or would not reduce parameters."""


def check_budget(budget: float, rank_multiple: int = 1) -> None:
    """Refuse a budget outside (0, 1] or a rank multiple below 1."""
    if not 0 < budget <= 1:
        raise BudgetError(f"budget={budget} is outside (0, 1]: it is the kept fraction of targeted weights")
    if rank_multiple < 1:
        raise BudgetError(f"rank_multiple={rank_multiple} must be a positive integer")


def fit_rank(out_features: int, in_features: int, budget: float, *, weights_per_rank: int, max_rank: int,
             rank_multiple: int = 1, what: str = "rank", hint: str = "use a larger budget") -> int:
    """Largest rank, a multiple of ``rank_multiple`` and at most ``max_rank``, whose ``rank * weights_per_rank``
    weights fit in ``budget`` of the ``out x in`` dense weights. ``what``/``hint`` word the error."""
    m, n, k = out_features, in_features, rank_multiple
    rank = min(math.floor(budget * m * n / weights_per_rank), max_rank) // k * k
    if rank < 1:
        raise BudgetError(f"budget={budget} leaves no {what} for a {m}x{n} layer "
                          f"(rank must be >= {k} with rank_multiple={k}); {hint}")
    return rank


def check_saves(layer_cls, out_features: int, in_features: int, **structure) -> int:
    """Refuse a structure of ``layer_cls`` (a FactorizedLinear class) that keeps as many weights as the dense
    layer or more; return its weight count (``layer_cls.param_count``)."""
    kept = layer_cls.param_count(out_features, in_features, **structure)
    dense = out_features * in_features
    if kept >= dense:
        args = ", ".join(f"{k}={v}" for k, v in structure.items())
        raise BudgetError(f"{layer_cls.method} with {args} keeps {kept:,} weights for a {out_features}x{in_features} "
                          f"layer, not fewer than its {dense:,} dense weights: it would not save anything")
    return kept
