"""ONNX export and ONNX Runtime sessions: the runtime people serve transformers with on CPUs.

Used by the latency measurement (``runtime="onnxruntime"``) and by ``python -m lit_factor export --format onnx``.
Only ``torch.onnx`` (the ``torch.export``-based exporter), ``onnx`` and ``onnxruntime``: no pickles, and the
exported graph has dynamic batch and sequence axes, so one file serves every input shape.

    export_onnx(model, {"input_ids": ids}, "model.onnx", output_name="logits")
    session = make_session("model.onnx", threads=2)
    logits = session.run(None, {"input_ids": ids.numpy()})[0]
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

#: inputs whose first two axes are (batch, sequence); anything else keeps its exported shape except the batch
_SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "hidden_states")


class _FirstOutput(nn.Module):
    """Positional inputs in ``names`` order -> the first output (logits of a classifier, hidden states of an
    encoder): ONNX graphs take and return plain tensors, not Hugging Face's keyword inputs and ModelOutputs."""

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.module, self.names = module, names

    def forward(self, *args):
        out = self.module(**dict(zip(self.names, args, strict=True)))
        return out[0] if isinstance(out, tuple | list) or hasattr(out, "to_tuple") else out


def _dynamic_shapes(names: list[str]) -> tuple:
    """torch.export's spec for ``forward(*args)``: batch (and sequence) axes of every input are dynamic."""
    dynamic = torch.export.Dim.DYNAMIC
    return (tuple({0: dynamic, 1: dynamic} if n in _SEQUENCE_INPUTS else {0: dynamic} for n in names),)


def export_onnx(module: nn.Module, inputs: Mapping[str, torch.Tensor], path: str | os.PathLike,
                output_name: str = "logits", quiet: bool = True) -> Path:
    """Export ``module(**inputs)[0]`` to ``path`` with dynamic batch and sequence axes; returns the path.

    The module is exported as it is (eval mode is the caller's business); gradients are off during the export.
    ``quiet`` hides the exporter's progress lines.
    """
    path = Path(path)
    names = list(inputs)
    wrapper = _FirstOutput(module, names).eval()
    sink = io.StringIO()
    redirect = (contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink)) if quiet else ()
    with contextlib.ExitStack() as stack:
        for r in redirect:
            stack.enter_context(r)
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.no_grad())
        # Inference-mode tensors cannot be traced: export from plain clones.
        args = tuple(inputs[n].clone() for n in names)
        program = torch.onnx.export(wrapper, args, input_names=names, output_names=[output_name],
                                    dynamic_shapes=_dynamic_shapes(names), dynamo=True,
                                    external_data=False, verbose=False)
        program.save(str(path))
    return path


def optimize_transformer(path: str | os.PathLike, out: str | os.PathLike, config) -> Path:
    """ONNX Runtime's transformer fusions (Gelu, LayerNorm, SkipLayerNorm, attention where its pattern matches)
    for a BERT-like ``config`` (``num_attention_heads``, ``hidden_size``); writes ``out``."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
    with contextlib.redirect_stdout(io.StringIO()):
        optimized = optimize_model(str(path), model_type="bert", num_heads=heads, hidden_size=hidden)
        optimized.save_model_to_file(str(out))
    return Path(out)


#: op types of ONNX Runtime's contrib domain that a fusion leaves in the graph (counted by :func:`graph_fusions`)
CONTRIB_DOMAIN = "com.microsoft"
FUSED_ATTENTION = ("Attention", "MultiHeadAttention")


def graph_fusions(path: str | os.PathLike) -> dict[str, int]:
    """{op type: count} of the fused (``com.microsoft``) ops in an ONNX file: what a fusion pass applied, read
    from the graph itself (Attention, MultiHeadAttention, SkipLayerNormalization, BiasGelu, ...)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(sorted(collections.Counter(n.op_type for n in graph.node if n.domain == CONTRIB_DOMAIN).items()))


def _restore_attention_outputs(model) -> int:
    """Put back the Reshape that onnxscript's MultiHeadAttention rule swallows when the layer after attention
    reshapes to something else than (batch, sequence, hidden) (a Monarch layer's (batch*sequence, blocks,
    block)): the rule does not verify that Reshape ("TODO: verify Reshapes" in ``ort_fusions/mha.py``), so the
    fused node would claim the swallowed shape and ONNX Runtime refuses the graph. Returns how many it restored."""
    import numpy as np
    import onnx_ir as ir

    restored = 0
    for node in list(model.graph):
        if node.op_type not in FUSED_ATTENTION or node.domain != CONTRIB_DOMAIN:
            continue
        out, query = node.outputs[0], node.inputs[0]
        if out.shape is None or query.shape is None:
            raise ValueError(f"fused {node.op_type} node {node.name!r} has no known shapes")
        if out.shape.rank() == 3 and list(out.shape)[:2] == list(query.shape)[:2]:
            continue
        dims = [d if isinstance(d, int) else -1 for d in out.shape]
        if dims.count(-1) > 1 or out.is_graph_output():
            raise ValueError(f"fused {node.op_type} node {node.name!r}: cannot restore its output shape {out.shape}")
        swallowed, width = out.shape, int(np.prod([d for d in dims if d > 0]))
        shape = ir.Value(name=f"{out.name}_restored_shape", const_value=ir.tensor(np.array(dims, dtype=np.int64)))
        model.graph.register_initializer(shape)
        uses = list(out.uses())
        reshape = ir.node("Reshape", [out, shape], name=f"{node.name or out.name}_restore_shape")
        reshaped = reshape.outputs[0]
        reshaped.name, reshaped.shape, reshaped.type = f"{out.name}_restored", swallowed, out.type
        for user, index in uses:
            user.replace_input_with(index, reshaped)
        out.shape = ir.Shape([*list(query.shape)[:2], width])
        model.graph.insert_after(node, reshape)
        restored += 1
    return restored


