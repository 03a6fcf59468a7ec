"""Data-aware projections: whitened (activation error) and Fisher-weighted truncated factors."""

from __future__ import annotations

import pytest
import torch

from lit_factor.factorize.base import truncated_factors
from lit_factor.factorize.datawise import weighted_factors, weighted_spectrum


def _correlated_inputs(n_tokens: int, n: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a strongly non-white covariance (a few dominant, mixed directions)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64)
    scales = torch.logspace(1, -2, n, dtype=torch.float64)
    return torch.randn(n_tokens, n, generator=g, dtype=torch.float64) * scales @ mix


def _activation_error(w, approx, x):
    return ((w - approx) @ x.T).norm().item()


@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
def test_white_inputs_give_plain_svd(shape):
    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a0, b0 = truncated_factors(w, 3)
    for damping in (0.0, 0.01):
        a, b = weighted_factors(w, 3, second_moment=4.0 * torch.eye(shape[1]), damping=damping)
        torch.testing.assert_close(a @ b, a0 @ b0)
        torch.testing.assert_close(a.abs(), a0.abs())  # same balanced factors, up to singular-vector signs


@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
def test_whitened_beats_svd_on_correlated_inputs(shape):
    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = _correlated_inputs(200, shape[1])
    a0, b0 = truncated_factors(w, 2)
    a, b = weighted_factors(w, 2, second_moment=x.T @ x, damping=0.0)
    assert _activation_error(w, a @ b, x) < 0.9 * _activation_error(w, a0 @ b0, x)


def test_whitened_matches_brute_force_optimum():
    torch.manual_seed(3)
    w = torch.randn(5, 4, dtype=torch.float64)
    x = _correlated_inputs(50, 4, seed=3)
    a, b = weighted_factors(w, 2, second_moment=x.T @ x, damping=0.0)
    ours = _activation_error(w, a @ b, x)
    # Independent closed form for invertible C: W' = [W S]_2 S^-1 via a full SVD.
    s = torch.linalg.cholesky(x.T @ x)
    u, sig, vh = torch.linalg.svd(w @ s)
    closed = (u[:, :2] * sig[:2]) @ vh[:2] @ torch.linalg.inv(s)
    assert ours == pytest.approx(_activation_error(w, closed, x), rel=1e-8)
    # Brute force: the best of several L-BFGS runs from random factors.
    best = float("inf")
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        fa = torch.randn(5, 2, dtype=torch.float64, generator=g).requires_grad_()
        fb = torch.randn(2, 4, dtype=torch.float64, generator=g).requires_grad_()
        opt = torch.optim.LBFGS([fa, fb], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                                line_search_fn="strong_wolfe")

        def closure(opt=opt, fa=fa, fb=fb):
            opt.zero_grad()
            loss = ((w - fa @ fb) @ x.T).pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        best = min(best, _activation_error(w, (fa @ fb).detach(), x))
    assert ours <= best * (1 + 1e-6)
    assert ours == pytest.approx(best, rel=1e-4)


@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_rank_deficient_second_moment(shape, damping):
    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x = _correlated_inputs(2, shape[1])  # 2 tokens: C has rank 2 < n
    x[:, 0] = 0  # and a dead input feature
    c = x.T @ x
    a, b = weighted_factors(w, 4, second_moment=c, damping=damping)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    if damping == 0:  # rank 4 >= rank of C = 2: the activations are reproduced exactly
        assert _activation_error(w, a @ b, x) < 1e-8 * w.norm().item() * x.norm().item()
    a, b = weighted_factors(w, 3, second_moment=torch.zeros(shape[1], shape[1]), damping=damping)
    assert torch.isfinite(a @ b).all()


def test_fisher_uniform_weights_give_plain_svd():
    w = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a0, b0 = truncated_factors(w, 2)
    a, b = weighted_factors(w, 2, row_weights=torch.full((7,), 3.0))
    torch.testing.assert_close(a @ b, a0 @ b0)


def test_fisher_weights_favour_important_rows():
    w = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    f = torch.tensor([100.0, 1, 1, 1, 1, 1, 0])  # a zero weight must not break D^-1
    a0, b0 = truncated_factors(w, 2)
    a, b = weighted_factors(w, 2, row_weights=f)
    assert torch.isfinite(a).all()
    weighted = lambda approx: ((w - approx) * f.sqrt().unsqueeze(-1).double()).norm()  # noqa: E731
    assert weighted(a @ b) < weighted(a0 @ b0)
    assert (w - a @ b)[0].norm() < (w - a0 @ b0)[0].norm()


def test_batched_and_spectrum():
    w = torch.randn(3, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    c = torch.stack([(x.T @ x) for x in (_correlated_inputs(30, 4, seed=s) for s in range(3))])
    a, b = weighted_factors(w, 2, second_moment=c, damping=0.0)
    for k in range(3):
        ak, bk = weighted_factors(w[k], 2, second_moment=c[k], damping=0.0)
        torch.testing.assert_close(a[k] @ b[k], ak @ bk)
        spec = weighted_spectrum(w[k], c[k], damping=0.0)
        # the tail of the spectrum is the optimal error: ||(W - W') S||^2 = ||(W - W') X^T||^2
        err = ((w[k] - ak @ bk) @ torch.linalg.cholesky(c[k])).pow(2).sum()
        torch.testing.assert_close(spec[2:].sum(), err)


def test_bad_arguments():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match="rank=4"):
        weighted_factors(w, 4)
    with pytest.raises(ValueError, match="damping"):
        weighted_factors(w, 1, second_moment=torch.eye(3), damping=-1)
    with pytest.raises(ValueError, match="row weights"):
        weighted_factors(w, 1, row_weights=torch.tensor([1.0, -1, 0, 0]))


# --- every structure: the data-aware inits plugged into project_ -------------------------------------------
def _structures():
    from lit_factor.factorize import METHODS

    return [(cls, {"rank": 3} if name == "lowrank" else {"nblocks": 2, "rank": 2}) for name, cls in METHODS.items()]


@pytest.mark.parametrize("cls, structure", _structures())
def test_structures_project_by_every_init(cls, structure):
    from lit_factor.factorize import ProjectionStats

    torch.manual_seed(8)
    linear = torch.nn.Linear(9, 11)  # odd sizes: blocks are padded
    x = _correlated_inputs(300, 9, seed=8)
    f = torch.rand(11, dtype=torch.float64) ** 4
    stats = ProjectionStats(input_cov=x.T @ x / 300, row_weights=f)
    w = linear.weight.detach().double()
    dense = {init: cls.from_linear(linear, init=init, stats=stats, **structure).to_dense().detach().double()
             for init in ("svd", "whitened", "fisher")}
    act = {k: ((w - d) @ x.T).norm() for k, d in dense.items()}
    fish = {k: ((w - d) * f.sqrt().unsqueeze(-1)).norm() for k, d in dense.items()}
    assert act["whitened"] < act["svd"] and fish["fisher"] < fish["svd"]
    white = ProjectionStats(input_cov=2 * torch.eye(9, dtype=torch.float64), row_weights=torch.ones(11))
    for init in ("whitened", "fisher"):  # uninformative statistics: the plain SVD projection
        d = cls.from_linear(linear, init=init, stats=white, **structure).to_dense()
        torch.testing.assert_close(d.double(), dense["svd"], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="init='whitened' needs calibration statistics"):
        cls.from_linear(linear, init="whitened", **structure)
