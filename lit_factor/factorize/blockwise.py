"""Block-wise low-rank layer: W split into a b x b grid of blocks, each of rank R.

Stored as two batched block-diagonal products, the same layout Monarch uses (see ``monarch.py``):

    x (n) --pad--> b input blocks of p --[blocks_in: b blocks, (b R) x p]--> b x b x R values
          --regroup by output block--> b x (b R) --[blocks_out: b blocks, q x (b R)]--> b output blocks of q

so block (i, j) of W is ``blocks_out[i][:, jR:(j+1)R] @ blocks_in[j][iR:(i+1)R, :]``: b R (m + n) params
(b^2 R (p + q) with p = ceil(n/b), q = ceil(m/b) once padded). Here output block i is the contiguous rows
i q .. (i+1) q - 1; :class:`~lit_factor.factorize.monarch.MonarchLinear` only changes that row order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_factor.factorize.allocation import block_step_spectrum
from lit_factor.factorize.base import FactorizedLinear, ProjectionStats, truncated_factors
from lit_factor.factorize.budget import BudgetError, fit_rank
from lit_factor.factorize.datawise import weighted_factors, weighted_spectrum
from lit_factor.factorize.inits import get_init


class BlockLowRankLinear(FactorizedLinear):
    """b x b grid of contiguous blocks, each a rank-R product. Projection: rank-R SVD of every block."""

    method = "blockwise"
    WEIGHTED_PROJECTION = True

    def __init__(self, in_features: int, out_features: int, nblocks: int, rank: int | None = None,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.nblocks = b = self._check_nblocks(out_features, in_features, nblocks)
        self.in_block = p = math.ceil(in_features / b)
        self.out_block = q = math.ceil(out_features / b)
        if rank is None:
            rank = self.default_rank(out_features, in_features, b)
        if not 1 <= rank <= min(p, q):
            raise ValueError(f"rank={rank} must be in 1..{min(p, q)} (the size of a {q}x{p} block) "
                             f"for nblocks={b}")
        self.rank = rank
        self.blocks_in = nn.Parameter(torch.empty(b, b * rank, p, device=device, dtype=dtype))
        self.blocks_out = nn.Parameter(torch.empty(b, q, b * rank, device=device, dtype=dtype))
        self.reset_parameters()

    @staticmethod
    def default_rank(out_features: int, in_features: int, nblocks: int) -> int:
        """R = min(m, n) / b^2: keeps min(m, n)(m + n) / b weights (37.5 % of a BERT block at b = 4)."""
        full = min(math.ceil(in_features / nblocks), math.ceil(out_features / nblocks))
        return max(1, min(full, min(in_features, out_features) // nblocks**2))

    def reset_parameters(self) -> None:
        """Random init with the output variance of nn.Linear's default (see LowRankLinear.reset_parameters)."""
        bound = (3.0 / (self.rank * self.in_features)) ** 0.25
        nn.init.uniform_(self.blocks_in, -bound, bound)
        nn.init.uniform_(self.blocks_out, -bound, bound)
        # Padded input columns never see data, padded output rows are cut: zero them so to_dense() is exact.
        self._zero_padding()
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))

    def _zero_padding(self) -> None:
        with torch.no_grad():
            pad_cols = self.nblocks * self.in_block - self.in_features
            if pad_cols:
                self.blocks_in[-1, :, self.in_block - pad_cols:] = 0

    @torch.no_grad()
    def project_(self, weight: Tensor, init: str = "svd", stats: ProjectionStats | None = None) -> None:
        """Rank-R factors of every block (i, j) of ``weight`` (output block i, input block j), by ``init``:

        * ``svd``: minimizes the weight error ``||W - W'||_F`` (the sum of the blocks' errors: exact optimum);
        * ``fisher``: minimizes ``||diag(sqrt f) (W - W')||_F``, which also splits exactly into the blocks'
          Fisher-weighted errors (f restricted to each block's rows): the exact optimum for this structure;
        * ``whitened``: minimizes ``sum_ij ||(W_ij - W'_ij) X_j^T||_F^2`` with X_j the calibration inputs of input
          block j (its diagonal block C_jj of the second moment): each block's activation error *as if it were
          alone*. The whole layer's activation error also has cross terms between input blocks j != k feeding
          the same output block (C_jk); they couple the blocks and have no closed form, so they are left out.
        """
        self.check_init(init, projection=True)
        b, p, q, r = self.nblocks, self.in_block, self.out_block, self.rank
        blocks = self._weight_blocks(weight)
        terms = get_init(init).terms(stats)
        if not terms:
            up, down = truncated_factors(blocks, r)  # (i, j, q, R), (i, j, R, p)
        else:
            up, down = weighted_factors(blocks, r, **self._block_terms(terms))
        self.blocks_in.copy_(down.permute(1, 0, 2, 3).reshape(b, b * r, p))
        self.blocks_out.copy_(up.permute(0, 2, 1, 3).reshape(b, q, b * r))

    def _weight_blocks(self, weight: Tensor) -> Tensor:
        """``weight`` zero-padded to (b q, b p) in float64, as its (i, j, q, p) blocks."""
        b, p, q = self.nblocks, self.in_block, self.out_block
        padded = F.pad(weight.detach().to(torch.float64),
                       (0, b * p - self.in_features, 0, b * q - self.out_features))
        return self._rows_to_blocks(padded)

    @property
    def weights_per_rank(self) -> int:
        return self.nblocks**2 * (self.in_block + self.out_block)

    def rank_spectrum(self, weight: Tensor, terms: dict) -> Tensor:
        """All blocks share one rank: step R gains the sum of the blocks' R-th squared singular values."""
        return block_step_spectrum(weighted_spectrum(self._weight_blocks(weight), **self._block_terms(terms)))

    def _block_terms(self, terms: dict) -> dict:
        """The layer's statistics cut to blocks (zero-padded like the weight): C_jj as (1, j, p, p), broadcast
        over output blocks; row weights as (i, j, q) in this structure's row order."""
        terms = dict(terms)
        b, p, q = self.nblocks, self.in_block, self.out_block
        if "second_moment" in terms:
            pad = b * p - self.in_features
            c = F.pad(terms["second_moment"].to(torch.float64), (0, pad, 0, pad)).reshape(b, p, b, p)
            j = torch.arange(b, device=c.device)
            terms["second_moment"] = c[j, :, j, :].unsqueeze(0)
        if "row_weights" in terms:
            f = F.pad(terms["row_weights"].to(torch.float64), (0, b * q - self.out_features))
            terms["row_weights"] = self._rows_to_blocks(f.unsqueeze(-1).expand(b * q, b * p))[..., 0]
        return terms

    # Row order: the only difference between block-wise low rank and Monarch. --------------------------
    def _rows_to_blocks(self, padded: Tensor) -> Tensor:
        """(b q, b p) -> (i, j, q, p) with output block i = rows i q .. (i + 1) q - 1."""
        b, p, q = self.nblocks, self.in_block, self.out_block
        return padded.reshape(b, q, b, p).permute(0, 2, 1, 3)

    def _blocks_to_rows(self, blocks: Tensor) -> Tensor:
        """Inverse of :meth:`_rows_to_blocks`."""
        b, p, q = self.nblocks, self.in_block, self.out_block
        return blocks.permute(0, 2, 1, 3).reshape(b * q, b * p)

    def _order_output(self, y: Tensor) -> Tensor:
        """(b_i, N, q) per-block outputs -> (N, b q) in row order (a copy; differentiable)."""
        return y.transpose(0, 1).reshape(y.shape[1], -1)

    def _output_blocks(self, out: Tensor) -> Tensor:
        """(N, b q) output in row order -> the (b_i, N, q) view of it that block i writes (no copy)."""
        return out.view(out.shape[0], self.nblocks, self.out_block).transpose(0, 1)

    # ---------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        b, p, q, r = self.nblocks, self.in_block, self.out_block, self.rank
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if b * p != self.in_features:
            x = F.pad(x, (0, b * p - self.in_features))
        n = x.shape[0]
        # Stage 1: input block j times blocks_in[j]. The (b_j, N, p) operand is a strided view of x: bmm reads
        # it in place (batch stride p, row stride b p), no transposed copy of the activations.
        h = torch.bmm(x.view(n, b, p).transpose(0, 1), self.blocks_in.mT)  # (b_j, N, b_i R)
        # The fixed permutation between the products, as the one unavoidable copy: regroup by output block i
        # (a single batched GEMM cannot read (j, R) columns that are not evenly strided).
        h = h.view(b, n, b, r).permute(2, 1, 0, 3).reshape(b, n, b * r)  # (b_i, N, b_j R)
        y = torch.bmm(h, self.blocks_out.mT)  # (b_i, N, q)
        bias = self.bias
        if bias is not None and b * q != self.out_features:
            bias = F.pad(bias, (0, b * q - self.out_features))
        if (torch.is_grad_enabled() and (y.requires_grad or (bias is not None and bias.requires_grad))) \
                or torch.compiler.is_compiling():
            # Training, or torch.compile (which fuses these into one kernel itself): plain differentiable ops.
            out = self._order_output(y)
            out = out if bias is None else out + bias
        else:
            # Inference: the row order and the bias in one pass, written straight into the output.
            out = y.new_empty(n, b * q)
            dst = self._output_blocks(out)
            if bias is None:
                dst.copy_(y)
            else:
                torch.add(y, self._output_blocks(bias.view(1, b * q)), out=dst)
        if b * q != self.out_features:
            out = out[:, : self.out_features]
        return out.reshape(*lead, self.out_features)

    def to_dense(self) -> Tensor:
        b, p, q, r = self.nblocks, self.in_block, self.out_block, self.rank
        up = self.blocks_out.reshape(b, q, b, r).permute(0, 2, 1, 3)  # (i, j, q, R)
        down = self.blocks_in.reshape(b, b, r, p).permute(1, 0, 2, 3)  # (i, j, R, p)
        return self._blocks_to_rows(up @ down)[: self.out_features, : self.in_features]

    @staticmethod
    def param_count(out_features: int, in_features: int, nblocks: int, rank: int | None = None) -> int:
        b = nblocks
        p, q = math.ceil(in_features / b), math.ceil(out_features / b)
        if rank is None:
            rank = BlockLowRankLinear.default_rank(out_features, in_features, b)
        return b * b * rank * (p + q)

    @classmethod
    def structure_for_budget(cls, out_features: int, in_features: int, budget: float, *, rank_multiple: int = 1,
                             nblocks: int = 4) -> dict:
        """b^2 R (p + q) <= f m n  ->  R = floor(f m n / (b^2 (p + q))), rounded down to ``rank_multiple`` and
        capped at the full block rank min(p, q)."""
        m, n, b = out_features, in_features, cls._check_nblocks(out_features, in_features, nblocks)
        p, q = math.ceil(n / b), math.ceil(m / b)
        rank = fit_rank(m, n, budget, weights_per_rank=b * b * (p + q), max_rank=min(p, q),
                        rank_multiple=rank_multiple, what=f"per-block rank with nblocks={b}",
                        hint="use fewer blocks or a larger budget")
        return {"nblocks": b, "rank": rank}

    @classmethod
    def default_structure(cls, out_features: int, in_features: int, *, rank: int | None = None,
                          nblocks: int = 4) -> dict:
        """The given per-block rank, else :meth:`default_rank`."""
        b = cls._check_nblocks(out_features, in_features, nblocks)
        return {"nblocks": b, "rank": cls.default_rank(out_features, in_features, b) if rank is None else rank}

    @staticmethod
    def _check_nblocks(out_features: int, in_features: int, nblocks: int) -> int:
        if not 1 <= nblocks <= min(out_features, in_features):
            raise BudgetError(f"nblocks={nblocks} must be in 1..{min(out_features, in_features)} "
                              f"for a {out_features}x{in_features} layer")
        return nblocks

    def structure(self) -> dict:
        return {"nblocks": self.nblocks, "rank": self.rank}
