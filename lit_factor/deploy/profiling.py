"""Where a forward's time goes, by operator: the breakdown that explains a latency ratio (docs/speed.md).

Same preparation and runtimes as :func:`lit_factor.deploy.latency.compare_latency` (copies in eval mode, the same random
inputs, warmed up). PyTorch runtimes are profiled with ``torch.profiler`` (``key_averages()`` by op, self CPU or
device time); ONNX Runtime with its own per-node profiler, summed by op type.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lit_factor.deploy.latency import (
    FP32_BASELINE,
    LatencySettings,
    cpu_threads,
    make_inputs,
    make_runners,
    onnx_file,
    prepare_models,
    timed_target,
)


def _torch_profile(run, calls: int, device: torch.device, rows: int) -> tuple[str, dict[str, float]]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    per_op = {e.key: getattr(e, attr, 0) / 1e3 / calls for e in averages}  # us -> ms per forward
    per_op = {k: v for k, v in sorted(per_op.items(), key=lambda kv: -kv[1]) if v > 0}
    return averages.table(sort_by=sort, row_limit=rows, max_name_column_width=50), per_op


def _ort_profile(model: nn.Module, inputs: dict, settings: LatencySettings, workdir: str,
                 calls: int) -> tuple[str, dict[str, float]]:
    from lit_factor.deploy import ort

    target, kwargs = timed_target(model, inputs, settings.part)
    path = onnx_file(model, target, kwargs, settings, Path(workdir) / "profiled.onnx")
    session = ort.make_session(path, settings.threads, profile_prefix=os.path.join(workdir, "ort_profile"))
    feed = ort.numpy_inputs(kwargs)
    for _ in range(settings.warmup + calls):
        session.run(None, feed)
    per_op = ort.op_times(session.end_profiling(), calls, skip_runs=settings.warmup)
    return ort.format_op_times(per_op), per_op


def profile_ops(dense: nn.Module, factorized: Mapping[str, nn.Module], settings: LatencySettings,
                calls: int = 3, rows: int = 15) -> dict[str, tuple[str, dict[str, float]]]:
    """{"dense": (table, {op: ms per forward}), name: ...} for the first batch size and sequence length of
    ``settings``: ONNX Runtime's op types, or PyTorch's ops by self time (CPU, or device time on CUDA)."""
    with cpu_threads(settings.threads), tempfile.TemporaryDirectory(prefix="lit_factor_profile_") as workdir:
        models = prepare_models(dense, factorized, settings)
        models.pop(FP32_BASELINE, None)
        device = next(models["dense"].parameters()).device
        inputs = make_inputs(models["dense"], settings.batch_sizes[0], settings.seq_lens[0], device, settings.seed)
        out = {}
        with torch.inference_mode():
            for key, model in models.items():
                if settings.runtime == "onnxruntime":
                    out[key] = _ort_profile(model, inputs, settings, workdir, calls)
                else:
                    run = make_runners({key: model}, inputs, settings, device, workdir, {})[key]
                    out[key] = _torch_profile(run, calls, device, rows)
        return out


def profile_models(dense: nn.Module, factorized: Mapping[str, nn.Module], settings: LatencySettings,
                   calls: int = 3, rows: int = 15) -> dict[str, str]:
    """{"dense": table, name: table ...} for the first batch size and sequence length of ``settings``."""
    return {k: table for k, (table, _) in profile_ops(dense, factorized, settings, calls, rows).items()}


#: op types / names that are the linear layers' products (what factorization shrinks), per runtime family; every
#: other op (attention, LayerNorm, GELU, copies, quantize/dequantize) is what factorization does not touch
GEMM_OPS = {
    "onnxruntime": {"MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul",
                    "MatMulIntegerToFloat", "QLinearMatMul", "QGemm"},
    "torch": {"aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "mkldnn::_linear_pointwise",
              "aten::baddbmm"},
}


def amdahl_bound(dense_ops: Mapping[str, float], runtime: str, macs_ratio: float) -> dict[str, float]:
    """The best speedup a model with ``macs_ratio`` of the dense model's linear-layer multiply-adds can reach in
    this runtime, from the dense model's own profile there: its GEMM time ``g`` shrinks by ``macs_ratio`` (the
    products run at the dense GEMMs' efficiency), the rest ``r`` is untouched -> ``(g + r) / (g * ratio + r)``.

    A fused ``Attention`` op holds the dense model's packed Q/K/V GEMM: its GEMM part is estimated at the
    per-MAC rate of the other GEMMs (the Q/K/V product has 3/4 of the attention block's dense MACs outside the
    FFN, i.e. 3 of the 12 h^2 MACs of a BERT block: a quarter of all), and moved from the rest to ``g``."""
    family = "onnxruntime" if runtime.startswith("onnxruntime") else "torch"
    gemm = sum(ms for op, ms in dense_ops.items() if op in GEMM_OPS[family])
    total = sum(dense_ops.values())
    fused_qkv = 0.0
    if "Attention" in dense_ops or "QAttention" in dense_ops:
        fused_qkv = min(gemm / 3, dense_ops.get("Attention", 0) + dense_ops.get("QAttention", 0))  # 9 h^2 -> 3 h^2
    gemm += fused_qkv
    rest = total - gemm
    bound = total / (gemm * macs_ratio + rest) if total else float("nan")
    return {"gemm_share": gemm / total if total else float("nan"), "bound": bound}
