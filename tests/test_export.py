"""``cli.py export``: every format round-trips every structure (and a mid-staging checkpoint) to the same logits;
bad checkpoints and occupied directories are refused with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch

import lit_factor
from lit_factor.compress.surgery import count_params
from lit_factor.compress.switchable import find_switchable
from lit_factor.deploy.export import main, model_inputs
from lit_factor.train.module import Factorization, FactorizedClassifier

ROOT = Path(__file__).resolve().parents[1]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


def write_checkpoint(path: Path, module: FactorizedClassifier) -> Path:
    """What a fit's ModelCheckpoint writes, minus optimizer state (export never reads it)."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 1}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def trained_like(method: str, budget: float | None = 0.5, staged_switches: int | None = None):
    """A tiny factorized classifier with non-trivial weights (biases and factors moved off their init)."""
    torch.manual_seed(0)
    module = FactorizedClassifier("random:tiny-bert", "sst2", Factorization(method, budget=budget))
    if staged_switches is not None:
        module.enable_staging()
    module.configure_model()
    switches = list(find_switchable(module.factorized_model).values())
    for switch in switches[:staged_switches or 0]:
        switch.switch_()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return module


def reference_logits(module: FactorizedClassifier, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return module.factorized_model.eval()(**inputs).logits


def reload(fmt: str, out: Path, inputs: dict) -> torch.Tensor:
    if fmt == "hf":
        with torch.inference_mode():
            return lit_factor.load_pretrained(out)(**inputs).logits
    if fmt == "dense":
        from transformers import AutoModelForSequenceClassification  # transformers alone, no lit_factor code

        assert "lit_factor" not in json.loads((out / "config.json").read_text())
        with torch.inference_mode():
            return AutoModelForSequenceClassification.from_pretrained(out).eval()(**inputs).logits
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])


def export_and_compare(tmp_path: Path, module, fmt: str, *extra: str) -> tuple[Path, str]:
    ckpt = write_checkpoint(tmp_path / "model.ckpt", module)
    out = tmp_path / f"out_{fmt}"
    assert main(["--ckpt_path", str(ckpt), "--to", str(out), "--format", fmt, *extra]) == 0
    inputs = model_inputs(module.factorized_model, 4, 9, seed=7)
    torch.testing.assert_close(reload(fmt, out, inputs), reference_logits(module, inputs), atol=1e-4, rtol=1e-4)
    assert not {p.suffix for p in out.iterdir()} & PICKLE_SUFFIXES  # nothing pickled
    assert json.loads((out / "lit_factor_export.json").read_text())["format"] == fmt
    return out, ""


@pytest.mark.parametrize("method, budget", [("lowrank", 0.5), ("monarch", None), ("blockwise", None)])
@pytest.mark.parametrize("fmt", ["hf", "dense"])
def test_round_trip_hf_and_dense(tmp_path, fmt, method, budget):
    module = trained_like(method, budget)
    out, _ = export_and_compare(tmp_path, module, fmt)
    if fmt == "hf":
        plan = json.loads((out / "config.json").read_text())["lit_factor"]["plan"]
        assert plan["method"] == method and len(plan["entries"]) == len(module.plan.entries)
        from safetensors.torch import load_file

        stored = sum(t.numel() for t in load_file(out / "model.safetensors").values())
        assert stored == count_params(module.factorized_model) < module.dense_params  # the factors, not W


@pytest.mark.slow
@pytest.mark.parametrize("method, budget", [("lowrank", 0.5), ("monarch", None), ("blockwise", None)])
def test_round_trip_onnx(tmp_path, method, budget):
    export_and_compare(tmp_path, trained_like(method, budget), "onnx")


@pytest.mark.slow
def test_onnx_with_fusions_and_inference_rewrites(tmp_path, capsys):
    out, _ = export_and_compare(tmp_path, trained_like("monarch", None), "onnx", "--ort-fusions", "--optimize")
    manifest = json.loads((out / "lit_factor_export.json").read_text())
    assert manifest["check"]["rewrites"]["ffn_chunk_order"] == 2
    assert manifest["check"]["max_abs_logit_diff[model.fused.onnx]"] <= 1e-4
    assert "model.fused.onnx" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["hf", "dense", pytest.param("onnx", marks=pytest.mark.slow)])
def test_mid_staging_checkpoint_exports_what_it_is(tmp_path, capsys, fmt):
    module = trained_like("lowrank", 0.5, staged_switches=3)
    out, _ = export_and_compare(tmp_path, module, fmt)
    printed = capsys.readouterr().out
    assert "mid-staging checkpoint: 3 of 12 planned layers are factorized" in printed
    manifest = json.loads((out / "lit_factor_export.json").read_text())
    assert manifest["mid_staging"] is True and manifest["factorized_layers"] == 3
    if fmt == "hf":
        assert len(json.loads((out / "config.json").read_text())["lit_factor"]["plan"]["entries"]) == 3


def test_dense_checkpoint_exports_too(tmp_path):
    export_and_compare(tmp_path, trained_like("none"), "hf")


def refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_refuses_missing_and_foreign_checkpoints(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "no such file" in refused(["--ckpt_path", str(tmp_path / "nope.ckpt"), "--to", out, "--format", "hf"],
                                     capsys)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert "garbage.ckpt" in refused(["--ckpt_path", str(garbage), "--to", out, "--format", "hf"], capsys)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, foreign)
    assert "not a lit-factor checkpoint" in refused(["--ckpt_path", str(foreign), "--to", out, "--format", "onnx"],
                                                    capsys)
    assert not Path(out).exists()  # nothing written


def test_refuses_a_non_empty_directory_without_overwrite(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "model.ckpt", trained_like("lowrank"))
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = refused(["--ckpt_path", str(ckpt), "--to", str(out), "--format", "hf"], capsys)
    assert "--overwrite" in err and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main(["--ckpt_path", str(ckpt), "--to", str(out), "--format", "hf", "--overwrite"]) == 0
    assert (out / "keep.txt").read_text() == "mine" and (out / "model.safetensors").exists()


@pytest.mark.slow
def test_cli_dispatches_export_and_reports_one_line(tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    done = subprocess.run([sys.executable, "cli.py", "export", "--ckpt_path", str(foreign), "--to",
                           str(tmp_path / "o"), "--format", "hf"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error: ")
