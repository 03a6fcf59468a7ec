"""ONNX export and ONNX Runtime sessions: the runtime people serve transformers with on CPUs.

Used by the latency measurement (``runtime="onnxruntime"``) and by ``python cli.py export --format onnx``.
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


def op_time_table(profile_json: str | os.PathLike, calls: int, skip_runs: int = 0, top: int = 15) -> str:
    """ORT's profile (``session.end_profiling()``) summed by op type: ms per forward and share of op time, over
    the ``calls`` runs that follow the first ``skip_runs`` (warm-up) runs."""
    events = json.loads(Path(profile_json).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    cutoff = starts[skip_runs] if len(starts) > skip_runs else 0
    per_op: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and event["ts"] >= cutoff:
            per_op[event.get("args", {}).get("op_name", "?")] += event["dur"] / 1e3  # us -> ms
    total = sum(per_op.values()) or 1.0
    lines = [f"{'op type':<28}{'ms/forward':>12}{'share':>8}"]
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{op:<28}{ms / calls:>12.2f}{ms / total:>8.1%}")
    lines.append(f"{'total op time':<28}{total / calls:>12.2f}")
    return "\n".join(lines)
