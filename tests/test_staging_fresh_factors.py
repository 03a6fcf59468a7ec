"""Staged factorization at a small budget collapses (studies claim2-harsh-*: staged Monarch 10 % ended at the
majority class in 10 of 10 runs, all at once trained in 5 of 5). Is it a defect of how a layer switches mid-run?

The suspects are the optimizer state of the new factors (stale Adam moments, a wrong bias-correction step, weight
decay applied while they were unused) and the learning rate they get. This test pins the mechanics down: a layer
switched after k optimizer steps gets, at its first step, exactly the update a brand-new AdamW at the current
learning rate gives the same projected factors (no state carried over, bias correction from step 1), and the
factors are untouched (not even decayed) before the switch. What the collapse is instead -- too little training
left after the last stage (studies claim2-collapse and claim2-collapse-control: all at once given only that
remainder collapses too, the staged schedule run twice as long trains) -- is in docs/guide.md, "When staging
collapses".
"""

import copy

import pytest
import torch

from lit_factor.compress.surgery import build_plan
from lit_factor.compress.switchable import SwitchableLinear


@pytest.mark.parametrize("method", ["lowrank", "monarch"])
def test_a_factor_switched_at_step_k_starts_like_a_fresh_adamw(method):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    entry = build_plan(net, method, 0.25, targets=["0"]).entries[0]
    layer = SwitchableLinear(net[0], entry)
    net[0] = layer
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 20)
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        sched.step()

    untouched = [p.detach().clone() for p in layer.factorized.parameters() if p is not layer.dense.bias]
    for _ in range(5):  # dense fine-tuning before the stage
        step()
    factors = [p for p in layer.factorized.parameters() if p is not layer.dense.bias]
    assert all(torch.equal(a, b) for a, b in zip(untouched, factors, strict=True))  # no update, no decay
    assert all(p not in opt.state for p in factors)

    layer.switch_()
    projected = [p.detach().clone() for p in factors]
    lr = sched.get_last_lr()[0]
    # the reference: the same projected factors, a brand-new AdamW at the current lr, the same gradient
    twin = copy.deepcopy(net)
    twin_factors = [p for p in twin[0].factorized.parameters() if p is not twin[0].dense.bias]
    fresh = torch.optim.AdamW(twin_factors, lr=lr, weight_decay=0.1)
    torch.nn.functional.cross_entropy(twin(x), y).backward()
    fresh.step()

    step()
    for got, want, before in zip(factors, twin_factors, projected, strict=True):
        assert not torch.equal(got, before)  # the factors train from their first step
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert all(opt.state[p]["step"] == 1 for p in factors)
    assert layer.dense.weight not in opt.state or opt.state[layer.dense.weight]["step"] == 5
