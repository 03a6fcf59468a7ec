"""Inference latency of a factorized model side by side with its dense equivalent (one process, one device).

The one measurement used by both :class:`lit_factor.callbacks.LatencyCallback` and ``benchmarks/latency.py``:

    dense = dense_equivalent(factorized)             # every factorized layer -> its to_linear()
    rows = compare_latency(dense, {"lowrank@0.5": factorized}, LatencySettings(batch_sizes=(8,), seq_lens=(128,)))
    print(format_table(rows))

How it measures (each point is a pitfall of latency numbers avoided; docs/speed.md):

* eval mode, ``torch.inference_mode``, the same random token ids for every model, full-length sequences (no padding,
  so no attention mask is passed: that keeps the forward free of host-device syncs and CUDA-graph capturable);
* ``warmup`` untimed calls per model and shape (torch.compile compiles here, CUDA graphs are captured here);
* ``torch.cuda.synchronize()`` around every timed call on CUDA;
* the models are timed in alternation, call after call, for ``repeats`` rounds, so drift (thermal, other
  processes on shared cores) hits all of them alike; median and 90th percentile over the rounds;
* one call is the model's whole forward (embeddings, encoder, pooler, classification head): what a user runs;
  or, with ``part="encoder"``, the encoder stack alone on precomputed embeddings;
* dense and factorized always run in the same ``runtime``: eager PyTorch, ``torch.compile``, CUDA graphs, or
  ONNX Runtime (both exported to ONNX, one CPU session each with the same thread count).

Parameters are whole-model counts; multiply-adds per token are those of all linear layers (the part factorization
changes; attention scores add 2 * seq_len * hidden per layer and token to both alike).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lit_factor.compress.surgery import count_params
from lit_factor.factorize import FactorizedLinear
from lit_factor.hardware import cpu_bf16

#: PyTorch execution modes, then the other runtimes; dense and factorized always run in the same one
MODES = ("eager", "compile", "cudagraph", "compile-cudagraph")
RUNTIMES = (*MODES, "onnxruntime")
PARTS = ("model", "encoder")
#: ONNX graph fusions before ONNX Runtime runs a model: none, ONNX Runtime's transformer optimizer ("ort", what
#: ``ort_fusions=True`` asked for), or onnxscript's fusions with attention fused ("attention"; issue 24)
FUSIONS = ("none", "ort", "attention")
#: numeric precision of both models: fp32; bf16 (PyTorch runtimes, CPUs with AVX-512 BF16 / AMX or CUDA); int8
#: (ONNX Runtime quantization of the fused graph: dynamic, or static with calibrated activation ranges)
PRECISIONS = ("fp32", "bf16", "int8", "int8-static")
#: the dense model in fp32, timed in the same rounds when the precision is not fp32 ("int8 vs dense fp32")
FP32_BASELINE = "dense@fp32"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class LatencyError(ValueError):
    """A measurement setting that cannot be honoured (unknown mode/dtype, CUDA graphs on CPU...)."""


@dataclass
class LatencySettings:
    """What to measure.

    Args:
        batch_sizes: batch sizes to sweep.
        seq_lens: sequence lengths (tokens) to sweep; each batch size is measured at each length.
        repeats: timed rounds per shape (each round times every model once); median and p90 over them.
        warmup: untimed calls per model and shape before timing.
        runtime: ``eager``; ``compile`` (``torch.compile``, default inductor); ``cudagraph`` (the forward captured
            once into a CUDA graph and replayed; CUDA only); ``compile-cudagraph`` (the compiled forward captured
            into a CUDA graph: kernel time without Python or launch overhead); ``onnxruntime`` (each model
            exported to ONNX and run by an ONNX Runtime CPU session with ``threads`` intra-op threads; float32).
        mode: the former name of ``runtime`` (still accepted; giving both, they must agree).
        ort_fusions: with ``onnxruntime``, apply ONNX Runtime's transformer fusions (Gelu, LayerNorm,
            SkipLayerNorm, attention where its pattern matches) to both exported graphs first (``fusions="ort"``).
        fusions: with ``onnxruntime``: ``none``, ``ort`` (as ``ort_fusions``) or ``attention`` (onnxscript's
            fusions, attention fused for dense and factorized alike: ``lit_factor.deploy.ort.fuse_attention``).
        precision: ``fp32``; ``bf16`` (PyTorch runtimes; on a CPU only where it has AVX-512 BF16 or AMX, else a
            :class:`LatencyError` saying so); ``int8`` / ``int8-static`` (ONNX Runtime dynamic / static
            quantization of both exported graphs, after their fusions). Not fp32: the dense fp32 model is timed in
            the same rounds too (rows' ``dense_fp32_ms``).
        export_cache: a directory where ONNX exports (and their fused / quantized versions) are kept and reused
            across settings of one run (keyed by a fingerprint of the weights); ``None``: a fresh export each time.
        pad_rank_to: rank padding of low-rank layers at inference on CUDA (see docs/speed.md), set on the
            measured copies only; ``None`` keeps the layers' own setting, 0 turns it off.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the measured copies; ``None`` keeps the model's dtype.
        device: ``cpu``, ``cuda``, ``cuda:1``...; ``None`` keeps the model's device.
        threads: CPU threads (``torch.set_num_threads``) during the measurement; ``None`` leaves it alone.
        seed: seed of the random token ids.
        part: ``model`` times the whole forward (embeddings, encoder, head); ``encoder`` only the encoder stack
            on precomputed embeddings (BERT-like: ``base_model.encoder``; encoder-decoders: ``get_encoder()``).
            Prefer ``encoder`` with ``cudagraph``: during CUDA-graph capture Hugging Face's mask code takes its
            tracing-safe path (a materialised attention mask, so SDPA falls back to its fp32 math kernel),
            which is not what an eager forward runs.
    """

    batch_sizes: Sequence[int] = (8,)
    seq_lens: Sequence[int] = (128,)
    repeats: int = 10
    warmup: int = 2
    runtime: str = "eager"
    mode: str | None = None
    dtype: str | None = None
    device: str | None = None
    threads: int | None = None
    seed: int = 0
    part: str = "model"
    ort_fusions: bool = False
    pad_rank_to: int | None = None
    fusions: str = "none"
    precision: str = "fp32"
    export_cache: str | None = None

    def __post_init__(self) -> None:
        if self.ort_fusions and self.fusions == "none":
            self.fusions = "ort"
        self.ort_fusions = self.fusions == "ort"
        if self.mode is not None and self.mode != self.runtime:
            if self.runtime != "eager":
                raise LatencyError(f"mode={self.mode!r} and runtime={self.runtime!r} disagree; give runtime only")
            self.runtime = self.mode
        self.mode = self.runtime

    def check(self) -> None:
        if self.runtime not in RUNTIMES:
            raise LatencyError(f"runtime/mode={self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if self.runtime == "onnxruntime" and (self.device or "cpu") != "cpu":
            raise LatencyError(f"runtime='onnxruntime' runs on the CPU here, got device={self.device!r}")
        if self.pad_rank_to is not None and self.pad_rank_to < 0:
            raise LatencyError(f"pad_rank_to={self.pad_rank_to} must be >= 0 (0 turns rank padding off)")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise LatencyError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        for name in ("batch_sizes", "seq_lens"):
            values = list(getattr(self, name))
            if not values or any(int(v) != v or v < 1 for v in values):
                raise LatencyError(f"{name}={values} must be a non-empty list of positive integers")
        if self.repeats < 1 or self.warmup < 0:
            raise LatencyError(f"repeats={self.repeats} must be >= 1 and warmup={self.warmup} >= 0")
        if self.part not in PARTS:
            raise LatencyError(f"part={self.part!r} is not one of {', '.join(PARTS)}")
        if self.threads is not None and self.threads < 1:
            raise LatencyError(f"threads={self.threads} must be a positive integer")
        if self.fusions not in FUSIONS:
            raise LatencyError(f"fusions={self.fusions!r} is not one of {', '.join(FUSIONS)}")
        if self.precision not in PRECISIONS:
            raise LatencyError(f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.precision.startswith("int8") and self.runtime != "onnxruntime":
            raise LatencyError(f"precision={self.precision!r} is measured in runtime='onnxruntime' only (ONNX "
                               f"Runtime's quantization), got runtime={self.runtime!r}")
        if self.precision == "bf16":
            if self.runtime == "onnxruntime":
                raise LatencyError("precision='bf16' is measured in the PyTorch runtimes only (ONNX Runtime's CPU "
                                   "provider has no bf16 GEMMs)")
            if self.dtype not in (None, "bf16", "bfloat16"):
                raise LatencyError(f"precision='bf16' and dtype={self.dtype!r} disagree")
            if (self.device or "cpu") == "cpu" and not cpu_bf16():
                raise LatencyError("precision='bf16' skipped: this CPU has neither AVX-512 BF16 nor AMX (bf16 would "
                                   "be emulated, slower than fp32)")


@dataclass
class LatencyRow:
    """One (model, shape) measurement next to the dense baseline measured in the same rounds."""

    name: str
    method: str
    budget: float | None
    kept_fraction: float
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    mode: str  # the runtime (former name, kept for readers of older result files)
    runtime: str
    dense_ms: float
    factorized_ms: float
    speedup: float  # dense_ms / factorized_ms: > 1 means the factorized model is faster
    dense_p90_ms: float
    factorized_p90_ms: float
    dense_min_ms: float  # best round: closest to the uncontended time on a shared machine
    factorized_min_ms: float
    params_dense: int
    params_factorized: int
    macs_per_token_dense: int
    macs_per_token_factorized: int
    repeats: int
    threads: int | None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        row = asdict(self)
        row.update(row.pop("extra"))
        return row


# --- models ------------------------------------------------------------------------------------------------
def linear_macs_per_token(model: nn.Module) -> int:
    """Multiply-adds of all linear layers for one token: factorized layers and the fused GEMMs of
    :mod:`lit_factor.deploy.inference` by their own ``macs_per_token``, ``nn.Linear`` by its shape."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif hasattr(module, "macs_per_token"):
            total += int(module.macs_per_token)
    return total


def describe(model: nn.Module) -> dict:
    """method / budget / kept fraction of a model factorized by lit-factor (read from its layers)."""
    layers = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    if not layers:
        return {"method": "dense", "kept_fraction": 1.0}
    methods = sorted({m.method for m in layers})
    kept = sum(m.weight_params for m in layers) / sum(m.in_features * m.out_features for m in layers)
    return {"method": "+".join(methods), "kept_fraction": kept}


# --- inputs and runners --------------------------------------------------------------------------------------
def make_inputs(model: nn.Module, batch_size: int, seq_len: int, device: torch.device, seed: int = 0) -> dict:
    """Random full-length token ids (no special ids, except an end-of-sequence token where the model pools on it)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or 1000
    gen = torch.Generator().manual_seed(seed)
    low = min(1000, vocab // 2)  # stay clear of [PAD]/[CLS]/[SEP]/[unused] ids
    ids = torch.randint(low, vocab, (batch_size, seq_len), generator=gen)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int) and getattr(config, "is_encoder_decoder", False):
        ids[:, -1] = eos  # T5ForSequenceClassification pools at the (single) end-of-sequence token
    return {"input_ids": ids.to(device)}


def timed_target(model: nn.Module, inputs: dict, part: str) -> tuple[nn.Module, dict]:
    """The module to time and its keyword inputs: the whole model, or its encoder on precomputed embeddings."""
    if part == "model":
        return model, inputs
    base = getattr(model, "base_model", model)
    if hasattr(base, "embeddings") and hasattr(base, "encoder"):  # BERT, RoBERTa and their kin
        with torch.inference_mode():
            hidden = base.embeddings(input_ids=inputs["input_ids"])  # untimed: the same for every model
        return base.encoder, {"hidden_states": hidden}
    if callable(getattr(model, "get_encoder", None)):  # T5 and other encoder-decoders
        return model.get_encoder(), {"input_ids": inputs["input_ids"]}
    raise LatencyError(f"part='encoder' does not know where the encoder of {type(model).__name__} is; "
                       "use part='model'")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _runner(model: nn.Module, inputs: dict, mode: str, warmup: int, device: torch.device) -> Callable[[], object]:
    """A no-argument callable running one forward in ``mode``, already warmed up (compiled / captured)."""
    if mode.startswith("compile"):
        # Each measured copy (dense, every variant, every shape) is one more compiled graph of the same forward
        # code: past dynamo's default limit of 8 it would silently run eager and the numbers would lie.
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    fn = torch.compile(model, dynamic=False) if mode.startswith("compile") else model

    def run():
        return fn(**inputs)

    if not mode.endswith("cudagraph"):
        for _ in range(warmup):
            run()
        _sync(device)
        return run
    # Warm up (compile) on a side stream, as torch.cuda.graphs requires, then capture one forward; replays
    # rerun its kernels on the same (static) input and output buffers.
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 2)):
            run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()

    def replay():
        graph.replay()

    # The graph reads its inputs from these very buffers: they must live as long as it may replay (an encoder's
    # precomputed embeddings have no other owner; freed and reused, replays would read garbage or fault).
    replay.static_inputs = inputs
    replay()
    _sync(device)
    return replay


def _time_once(run: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _prepare(model: nn.Module, settings: LatencySettings) -> nn.Module:
    """An eval-mode copy on the measurement device and dtype (the caller's model is never touched)."""
    params = next(model.parameters(), None)
    device = torch.device(settings.device) if settings.device else (params.device if params is not None else "cpu")
    dtype = DTYPES[settings.dtype] if settings.dtype else None
    if settings.precision == "bf16":
        dtype = torch.bfloat16
    clone = copy.deepcopy(model).to(device=device, dtype=dtype)
    for p in clone.parameters():
        p.requires_grad_(False)
    if settings.pad_rank_to is not None:  # on this copy only: an instance attribute shadows the class default
        for module in clone.modules():
            if hasattr(type(module), "pad_rank_to"):
                module.pad_rank_to = settings.pad_rank_to
    return clone.eval()


def _fingerprint(module: nn.Module, part: str) -> str:
    """What an export depends on: the module's class, parameter names, shapes and values (a hash), the part."""
    import hashlib

    h = hashlib.sha1(f"{type(module).__name__}|{part}".encode())
    for name, tensor in module.state_dict().items():
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(tensor.detach().float().contiguous().cpu().numpy().tobytes()[:4096])
        h.update(f"{float(tensor.detach().float().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def onnx_file(model: nn.Module, target: nn.Module, kwargs: dict, settings: LatencySettings, path: Path) -> Path:
    """``target`` (the timed part of ``model``) exported to ``path``, fused and quantized as the settings ask.

    With ``settings.export_cache`` (a directory), each stage (export, fusion, quantization) is kept there under
    a fingerprint of the module's weights, and reused by later settings of the same run: a sweep over
    precisions exports each model once."""
    from lit_factor.deploy import ort

    cache = Path(settings.export_cache) if settings.export_cache else None
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / f"{_fingerprint(target, settings.part)}.onnx"
    if not path.is_file():
        ort.export_onnx(target, kwargs, path,
                        output_name="logits" if settings.part == "model" else "last_hidden_state")
    exported = path
    if settings.fusions == "ort":
        exported = path.with_suffix(".ortfused.onnx")
        if cache is None or not exported.is_file():
            ort.optimize_transformer(path, exported, model.config)
    elif settings.fusions == "attention":
        exported = path.with_suffix(".fused.onnx")
        if cache is None or not exported.is_file():
            ort.fuse_attention(path, exported)
    if settings.precision.startswith("int8"):
        from lit_factor.deploy.quantize import quantize_int8

        static = settings.precision == "int8-static"  # calibrated on the timed inputs (random weights anyway)
        quantized = exported.with_suffix(f".{settings.precision}.onnx")
        if cache is None or not quantized.is_file():
            quantize_int8(exported, quantized, mode="static" if static else "dynamic",
                          calibration=[ort.numpy_inputs(kwargs)] if static else None)
        exported = quantized
    return exported


def _ort_runner(model: nn.Module, inputs: dict, settings: LatencySettings, path: Path,
                sessions: dict) -> Callable[[], object]:
    """One ONNX Runtime forward of ``model`` (exported once, with dynamic axes, on its first shape)."""
    from lit_factor.deploy import ort

    target, kwargs = timed_target(model, inputs, settings.part)
    if path not in sessions:
        sessions[path] = ort.make_session(onnx_file(model, target, kwargs, settings, path), settings.threads)
    session, feed = sessions[path], ort.numpy_inputs(kwargs)

    def run():
        return session.run(None, feed)

    for _ in range(settings.warmup):
        run()
    return run


def make_runners(models: Mapping[str, nn.Module], inputs: dict, settings: LatencySettings, device: torch.device,
                 workdir: str, sessions: dict) -> dict[str, Callable[[], object]]:
    """{name: no-argument forward in ``settings.runtime``}, warmed up; ``sessions`` caches ONNX Runtime sessions
    across shapes (call under ``torch.inference_mode``)."""
    if settings.runtime == "onnxruntime":
        fp32 = dataclasses.replace(settings, precision="fp32")
        return {k: _ort_runner(m, inputs, fp32 if k == FP32_BASELINE else settings,
                               Path(workdir) / f"model{i}.onnx", sessions)
                for i, (k, m) in enumerate(models.items())}
    return {k: _runner(*timed_target(m, inputs, settings.part), settings.runtime, settings.warmup, device)
            for k, m in models.items()}


def prepare_models(dense: nn.Module, factorized: Mapping[str, nn.Module],
                   settings: LatencySettings) -> dict[str, nn.Module]:
    """Checked settings and {"dense": copy, name: copy...} ready to measure."""
    settings.check()
    models = {"dense": _prepare(dense, settings), **{k: _prepare(m, settings) for k, m in factorized.items()}}
    if settings.precision != "fp32":
        models[FP32_BASELINE] = _prepare(dense, dataclasses.replace(settings, precision="fp32"))
    device = next(models["dense"].parameters()).device
    if settings.runtime.endswith("cudagraph") and device.type != "cuda":
        raise LatencyError(f"mode={settings.runtime!r} needs a CUDA device, got device={device}")
    dtype = next(models["dense"].parameters()).dtype
    if settings.runtime == "onnxruntime" and (device.type != "cpu" or dtype != torch.float32):
        raise LatencyError(f"runtime='onnxruntime' measures float32 on the CPU here, got {dtype} on {device}")
    return models


@contextlib.contextmanager
def cpu_threads(threads: int | None):
    """``torch.set_num_threads(threads)`` for the block (restored after); ``None`` leaves it alone."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --- the measurement -----------------------------------------------------------------------------------------
def compare_latency(dense: nn.Module, factorized: Mapping[str, nn.Module], settings: LatencySettings,
                    meta: Mapping[str, dict] | None = None) -> list[LatencyRow]:
    """Time ``dense`` and every model in ``factorized`` ({name: model}) over the batch x length sweep.

    All models run in the same rounds, alternating, on the same inputs, in the same runtime. ``meta[name]`` may
    give ``method``, ``budget``, ``kept_fraction`` and extra JSON fields for that model's rows (read from its
    layers otherwise). Returns one row per (factorized model, batch size, sequence length).
    """
    with cpu_threads(settings.threads), tempfile.TemporaryDirectory(prefix="lit_factor_latency_") as workdir:
        models = prepare_models(dense, factorized, settings)
        device = next(models["dense"].parameters()).device
        counts = {k: (count_params(m), linear_macs_per_token(m)) for k, m in models.items()}
        rows, sessions = [], {}
        for batch_size in settings.batch_sizes:
            for seq_len in settings.seq_lens:
                inputs = make_inputs(models["dense"], batch_size, seq_len, device, settings.seed)
                times: dict[str, list[float]] = {k: [] for k in models}
                with torch.inference_mode():
                    runners = make_runners(models, inputs, settings, device, workdir, sessions)
                    for _ in range(settings.repeats):
                        for key, run in runners.items():
                            times[key].append(_time_once(run, device))
                del runners
                rows += [_row(key, models[key], times, counts, {**describe(models[key]), **(meta or {}).get(key, {})},
                              settings, device, batch_size, seq_len) for key in factorized]
        sessions.clear()
        return rows


def _row(key: str, model: nn.Module, times: dict, counts: dict, info: dict, settings: LatencySettings,
         device: torch.device, batch_size: int, seq_len: int) -> LatencyRow:
    dense_ms, fact_ms = statistics.median(times["dense"]), statistics.median(times[key])
    threads = (settings.threads or os.cpu_count()) if settings.runtime == "onnxruntime" else torch.get_num_threads()
    extra = {"part": settings.part, **({"ort_fusions": settings.ort_fusions, "fusions": settings.fusions}
                                       if settings.runtime == "onnxruntime" else {}),
             "precision": settings.precision, **info}
    if FP32_BASELINE in times:
        fp32_ms = statistics.median(times[FP32_BASELINE])
        extra.update(dense_fp32_ms=round(fp32_ms, 4), speedup_vs_dense_fp32=round(fp32_ms / fact_ms, 3),
                     dense_speedup_vs_fp32=round(fp32_ms / dense_ms, 3))
    return LatencyRow(
        name=key, method=extra.pop("method"), budget=extra.pop("budget", None),
        kept_fraction=round(float(extra.pop("kept_fraction")), 4), device=_device_name(device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."), batch_size=batch_size, seq_len=seq_len,
        mode=settings.runtime, runtime=settings.runtime, dense_ms=round(dense_ms, 4),
        factorized_ms=round(fact_ms, 4), speedup=round(dense_ms / fact_ms, 3),
        dense_p90_ms=round(_percentile(times["dense"], 0.9), 4),
        factorized_p90_ms=round(_percentile(times[key], 0.9), 4),
        dense_min_ms=round(min(times["dense"]), 4), factorized_min_ms=round(min(times[key]), 4),
        params_dense=counts["dense"][0], params_factorized=counts[key][0],
        macs_per_token_dense=counts["dense"][1], macs_per_token_factorized=counts[key][1],
        repeats=settings.repeats, threads=threads if device.type == "cpu" else None, extra=extra)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def _human(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def runtime_label(row: LatencyRow | dict) -> str:
    """``eager``, ``compile``, ``onnxruntime``, ``onnxruntime+fusions`` ... of a row (or of its JSON dict);
    ``+rewrites`` where the models ran after lit_factor.deploy.inference's rewrites (benchmark ``--optimize``)."""
    data = row.to_dict() if isinstance(row, LatencyRow) else row
    fusions = data.get("fusions") or ("ort" if data.get("ort_fusions") else "none")
    precision = data.get("precision", "fp32")
    return (data.get("runtime", data.get("mode", "eager")) + {"none": "", "ort": "+fusions", "attention":
                                                               "+attention"}[fusions]
            + ("+rewrites" if data.get("optimized") else "") + ("" if precision == "fp32" else f" {precision}"))


def format_table(rows: Sequence[LatencyRow], title: str = "") -> str:
    """A plain-text table; every row where factorization is slower than dense says so."""
    if not rows:
        return "(no latency rows)"
    head = ("model", "kept", "batch x len", "runtime", "dense ms", "factorized ms", "p90 d/f ms", "speedup",
            "params d -> f", "MACs/token d -> f")
    lines = [head]
    for r in rows:
        verdict = f"{r.speedup:.2f}x" + ("  SLOWER than dense" if r.speedup < 1 else "")
        lines.append((
            r.name, f"{r.kept_fraction:.1%}", f"{r.batch_size} x {r.seq_len}", runtime_label(r), f"{r.dense_ms:.2f}",
            f"{r.factorized_ms:.2f}", f"{r.dense_p90_ms:.2f}/{r.factorized_p90_ms:.2f}", verdict,
            f"{_human(r.params_dense)} -> {_human(r.params_factorized)}",
            f"{_human(r.macs_per_token_dense)} -> {_human(r.macs_per_token_factorized)}",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    first = rows[0]
    threads = f", {first.threads} CPU threads" if first.threads else ""
    what = "the encoder forward" if first.extra.get("part") == "encoder" else "the whole model forward"
    header = (title + "\n" if title else "") + (
        f"latency of {what} on {first.device}, {first.dtype}{threads}; "
        f"median of {first.repeats} alternating rounds (speedup = dense ms / factorized ms)")
    return "\n".join([header, text[0], "-" * len(text[0]), *text[1:]])
