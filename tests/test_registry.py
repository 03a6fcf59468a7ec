"""Adding a structure is one class plus one registry line: a toy diagonal-plus-low-rank layer, defined only
here, goes through the contract, the budget rule, surgery, staging and a checkpoint round trip."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_factorize import CONTRACTS, Case
from torch import Tensor, nn

from lit_factor.compress.surgery import Plan, PlanError, apply_plan, build_plan, count_params, format_report
from lit_factor.compress.switchable import finalize, make_switchable
from lit_factor.factorize import METHODS, BudgetError, FactorizedLinear, ProjectionStats, fit_rank, truncated_factors
from lit_factor.models import load_model


def _diagonal(d: Tensor, m: int, n: int) -> Tensor:
    """The m x n matrix with ``d`` on its main diagonal."""
    return F.pad(torch.diag(d), (0, n - d.numel(), 0, m - d.numel()))


class DiagLowRankLinear(FactorizedLinear):
    """W ~= diag(d) + A B: r (m + n) + min(m, n) weights. Projection: alternating minimization of the
    Frobenius error over d (exact: the diagonal of the residual) and A B (exact: truncated SVD)."""

    method = "diaglowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank={rank} must be in 1..{min(in_features, out_features)}")
        self.rank = rank
        bound = (3.0 / (rank * in_features)) ** 0.25  # nn.Linear's output variance, as LowRankLinear
        self.diag = nn.Parameter(torch.zeros(min(in_features, out_features), device=device, dtype=dtype))
        self.down = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype).uniform_(-bound, bound))
        self.up = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        k = self.diag.numel()
        return F.linear(F.linear(x, self.down), self.up, self.bias) + F.pad(x[..., :k] * self.diag,
                                                                           (0, self.out_features - k))

    def to_dense(self) -> Tensor:
        return self.up @ self.down + _diagonal(self.diag, self.out_features, self.in_features)

    @torch.no_grad()
    def project_(self, weight: Tensor, init: str = "svd", stats: ProjectionStats | None = None) -> None:
        self.check_init(init, projection=True)
        w = weight.detach().to(torch.float64)
        d = torch.zeros(self.diag.numel(), dtype=w.dtype, device=w.device)
        for _ in range(500):
            a, b = truncated_factors(w - _diagonal(d, *w.shape), self.rank)
            d, previous = torch.diagonal(w - a @ b), d
            if (d - previous).norm() <= 1e-13 * w.norm():
                break
        a, b = truncated_factors(w - _diagonal(d, *w.shape), self.rank)
        self.diag.copy_(d)
        self.up.copy_(a)
        self.down.copy_(b)

    def structure(self) -> dict:
        return {"rank": self.rank}

    @staticmethod
    def param_count(out_features: int, in_features: int, rank: int) -> int:
        return rank * (out_features + in_features) + min(out_features, in_features)

    @classmethod
    def structure_for_budget(cls, out_features: int, in_features: int, budget: float, *, rank_multiple: int = 1,
                             nblocks: int = 4) -> dict:
        m, n = out_features, in_features
        return {"rank": fit_rank(m, n, budget - min(m, n) / (m * n), weights_per_rank=m + n, max_rank=min(m, n),
                                 rank_multiple=rank_multiple)}


TOY = Case(DiagLowRankLinear, lambda m, n: {"rank": min(m, n) // 4}, lambda m, n: {"rank": min(m, n)})
SHAPES = [(24, 40), (40, 24), (32, 32)]


@pytest.fixture
def registered(monkeypatch):
    """The one registry line, for the duration of a test."""
    monkeypatch.setitem(METHODS, DiagLowRankLinear.method, DiagLowRankLinear)


@pytest.mark.parametrize("contract", CONTRACTS, ids=[c.__name__ for c in CONTRACTS])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
def test_toy_structure_honours_the_contract(contract, shape):
    contract(TOY, *shape)


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    return load_model("random:tiny-bert", num_labels=2).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_unregistered_structure_is_refused(tiny_bert):
    with pytest.raises(PlanError, match="method='diaglowrank' is not one of"):
        build_plan(tiny_bert, "diaglowrank", 0.5)


@pytest.mark.usefixtures("registered")
def test_toy_plan_surgery_and_checkpoint_round_trip(tiny_bert):
    model = copy.deepcopy(tiny_bert)
    dense_params = count_params(model)
    plan = build_plan(model, "diaglowrank", 0.5)
    for entry in plan.entries:  # the toy's own budget rule made every structure
        m, n = entry.out_features, entry.in_features
        assert entry.structure == DiagLowRankLinear.structure_for_budget(m, n, 0.5)
    assert 0.5 - 0.1 < plan.kept_fraction <= 0.5
    errors = apply_plan(model, plan)
    assert set(errors) == set(plan.paths) and all(0 < e < 1 for e in errors.values())
    assert all(isinstance(model.get_submodule(p), DiagLowRankLinear) for p in plan.paths)
    assert count_params(model) == plan.factorized_model_params(dense_params)
    assert "diaglowrank" in format_report(model, plan, errors)

    restored = Plan.from_json(json.dumps(json.loads(plan.to_json())))
    assert restored == plan
    fresh = load_model("random:tiny-bert", num_labels=2).eval()  # other weights: all must come from the state
    apply_plan(fresh, restored, project=False)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(**_inputs()).logits, model(**_inputs()).logits, rtol=0, atol=0)


@pytest.mark.usefixtures("registered")
def test_toy_stages_like_the_built_in_structures(tiny_bert):
    model, reference = copy.deepcopy(tiny_bert), copy.deepcopy(tiny_bert)
    plan = build_plan(model, "diaglowrank", None, rank=2)
    errors = apply_plan(reference, plan)
    switches = make_switchable(model, plan)
    assert {path: s.switch_() for path, s in switches.items()} == pytest.approx(errors)
    finalize(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs()).logits, reference(**_inputs()).logits)


@pytest.mark.usefixtures("registered")
def test_toy_budget_rule_refuses_what_does_not_save(tiny_bert):
    m, n = 32, 32
    assert math.floor(0.05 * m * n) < m + n + min(m, n)  # not even rank 1 fits beside the diagonal
    with pytest.raises(BudgetError, match="leaves no rank"):
        DiagLowRankLinear.planned_structure(m, n, 0.05)
    with pytest.raises(BudgetError, match="would not save anything"):
        build_plan(tiny_bert, "diaglowrank", None, rank=32)


@pytest.mark.slow
def test_a_registered_structure_works_from_the_command_line(registered, glue_writer, tmp_path, monkeypatch):
    """No list of structures at the door: the YAML/command-line key takes what METHODS holds when it is parsed."""
    from lit_factor import cli

    monkeypatch.chdir(tmp_path)
    root = glue_writer("SST-2")
    run = cli.main(["fit", "--model.model_name_or_path", "random:tiny-bert", "--data.data_dir", str(root),
                    "--data.max_seq_length", "16", "--data.batch_size", "4", "--trainer.max_steps", "2",
                    "--trainer.enable_progress_bar", "false", "--model.factorization.method", "diaglowrank",
                    "--model.factorization.budget", "0.5", "--trainer.logger.init_args.save_dir", "logs"])
    layers = [m for m in run.model.modules() if isinstance(m, DiagLowRankLinear)]
    assert len(layers) == len(run.model.plan.entries) == 12 and run.model.plan.method == "diaglowrank"


def test_a_new_init_is_one_registry_entry(registered, monkeypatch):
    """A toy init that weighs both the inputs and the output rows (whitened and Fisher at once): registered in
    one line, accepted by the config, calibrated (activations and gradients) and projected by low rank; refused
    for the toy structure above, whose projection takes no weighted objective."""
    from test_compress import _fit, _module

    from lit_factor.compress.factorizer import ConfigError, Factorization, Factorizer
    from lit_factor.factorize import LowRankLinear, MonarchLinear
    from lit_factor.factorize.inits import INITS, Init

    monkeypatch.setitem(INITS, "both", Init("both", ("input_cov", "row_weights"), summary="toy"))
    assert "both" in LowRankLinear.inits() and "both" in MonarchLinear.inits()
    assert "both" not in DiagLowRankLinear.inits() and "svd" in DiagLowRankLinear.inits()
    with pytest.raises(ConfigError, match="init='both' is not one of svd, random for diaglowrank"):
        Factorization(method="diaglowrank", init="both")
    gathered = []
    real = Factorizer.statistics

    def spy(self, paths, batches, forward, statistics):
        stats = real(self, paths, batches, forward, statistics)
        gathered.append(stats[paths[0]])
        return stats
    monkeypatch.setattr(Factorizer, "statistics", spy)
    module = _module(init="both")
    _fit(module, steps=1)
    assert gathered[0].input_cov is not None and gathered[0].row_weights is not None
    assert len(module.rel_errors) == 12 and all(0 < e < 1 for e in module.rel_errors.values())
    plain = _module(init="svd")
    _fit(plain, steps=1)
    # the weighted objective moved the factors away from the plain SVD (a larger weight error)
    assert sum(module.rel_errors.values()) > sum(plain.rel_errors.values())
