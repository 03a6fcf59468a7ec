"""Budget -> structure: kept fraction <= f, within one rank step of f, aligned, never non-saving."""

import pytest

from lit_factor.factorize import BudgetError, check_saves, structure_for_budget, weight_count

BERT_BASE = [(768, 768), (3072, 768), (768, 3072)]


def kept(method, m, n, structure):
    return weight_count(method, m, n, **structure) / (m * n)


def one_rank_step(method, m, n, structure, multiple):
    bigger = dict(structure, rank=structure["rank"] + multiple)
    return kept(method, m, n, bigger) - kept(method, m, n, structure)


@pytest.mark.parametrize("method", ["lowrank", "monarch", "blockwise"])
@pytest.mark.parametrize("budget", [0.5, 0.25])
@pytest.mark.parametrize("multiple", [1, 8, 64])
@pytest.mark.parametrize("shape", BERT_BASE, ids=["768x768", "3072x768", "768x3072"])
def test_kept_fraction_is_at_most_budget_and_within_one_step(method, budget, multiple, shape):
    m, n = shape
    if method != "lowrank" and multiple == 64:
        multiple = 16  # per-block ranks are small (<= 192 at b = 4); 64 would be one huge step
    structure = structure_for_budget(method, m, n, budget, nblocks=4, rank_multiple=multiple)
    assert structure["rank"] % multiple == 0
    fraction = kept(method, m, n, structure)
    assert fraction <= budget
    assert budget - fraction < one_rank_step(method, m, n, structure, multiple)


def test_lowrank_rank_by_formula():
    # r = floor(f m n / (m + n)): 768x3072 at 50 % -> 307, aligned to 64 -> 256.
    assert structure_for_budget("lowrank", 768, 3072, 0.5) == {"rank": 307}
    assert structure_for_budget("lowrank", 768, 3072, 0.5, rank_multiple=64) == {"rank": 256}
    assert structure_for_budget("lowrank", 768, 768, 0.25) == {"rank": 96}


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5])
def test_budget_outside_unit_interval_is_refused(budget):
    with pytest.raises(BudgetError, match=r"outside \(0, 1\]"):
        structure_for_budget("lowrank", 768, 768, budget)


def test_non_saving_structures_are_refused():
    # Full budget on a square matrix: r = mn/(m+n) = n/2 keeps exactly m n weights -> refused.
    with pytest.raises(BudgetError, match="would not save anything"):
        structure_for_budget("lowrank", 768, 768, 1.0)
    with pytest.raises(BudgetError, match="would not save anything"):
        check_saves("lowrank", 768, 768, rank=400)
    with pytest.raises(BudgetError, match="would not save anything"):
        check_saves("monarch", 768, 768, nblocks=4, rank=192)


def test_too_small_budget_or_too_coarse_alignment_is_refused():
    with pytest.raises(BudgetError, match="leaves no rank"):
        structure_for_budget("lowrank", 64, 64, 0.01)
    with pytest.raises(BudgetError, match="rank_multiple=64"):
        structure_for_budget("lowrank", 96, 96, 0.5, rank_multiple=64)
    with pytest.raises(BudgetError, match="leaves no per-block rank"):
        structure_for_budget("monarch", 64, 64, 0.05, nblocks=8)


def test_unknown_method_is_refused():
    with pytest.raises(BudgetError, match="method='svd' is not one of"):
        structure_for_budget("svd", 64, 64, 0.5)
