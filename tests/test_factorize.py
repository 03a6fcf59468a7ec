"""The contract every FactorizedLinear honours, checked against math for all three structures alike."""

import math

import pytest
import torch
from torch import nn

from lit_factor.factorize import METHODS, BlockLowRankLinear, LowRankLinear, MonarchLinear

SHAPES = [(96, 384), (384, 96), (128, 128), (100, 300)]  # (out, in); the last is not divisible by the blocks
BLOCKS = 4


def dense(out_features, in_features, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, dtype=dtype)


def partial(cls, m, n):
    """A typical, non-full structure for each method."""
    if cls is LowRankLinear:
        return {"rank": min(m, n) // 3}
    return {"nblocks": BLOCKS, "rank": 2}


def full(cls, m, n):
    if cls is LowRankLinear:
        return {"rank": min(m, n)}
    return {"nblocks": BLOCKS, "rank": min(math.ceil(m / BLOCKS), math.ceil(n / BLOCKS))}


ALL = pytest.mark.parametrize("cls", list(METHODS.values()), ids=list(METHODS))
SHAPED = pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])


@ALL
@SHAPED
def test_forward_equals_dense_reconstruction(cls, shape):
    m, n = shape
    layer = cls.from_linear(dense(m, n), **partial(cls, m, n))
    x = torch.randn(2, 3, n, dtype=torch.float64)  # any leading shape
    expected = x @ layer.to_dense().T + layer.bias
    torch.testing.assert_close(layer(x), expected)
    assert layer(x).shape == (2, 3, m)


@ALL
@SHAPED
def test_full_structure_reconstructs_exactly(cls, shape):
    m, n = shape
    linear = dense(m, n)
    layer = cls.from_linear(linear, **full(cls, m, n))
    torch.testing.assert_close(layer.to_dense(), linear.weight.detach(), atol=1e-10, rtol=1e-10)
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x), atol=1e-10, rtol=1e-10)


@ALL
@SHAPED
def test_param_count_formula_matches_real_parameters(cls, shape):
    m, n = shape
    for structure in (partial(cls, m, n), full(cls, m, n)):
        layer = cls.from_linear(dense(m, n), **structure)
        real = sum(p.numel() for p in layer.parameters())
        assert layer.num_params == real == cls.param_count(m, n, **structure) + m
        assert layer.macs_per_token == real - m


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
    """DESIGN.md section 2: at equal (b, R) a Monarch matrix is a BLR matrix with rows permuted."""
    m, n, b = 128, 96, BLOCKS
    monarch = _random_structured(MonarchLinear, m, n, rank=3)
    blr = BlockLowRankLinear(n, m, nblocks=b, rank=3, dtype=torch.float64)
    blr.load_state_dict(monarch.state_dict())
    q = m // b
    perm = torch.arange(m).reshape(q, b).T.reshape(-1)  # BLR row i*q+t is Monarch row t*b+i
    torch.testing.assert_close(blr.to_dense(), monarch.to_dense()[perm])
    assert blr.num_params == monarch.num_params


@ALL
def test_bias_dtype_and_device_are_kept(cls):
    linear = nn.Linear(64, 32, bias=True).to(torch.float32)
    layer = cls.from_linear(linear, **partial(cls, 32, 64))
    torch.testing.assert_close(layer.bias, linear.bias)
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    no_bias = cls.from_linear(nn.Linear(64, 32, bias=False), **partial(cls, 32, 64))
    assert no_bias.bias is None
    assert no_bias(torch.randn(4, 64)).shape == (4, 32)


@ALL
def test_random_init_ignores_weights_with_linear_like_scale(cls):
    torch.manual_seed(0)
    linear = nn.Linear(384, 384)
    layer = cls.from_linear(linear, init="random", **partial(cls, 384, 384))
    ratio = layer.to_dense().std() / linear.weight.std()
    assert 0.5 < ratio < 2.0  # same output scale as nn.Linear's default init
    assert not torch.allclose(layer.to_dense(), linear.weight, atol=1e-3)


@ALL
def test_extra_repr_names_structure_and_savings(cls):
    layer = cls.from_linear(nn.Linear(64, 32), **partial(cls, 32, 64))
    text = repr(layer)
    assert "rank=" in text and "kept=" in text and "in_features=64" in text


@pytest.mark.parametrize("cls,kwargs", [
    (LowRankLinear, {"rank": 0}), (LowRankLinear, {"rank": 33}),
    (MonarchLinear, {"nblocks": 4, "rank": 9}), (BlockLowRankLinear, {"nblocks": 0}),
])
def test_impossible_structure_is_refused(cls, kwargs):
    with pytest.raises(ValueError, match="must be in"):
        cls.from_linear(nn.Linear(64, 32), **kwargs)


def test_gradients_flow_to_every_factor():
    for cls in METHODS.values():
        layer = cls.from_linear(nn.Linear(48, 40), **partial(cls, 40, 48))
        layer(torch.randn(3, 48)).square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


@ALL
def test_weight_snapshot_follows_factor_updates(cls):
    """``.weight`` (read by HF T5) is cached, yet always equals to_dense() after the factors change."""
    layer = cls.from_linear(nn.Linear(48, 40), **partial(cls, 40, 48))
    first = layer.weight
    assert layer.weight is first  # cached while nothing changed
    torch.testing.assert_close(first, layer.to_dense().detach())
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(3, 48)).square().sum().backward()
    optimizer.step()
    assert layer.weight is not first
    torch.testing.assert_close(layer.weight, layer.to_dense().detach())
    assert not layer.weight.requires_grad