def _fold_packed_qkv(model) -> int:
    """A dense model's fused ``Attention`` takes its Q/K/V weights as a run-time ``Concat`` of the three
    matrices, with a ``qkv_hidden_sizes`` attribute: ONNX Runtime folds the Concat at load time, but its
    quantizer sees neither a constant weight nor equal sizes and leaves the op (its Q/K/V GEMM: a quarter of the
    model's MACs) in fp32 instead of making it a ``QAttention``. Fold the Concats into initializers and drop the
    attribute where the three sizes are equal (its default). Returns the Attention ops folded."""
    import numpy as np
    import onnx_ir as ir

    folded = 0
    for node in list(model.graph):
        if node.op_type != "Attention" or node.domain != CONTRIB_DOMAIN:
            continue
        for index in (1, 2):  # weight, bias
            value = node.inputs[index] if len(node.inputs) > index else None
            concat = value.producer() if value is not None else None
            if concat is None or concat.op_type != "Concat" or any(v.const_value is None for v in concat.inputs):
                continue
            axis = concat.attributes["axis"].as_int()
            tensor = np.concatenate([v.const_value.numpy() for v in concat.inputs], axis=axis)
            constant = ir.Value(name=f"{value.name}_folded", const_value=ir.tensor(tensor))
            constant.shape, constant.type = ir.Shape(tensor.shape), value.type
            model.graph.register_initializer(constant)
            node.replace_input_with(index, constant)
        sizes = node.attributes.get("qkv_hidden_sizes")
        if sizes is not None and len(set(sizes.as_ints())) == 1:
            del node.attributes["qkv_hidden_sizes"]
        folded += 1
    return folded


def fuse_attention(path: str | os.PathLike, out: str | os.PathLike) -> dict[str, int]:
    """onnxscript's transformer fusions for ONNX Runtime (``rewriter.ort_fusions.optimize_for_ort``) on a
    ``torch.export``-based export: attention becomes one ``Attention`` op (dense: its Q/K/V GEMM packed inside)
    or ``MultiHeadAttention`` (factorized Q/K/V: their own products stay outside), LayerNorm + residual
    ``SkipLayerNormalization``, bias + GELU ``BiasGelu``. ONNX Runtime's own transformer optimizer
    (:func:`optimize_transformer`) does not fuse attention on these exports (docs/speed.md). Writes ``out``;
    returns the fused ops counted in the written graph (:func:`graph_fusions`)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with contextlib.redirect_stdout(io.StringIO()):
        model, _ = optimize_for_ort(ir.load(str(path)))
    _restore_attention_outputs(model)
    _fold_packed_qkv(model)
    import onnx_ir.passes.common as common_passes

    common_passes.RemoveUnusedNodesPass()(model)
    ir.save(model, str(out))
    return graph_fusions(out)


def make_session(path: str | os.PathLike, threads: int | None = None, profile_prefix: str | None = None):
    """A CPU ``InferenceSession`` with ``threads`` intra-op threads (all graph optimizations on, one inter-op
    thread: a forward is one chain of ops). ``profile_prefix`` turns ORT's per-op profiler on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def numpy_inputs(inputs: Mapping[str, torch.Tensor]) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in inputs.items()}


def op_times(profile_json: str | os.PathLike, calls: int, skip_runs: int = 0) -> dict[str, float]:
    """ORT's profile (``session.end_profiling()``) summed by op type: {op type: ms per forward}, largest first,
    over the ``calls`` runs that follow the first ``skip_runs`` (warm-up) runs."""
    events = json.loads(Path(profile_json).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    cutoff = starts[skip_runs] if len(starts) > skip_runs else 0
    per_op: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and event["ts"] >= cutoff:
            per_op[event.get("args", {}).get("op_name", "?")] += event["dur"] / 1e3  # us -> ms
    return {op: ms / calls for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])}


def format_op_times(per_op: dict[str, float], top: int = 15) -> str:
    """{op: ms per forward} as a table with each op's share of the op time."""
    total = sum(per_op.values()) or 1.0
    lines = [f"{'op type':<28}{'ms/forward':>12}{'share':>8}"]
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{op:<28}{ms:>12.2f}{ms / total:>8.1%}")
    lines.append(f"{'total op time':<28}{total:>12.2f}")
    return "\n".join(lines)


def op_time_table(profile_json: str | os.PathLike, calls: int, skip_runs: int = 0, top: int = 15) -> str:
    """:func:`op_times` as a table: ms per forward and share of op time."""
    return format_op_times(op_times(profile_json, calls, skip_runs), top)
