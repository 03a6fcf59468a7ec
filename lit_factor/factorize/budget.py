"""From a parameter budget to a concrete structure.

**Budget semantics** (used everywhere in lit-factor): the budget f is the fraction of a targeted linear
layer's *weight* parameters that is kept (bias excluded; embeddings, norms and the classifier are untouched
unless targeted). A structure is accepted only if it keeps strictly fewer weights than the dense layer.

* low rank: r (m + n) <= f m n  ->  r = floor(f m n / (m + n)), rounded *down* to a multiple of
  ``rank_multiple`` (GPUs want ranks that are multiples of 8 or 64, see DESIGN.md section 5);
* Monarch / block-wise with b blocks: b^2 R (p + q) <= f m n  ->  R = floor(f m n / (b^2 (p + q))), likewise
  rounded; capped at the full block rank min(p, q).

Rounding down keeps the kept fraction <= f and within one rank step of it.
"""

from __future__ import annotations

import math

from .blockwise import BlockLowRankLinear
from .lowrank import LowRankLinear

METHODS_WITH_BLOCKS = ("monarch", "blockwise")


class BudgetError(ValueError):
    """A requested structure that cannot be built or would not reduce parameters."""


def _round_down(value: int, multiple: int) -> int:
    return value // multiple * multiple


def _check_budget(budget: float) -> None:
    if not 0 < budget <= 1:
        raise BudgetError(f"budget={budget} is outside (0, 1]: it is the kept fraction of targeted weights")


def lowrank_rank(out_features: int, in_features: int, budget: float, rank_multiple: int = 1) -> int:
    """Largest rank (a multiple of ``rank_multiple``) whose r (m + n) weights fit in ``budget`` of m n."""
    _check_budget(budget)
    m, n = out_features, in_features
    rank = _round_down(math.floor(budget * m * n / (m + n)), rank_multiple)
    rank = min(rank, _round_down(min(m, n), rank_multiple))
    if rank < 1:
        raise BudgetError(f"budget={budget} leaves no rank for a {m}x{n} layer "
                          f"(rank must be >= {rank_multiple} with rank_multiple={rank_multiple})")
    return rank


def block_rank(out_features: int, in_features: int, nblocks: int, budget: float, rank_multiple: int = 1) -> int:
    """Largest per-block rank R whose b^2 R (p + q) weights fit in ``budget`` of m n."""
    _check_budget(budget)
    m, n, b = out_features, in_features, nblocks
    if not 1 <= b <= min(m, n):
        raise BudgetError(f"nblocks={b} must be in 1..{min(m, n)} for a {m}x{n} layer")
    p, q = math.ceil(n / b), math.ceil(m / b)
    rank = _round_down(math.floor(budget * m * n / (b * b * (p + q))), rank_multiple)
    rank = min(rank, _round_down(min(p, q), rank_multiple))
    if rank < 1:
        raise BudgetError(f"budget={budget} with nblocks={b} leaves no per-block rank for a {m}x{n} layer "
                          f"(rank_multiple={rank_multiple}); use fewer blocks or a larger budget")
    return rank


def weight_count(method: str, out_features: int, in_features: int, **structure) -> int:
    """Weights (no bias) of ``method`` with ``structure`` for an out x in layer, by formula."""
    if method == "lowrank":
        return LowRankLinear.param_count(out_features, in_features, structure["rank"])
    if method in METHODS_WITH_BLOCKS:
        return BlockLowRankLinear.param_count(out_features, in_features, structure["nblocks"], structure.get("rank"))
    raise BudgetError(f"method={method!r} is not one of 'lowrank', 'monarch', 'blockwise'")


def check_saves(method: str, out_features: int, in_features: int, **structure) -> int:
    """Refuse a structure that keeps as many weights as the dense layer or more; return its weight count."""
    kept = weight_count(method, out_features, in_features, **structure)
    dense = out_features * in_features
    if kept >= dense:
        args = ", ".join(f"{k}={v}" for k, v in structure.items())
        raise BudgetError(f"{method} with {args} keeps {kept:,} weights for a {out_features}x{in_features} layer, "
                          f"not fewer than its {dense:,} dense weights: it would not save anything")
    return kept


def structure_for_budget(method: str, out_features: int, in_features: int, budget: float,
                         nblocks: int = 4, rank_multiple: int = 1) -> dict:
    """The structure keyword arguments (``rank``, ``nblocks``) for ``method`` at ``budget``; checked to save."""
    if rank_multiple < 1:
        raise BudgetError(f"rank_multiple={rank_multiple} must be a positive integer")
    if method == "lowrank":
        structure = {"rank": lowrank_rank(out_features, in_features, budget, rank_multiple)}
    elif method in METHODS_WITH_BLOCKS:
        structure = {"nblocks": nblocks,
                     "rank": block_rank(out_features, in_features, nblocks, budget, rank_multiple)}
    else:
        raise BudgetError(f"method={method!r} is not one of 'lowrank', 'monarch', 'blockwise'")
    check_saves(method, out_features, in_features, **structure)
    return structure
