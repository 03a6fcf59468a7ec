"""Data-aware truncated factors: the best rank-r approximation under an input second moment and/or row weights.

Plain truncated SVD (:func:`~lit_factor.factorize.base.truncated_factors`) minimizes the *weight* error
``||W - W'||_F``. A layer is only ever used on its inputs, so the error that matters is on its outputs:

* **whitened** (SVD-LLM, DRONE): minimize ``||(W - W') X^T||_F`` over calibration inputs X (one row per token),
  i.e. ``tr((W - W') C (W - W')^T)`` with the input second moment ``C = X^T X``;
* **Fisher-weighted** (FWSVD, Hsu et al. 2022): minimize ``||D (W - W')||_F`` with ``D = diag(sqrt(f))`` and
  ``f_i`` the empirical Fisher information of output row i (squared loss gradients of the row, summed);
* both at once: ``||D (W - W') S||_F`` with ``C = S S^T``.

Closed form, without inverting C. Write ``Y = D W S``. Any rank-r ``W'`` gives ``D W' S`` of rank <= r, so the
error is at least ``||Y - [Y]_r||`` (Eckart-Young). With ``U_r`` the top-r left singular vectors of Y,
``W' = D^-1 U_r U_r^T D W`` reaches that bound: ``D (W - W') S = (I - U_r U_r^T) Y``. So only the *left* singular
subspace of Y is needed, which exists whatever the rank of C: a rank-deficient second moment (fewer tokens than
features, dead inputs) never produces a NaN. It only makes the optimum non-unique along C's null space; this
choice keeps W's own component there (projected by ``U_r U_r^T``), so an input direction never seen in
calibration is not zeroed.

**Damping** (documented choice, default ``damping=0.01``): C is replaced by ``C + damping * mean(diag C) * I``
and f by ``f + damping * mean(f)``. The whitened objective becomes ``||(W - W') X^T||^2 + d ||W - W'||^2``: a
mix with plain SVD that keeps directions rare in a small calibration set from being discarded outright (they
may matter on other inputs), and keeps ``D^-1`` finite for rows whose Fisher weight is zero. ``damping=0``
gives the exact optimum (used by the tests). Negative eigenvalues of C from float round-off are clipped to 0.

All functions accept a batch of matrices (leading dimensions), as Monarch/block-wise use; all work in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_factor.factorize.inits import Init, get_init


def damped_second_moment(second_moment: Tensor, damping: float) -> Tensor:
    """Symmetrized float64 ``C + damping * mean(diag C) * I`` (an all-zero C becomes the identity)."""
    if damping < 0:
        raise ValueError(f"damping={damping} must be >= 0")
    c = second_moment.detach().to(torch.float64)
    c = (c + c.mT) / 2
    n = c.shape[-1]
    scale = c.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).unsqueeze(-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    return c + (damping * scale) * eye if damping > 0 else c


def damped_row_weights(row_weights: Tensor, damping: float) -> Tensor:
    """float64 ``f + damping * mean(f)`` (all-zero f becomes all ones), checked non-negative."""
    if damping < 0:
        raise ValueError(f"damping={damping} must be >= 0")
    f = row_weights.detach().to(torch.float64)
    if (f < 0).any() or not torch.isfinite(f).all():
        raise ValueError("row weights must be finite and >= 0 (they are sums of squared gradients)")
    mean = f.mean(-1, keepdim=True)
    f = torch.where(mean > 0, f, torch.ones_like(f))
    return f + damping * f.mean(-1, keepdim=True)


def input_sqrt(second_moment: Tensor) -> Tensor:
    """A square root S of C (``C = S S^T``) from its eigendecomposition, negative round-off clipped to 0."""
    evals, evecs = torch.linalg.eigh(second_moment)
    return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)


def left_basis(y: Tensor, rank: int) -> Tensor:
    """Orthonormal top-``rank`` left singular vectors of ``y`` (or of a batch), via the smaller Gram matrix.

    Orthonormalized by QR, so where y has rank < ``rank`` the missing columns are still unit vectors orthogonal
    to the rest (any such completion is optimal: those directions carry no energy of y).
    """
    m, n = y.shape[-2:]
    if m <= n:
        basis = torch.linalg.eigh(y @ y.mT)[1][..., -rank:].flip(-1)
    else:
        evals, evecs = torch.linalg.eigh(y.mT @ y)
        v, sigma = evecs[..., -rank:].flip(-1), evals[..., -rank:].flip(-1).clamp_min(0).sqrt()
        tiny = sigma.amax(-1, keepdim=True).clamp_min(1e-300) * 1e-12
        # Columns without energy are zeroed; Householder QR still returns orthonormal columns for them.
        basis = (y @ v) / sigma.clamp_min(1e-300).unsqueeze(-2) * (sigma > tiny).unsqueeze(-2)
    return torch.linalg.qr(basis)[0]


def weighted_factors(weight: Tensor, rank: int, second_moment: Tensor | None = None,
                     row_weights: Tensor | None = None, damping: float = 0.01) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors ``A @ B`` (float64) minimizing ``||D (W - A B) S||_F`` (see the module docstring).

    Args:
        weight: ``(..., m, n)`` matrix (nn.Linear orientation: out x in).
        second_moment: ``(..., n, n)`` input second moment C = X^T X, or None (S = I).
        row_weights: ``(..., m)`` Fisher row weights f, or None (D = I).
        damping: relative damping of C and f (see the module docstring).

    With neither C nor f this is plain truncated SVD. The factors are balanced like
    :func:`~lit_factor.factorize.base.truncated_factors` (row i of B and column i of A have equal norms),
    so with C proportional to I or f constant they equal its factors up to the signs of singular vectors.
    """
    w = weight.detach().to(torch.float64)
    m, n = w.shape[-2:]
    if rank < 1 or rank > min(m, n):
        raise ValueError(f"rank={rank} is outside 1..{min(m, n)} for a {m}x{n} matrix")
    d = None if row_weights is None else damped_row_weights(row_weights, damping).to(w.device).sqrt()
    dw = w if d is None else w * d.unsqueeze(-1)
    y = dw if second_moment is None else dw @ input_sqrt(damped_second_moment(second_moment, damping).to(w.device))
    u = left_basis(y, rank)  # (..., m, r)
    b = u.mT @ dw  # U_r^T D W
    a = u if d is None else u / d.unsqueeze(-1)  # D^-1 U_r
    # Balance: move sqrt of each B row's norm into A (for plain SVD that row norm is sigma_i).
    s = b.norm(dim=-1).clamp_min(1e-300).sqrt()
    return a * s.unsqueeze(-2), b / s.unsqueeze(-1)


def weighted_spectrum(weight: Tensor, second_moment: Tensor | None = None, row_weights: Tensor | None = None,
                      damping: float = 0.01) -> Tensor:
    """Squared singular values of ``Y = D W S``, descending: ``sum(spectrum[r:])`` is the error of the best
    rank-r approximation in the weighted objective (what rank allocation compares across layers)."""
    w = weight.detach().to(torch.float64)
    d = None if row_weights is None else damped_row_weights(row_weights, damping).to(w.device).sqrt()
    y = w if d is None else w * d.unsqueeze(-1)
    if second_moment is not None:
        y = y @ input_sqrt(damped_second_moment(second_moment, damping).to(w.device))
    m, n = y.shape[-2:]
    gram = y @ y.mT if m <= n else y.mT @ y
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)


def allocation_terms(init: str, allocation_statistics: tuple[str, ...], stats) -> dict:
    """What global rank allocation weighs a layer's spectrum by: the terms of its projection ``init``, plus the
    statistics the allocation itself declares (``fisher``: the Fisher row weights; see ``allocation.py``)."""
    terms = get_init(init).terms(stats)
    if allocation_statistics:
        terms.update(Init("allocation", tuple(allocation_statistics)).terms(stats))
    return terms
