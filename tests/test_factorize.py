"""The contract every FactorizedLinear honours, then each structure's own math.

The contract is a list of checks (``CONTRACTS``), run here on every registered structure (``CASES``) and by
``tests/test_registry.py`` on a toy structure defined there: a new structure is held to the same contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lit_factor.factorize import METHODS, BlockLowRankLinear, FactorizedLinear, LowRankLinear, MonarchLinear

SHAPES = [(96, 384), (384, 96), (128, 128), (100, 300)]  # (out, in); the last is not divisible by the blocks
BLOCKS = 4



@dataclass(frozen=True)
class Case:
    """A structure under test: its class, a typical saving structure and the full one, for an out x in layer."""

    cls: type[FactorizedLinear]
    partial: Callable[[int, int], dict]
    full: Callable[[int, int], dict]

    def __repr__(self) -> str:
        return self.cls.method


def dense(out_features, in_features, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, dtype=dtype)


def _full_blocks(m, n):
    return {"nblocks": BLOCKS, "rank": min(math.ceil(m / BLOCKS), math.ceil(n / BLOCKS))}


CASES = [
    Case(LowRankLinear, lambda m, n: {"rank": min(m, n) // 3}, lambda m, n: {"rank": min(m, n)}),
    Case(MonarchLinear, lambda m, n: {"nblocks": BLOCKS, "rank": 2}, _full_blocks),
    Case(BlockLowRankLinear, lambda m, n: {"nblocks": BLOCKS, "rank": 2}, _full_blocks),
]


# --- the contract: each check takes (case, out_features, in_features) ----------------------------------------
def forward_equals_dense_reconstruction(case, m, n):
    layer = case.cls.from_linear(dense(m, n), **case.partial(m, n))
    x = torch.randn(2, 3, n, dtype=torch.float64)  # any leading shape
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + layer.bias)
    assert layer(x).shape == (2, 3, m)


def full_structure_reconstructs_exactly(case, m, n):
    linear = dense(m, n)
    layer = case.cls.from_linear(linear, **case.full(m, n))
    torch.testing.assert_close(layer.to_dense(), linear.weight.detach(), atol=1e-10, rtol=1e-10)
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-10, rtol=1e-10)


def projection_is_stationary(case, m, n):
    """First-order optimal: no small change of any factor lowers the weight error of the projection."""
    linear = dense(m, n)
    layer = case.cls.from_linear(linear, **case.partial(m, n))
    w = linear.weight.detach()
    (w - layer.to_dense()).square().sum().backward()
    for name, p in layer.named_parameters():
        if name != "bias":
            assert p.grad.norm() <= 1e-6 * w.norm(), name
    assert (w - layer.to_dense()).norm() < w.norm()


def projection_is_in_place(case, m, n):
    """``project_`` fills the same Parameter objects (what a staged switch relies on) and leaves the bias."""
    layer = case.cls(n, m, dtype=torch.float64, **case.partial(m, n))
    before = {name: (p, p.detach().clone()) for name, p in layer.named_parameters()}
    layer.project_(dense(m, n).weight)
    after = dict(layer.named_parameters())
    assert all(after[name] is p for name, (p, _) in before.items())
    assert torch.equal(layer.bias, before["bias"][1])
    assert any(not torch.equal(after[name], old) for name, (_, old) in before.items() if name != "bias")


def param_count_matches_real_parameters(case, m, n):
    for structure in (case.partial(m, n), case.full(m, n)):
        layer = case.cls.from_linear(dense(m, n), **structure)
        real = sum(p.numel() for p in layer.parameters())
        assert layer.num_params == real == case.cls.param_count(m, n, **structure) + m
        assert layer.macs_per_token == real - m


def budget_rule_keeps_at_most_the_budget(case, m, n):
    for budget in (0.5, 0.25):
        structure = case.cls.planned_structure(m, n, budget, nblocks=BLOCKS)
        layer = case.cls.from_linear(dense(m, n), **structure)
        assert layer.structure() == structure
        assert layer.weight_params <= budget * m * n


def bias_dtype_and_device_are_kept(case, m, n):
    linear = nn.Linear(n, m, bias=True).to(torch.float32)
    layer = case.cls.from_linear(linear, **case.partial(m, n))
    torch.testing.assert_close(layer.bias, linear.bias)
    assert all(p.dtype == torch.float32 and p.device == linear.weight.device for p in layer.parameters())
    no_bias = case.cls.from_linear(nn.Linear(n, m, bias=False), **case.partial(m, n))
    assert no_bias.bias is None
    assert no_bias(torch.randn(4, n)).shape == (4, m)


def random_init_ignores_weights_with_linear_like_scale(case, m, n):
    linear = dense(m, n, dtype=torch.float32)
    layer = case.cls.from_linear(linear, init="random", **case.partial(m, n))
    ratio = layer.to_dense().std() / linear.weight.std()
    assert 0.5 < ratio < 2.0  # same output scale as nn.Linear's default init
    assert not torch.allclose(layer.to_dense(), linear.weight, atol=1e-3)


def unknown_init_is_refused(case, m, n):
    with pytest.raises(ValueError, match="init='zeros' is not one of 'svd'"):
        case.cls.from_linear(dense(m, n), init="zeros", **case.partial(m, n))
    with pytest.raises(ValueError, match="init='random' is not one of 'svd'"):
        case.cls(n, m, **case.partial(m, n)).project_(dense(m, n).weight, init="random")


def extra_repr_names_structure_and_savings(case, m, n):
    layer = case.cls.from_linear(dense(m, n), **case.partial(m, n))
    text = repr(layer)
    assert "kept=" in text and f"in_features={n}" in text
    assert all(f"{key}={value}" in text for key, value in layer.structure().items())


def gradients_flow_to_every_factor(case, m, n):
    layer = case.cls.from_linear(dense(m, n), **case.partial(m, n))
    layer(torch.randn(3, n, dtype=torch.float64)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def weight_snapshot_follows_factor_updates(case, m, n):
    """``.weight`` (read by HF T5) is cached, yet always equals to_dense() after the factors change."""
    layer = case.cls.from_linear(dense(m, n), **case.partial(m, n))
    first = layer.weight
    assert layer.weight is first  # cached while nothing changed
    torch.testing.assert_close(first, layer.to_dense().detach())
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(3, n, dtype=torch.float64)).square().sum().backward()
    optimizer.step()
    assert layer.weight is not first
    torch.testing.assert_close(layer.weight, layer.to_dense().detach())
    assert not layer.weight.requires_grad


CONTRACTS = [
    forward_equals_dense_reconstruction, full_structure_reconstructs_exactly, projection_is_stationary,
    projection_is_in_place, param_count_matches_real_parameters, budget_rule_keeps_at_most_the_budget,
    bias_dtype_and_device_are_kept, random_init_ignores_weights_with_linear_like_scale, unknown_init_is_refused,
    extra_repr_names_structure_and_savings, gradients_flow_to_every_factor, weight_snapshot_follows_factor_updates,
]
SHAPED = pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])


@pytest.mark.parametrize("contract", CONTRACTS, ids=[c.__name__ for c in CONTRACTS])
@pytest.mark.parametrize("case", CASES, ids=repr)
@SHAPED
def test_contract(contract, case, shape):
    contract(case, *shape)


def test_every_registered_structure_is_held_to_the_contract():
    assert {case.cls for case in CASES} == set(METHODS.values())


# --- each structure's own math ---------------------------------------------------------------------------------
def test_param_count_closed_forms():
    # r (m + n) for low rank; b^2 R (p + q) for the block structures (p, q padded block sizes).
    assert LowRankLinear.param_count(3072, 768, rank=100) == 100 * (3072 + 768)
    assert MonarchLinear.param_count(100, 300, nblocks=4, rank=3) == 16 * 3 * (75 + 25)
    # Default R = min(m, n) / b^2 keeps 1.5 / b of a BERT block's linear weights (37.5 % at b = 4).
    block = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
    kept = sum(MonarchLinear.param_count(m, n, nblocks=4) for m, n in block)
    assert kept / sum(m * n for m, n in block) == pytest.approx(0.375)


@SHAPED
def test_lowrank_error_is_eckart_young_optimal(shape):
    m, n = shape
    linear = dense(m, n)
    sigma = torch.linalg.svdvals(linear.weight.detach())
    for rank in (1, min(m, n) // 4, min(m, n) - 1):
        layer = LowRankLinear.from_linear(linear, rank=rank)
        error = torch.linalg.matrix_norm(linear.weight.detach() - layer.to_dense())
        torch.testing.assert_close(error, sigma[rank:].square().sum().sqrt(), atol=1e-9, rtol=1e-9)


def _random_structured(cls, m, n, rank, seed=1):
    torch.manual_seed(seed)
    return cls(n, m, nblocks=BLOCKS, rank=rank, dtype=torch.float64)


@pytest.mark.parametrize("cls", [MonarchLinear, BlockLowRankLinear], ids=["monarch", "blockwise"])
@SHAPED
def test_projection_recovers_a_structured_matrix_exactly(cls, shape):
    """Projecting a matrix that already has the structure gives it back: the projection is exact on it."""
    m, n = shape
    target = _random_structured(cls, m, n, rank=2).to_dense()
    linear = dense(m, n)
    with torch.no_grad():
        linear.weight.copy_(target)
    layer = cls.from_linear(linear, nblocks=BLOCKS, rank=2)
    torch.testing.assert_close(layer.to_dense(), target, atol=1e-10, rtol=1e-10)


@SHAPED
def test_block_projection_is_optimal_per_block(shape):
    """Block-wise projection error equals the per-block Eckart-Young tail, so no other factors can do better."""
    m, n = shape
    linear = dense(m, n)
    layer = BlockLowRankLinear.from_linear(linear, nblocks=BLOCKS, rank=2)
    w = linear.weight.detach()
    p, q = math.ceil(n / BLOCKS), math.ceil(m / BLOCKS)
    tail = 0.0
    for i in range(BLOCKS):
        for j in range(BLOCKS):
            block = w[i * q:(i + 1) * q, j * p:(j + 1) * p]
            if block.numel():
                tail += torch.linalg.svdvals(block)[2:].square().sum()
    torch.testing.assert_close(torch.linalg.matrix_norm(w - layer.to_dense()) ** 2, torch.as_tensor(tail))


def test_monarch_is_blockwise_after_a_row_permutation():
    """At equal (b, R) a Monarch matrix is a BLR matrix with rows permuted (monarch.py's docstring)."""
    m, n, b = 128, 96, BLOCKS
    monarch = _random_structured(MonarchLinear, m, n, rank=3)
    blr = BlockLowRankLinear(n, m, nblocks=b, rank=3, dtype=torch.float64)
    blr.load_state_dict(monarch.state_dict())
    q = m // b
    perm = torch.arange(m).reshape(q, b).T.reshape(-1)  # BLR row i*q+t is Monarch row t*b+i
    torch.testing.assert_close(blr.to_dense(), monarch.to_dense()[perm])
    assert blr.num_params == monarch.num_params


@pytest.mark.parametrize("cls,kwargs", [
    (LowRankLinear, {"rank": 0}), (LowRankLinear, {"rank": 33}),
    (MonarchLinear, {"nblocks": 4, "rank": 9}), (BlockLowRankLinear, {"nblocks": 0}),
])
def test_impossible_structure_is_refused(cls, kwargs):
    with pytest.raises(ValueError, match="must be in"):
        cls.from_linear(nn.Linear(64, 32), **kwargs)


