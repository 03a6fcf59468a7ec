"""Inference-time rewrites of a (factorized) model: the same outputs from fewer, fatter GEMMs and fewer copies.

    model = optimize_for_inference(model)      # in place; eval mode, no training afterwards

Two rewrites, each exact up to float summation order (tests/test_inference.py checks outputs against the
unrewritten model), both explained with measurements in docs/speed.md:

* **One GEMM for layers that read the same input.** Attention's query, key and value all read the same hidden
  states. Their low-rank ``down`` factors are stacked into one matrix, so three thin GEMMs (rank r each) become
  one of width 3 r; dense query/key/value become one 3 h-wide ``nn.Linear`` the same way, so a dense baseline
  gets the same treatment. The first of the three calls computes the stacked product, the other two take their
  slice of it (a cache keyed on the input tensor's identity, cleared after the last consumer).
* **Monarch without its strided reorder.** A Monarch layer writes block i's output to the strided rows
  t b + i; that element-wise scatter costs more than its share of FLOPs on CPUs. When the only reader of the
  output is permutation-tolerant, the layer instead writes its rows in *chunk order* (contiguous runs of
  ``chunk`` values, a cheap copy) and the reader's input columns are permuted to match:
  FFN in -> elementwise activation -> FFN out (the permutation stays inside each input block of a Monarch reader,
  so its factors just permute their columns), and query/key/value -> attention -> attention output, where
  ``chunk = head_dim / nblocks`` keeps the permutation inside every head (scores and per-head mixing do not see
  a permutation applied alike to q and k, or to v and the output layer's columns).

Only the layers of the layouts in :data:`ATTENTION_LAYOUTS` are rewritten (BERT-like:
``attention.self.{query,key,value}``, ``attention.output.dense``; MPNet: ``attention.attn.{q,k,v,o}``; both with
``intermediate.dense`` and ``output.dense``); anything else is left as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_factor.factorize import LowRankLinear, MonarchLinear

#: activations that act on every value alone (a permutation of their input permutes their output alike)
ELEMENTWISE = {"GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
               "PytorchGELUTanh", "GELUTanh", "SiLUActivation", "ReLU", "GELU", "SiLU", "Tanh", "ReLUSquaredActivation"}


# --- one GEMM for several layers reading the same input ------------------------------------------------------
class SharedInputGEMM(nn.Module):
    """``x @ weight.T + bias`` split into ``sizes`` along the last axis, computed once for ``consumers`` calls."""

    def __init__(self, weight: Tensor, bias: Tensor | None, sizes: list[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.sizes = list(sizes)

    @property
    def macs_per_token(self) -> int:
        return self.weight.numel()

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        cached = self.__dict__.get("_cache")  # a plain attribute: never in the state_dict
        if cached is not None and cached[0] is x:
            outputs, uses = cached[1], cached[2] + 1
        else:
            outputs, uses = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1), 1
        # Dropped after the last consumer: holds no activations between forwards.
        self.__dict__["_cache"] = None if uses >= len(self.sizes) else (x, outputs, uses)
        return outputs


class SharedInputBranch(nn.Module):
    """One consumer of a :class:`SharedInputGEMM`: its slice, then (low rank) its own ``up`` factor and bias."""

    def __init__(self, shared: SharedInputGEMM, index: int, in_features: int, out_features: int,
                 up: Tensor | None = None, bias: Tensor | None = None) -> None:
        super().__init__()
        self.shared, self.index = shared, index
        self.in_features, self.out_features = in_features, out_features
        self.up = None if up is None else nn.Parameter(up, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def macs_per_token(self) -> int:
        return 0 if self.up is None else self.up.numel()  # the shared GEMM counts its own

    def forward(self, x: Tensor) -> Tensor:
        h = self.shared(x)[self.index]
        return h if self.up is None else F.linear(h, self.up, self.bias)


def fuse_shared_input(parent: nn.Module, names: list[str]) -> bool:
    """Replace ``parent.<name>`` for every name by branches of one GEMM, if they are all ``nn.Linear`` or all
    :class:`LowRankLinear` of the same input size. Returns whether it did."""
    layers = [getattr(parent, n, None) for n in names]
    if len({getattr(m, "in_features", None) for m in layers}) != 1:
        return False
    if all(type(m) is nn.Linear for m in layers):
        biases = [m.bias for m in layers]
        bias = torch.cat(biases) if all(b is not None for b in biases) else None
        if bias is None and any(b is not None for b in biases):
            return False
        shared = SharedInputGEMM(torch.cat([m.weight.detach() for m in layers]), bias,
                                 [m.out_features for m in layers])
        branches = [SharedInputBranch(shared, i, m.in_features, m.out_features) for i, m in enumerate(layers)]
    elif all(type(m) is LowRankLinear for m in layers):
        shared = SharedInputGEMM(torch.cat([m.down.detach() for m in layers]), None, [m.rank for m in layers])
        branches = [SharedInputBranch(shared, i, m.in_features, m.out_features, m.up.detach(),
                                      None if m.bias is None else m.bias.detach()) for i, m in enumerate(layers)]
    else:
        return False
    for name, branch in zip(names, branches, strict=True):
        setattr(parent, name, branch)
    return True


# --- Monarch in chunk order ----------------------------------------------------------------------------------
def chunk_order(out_block: int, nblocks: int, chunk: int) -> Tensor:
    """``perm`` with ``new_output = monarch_output[..., perm]``: runs of ``chunk`` rows of one block in a row.

    Monarch row t b + i holds position t of block i. In chunk order, group g (``chunk * nblocks`` rows) lists
    block 0's positions g chunk .. (g + 1) chunk - 1, then block 1's, ...: rows never leave their group.
    """
    rows = torch.arange(out_block * nblocks).view(out_block // chunk, chunk, nblocks)  # [g, tl, i] = t b + i
    return rows.permute(0, 2, 1).reshape(-1)


def _block_products(layer: MonarchLinear, x: Tensor) -> Tensor:
    """Monarch's two batched products on (N, in) without padding: (b_i, N, q) per-block outputs."""
    b, p, r, n = layer.nblocks, layer.in_block, layer.rank, x.shape[0]
    h = torch.bmm(x.view(n, b, p).transpose(0, 1), layer.blocks_in.mT)  # (b_j, N, b_i R)
    h = h.view(b, n, b, r).permute(2, 1, 0, 3).reshape(b, n, b * r)  # (b_i, N, b_j R)
    return torch.bmm(h, layer.blocks_out.mT)


