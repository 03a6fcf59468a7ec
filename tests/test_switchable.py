"""SwitchableLinear / make_switchable / finalize: the surgery floor of staged factorization (pure torch)."""

import copy

import pytest
import torch

from lit_factor.compress.surgery import PlanError, apply_plan, build_plan, count_params, format_report
from lit_factor.compress.switchable import SwitchableLinear, finalize, find_switchable, make_switchable
from lit_factor.models import load_model

METHODS = ["lowrank", "monarch", "blockwise"]



@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    model = load_model("random:tiny-bert")
    model.eval()
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (3, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("method", METHODS)
def test_switch_matches_apply_plan(dense, method):
    model = copy.deepcopy(dense)
    plan = build_plan(model, method, 0.5)
    x = _inputs()
    before = model(**x).logits
    switches = make_switchable(model, plan)
    assert list(switches) == plan.paths
    assert torch.equal(model(**x).logits, before)  # dense path live: nothing changed yet

    reference = copy.deepcopy(dense)
    errors = apply_plan(reference, plan)
    got = {path: s.switch_() for path, s in switches.items()}
    assert got == pytest.approx(errors)
    assert all(s.is_switched and bool(s.switched) for s in switches.values())
    torch.testing.assert_close(model(**x).logits, reference(**x).logits)


def test_bias_is_shared_and_listed_once(dense):
    model = copy.deepcopy(dense)
    switches = make_switchable(model, build_plan(model, "lowrank", 0.5))
    s = next(iter(switches.values()))
    assert s.factorized.bias is s.dense.bias
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(id(p) for p in model.parameters()))
    assert not any(n.endswith("factorized.bias") for n in names)


def test_gradients_follow_the_live_path(dense):
    model = copy.deepcopy(dense)
    switches = make_switchable(model, build_plan(model, "lowrank", 0.5))
    first, second = list(switches.values())[:2]
    first.dense.weight.grad = torch.ones_like(first.dense.weight)  # a stale gradient, e.g. mid-accumulation
    first.switch_()
    assert first.dense.weight.grad is None
    model(**_inputs()).logits.sum().backward()
    assert first.dense.weight.grad is None
    assert first.factorized.up.grad is not None and first.factorized.down.grad is not None
    assert first.dense.bias.grad is not None  # shared bias keeps training
    assert second.dense.weight.grad is not None and second.factorized.up.grad is None
    assert {id(p) for p in first.replaced_parameters()} == {id(first.dense.weight)}
    assert first.live_params == first.factorized.num_params


def test_state_dict_restores_flags_and_weights(dense):
    model = copy.deepcopy(dense)
    plan = build_plan(model, "monarch", 0.5)
    switches = make_switchable(model, plan)
    for s in list(switches.values())[:5]:
        s.switch_()
    state = model.state_dict()
    x = _inputs()
    expected = model(**x).logits

    fresh = load_model("random:tiny-bert")
    fresh.eval()
    restored = make_switchable(fresh, plan)
    fresh.load_state_dict(state)
    assert [s.is_switched for s in restored.values()] == [i < 5 for i in range(len(plan.entries))]
    torch.testing.assert_close(fresh(**x).logits, expected, rtol=0, atol=0)
    # idempotent: a second call (configure_model, then on_load_checkpoint) keeps the same modules
    assert make_switchable(fresh, plan) == restored


def test_finalize_gives_the_plan_architecture(dense):
    model = copy.deepcopy(dense)
    plan = build_plan(model, "blockwise", 0.5)
    switches = make_switchable(model, plan)
    x = _inputs()
    with pytest.raises(PlanError, match="never switched"):
        finalize(copy.deepcopy(model))
    for s in switches.values():
        s.switch_()
    expected = model(**x).logits
    assert set(finalize(model).values()) == {"factorized"}
    assert not find_switchable(model)
    shells = copy.deepcopy(dense)
    apply_plan(shells, plan, project=False)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in shells.state_dict().items()}
    torch.testing.assert_close(model(**x).logits, expected, rtol=0, atol=0)


def test_finalize_partial_keeps_dense(dense):
    model = copy.deepcopy(dense)
    switches = make_switchable(model, build_plan(model, "lowrank", 0.5))
    list(switches.values())[0].switch_()
    kinds = finalize(model, strict=False)
    assert list(kinds.values()).count("factorized") == 1
    assert isinstance(model.get_submodule(list(kinds)[1]), torch.nn.Linear)


def test_random_init_entries_keep_their_factors(dense):
    model = copy.deepcopy(dense)
    switches = make_switchable(model, build_plan(model, "lowrank", 0.5, init="random"))
    s = next(iter(switches.values()))
    up = s.factorized.up.detach().clone()
    assert s.switch_() is None
    assert torch.equal(s.factorized.up, up)
    with pytest.raises(RuntimeError, match="already switched"):
        s.switch_()


def test_bad_plan_entry_is_refused(dense):
    model = copy.deepcopy(dense)
    plan = build_plan(model, "lowrank", 0.5)
    plan.entries[0].path = "bert.encoder.layer.9.output.dense"
    with pytest.raises(PlanError, match="not a module"):
        make_switchable(model, plan)
    assert not isinstance(model.get_submodule(plan.entries[1].path), SwitchableLinear)


def test_staged_report_gives_the_final_architecture(dense):
    """Switchable layers hold dense weights and factors: the report counts what remains once all have switched."""
    model = copy.deepcopy(dense)
    dense_params = count_params(model)
    plan = build_plan(model, "lowrank", 0.5)
    make_switchable(model, plan)
    final = plan.factorized_model_params(dense_params)
    line = (f"whole model params: {dense_params:,} -> {final:,} ({final / dense_params:.1%}) "
            "once every stage has switched")
    assert line in format_report(model, plan, staged=True).splitlines()
    assert line in format_report(model, plan, dense_model_params=dense_params, staged=True).splitlines()
    assert "once every stage" not in format_report(model, plan)
