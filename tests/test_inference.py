"""Inference rewrites (lit_factor/inference.py): the same outputs from fused GEMMs and Monarch in chunk order."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lit_factor.compress.surgery import apply_plan, build_plan, count_params
from lit_factor.deploy.inference import (
    ChunkOrderMonarchLinear,
    SharedInputBranch,
    chunk_order,
    optimize_for_inference,
    permute_input,
)
from lit_factor.deploy.latency import linear_macs_per_token, make_inputs
from lit_factor.factorize import LowRankLinear, MonarchLinear
from lit_factor.models import load_model

# hidden 64, 4 heads of 16, FFN 256: Monarch with 4 blocks has 16-row blocks, so a head is one chunk group
SHAPE = dict(hidden_size=64, num_attention_heads=4, intermediate_size=256)


def model_with(method: str, budget: float | None, targets=None, arch: str = "random:tiny-bert"):
    torch.manual_seed(0)
    model = load_model(arch, **SHAPE).eval()
    if method != "none":
        apply_plan(model, build_plan(model, method, budget, targets=targets))
    return model


def outputs(model, inputs):
    with torch.inference_mode():
        return model.base_model(**inputs).last_hidden_state, model(**inputs).logits


@pytest.mark.parametrize("arch", ["random:tiny-bert", "random:tiny-mpnet"])  # attention.self.query / attn.q
@pytest.mark.parametrize("method, budget, expected", [
    ("none", None, {"shared_qkv_gemm": 2}),
    ("lowrank", 0.5, {"shared_qkv_gemm": 2}),
    ("monarch", None, {"ffn_chunk_order": 2, "attention_chunk_order": 2}),
])
def test_rewritten_model_computes_the_same_function(method, budget, expected, arch):
    model = model_with(method, budget, arch=arch)
    fast = optimize_for_inference(copy.deepcopy(model))
    assert {k: v for k, v in fast.inference_rewrites.items() if v} == expected
    assert linear_macs_per_token(fast) == linear_macs_per_token(model)  # the same math, regrouped
    assert count_params(fast) == count_params(model)
    inputs = make_inputs(model, 3, 10, torch.device("cpu"))
    for got, want in zip(outputs(fast, inputs), outputs(model, inputs), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_qkv_runs_one_gemm_and_keeps_no_activations():
    fast = optimize_for_inference(model_with("lowrank", 0.5))
    attention = fast.bert.encoder.layer[0].attention.self
    assert all(isinstance(getattr(attention, n), SharedInputBranch) for n in ("query", "key", "value"))
    shared = attention.query.shared
    assert shared is attention.key.shared is attention.value.shared
    assert shared.weight.shape[0] == sum(b.up.shape[1] for b in (attention.query, attention.key, attention.value))
    calls = []
    shared.register_forward_hook(lambda *args: calls.append(1))
    with torch.inference_mode():
        fast(**make_inputs(fast, 2, 6, torch.device("cpu")))
    assert len(calls) == 3  # three calls in this layer ...
    assert shared.__dict__.get("_cache") is None  # ... one product, dropped after the last consumer


def test_mid_staging_mix_rewrites_only_what_is_exact():
    # only the FFN input layers factorized (the rest dense), as in a checkpoint between stages
    model = model_with("monarch", None, targets=r"intermediate\.dense$")
    fast = optimize_for_inference(copy.deepcopy(model))
    assert fast.inference_rewrites == {"ffn_chunk_order": 2, "attention_chunk_order": 0, "shared_qkv_gemm": 2}
    assert type(fast.bert.encoder.layer[0].output.dense) is nn.Linear  # dense reader took the permutation
    inputs = make_inputs(model, 2, 7, torch.device("cpu"))
    torch.testing.assert_close(outputs(fast, inputs)[1], outputs(model, inputs)[1], atol=1e-5, rtol=1e-5)


def test_chunk_order_keeps_rows_inside_their_group():
    perm = chunk_order(out_block=6, nblocks=2, chunk=3)
    assert perm.tolist() == [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]
    assert torch.equal(perm.sort().values, torch.arange(12))
    assert ((perm // 6) == (torch.arange(12) // 6)).all()


def test_chunk_ordered_monarch_is_the_monarch_with_permuted_rows():
    torch.manual_seed(1)
    plain = MonarchLinear(32, 64, nblocks=4)
    chunked = ChunkOrderMonarchLinear.from_monarch(plain, chunk=4)
    x = torch.randn(5, 3, 32)
    perm = chunk_order(16, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), plain(x)[..., perm])
        torch.testing.assert_close(chunked(x), x @ chunked.to_dense().T + chunked.bias)


def test_permute_input_is_exact_for_every_reader_and_refuses_a_cross_block_permutation():
    torch.manual_seed(2)
    x = torch.randn(4, 32)
    within = torch.cat([torch.randperm(8) + 8 * j for j in range(4)])  # stays inside 8-column blocks
    for layer in (nn.Linear(32, 16), LowRankLinear(32, 16, rank=4), MonarchLinear(32, 16, nblocks=4)):
        with torch.no_grad():
            want = layer(x)
            assert permute_input(layer, within)
            torch.testing.assert_close(layer(x[:, within]), want)
    monarch = MonarchLinear(32, 16, nblocks=4)
    before = monarch.blocks_in.detach().clone()
    assert not permute_input(monarch, torch.arange(32).roll(1))  # crosses blocks: refused, untouched
    assert torch.equal(monarch.blocks_in, before)
