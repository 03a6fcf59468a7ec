"""The one base class every structured replacement of ``nn.Linear`` derives from.

A :class:`FactorizedLinear` represents an ``out_features x in_features`` matrix W (same orientation as
``nn.Linear.weight``) by a few smaller parameter tensors. The contract every subclass honours, and which
``tests/test_factorize.py`` checks for all registered structures alike (``tests/test_registry.py`` runs the same
checks on a toy structure):

* ``forward(x) == x @ to_dense().T + bias`` for inputs of any leading shape;
* ``from_linear(linear, init, stats, **structure)`` projects a dense layer onto the structure (best approximation
  the structure allows) and keeps its bias, dtype and device;
* at full structure the projection reconstructs W to float tolerance;
* ``num_params`` equals both the closed-form ``param_count(...)`` plus the bias and the real number of parameters.

A structure is one subclass implementing ``__init__`` (its parameters), ``forward``, ``to_dense``, ``structure``,
``project_``, ``param_count`` (its formula) and ``structure_for_budget`` (its budget rule), plus one line in
``lit_factor.factorize.METHODS``; it overrides ``default_structure`` when it has a default without a budget.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_factor.factorize.budget import BudgetError, check_budget, check_saves
from lit_factor.factorize.inits import INITS, get_init


@dataclass
class ProjectionStats:
    """What a data-aware projection knows about the layer beyond its weight (``None``: not gathered).

    Attributes:
        input_cov: ``in x in`` second moment E[x x^T] of the layer's inputs over calibration data.
        row_weights: ``out`` non-negative importance of each output row (e.g. Fisher information).
    """

    input_cov: Tensor | None = None
    row_weights: Tensor | None = None


class FactorizedLinear(nn.Module, ABC):
    """Drop-in replacement for ``nn.Linear`` whose weight is stored in factorized form."""

    #: short name used in plans and configs ("lowrank", "monarch", "blockwise"); the key in ``METHODS``
    method: str = ""
    #: whether :meth:`project_` minimizes the weighted objectives of data-aware inits (see
    #: :mod:`lit_factor.factorize.inits`); without it the structure takes only the data-free inits.
    WEIGHTED_PROJECTION: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    # --- the template: the same for every structure -----------------------------------------------------
    @classmethod
    def inits(cls) -> tuple[str, ...]:
        """The registered inits this structure takes: every data-free one, the data-aware ones only with
        :attr:`WEIGHTED_PROJECTION` (read at call time: an init registered later is included)."""
        return tuple(name for name, init in INITS.items() if cls.WEIGHTED_PROJECTION or not init.data_aware)

    @classmethod
    def check_init(cls, init: str, projection: bool = False) -> None:
        """Refuse an ``init`` this structure does not implement (``projection=True``: a non-projecting one too)."""
        allowed = [i for i in cls.inits() if not (projection and not INITS[i].projects)]
        if init not in allowed:
            raise ValueError(f"init={init!r} is not one of {', '.join(map(repr, allowed))} for {cls.method}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, init: str = "svd", stats: ProjectionStats | None = None,
                    **structure) -> FactorizedLinear:
        """A layer of this structure for ``linear``: its weight projected (``init`` names the projection,
        ``stats`` feeds a data-aware one) and its bias copied, or with a random init when ``init="random"``
        (bias included: the from-scratch baseline). Same dtype and device as ``linear``."""
        cls.check_init(init)
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device=w.device, dtype=w.dtype, **structure)
        if get_init(init).projects:
            layer.project_(w, init=init, stats=stats)
            if layer.bias is not None:
                with torch.no_grad():
                    layer.bias.copy_(linear.bias)
        return layer

    # --- what every structure provides -------------------------------------------------------------------
    @abstractmethod
    def project_(self, weight: Tensor, init: str = "svd", stats: ProjectionStats | None = None) -> None:
        """Set the factors in place (same ``Parameter`` objects) to the best approximation of ``weight`` this
        structure allows under projection ``init`` (a projecting one of :meth:`inits`). Leaves the bias."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The ``out_features x in_features`` matrix this layer represents (without bias)."""

    @abstractmethod
    def structure(self) -> dict:
        """The keyword arguments that rebuild this structure (``rank``, ``nblocks`` ...); JSON-serializable."""

    @staticmethod
    @abstractmethod
    def param_count(out_features: int, in_features: int, **structure) -> int:
        """Weight parameters (no bias) of this structure for an ``out x in`` matrix, by formula."""

    @classmethod
    @abstractmethod
    def structure_for_budget(cls, out_features: int, in_features: int, budget: float, *, rank_multiple: int = 1,
                             nblocks: int = 4) -> dict:
        """The structure keeping at most ``budget`` of the ``out x in`` weights and within one step of it
        (ranks rounded down to ``rank_multiple``); a ``BudgetError`` when none saves anything."""

    @classmethod
    def default_structure(cls, out_features: int, in_features: int, *, rank: int | None = None,
                          nblocks: int = 4) -> dict:
        """The structure when no budget is given. Here: the given ``rank``, and no default (the rank is the
        whole trade-off, so it is asked for); a structure with a sensible default overrides this."""
        if rank is None:
            raise BudgetError(f"method={cls.method!r} needs a budget in (0, 1] or a rank")
        return {"rank": rank}

    # --- shared by all ------------------------------------------------------------------------------------
    @classmethod
    def planned_structure(cls, out_features: int, in_features: int, budget: float | None = None, *,
                          rank: int | None = None, nblocks: int = 4, rank_multiple: int = 1) -> dict:
        """The structure a plan gives an ``out x in`` layer: by ``budget`` (:meth:`structure_for_budget`) or,
        without one, :meth:`default_structure`; refused (``BudgetError``) unless it saves weights."""
        if budget is not None:
            check_budget(budget, rank_multiple)
            structure = cls.structure_for_budget(out_features, in_features, budget, rank_multiple=rank_multiple,
                                                 nblocks=nblocks)
        else:
            structure = cls.default_structure(out_features, in_features, rank=rank, nblocks=nblocks)
        check_saves(cls, out_features, in_features, **structure)
        return structure

    # --- global rank allocation (lit_factor.factorize.allocation): structures with a rank implement these ---
    @property
    def weights_per_rank(self) -> int:
        """Weights one more unit of ``rank`` costs."""
        raise ValueError(f"method={self.method!r} has no rank to allocate: use allocation=uniform")

    def rank_spectrum(self, weight: Tensor, terms: dict) -> Tensor:
        """Squared singular values, per unit of rank and descending, of what :meth:`project_` truncates
        (``terms``: the ``second_moment`` / ``row_weights`` of ``datawise.weighted_spectrum``)."""
        raise ValueError(f"method={self.method!r} has no rank to allocate: use allocation=uniform")

    @property
    def weight_params(self) -> int:
        return self.param_count(self.out_features, self.in_features, **self.structure())

    @property
    def num_params(self) -> int:
        """Weight parameters by formula plus the bias."""
        return self.weight_params + (self.out_features if self.bias is not None else 0)

    @property
    def macs_per_token(self) -> int:
        """Multiply-adds for one input vector. Each factor entry is used exactly once per token."""
        return self.weight_params

    @property
    def weight(self) -> Tensor:
        """A read-only snapshot of the dense matrix (no gradient flows through it; use ``to_dense()`` for that).

        Exists because model code written for ``nn.Linear`` reads ``.weight``: HF T5's feed-forward reads
        ``wo.weight.dtype`` on every call. Rebuilding the matrix on each read would dominate factorized T5's
        latency, so the snapshot is cached until a factor changes (in-place optimizer steps bump the version
        counters). The cache costs one dense matrix of memory, and only for layers whose ``.weight`` is read.
        """
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        cached = self.__dict__.get("_dense_snapshot")  # a plain attribute: never in the state_dict
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.to_dense().detach())
            self.__dict__["_dense_snapshot"] = cached
        return cached[1]

    def to_linear(self) -> nn.Linear:
        """Materialise the dense ``nn.Linear`` this layer represents (for comparison and export)."""
        ref = self.to_dense()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            linear.weight.copy_(ref)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        dense = self.out_features * self.in_features
        args = ", ".join(f"{k}={v}" for k, v in self.structure().items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, {args}, "
                f"bias={self.bias is not None}, kept={self.weight_params / dense:.1%} of {dense:,} weights")


