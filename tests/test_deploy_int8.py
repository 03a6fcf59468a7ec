"""Issue 24 (tiny models, CPU): attention fused in the ONNX export for dense, low-rank and Monarch models and
equal to PyTorch within 1e-4; the int8 export round trip (within a stated tolerance, same predicted labels);
the quantizer cannot drop the padding mask; an exported directory evaluates to its checkpoint's `test` metric;
precision settings and the Amdahl bound."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime
import pytest
import torch
from conftest import quiet_trainer
from test_export import reference_logits, trained_like, write_checkpoint

from lit_factor.deploy.evaluate import main as evaluate_main
from lit_factor.deploy.export import main as export_main
from lit_factor.deploy.export import model_inputs
from lit_factor.deploy.latency import LatencyError, LatencySettings
from lit_factor.deploy.profiling import amdahl_bound

#: int8 tolerance stated for tiny random models: |logit - checkpoint logit| (their logits are ~0.1-1)
INT8_TOLERANCE = 0.05
FUSED = {"none": "Attention", "lowrank": "MultiHeadAttention", "monarch": "MultiHeadAttention"}


def session_logits(path: Path, inputs: dict) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    """``int8_export(method, budget, capsys)``: (module, export directory, what the export printed) of
    :func:`trained_like`'s model exported to ONNX with int8, once per module (several tests read the same export)."""
    made = {}

    def export(method: str, budget: float | None, capsys) -> tuple:
        if (method, budget) not in made:
            module, root = trained_like(method, budget), tmp_path_factory.mktemp(f"int8-{method}")
            ckpt, out = write_checkpoint(root / "m.ckpt", module), root / "onnx"
            capsys.readouterr()
            assert export_main(["--ckpt_path", str(ckpt), "--to", str(out), "--format", "onnx", "--quantize",
                                "int8"]) == 0
            made[method, budget] = module, out, capsys.readouterr().out
        return made[method, budget]
    return export


@pytest.mark.slow
@pytest.mark.parametrize("method,budget", [("none", None), ("lowrank", 0.5), ("monarch", None)])
def test_fused_attention_export_equals_pytorch_and_int8_round_trips(int8_export, capsys, method, budget):
    module, out, printed = int8_export(method, budget, capsys)
    manifest = json.loads((out / "lit_factor_export.json").read_text())
    layers = module.factorized_model.config.num_hidden_layers
    # counted from the written graph: one fused attention per layer, LayerNorm + residual fused twice per layer
    assert manifest["check"]["fusions"]["model.onnx"][FUSED[method]] == layers
    assert manifest["check"]["fusions"]["model.onnx"]["SkipLayerNormalization"] == 2 * layers
    assert f"{FUSED[method]} x{layers}" in printed
    inputs = model_inputs(module.factorized_model, 4, 9, seed=7)  # a padded row; a shape the export never saw
    want = reference_logits(module, inputs)
    torch.testing.assert_close(session_logits(out / "model.onnx", inputs), want, atol=1e-4, rtol=0)
    int8 = session_logits(out / "model.int8.onnx", inputs)
    assert (int8 - want).abs().max() <= INT8_TOLERANCE
    assert torch.equal(int8.argmax(-1), want.argmax(-1))
    assert 0 < manifest["check"]["max_abs_logit_diff[model.int8.onnx]"] <= INT8_TOLERANCE  # quantized, not a copy
    assert manifest["check"]["int8"]["mode"] == "dynamic" and manifest["check"]["int8"]["label_agreement"] == 1.0


@pytest.mark.slow
def test_quantized_dense_attention_keeps_the_padding_mask(int8_export, capsys):
    """ONNX Runtime's quantizer makes a fused Attention a QAttention, which has no attention-bias input: the mask
    would be dropped. The int8 graph must carry the mask into every attention instead."""
    import onnx

    _, out, _ = int8_export("none", None, capsys)
    nodes = onnx.load(str(out / "model.int8.onnx")).graph.node
    attention = [n for n in nodes if n.op_type in ("Attention", "QAttention", "MultiHeadAttention")]
    assert attention and all(n.op_type == "MultiHeadAttention" for n in attention)
    assert all(len(n.input) > 5 and n.input[5] for n in attention)  # attention bias (the mask) wired in
    assert sum(n.op_type == "MatMulInteger" for n in nodes) >= 3 * len(attention)  # Q/K/V product quantized too


