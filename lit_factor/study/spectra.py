"""Claim 3's yardstick, shared by ``analyze`` (which measures) and the results page (which judges): the rank
fraction a matrix needs for a given relative error, and the criterion for "near full rank" (Gupta et al. 2024,
"An Empirical Investigation of Matrix Factorization Methods for Pre-trained Transformers", claim 3)."""

from __future__ import annotations

#: a matrix counts as "near full rank" when a 10 % error needs at least this fraction of its full rank
NEAR_FULL_RANK = 0.5


def rank_needed(rows: list[dict], name: str, error: float) -> float:
    """Smallest rank fraction whose best approximation of matrix ``name`` has relative error <= ``error``
    (``rows``: analyze's spectrum rows, ``matrix`` / ``rank_fraction`` / ``relative_error``)."""
    return min(r["rank_fraction"] for r in rows if r["matrix"] == name and r["relative_error"] <= error)
