"""The latency measurement: core, benchmark command, Lightning callback (tiny models, CPU, eager)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lit_factor.callbacks import LatencyCallback
from lit_factor.compress.surgery import apply_plan, build_plan
from lit_factor.compress.switchable import dense_equivalent
from lit_factor.deploy.latency import (
    LatencyError,
    LatencySettings,
    compare_latency,
    format_table,
    linear_macs_per_token,
    make_inputs,
)
from lit_factor.factorize import FactorizedLinear
from lit_factor.models import load_model
from lit_factor.train.module import FactorizedClassifier
from tests.conftest import quiet_trainer, synthetic_loader

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"method", "budget", "kept_fraction", "device", "dtype", "batch_size", "seq_len", "dense_ms",
            "factorized_ms", "speedup", "params_dense", "params_factorized", "mode"}
FAST = dict(batch_sizes=[2], seq_lens=[8], repeats=2, warmup=1)


def factorized_tiny(method="lowrank", budget=0.5):
    torch.manual_seed(0)
    model = load_model("random:tiny-bert")
    apply_plan(model, build_plan(model, method, budget))
    return model.eval()


def test_dense_equivalent_computes_the_same_function_with_plain_linears():
    fact = factorized_tiny("monarch", None)
    dense = dense_equivalent(fact).eval()
    assert not any(isinstance(m, FactorizedLinear) for m in dense.modules())
    assert any(isinstance(m, FactorizedLinear) for m in fact.modules())  # the original is untouched
    inputs = make_inputs(fact, 2, 8, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(dense(**inputs).logits, fact(**inputs).logits, atol=1e-5, rtol=1e-4)
    assert linear_macs_per_token(fact) < linear_macs_per_token(dense)


def test_compare_latency_rows_and_table():
    fact = factorized_tiny()
    dense = dense_equivalent(fact)
    settings = LatencySettings(batch_sizes=[1, 2], seq_lens=[8], repeats=3, warmup=1, threads=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = compare_latency(dense, {"lr": fact}, settings, {"lr": {"budget": 0.5}})
        assert torch.get_num_threads() == 2  # the measurement's 1 thread (row["threads"]) was undone
    finally:
        torch.set_num_threads(threads)
    assert [(r.batch_size, r.seq_len) for r in rows] == [(1, 8), (2, 8)]
    row = rows[0].to_dict()
    assert REQUIRED <= set(row)
    assert row["speedup"] == pytest.approx(row["dense_ms"] / row["factorized_ms"], rel=1e-2)
    assert row["params_factorized"] < row["params_dense"] and row["threads"] == 1
    assert row["dense_p90_ms"] >= row["dense_ms"] > 0
    assert 0.4 < row["kept_fraction"] <= 0.5 and row["method"] == "lowrank" and row["budget"] == 0.5
    rows[0].speedup, rows[1].speedup = 0.5, 2.0
    table = format_table(rows).splitlines()
    assert "SLOWER" in table[3] and "SLOWER" not in table[4]


@pytest.mark.parametrize("bad, message", [
    (dict(mode="jit"), "mode='jit'"), (dict(dtype="int8"), "dtype='int8'"), (dict(batch_sizes=[0]), "batch_sizes"),
])
def test_bad_settings_name_the_value(bad, message):
    with pytest.raises(LatencyError, match=message):
        LatencySettings(**bad).check()


def test_cudagraph_mode_refuses_cpu():
    fact = factorized_tiny()
    with pytest.raises(LatencyError, match="cudagraph"):
        compare_latency(dense_equivalent(fact), {"f": fact}, LatencySettings(mode="cudagraph", device="cpu", **FAST))


@pytest.mark.slow  # a fresh interpreter importing torch and transformers
def test_benchmark_command_writes_json(tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--model", "tiny-bert", "--method", "lowrank",
           "monarch", "--budget", "0.5", "--device", "cpu", "--dtype", "float32", "--batch-sizes", "2",
           "--seq-lens", "8", "--repeats", "2", "--warmup", "1", "--init", "random", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["lowrank", "monarch"]
    for row in rows:
        assert REQUIRED <= set(row)
        assert row["device"] == "cpu" and row["dtype"] == "float32" and row["mode"] == "eager"
        assert row["budget"] == 0.5 and row["batch_size"] == 2 and row["seq_len"] == 8
        # the row's speedup is rounded to 3 decimals: a small one (a timing spike on a loaded machine) needs abs
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["factorized_ms"], rel=1e-2, abs=1e-3)
    assert "speedup" in done.stdout and "lowrank@0.5" in done.stdout


def test_benchmark_command_rejects_a_bad_budget(capsys):
    spec = importlib.util.spec_from_file_location("latency_benchmark", ROOT / "benchmarks" / "latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny-bert", "--budget", "1.5"])
    assert "1.5" in capsys.readouterr().err
    assert bench.model_source("bert-base") == "random:bert-base"
    assert bench.model_source("bert-base-uncased") == "bert-base-uncased"  # hub names pass through


# --- the callback in a real (tiny) fit ------------------------------------------------------------------------
def tiny_loader():
    return synthetic_loader(8, batch_size=4)


def tiny_module():
    return FactorizedClassifier("random:tiny-bert", task="sst2", factorization={"method": "lowrank", "budget": 0.5})


def test_callback_in_fast_dev_run_prints_its_table(capsys, tmp_path):
    callback = LatencyCallback(**FAST)
    trainer = quiet_trainer(fast_dev_run=True, callbacks=[callback], default_root_dir=tmp_path)
    trainer.fit(tiny_module(), train_dataloaders=tiny_loader())
    assert len(callback.rows) == 1 and callback.rows[0].method == "lowrank"
    assert callback.rows[0].params_factorized < callback.rows[0].params_dense
    out = capsys.readouterr().out
    assert "inference latency at fit_end (single process)" in out and "speedup" in out


def test_callback_logs_its_table_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = LatencyCallback(**FAST, when=["fit_end", "test_end"])
    module = tiny_module()
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, callbacks=[callback],
                            logger=pl.loggers.TensorBoardLogger(tmp_path))
    trainer.fit(module, train_dataloaders=tiny_loader())
    before = copy.deepcopy(module.model.state_dict())
    trainer.test(module, dataloaders=tiny_loader(), verbose=False)
    for key, value in module.model.state_dict().items():  # measuring never changes the trained model
        assert torch.equal(value, before[key]), key
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"tensors": 0}).Reload()
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("latency/")]  # no one-point charts
    for stage in ("fit_end", "test_end"):  # the text tables
        assert any(f"latency/{stage}" in tag for tag in events.Tags()["tensors"]), stage


def test_callback_rejects_bad_when():
    with pytest.raises(ValueError, match="when=.*fit_end, test_end"):
        LatencyCallback(when=["epoch_end"])


def test_callback_is_configurable_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(LatencyCallback, "latency")
    cfg = parser.parse_string("latency:\n  batch_sizes: [8, 32]\n  seq_lens: [64, 128]\n  repeats: 5\n"
                              "  when: [fit_end, test_end]\n  part: encoder\n  dtype: bfloat16\n")
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    callback = instantiate(cfg).latency
    assert callback.settings.batch_sizes == [8, 32] and callback.settings.seq_lens == [64, 128]
    assert callback.settings.part == "encoder" and callback.when == ["fit_end", "test_end"]
    with pytest.raises(Exception, match="part='decoder'"):
        LatencyCallback(part="decoder")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_callback_under_ddp_measures_on_rank_zero_only(tmp_path):
    worker = Path(__file__).with_name("_latency_ddp_worker.py")
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(worker), str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert len(rank0["rows"]) == 1 and rank1["rows"] == []
    assert proc.stdout.count("inference latency at fit_end (rank 0 of 2)") == 1
    assert proc.stdout.count("run SUCCEEDED") == 1 and proc.stdout.count("inference: ") == 1  # RunSummary


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["eager", "cudagraph"])
def test_callback_on_cuda(capsys, tmp_path, mode):
    callback = LatencyCallback(**FAST, mode=mode, part="encoder", dtype="bfloat16")
    trainer = quiet_trainer(fast_dev_run=True, accelerator="gpu", callbacks=[callback], default_root_dir=tmp_path)
    trainer.fit(tiny_module(), train_dataloaders=tiny_loader())
    row = callback.rows[0]
    assert row.device.startswith("cuda") and row.dtype == "bfloat16" and row.mode == mode
    assert "latency of the encoder forward on cuda" in capsys.readouterr().out


def test_callback_measures_on_the_training_device_not_where_teardown_left_the_model(monkeypatch):
    """Lightning moves the module to the CPU before on_fit_end; the callback must use the strategy's device."""
    import types

    import lit_factor.deploy.callback as latency_callback

    seen = {}
    monkeypatch.setattr(latency_callback, "compare_latency",
                        lambda dense, factorized, settings, meta: seen.setdefault("device", settings.device) and [])
    trainer = types.SimpleNamespace(global_rank=0, world_size=1, loggers=[], global_step=0,
                                    strategy=types.SimpleNamespace(root_device=torch.device("cuda", 3),
                                                                   barrier=lambda name: None))
    module = types.SimpleNamespace(factorized_model=factorized_tiny(), plan=None)  # the module interface only
    LatencyCallback(**FAST).measure(trainer, module, "fit_end")
    assert seen["device"] == "cuda:3"
