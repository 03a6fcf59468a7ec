"""int8 ONNX models with ONNX Runtime's quantization tools: what people ship on CPUs instead of fp32.

    quantize_int8("model.onnx", "model.int8.onnx")                                    # dynamic
    quantize_int8("model.onnx", "model.int8.onnx", mode="static", calibration=feeds)   # calibrated

* ``dynamic`` (``onnxruntime.quantization.quantize_dynamic``): int8 weights (QInt8), activations quantized at run
  time per tensor; no data needed. On AVX-512 VNNI / AMX CPUs ONNX Runtime runs the products as int8 GEMMs.
* ``static`` (``quantize_static``, QDQ format): activation ranges calibrated once on ``calibration`` feeds
  (training sentences for a real model), so no run-time range computation and, where two products follow each
  other (a low-rank layer's ``down`` then ``up``), the intermediate can stay int8.

Quantize *after* the attention fusions (``ort.fuse_attention``): the quantizer then sees the fused graph (a
dense model's ``Attention`` op becomes ``QAttention`` in the dynamic mode). Which mode is faster for which model
is measured, not assumed: docs/deploy.md.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

MODES = ("dynamic", "static")


class _Feeds:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of input dicts (numpy arrays)."""

    def __init__(self, feeds: Iterable[Mapping[str, np.ndarray]]) -> None:
        self._feeds = [dict(f) for f in feeds]
        self._iter = iter(self._feeds)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._feeds)


def attention_to_mha(model) -> int:
    """Rewrite every fused ``Attention`` (a dense model's: packed Q/K/V GEMM inside) into its Q/K/V ``MatMul``,
    a ``Split`` and a ``MultiHeadAttention`` with the same bias and attention bias (an ``onnx_ir`` model, in place).

    ONNX Runtime's quantizer turns ``Attention`` into ``QAttention``, which has no attention-bias input: the
    padding mask of an exported classifier would be dropped silently (the quantizer's ``AttentionQuant`` copies
    inputs 0-4 only). As a ``MatMul`` the Q/K/V product is quantized like every other linear layer, and the mask
    reaches the attention. Returns how many it rewrote."""
    import onnx_ir as ir

    rewritten = 0
    for node in list(model.graph):
        if node.op_type != "Attention" or node.domain != "com.microsoft":
            continue
        x, weight = node.inputs[0], node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        mask_index = node.inputs[3] if len(node.inputs) > 3 else None
        past = node.inputs[4] if len(node.inputs) > 4 else None
        attention_bias = node.inputs[5] if len(node.inputs) > 5 else None
        if weight.const_value is None or mask_index is not None or past is not None or len(node.outputs) > 1:
            continue  # a form this rewrite does not know: leave it
        width = weight.const_value.shape[1] // 3
        sizes = node.attributes.get("qkv_hidden_sizes")
        if sizes is not None and len(set(sizes.as_ints())) != 1:
            continue
        name = node.name or node.outputs[0].name
        matmul = ir.node("MatMul", [x, weight], name=f"{name}_qkv")
        split_sizes = ir.Value(name=f"{name}_qkv_sizes", const_value=ir.tensor(np.array([width] * 3, np.int64)))
        model.graph.register_initializer(split_sizes)
        split = ir.node("Split", [matmul.outputs[0], split_sizes], {"axis": -1}, num_outputs=3, name=f"{name}_split")
        attrs = {"num_heads": node.attributes["num_heads"].as_int()}
        if "scale" in node.attributes:
            attrs["scale"] = node.attributes["scale"].as_float()
        mha = ir.node("MultiHeadAttention", [*split.outputs, bias, None, attention_bias], attrs,
                      domain="com.microsoft", name=f"{name}_mha")
        out = node.outputs[0]
        mha.outputs[0].shape, mha.outputs[0].type = out.shape, out.type
        for value in (*split.outputs, matmul.outputs[0]):
            value.type = out.type
        model.graph.insert_before(node, [matmul, split, mha])
        out.replace_all_uses_with(mha.outputs[0], replace_graph_outputs=True)
        mha.outputs[0].name = out.name
        model.graph.remove(node, safe=True)
        rewritten += 1
    return rewritten


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike, mode: str = "dynamic",
                  calibration: Iterable[Mapping[str, np.ndarray]] | None = None, per_channel: bool = False) -> Path:
    """Write the int8 version of the ONNX model ``src`` to ``dst`` (``mode`` dynamic or static); static needs
    ``calibration``: feeds (input name -> numpy array) run through the fp32 model to calibrate activation ranges."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode not in MODES:
        raise ValueError(f"quantization mode {mode!r} is not one of {', '.join(MODES)}")
    dst = Path(dst)
    import onnx_ir as ir

    model = ir.load(str(src))
    if attention_to_mha(model):  # QAttention would drop the padding mask (see attention_to_mha)
        src = dst.with_name(dst.stem + ".prequant.onnx")
        ir.save(model, str(src))
    sink = io.StringIO()
    previous = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs a line per skipped node at INFO/WARNING
    try:
        with contextlib.redirect_stdout(sink):
            if mode == "dynamic":
                quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
            else:
                if calibration is None:
                    raise ValueError("static quantization needs calibration feeds")
                reader = _Feeds(calibration)
                CalibrationDataReader.register(_Feeds)
                quantize_static(str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                per_channel=per_channel, extra_options={"ActivationSymmetric": False})
    finally:
        logging.getLogger().setLevel(previous)
        if Path(src).name.endswith(".prequant.onnx"):
            Path(src).unlink(missing_ok=True)
    return dst