def truncated_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors (Eckart-Young) of one matrix or a batch: ``A @ B`` with A = U_r sqrt(S_r),
    B = sqrt(S_r) V_r^T, returned in float64.

    Why not ``torch.linalg.svd``: a full float64 SVD of every matrix of a BERT-base-sized model is slow on CPUs.
    The eigendecomposition of the smaller Gram matrix (W W^T or W^T W) in float64 gives the same top singular
    subspace several times faster (``benchmarks/projection.py --reference`` measures both; numbers in
    ``benchmarks/results/``). A @ B = U_r U_r^T W is the orthogonal projection onto that subspace, so it stays the
    optimal rank-r approximation even where trailing singular values are tiny (their 1/sqrt is clamped).
    """
    w = weight.detach().to(torch.float64)
    m, n = w.shape[-2:]
    if rank < 1 or rank > min(m, n):
        raise ValueError(f"rank={rank} is outside 1..{min(m, n)} for a {m}x{n} matrix")
    wide = m <= n
    gram = w @ w.mT if wide else w.mT @ w
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    basis = evecs[..., -rank:].flip(-1)  # top singular vectors: U_r if wide, else V_r
    sigma = evals[..., -rank:].flip(-1).clamp_min(0).sqrt()
    tiny = sigma.amax(-1, keepdim=True).clamp_min(1e-300) * 1e-12
    inv_sqrt = torch.where(sigma > tiny, sigma.clamp_min(1e-300).rsqrt(), torch.zeros_like(sigma))
    if wide:
        a = basis * sigma.sqrt().unsqueeze(-2)  # U_r sqrt(S)
        b = (basis.mT @ w) * inv_sqrt.unsqueeze(-1)  # S^-1/2 U_r^T W = sqrt(S) V_r^T
    else:
        a = (w @ basis) * inv_sqrt.unsqueeze(-2)  # W V_r S^-1/2 = U_r sqrt(S)
        b = basis.mT * sigma.sqrt().unsqueeze(-1)
    return a, b
