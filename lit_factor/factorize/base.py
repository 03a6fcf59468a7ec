"""The one base class every structured replacement of ``nn.Linear`` derives from.

A :class:`FactorizedLinear` represents an ``out_features x in_features`` matrix W (same orientation as
``nn.Linear.weight``) by a few smaller parameter tensors. The contract every subclass honours, and which
``tests/factorize`` checks for all of them alike:

* ``forward(x) == x @ to_dense().T + bias`` for inputs of any leading shape;
* ``from_linear(linear, **structure)`` projects a dense layer onto the structure (best approximation the
  structure allows) and keeps its bias, dtype and device;
* at full structure the projection reconstructs W to float tolerance;
* ``num_params`` equals both the closed-form ``param_count(...)`` and the real number of parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


class FactorizedLinear(nn.Module, ABC):
    """Drop-in replacement for ``nn.Linear`` whose weight is stored in factorized form."""

    #: short name used in plans and configs ("lowrank", "monarch", "blockwise")
    method: str = ""

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

    # --- what every structure provides -------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_linear(cls, linear: nn.Linear, **structure) -> FactorizedLinear:
        """Project ``linear.weight`` onto this structure; copy the bias."""

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The ``out_features x in_features`` matrix this layer represents (without bias)."""

    @staticmethod
    @abstractmethod
    def param_count(out_features: int, in_features: int, **structure) -> int:
        """Weight parameters (no bias) of this structure for an ``out x in`` matrix, by formula."""

    @abstractmethod
    def structure(self) -> dict:
        """The keyword arguments that rebuild this structure (``rank``, ``nblocks`` ...); JSON-serializable."""

    # --- shared by all ------------------------------------------------------------------------------------
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

    def _copy_bias(self, linear: nn.Linear) -> None:
        if self.bias is not None and linear.bias is not None:
            with torch.no_grad():
                self.bias.copy_(linear.bias)

    def extra_repr(self) -> str:
        dense = self.out_features * self.in_features
        args = ", ".join(f"{k}={v}" for k, v in self.structure().items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, {args}, "
                f"bias={self.bias is not None}, kept={self.weight_params / dense:.1%} of {dense:,} weights")


def truncated_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors (Eckart-Young) of one matrix or a batch: ``A @ B`` with A = U_r sqrt(S_r),
    B = sqrt(S_r) V_r^T, returned in float64.

    Why not ``torch.linalg.svd``: a full float64 SVD of every BERT-base matrix takes ~25 s on two cores. The
    eigendecomposition of the smaller Gram matrix (W W^T or W^T W) in float64 gives the same top singular
    subspace 3x faster. A @ B = U_r U_r^T W is the orthogonal projection onto that subspace, so it stays the
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