def test_onnx_only_options_are_refused_elsewhere(tmp_path, capsys):
    module = trained_like("lowrank")
    ckpt = write_checkpoint(tmp_path / "m.ckpt", module)
    for argv, message in (
            (["--format", "hf", "--quantize", "int8"], "--quantize apply to --format onnx only"),
            (["--format", "onnx", "--quantize", "int8", "--quantize-mode", "static"], "needs --calibration-data")):
        with pytest.raises(SystemExit) as exit_info:
            export_main(["--ckpt_path", str(ckpt), "--to", str(tmp_path / "out"), *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
        assert not (tmp_path / "out").exists()


def checkpoint_test_metrics(module, glue_root: Path) -> dict:
    """What `test` reports for the checkpoint's model on the dev split (the Lightning test loop, its metrics)."""
    from lit_factor.train.data import GLUEDataModule

    data = GLUEDataModule("sst2", data_dir=str(glue_root), model_name_or_path="random:tiny-bert", batch_size=4,
                          cache_dir=str(glue_root / "cache"))
    results = quiet_trainer().test(module, datamodule=data, verbose=False)[0]
    return {k: v for k, v in results.items() if k.startswith("dev/") and not k.endswith("loss")}


@pytest.mark.slow
def test_an_export_evaluates_to_its_checkpoints_test_metric(tmp_path, int8_export, glue_writer, capsys,
                                                            monkeypatch):
    monkeypatch.setenv("LIT_FACTOR_CACHE", str(tmp_path / "cache"))
    root = glue_writer("SST-2", n_dev=24)
    module, onnx_out, _ = int8_export("lowrank", 0.5, capsys)  # the ONNX + int8 export of the fused-attention test
    want = checkpoint_test_metrics(module, root)
    ckpt = write_checkpoint(tmp_path / "m.ckpt", module)
    got = {}
    for fmt in ("hf", "dense", "onnx"):
        out = onnx_out if fmt == "onnx" else tmp_path / fmt
        if fmt != "onnx":
            assert export_main(["--ckpt_path", str(ckpt), "--to", str(out), "--format", fmt]) == 0
        files = [None, "model.int8.onnx"] if fmt == "onnx" else [None]
        for file in files:
            target = tmp_path / f"{fmt}-{file}.json"
            argv = [str(out), "--data.data_dir", str(root), "--data.batch_size", "4", "--json", str(target)]
            assert evaluate_main(argv + (["--file", file] if file else [])) == 0
            got[(fmt, file)] = json.loads(target.read_text())["metrics"]
    assert want and set(want) <= set(got[("hf", None)])
    for key in (("hf", None), ("dense", None), ("onnx", None)):  # fp32 exports: the checkpoint's metric, exactly
        assert {k: got[key][k] for k in want} == pytest.approx(want, abs=1e-12), key
    assert abs(got[("onnx", "model.int8.onnx")]["dev/accuracy"] - want["dev/accuracy"]) <= 1 / 24 + 1e-9
    assert "dev/accuracy = " in capsys.readouterr().out


def test_evaluate_refuses_what_is_not_an_export(tmp_path, capsys):
    for argv, message in (([str(tmp_path / "missing")], "is not a directory"),
                          ([str(tmp_path)], "not an export")):
        with pytest.raises(SystemExit) as exit_info:
            evaluate_main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_precision_settings_are_checked():
    with pytest.raises(LatencyError, match="precision='int8' is measured in runtime='onnxruntime' only"):
        LatencySettings(runtime="eager", precision="int8").check()
    with pytest.raises(LatencyError, match="bf16"):
        LatencySettings(runtime="onnxruntime", precision="bf16").check()
    with pytest.raises(LatencyError, match="precision='fp8'"):
        LatencySettings(precision="fp8").check()
    assert LatencySettings(ort_fusions=True).fusions == "ort"  # the former switch still works


def test_amdahl_bound_from_the_dense_profile():
    # 60 ms of GEMMs, 40 ms of the rest: half the MACs -> 100 / (30 + 40)
    bound = amdahl_bound({"MatMul": 60.0, "Softmax": 25.0, "SkipLayerNormalization": 15.0}, "onnxruntime", 0.5)
    assert bound["bound"] == pytest.approx(100 / 70) and bound["gemm_share"] == pytest.approx(0.6)
    # a fused Attention holds the packed Q/K/V GEMM: a third of the other GEMMs' time moves from the rest to g
    fused = amdahl_bound({"MatMul": 60.0, "Attention": 30.0, "BiasGelu": 10.0}, "onnxruntime", 0.5)
    assert fused["gemm_share"] == pytest.approx(0.8) and fused["bound"] == pytest.approx(100 / 60)
    torch_bound = amdahl_bound({"aten::addmm": 80.0, "aten::gelu": 20.0}, "eager", 0.25)
    assert torch_bound["bound"] == pytest.approx(100 / 40)


def test_loaded_flag_counts_the_measurements_own_threads():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", Path(__file__).resolve().parents[1] / "benchmarks" /
                                                  "latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert not bench.is_loaded([1.8, 2.9], threads=2)  # our own two threads and a little noise
    assert bench.is_loaded([1.8, 7.5], threads=2)
    assert not bench.is_loaded([None], threads=2)


def test_deploy_doc_is_the_generated_one():
    """docs/deploy.md holds only what benchmarks/deploy_report.py prints from the result files."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_report", Path(__file__).resolve().parents[1] /
                                                  "benchmarks" / "deploy_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report.main(["--check"]) == 0
