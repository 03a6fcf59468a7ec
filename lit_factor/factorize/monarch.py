"""Monarch layer (Dao et al. 2022): two block-diagonal products with a fixed permutation between them.

Same factors and forward as :class:`BlockLowRankLinear` (see its docstring for the layout), but the output of
block i is written to the *strided* rows t b + i (t = 0 .. q-1), as in HazyResearch/fly's
``blockdiag_butterfly_multiply``. So a Monarch matrix is a block-wise low-rank matrix after a fixed row
permutation: the sub-matrices it couples are (rows strided by b, columns contiguous), each of rank R, and the
closed-form projection from dense is a rank-R SVD of each of them.

With R = min(m, n) / b^2 it keeps min(m, n)(m + n) / b weights: 1.5 / b of a BERT block (37.5 % at b = 4).
"""

from __future__ import annotations

from torch import Tensor

from lit_factor.factorize.blockwise import BlockLowRankLinear


class MonarchLinear(BlockLowRankLinear):
    """Monarch matrix ``P_out B_out P B_in`` (padding the input / truncating the output when b does not divide)."""

    method = "monarch"

    def _rows_to_blocks(self, padded: Tensor) -> Tensor:
        """(q b, b p) -> (i, j, q, p) with output block i = rows i, b + i, 2 b + i, ..."""
        b, p, q = self.nblocks, self.in_block, self.out_block
        return padded.reshape(q, b, b, p).permute(1, 2, 0, 3)

    def _blocks_to_rows(self, blocks: Tensor) -> Tensor:
        b, p, q = self.nblocks, self.in_block, self.out_block
        return blocks.permute(2, 0, 1, 3).reshape(q * b, b * p)

    def _order_output(self, y: Tensor) -> Tensor:
        """(b_i, N, q) -> (N, q b): row t b + i holds y[i, :, t]."""
        return y.permute(1, 2, 0).reshape(y.shape[1], -1)

    def _output_blocks(self, out: Tensor) -> Tensor:
        """(N, q b) output -> the (b_i, N, q) view block i writes: its rows are the strided t b + i."""
        return out.view(out.shape[0], self.out_block, self.nblocks).permute(2, 0, 1)
