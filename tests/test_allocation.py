"""Global rank allocation across layers."""

from __future__ import annotations

import pytest
import torch

from lit_factor.factorize import BudgetError
from lit_factor.factorize.allocation import RankChoice, allocate_ranks, block_step_spectrum
from lit_factor.factorize.datawise import weighted_spectrum


def _matrix(spectrum: torch.Tensor, m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0][:, : len(spectrum)]
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0][:, : len(spectrum)]
    return u * spectrum @ v.T


def _choice(w: torch.Tensor) -> RankChoice:
    m, n = w.shape
    return RankChoice(weighted_spectrum(w), m * n, m + n)


def _kept(choices, ranks):
    return sum(c.cost_per_rank * r for c, r in zip(choices, ranks, strict=True))


def test_flatter_spectrum_gets_more_rank():
    k = 24
    flat_s, steep_s = torch.linspace(1.0, 0.8, k, dtype=torch.float64), torch.logspace(0, -4, k, dtype=torch.float64)
    steep_s *= flat_s.norm() / steep_s.norm()  # same Frobenius norm: only the shape of the spectra differs
    flat, steep = _matrix(flat_s, 32, 24, seed=0), _matrix(steep_s, 32, 24, seed=1)
    choices = [_choice(steep), _choice(flat)]
    for normalize in (True, False):
        ranks = allocate_ranks(choices, 0.5, normalize=normalize)
        assert ranks[1] > ranks[0], (normalize, ranks)


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("rank_multiple", [1, 4])
def test_budget_met_within_one_rank_step(budget, rank_multiple):
    shapes = [(48, 16), (16, 48), (32, 32), (40, 24)]
    choices = [_choice(torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(i)))
               for i, (m, n) in enumerate(shapes)]
    if budget * sum(c.dense_weights for c in choices) < sum(c.cost_per_rank * rank_multiple for c in choices):
        with pytest.raises(BudgetError, match="below one rank step"):
            allocate_ranks(choices, budget, rank_multiple=rank_multiple)
        return
    ranks = allocate_ranks(choices, budget, rank_multiple=rank_multiple)
    assert all(r % rank_multiple == 0 and r >= rank_multiple for r in ranks)
    assert all(c.cost_per_rank * r < c.dense_weights for c, r in zip(choices, ranks, strict=True))
    target = budget * sum(c.dense_weights for c in choices)
    kept = _kept(choices, ranks)
    assert kept <= target
    open_steps = [c.cost_per_rank * rank_multiple for c, r in zip(choices, ranks, strict=True)
                  if r < c.max_rank(rank_multiple)]
    if open_steps:
        assert target - kept < max(open_steps)


def test_equal_layers_get_equal_ranks():
    w = torch.randn(20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ranks = allocate_ranks([_choice(w), _choice(w.clone())], 0.5, normalize=True)
    assert abs(ranks[0] - ranks[1]) <= 1


def test_block_spectrum_sums_blocks():
    spectra = torch.tensor([[[4.0, 1.0], [3.0, 2.0]], [[1.0, 0.0], [2.0, 2.0]]])
    torch.testing.assert_close(block_step_spectrum(spectra), torch.tensor([10.0, 5.0]))


def test_impossible_budgets():
    choices = [_choice(torch.randn(8, 8, dtype=torch.float64))] * 2
    with pytest.raises(BudgetError, match="budget=0.01"):
        allocate_ranks(choices, 0.01)
    with pytest.raises(BudgetError, match="budget=1.5"):
        allocate_ranks(choices, 1.5)
    with pytest.raises(BudgetError, match="multiple of 8"):
        allocate_ranks(choices, 0.5, rank_multiple=8)


@pytest.mark.parametrize("method", ["lowrank", "monarch", "blockwise"])
def test_structure_spectrum_tail_is_the_projection_error(method):
    from lit_factor.factorize import METHODS

    torch.manual_seed(4)
    linear = torch.nn.Linear(10, 13)
    structure = {"rank": 3} if method == "lowrank" else {"nblocks": 3, "rank": 2}
    layer = METHODS[method].from_linear(linear, **structure)
    spectrum = layer.rank_spectrum(linear.weight, {})
    error = (linear.weight.double() - layer.to_dense().double()).pow(2).sum()
    torch.testing.assert_close(spectrum[3 if method == "lowrank" else 2:].sum(), error.detach(), rtol=1e-4, atol=1e-6)
    assert layer.weights_per_rank * structure["rank"] == layer.weight_params


def test_min_share_floors_every_layer():
    k = 24
    flat_s, steep_s = torch.linspace(1.0, 0.8, k, dtype=torch.float64), torch.logspace(0, -6, k, dtype=torch.float64)
    choices = [_choice(_matrix(steep_s, 32, 24, seed=1)), _choice(_matrix(flat_s, 32, 24, seed=0))]
    free = allocate_ranks(choices, 0.5, normalize=False)
    floored = allocate_ranks(choices, 0.5, normalize=False, min_share=0.5)
    uniform = int(0.5 * 32 * 24 // 56)
    assert free[0] < uniform // 2 <= floored[0]  # the steep layer is starved without the floor, not with it
    target = 0.5 * sum(c.dense_weights for c in choices)
    assert target - 56 < _kept(choices, floored) <= target
    with pytest.raises(BudgetError, match="min_share=2"):
        allocate_ranks(choices, 0.5, min_share=2)