class ChunkOrderMonarchLinear(MonarchLinear):
    """A Monarch layer whose outputs come in :func:`chunk_order` (its bias permuted alike): contiguous copies of
    ``chunk`` values instead of Monarch's element-wise strided write. Inference only; built by
    :meth:`from_monarch`, and only correct where the reader of its output was permuted to match."""

    method = "monarch-chunked"

    @classmethod
    def from_monarch(cls, layer: MonarchLinear, chunk: int) -> ChunkOrderMonarchLinear:
        b, q = layer.nblocks, layer.out_block
        w = layer.blocks_in
        new = cls(layer.in_features, layer.out_features, b, layer.rank, bias=layer.bias is not None,
                  device=w.device, dtype=w.dtype)
        new.chunk = chunk
        perm = chunk_order(q, b, chunk).to(w.device)
        with torch.no_grad():
            new.blocks_in.copy_(layer.blocks_in)
            new.blocks_out.copy_(layer.blocks_out)
            if layer.bias is not None:
                new.bias.copy_(layer.bias[perm])
        return new.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = _block_products(self, x.reshape(-1, self.in_features))
        b, n, q, c = self.nblocks, y.shape[1], self.out_block, self.chunk
        chunks = y.view(b, n, q // c, c).permute(1, 2, 0, 3)  # (N, g, b_i, chunk): each run of c is contiguous
        bias = None if self.bias is None else self.bias.view(q // c, b, c)
        if (torch.is_grad_enabled() and y.requires_grad) or torch.compiler.is_compiling():
            # Autograd, or a compiler that plans its own buffers: out-of-place ops (the compiler fuses them).
            out = chunks.contiguous() if bias is None else chunks.contiguous() + bias
        else:
            out = y.new_empty(n, q // c, b, c)
            out.copy_(chunks) if bias is None else torch.add(chunks, bias, out=out)
        return out.view(*lead, self.out_features)

    def to_dense(self) -> Tensor:
        return super().to_dense()[chunk_order(self.out_block, self.nblocks, self.chunk).to(self.blocks_in.device)]


def _unpadded_monarch(layer: nn.Module) -> bool:
    return (type(layer) is MonarchLinear and layer.nblocks * layer.out_block == layer.out_features
            and layer.nblocks * layer.in_block == layer.in_features)


@torch.no_grad()
def permute_input(layer: nn.Module, perm: Tensor) -> bool:
    """Permute ``layer``'s input columns in place (``layer(x[..., perm])`` then equals the old ``layer(x)``).

    ``nn.Linear`` and low rank take any permutation; a Monarch/block-wise layer only one that keeps every
    column inside its input block (its factors are block-diagonal on the input side). Returns whether it could.
    """
    perm = perm.to(next(layer.parameters()).device)
    if type(layer) is nn.Linear:
        layer.weight.copy_(layer.weight[:, perm])
    elif type(layer) is LowRankLinear:
        layer.down.copy_(layer.down[:, perm])
    elif isinstance(layer, MonarchLinear) and layer.nblocks * layer.in_block == layer.in_features:
        b, p = layer.nblocks, layer.in_block
        local = perm.view(b, p) - torch.arange(b, device=perm.device).unsqueeze(1) * p
        if local.min() < 0 or local.max() >= p:
            return False
        layer.blocks_in.copy_(torch.stack([layer.blocks_in[j][:, local[j]] for j in range(b)]))
    else:
        return False
    return True


def _reader_chunk(writer: MonarchLinear, reader: nn.Module) -> int | None:
    """The largest chunk whose order ``reader`` can absorb (None if none can)."""
    if type(reader) in (nn.Linear, LowRankLinear):
        return writer.out_block  # any order: the whole block is one run
    if isinstance(reader, MonarchLinear) and reader.in_block % writer.nblocks == 0:
        chunk = reader.in_block // writer.nblocks  # a group of chunk * b rows = one input block of the reader
        return chunk if writer.out_block % chunk == 0 else None
    return None


def absorb_ffn(layer: nn.Module) -> bool:
    """FFN in (Monarch) -> elementwise activation -> FFN out: chunk order, absorbed by FFN out's columns."""
    inter, out = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    writer, reader = getattr(inter, "dense", None), getattr(out, "dense", None)
    act = getattr(inter, "intermediate_act_fn", None)
    if not (_unpadded_monarch(writer) and reader is not None and type(act).__name__ in ELEMENTWISE):
        return False
    chunk = _reader_chunk(writer, reader)
    if chunk is None or not permute_input(reader, chunk_order(writer.out_block, writer.nblocks, chunk)):
        return False
    inter.dense = ChunkOrderMonarchLinear.from_monarch(writer, chunk)
    return True


#: Where an attention module keeps its parts: (attribute of the module holding query/key/value, their three
#: names, attribute path from the module to the output projection).
ATTENTION_LAYOUTS = (
    ("self", ("query", "key", "value"), ("output", "dense")),  # BERT, RoBERTa and their kin
    ("attn", ("q", "k", "v"), ("attn", "o")),  # MPNet
)


def _attribute(module: nn.Module | None, path: tuple[str, ...]):
    for name in path:
        module = getattr(module, name, None)
    return module


def absorb_attention(attention: nn.Module) -> bool:
    """Query and key in the same within-head chunk order (scores unchanged); value too, absorbed by the
    attention output layer's columns. Needs Monarch query/key/value and head_dim divisible by nblocks."""
    return any(_absorb_attention(attention, *layout) for layout in ATTENTION_LAYOUTS
               if hasattr(attention, layout[0]))


def _absorb_attention(attention: nn.Module, holder: str, names: tuple[str, ...], out_path: tuple[str, ...]) -> bool:
    selfattn, out = getattr(attention, holder, None), _attribute(attention, out_path)
    head_dim = getattr(selfattn, "attention_head_size", None)
    qkv = [getattr(selfattn, n, None) for n in names]
    if head_dim is None or out is None or not all(_unpadded_monarch(m) for m in qkv):
        return False
    if len({(m.nblocks, m.out_block) for m in qkv}) != 1 or head_dim % qkv[0].nblocks:
        return False
    chunk = head_dim // qkv[0].nblocks  # a group of chunk * b rows is exactly one head
    if qkv[0].out_block % chunk or not permute_input(out, chunk_order(qkv[0].out_block, qkv[0].nblocks, chunk)):
        return False
    for name, layer in zip(names, qkv, strict=True):
        setattr(selfattn, name, ChunkOrderMonarchLinear.from_monarch(layer, chunk))
    return True


# --- all of it -----------------------------------------------------------------------------------------------
@torch.no_grad()
def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Apply every rewrite above where it is exact (in place); returns ``model`` in eval mode, with a
    ``inference_rewrites`` attribute counting what was rewritten."""
    done = {"ffn_chunk_order": 0, "attention_chunk_order": 0, "shared_qkv_gemm": 0}
    for module in list(model.modules()):
        if hasattr(module, "intermediate") and hasattr(module, "output"):
            done["ffn_chunk_order"] += absorb_ffn(module)
        if any(hasattr(module, holder) for holder, *_ in ATTENTION_LAYOUTS):
            done["attention_chunk_order"] += absorb_attention(module)
        for _, names, _ in ATTENTION_LAYOUTS:  # a self-attention (head size known) reads one input three times
            if hasattr(module, "attention_head_size") and all(hasattr(module, n) for n in names):
                done["shared_qkv_gemm"] += fuse_shared_input(module, list(names))
    model.inference_rewrites = done
    return model.eval().requires_grad_(False)
