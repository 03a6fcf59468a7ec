"""Low-rank linear layer: W (m x n) ~= A B with A (m x r) and B (r x n); r (m + n) parameters."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_factor.factorize.base import FactorizedLinear, ProjectionStats, truncated_factors
from lit_factor.factorize.budget import fit_rank
from lit_factor.factorize.datawise import weighted_factors, weighted_spectrum
from lit_factor.factorize.inits import get_init


class LowRankLinear(FactorizedLinear):
    """``y = A (B x) + b``. Projection from dense is the truncated SVD (Eckart-Young optimal)."""

    method = "lowrank"
    WEIGHTED_PROJECTION = True

    #: Inference fast path. On these devices, with autograd off, a rank that is not a multiple of
    #: ``pad_rank_to`` runs on zero-padded copies of the factors (cached; rebuilt when the factors change).
    #: Same math -- the zero rows/columns add nothing -- but GPU bf16/fp16 GEMMs whose dimensions are not
    #: multiples of 8 elements fall off the tensor-core kernels and can run slower than the dense layer; why, and
    #: the measurements behind the default of 64, are in docs/speed.md. ``pad_rank_to = 0`` turns it off. Not
    #: used under torch.compile, which pads GEMMs itself.
    pad_rank_to: int = 64
    pad_rank_devices: tuple[str, ...] = ("cuda",)

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank={rank} must be in 1..{min(in_features, out_features)} "
                             f"for a {out_features}x{in_features} layer")
        self.rank = rank
        # Named by role: `down` maps the input to the rank-r bottleneck, `up` maps back out.
        self.down = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))  # B = sqrt(S) V^T
        self.up = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))  # A = U sqrt(S)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init whose product has the variance of nn.Linear's default init (the paper's baseline)."""
        # nn.Linear draws W ~ U(+-1/sqrt(n)), var 1/(3n). With A,B ~ U(+-a): var(AB) = r a^4 / 9 -> a^4 = 3/(r n).
        bound = (3.0 / (self.rank * self.in_features)) ** 0.25
        nn.init.uniform_(self.down, -bound, bound)
        nn.init.uniform_(self.up, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))

    @torch.no_grad()
    def project_(self, weight: Tensor, init: str = "svd", stats: ProjectionStats | None = None) -> None:
        """The best rank-r approximation of ``weight``: ``svd`` in weight error (Eckart-Young); ``whitened`` in
        activation error ``||(W - W') X^T||`` over the calibration inputs (``stats.input_cov``); ``fisher`` in
        Fisher-weighted error ``||diag(sqrt f) (W - W')||`` (``stats.row_weights``). See ``datawise.py``."""
        self.check_init(init, projection=True)
        terms = get_init(init).terms(stats)
        if not terms:
            a, b = truncated_factors(weight, self.rank)
        else:
            a, b = weighted_factors(weight, self.rank, **terms)
        self.up.copy_(a)
        self.down.copy_(b)

    def forward(self, x: Tensor) -> Tensor:
        down, up = self._padded_factors() if self._pads_rank(x) else (self.down, self.up)
        return F.linear(F.linear(x, down), up, self.bias)

    def _pads_rank(self, x: Tensor) -> bool:
        multiple = self.pad_rank_to
        return (multiple > 1 and self.rank % multiple != 0 and x.device.type in self.pad_rank_devices
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling())

    def _padded_factors(self) -> tuple[Tensor, Tensor]:
        """``down`` with zero rows and ``up`` with zero columns up to the next multiple of ``pad_rank_to``."""
        key = (self.down._version, self.up._version, self.down.data_ptr(), self.up.data_ptr(),
               self.down.dtype, self.pad_rank_to)
        cached = self.__dict__.get("_padded")  # a plain attribute: never in the state_dict
        if cached is None or cached[0] != key:
            extra = -self.rank % self.pad_rank_to
            with torch.no_grad():
                cached = (key, F.pad(self.down, (0, 0, 0, extra)), F.pad(self.up, (0, extra)))
            self.__dict__["_padded"] = cached
        return cached[1], cached[2]

    def to_dense(self) -> Tensor:
        return self.up @ self.down

    @property
    def weights_per_rank(self) -> int:
        return self.in_features + self.out_features

    def rank_spectrum(self, weight: Tensor, terms: dict) -> Tensor:
        return weighted_spectrum(weight, **terms)

    @staticmethod
    def param_count(out_features: int, in_features: int, rank: int) -> int:
        return rank * (out_features + in_features)

    @classmethod
    def structure_for_budget(cls, out_features: int, in_features: int, budget: float, *, rank_multiple: int = 1,
                             nblocks: int = 4) -> dict:
        """r (m + n) <= f m n  ->  r = floor(f m n / (m + n)), rounded down to ``rank_multiple``."""
        return {"rank": fit_rank(out_features, in_features, budget, weights_per_rank=out_features + in_features,
                                 max_rank=min(out_features, in_features), rank_multiple=rank_multiple,
                                 hint="use a larger budget or a smaller rank_multiple")}

    def structure(self) -> dict:
        return {"rank": self.rank}
