"""Every inference fast path computes exactly the reference math ``x @ to_dense().T + bias``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_factor.factorize import BlockLowRankLinear, LowRankLinear, MonarchLinear

SHAPES = [(96, 384), (384, 96), (128, 128), (100, 300), (3, 7)]  # (out, in); the last two do not divide by 4


def reference(layer, x):
    out = x @ layer.to_dense().T
    return out if layer.bias is None else out + layer.bias


@pytest.mark.parametrize("cls", [MonarchLinear, BlockLowRankLinear])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad", ["no_grad", "inference_mode", "grad"])
def test_block_forward_paths_equal_reference(cls, shape, bias, grad):
    m, n = shape
    torch.manual_seed(0)
    nblocks = min(4, m, n)
    layer = cls(n, m, nblocks=nblocks, rank=max(1, min(math.ceil(m / nblocks), math.ceil(n / nblocks)) // 2),
                bias=bias, dtype=torch.float64)
    x = torch.randn(2, 5, n, dtype=torch.float64)
    expected = reference(layer, x).detach()
    if grad == "no_grad":
        with torch.no_grad():
            out = layer(x)
    elif grad == "inference_mode":
        with torch.inference_mode():
            out = layer(x)
    else:
        out = layer(x)
        assert out.requires_grad
    assert out.shape == (2, 5, m)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [MonarchLinear, BlockLowRankLinear])
def test_block_training_path_gradients_equal_reference(cls):
    torch.manual_seed(0)
    layer = cls(30, 50, nblocks=4, rank=3, dtype=torch.float64)
    x = torch.randn(7, 30, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    fast = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    reference(layer, x).square().sum().backward()
    slow = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_block_fast_path_in_low_precision_matches_reference():
    torch.manual_seed(0)
    layer = MonarchLinear(768, 3072, nblocks=4).to(torch.bfloat16)
    x = torch.randn(4, 768, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = layer(x)
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    expected = x.double() @ layer.to_dense().double().T + layer.bias.double()
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def lowrank_on_cpu_with_padding(rank=7, pad=8):
    torch.manual_seed(0)
    layer = LowRankLinear(24, 40, rank=rank, dtype=torch.float64)
    layer.pad_rank_devices = ("cpu",)  # exercise the GPU fast path here
    layer.pad_rank_to = pad
    return layer


@pytest.mark.parametrize("rank, pad, padded", [(7, 8, True), (8, 8, False), (5, 64, True), (7, 0, False)])
def test_lowrank_rank_padding_is_exact_and_used_only_when_unaligned(rank, pad, padded):
    layer = lowrank_on_cpu_with_padding(rank, pad)
    x = torch.randn(3, 4, 24, dtype=torch.float64)
    with torch.no_grad():
        assert layer._pads_rank(x) is padded
        out = layer(x)
    torch.testing.assert_close(out, reference(layer, x).detach(), rtol=1e-12, atol=1e-12)
    if padded:
        down, up = layer._padded_factors()
        assert down.shape == (math.ceil(rank / pad) * pad, 24) and up.shape == (40, down.shape[0])
        assert down[rank:].abs().sum() == 0 and up[:, rank:].abs().sum() == 0
    assert "_padded" not in "".join(layer.state_dict())


def test_lowrank_padding_is_never_used_with_autograd():
    layer = lowrank_on_cpu_with_padding()
    x = torch.randn(4, 24, dtype=torch.float64)
    assert not layer._pads_rank(x)
    layer(x).sum().backward()
    assert layer.up.grad is not None and layer.down.grad is not None


def test_lowrank_padded_cache_follows_weight_updates():
    layer = lowrank_on_cpu_with_padding()
    x = torch.randn(4, 24, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        layer.up.mul_(2.0)  # an optimizer step / load_state_dict changes the factors in place
        layer.down.add_(1.0)
        out = layer(x)
    torch.testing.assert_close(out, reference(layer, x).detach(), rtol=1e-12, atol=1e-12)
    moved = layer.to(torch.float32)  # a new storage and dtype invalidate the cache too
    with torch.no_grad():
        out = moved(x.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(moved, x.float()).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("cls, structure", [(LowRankLinear, {"rank": 307}), (MonarchLinear, {"nblocks": 4}),
                                            (BlockLowRankLinear, {"nblocks": 4})])
def test_cuda_fast_paths_equal_reference(cls, structure):
    torch.manual_seed(0)
    layer = cls(768, 3072, **structure, device="cuda")
    x = torch.randn(64, 768, device="cuda")
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.to(torch.bfloat16)(x.bfloat16()).float(),
                                   reference(layer, x.bfloat16()).float(), rtol=3e-2, atol=3e-2)


def test_fast_paths_leave_nn_linear_semantics():
    """A factorized model under inference_mode equals its dense reconstruction (all layers, all paths)."""
    torch.manual_seed(0)
    net = nn.Sequential(MonarchLinear(24, 40, nblocks=4), nn.GELU(), BlockLowRankLinear(40, 24, nblocks=4),
                        LowRankLinear(24, 24, rank=5)).double()
    dense = nn.Sequential(*(layer.to_linear() if hasattr(layer, "to_linear") else layer for layer in net))
    x = torch.randn(6, 24, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), dense(x), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_compiled_forward_equals_reference():
    """Under torch.compile the block layers take their plain-ops branch and low rank skips its padding cache."""
    torch.manual_seed(0)
    net = nn.Sequential(MonarchLinear(24, 40, nblocks=4), BlockLowRankLinear(40, 24, nblocks=4),
                        LowRankLinear(24, 24, rank=5)).eval()
    net[2].pad_rank_devices = ("cpu",)
    x = torch.randn(6, 24)
    with torch.inference_mode():
        expected = reference(net[2], reference(net[1], reference(net[0], x)))
        torch.testing.assert_close(torch.compile(net, dynamic=False)(x), expected, rtol=1e-5, atol=1e-5)
