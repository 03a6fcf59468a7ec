"""Budget -> structure: kept fraction <= f, within one rank step of f, aligned, never non-saving."""

import pytest

from lit_factor.factorize import METHODS, BudgetError, LowRankLinear, MonarchLinear, check_saves

BERT_BASE = [(768, 768), (3072, 768), (768, 3072)]


def kept(cls, m, n, structure):
    return cls.param_count(m, n, **structure) / (m * n)


def one_rank_step(cls, m, n, structure, multiple):
    bigger = dict(structure, rank=structure["rank"] + multiple)
    return kept(cls, m, n, bigger) - kept(cls, m, n, structure)


@pytest.mark.parametrize("cls", list(METHODS.values()), ids=list(METHODS))
@pytest.mark.parametrize("budget", [0.5, 0.25])
@pytest.mark.parametrize("multiple", [1, 8, 64])
@pytest.mark.parametrize("shape", BERT_BASE, ids=["768x768", "3072x768", "768x3072"])
def test_kept_fraction_is_at_most_budget_and_within_one_step(cls, budget, multiple, shape):
    m, n = shape
    if cls is not LowRankLinear and multiple == 64:
        multiple = 16  # per-block ranks are small (<= 192 at b = 4); 64 would be one huge step
    structure = cls.planned_structure(m, n, budget, nblocks=4, rank_multiple=multiple)
    assert structure["rank"] % multiple == 0
    fraction = kept(cls, m, n, structure)
    assert fraction <= budget
    assert budget - fraction < one_rank_step(cls, m, n, structure, multiple)


def test_lowrank_rank_by_formula():
    # r = floor(f m n / (m + n)): 768x3072 at 50 % -> 307, aligned to 64 -> 256.
    assert LowRankLinear.planned_structure(768, 3072, 0.5) == {"rank": 307}
    assert LowRankLinear.planned_structure(768, 3072, 0.5, rank_multiple=64) == {"rank": 256}
    assert LowRankLinear.planned_structure(768, 768, 0.25) == {"rank": 96}


def test_without_budget_the_structure_default_or_the_given_rank():
    assert MonarchLinear.planned_structure(768, 768, None, nblocks=4) == {"nblocks": 4, "rank": 48}
    assert MonarchLinear.planned_structure(768, 768, None, rank=8, nblocks=2) == {"nblocks": 2, "rank": 8}
    assert LowRankLinear.planned_structure(768, 768, None, rank=8) == {"rank": 8}
    with pytest.raises(BudgetError, match="needs a budget in \\(0, 1\\] or a rank"):
        LowRankLinear.planned_structure(768, 768, None)


@pytest.mark.parametrize("cls", list(METHODS.values()), ids=list(METHODS))
@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5])
def test_budget_outside_unit_interval_is_refused(cls, budget):
    with pytest.raises(BudgetError, match=r"outside \(0, 1\]"):
        cls.planned_structure(768, 768, budget)


def test_non_saving_structures_are_refused():
    # Full budget on a square matrix: r = mn/(m+n) = n/2 keeps exactly m n weights -> refused.
    with pytest.raises(BudgetError, match="would not save anything"):
        LowRankLinear.planned_structure(768, 768, 1.0)
    with pytest.raises(BudgetError, match="lowrank with rank=400 .* would not save anything"):
        check_saves(LowRankLinear, 768, 768, rank=400)
    with pytest.raises(BudgetError, match="would not save anything"):
        check_saves(MonarchLinear, 768, 768, nblocks=4, rank=192)


def test_too_small_budget_or_too_coarse_alignment_is_refused():
    with pytest.raises(BudgetError, match="leaves no rank"):
        LowRankLinear.planned_structure(64, 64, 0.01)
    with pytest.raises(BudgetError, match="rank_multiple=64"):
        LowRankLinear.planned_structure(96, 96, 0.5, rank_multiple=64)
    with pytest.raises(BudgetError, match="leaves no per-block rank"):
        MonarchLinear.planned_structure(64, 64, 0.05, nblocks=8)
    with pytest.raises(BudgetError, match="nblocks=100 must be in 1..64"):
        MonarchLinear.planned_structure(64, 64, 0.5, nblocks=100)
    with pytest.raises(BudgetError, match="rank_multiple=0 must be a positive integer"):
        LowRankLinear.planned_structure(64, 64, 0.5, rank_multiple=0)
