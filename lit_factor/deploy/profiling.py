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
    LatencySettings,
    cpu_threads,
    make_inputs,
    make_runners,
    onnx_file,
    prepare_models,
    timed_target,
)


def _torch_table(run, calls: int, device: torch.device, rows: int) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=50)


def _ort_table(model: nn.Module, inputs: dict, settings: LatencySettings, workdir: str, calls: int) -> str:
    from lit_factor.deploy import ort

    target, kwargs = timed_target(model, inputs, settings.part)
    path = onnx_file(model, target, kwargs, settings, Path(workdir) / "profiled.onnx")
    session = ort.make_session(path, settings.threads, profile_prefix=os.path.join(workdir, "ort_profile"))
    feed = ort.numpy_inputs(kwargs)
    for _ in range(settings.warmup + calls):
        session.run(None, feed)
    trace = session.end_profiling()
    return ort.op_time_table(trace, calls, skip_runs=settings.warmup)


def profile_models(dense: nn.Module, factorized: Mapping[str, nn.Module], settings: LatencySettings,
                   calls: int = 3, rows: int = 15) -> dict[str, str]:
    """{"dense": table, name: table ...} for the first batch size and sequence length of ``settings``."""
    with cpu_threads(settings.threads), tempfile.TemporaryDirectory(prefix="lit_factor_profile_") as workdir:
        models = prepare_models(dense, factorized, settings)
        device = next(models["dense"].parameters()).device
        inputs = make_inputs(models["dense"], settings.batch_sizes[0], settings.seq_lens[0], device, settings.seed)
        tables = {}
        with torch.inference_mode():
            for key, model in models.items():
                if settings.runtime == "onnxruntime":
                    tables[key] = _ort_table(model, inputs, settings, workdir, calls)
                else:
                    run = make_runners({key: model}, inputs, settings, device, workdir, {})[key]
                    tables[key] = _torch_table(run, calls, device, rows)
        return tables
