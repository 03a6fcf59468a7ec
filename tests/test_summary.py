"""RunSummary and LineProgress in plain Trainer fits (the CLI adds them; tests/test_cli.py checks them there)."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lit_factor.callbacks import LineProgress, RunSummary, StabilityMonitor
from lit_factor.errors import UserError
from lit_factor.train.module import Factorization, FactorizedClassifier
from tests.conftest import quiet_trainer, synthetic_loader


def _fit(tmp_path, max_epochs: int, ckpt_path=None, **stability):
    module = FactorizedClassifier("random:tiny-bert", task="sst2", learning_rate=1e-3, warmup_ratio=0.0,
                                  factorization=Factorization("lowrank", budget=0.5))
    summary = RunSummary()
    callbacks = [ModelCheckpoint(monitor="val/accuracy", mode="max", save_top_k=-1), summary,
                 StabilityMonitor(monitor="val/accuracy", **stability)]
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=callbacks, num_sanity_val_steps=0,
                            logger=TensorBoardLogger(tmp_path, name="run", version=0), enable_checkpointing=True)
    trainer.fit(module, synthetic_loader(16), synthetic_loader(8, seed=1), ckpt_path=ckpt_path)
    return trainer, summary


def test_failed_run_then_resumed_run_summarize_the_whole_run(tmp_path, capsys):
    trainer, summary = _fit(tmp_path, max_epochs=2, success_threshold=1.01)  # accuracy can never beat 1.01
    written = json.loads((tmp_path / "run" / "version_0" / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary.summary))
    assert written["status"] == "failed" and "val/accuracy" in written["reasons"][0]
    assert written["stability"]["succeeded"] is False and written["stability"]["threshold"] == 1.01
    assert (written["final"]["epoch"], written["final"]["step"]) == (1, 8)
    assert written["best"]["value"] == pytest.approx(float(trainer.checkpoint_callback.best_model_score))
    out = capsys.readouterr().out
    assert "run FAILED" in out and "failed because: val/accuracy" in out
    first_time = written["train_time_s"]

    last = tmp_path / "run" / "version_0" / "checkpoints" / "epoch=1-step=8.ckpt"
    # The checkpoint holds the time up to its save, not the run's final time (validation and teardown come after):
    # the resumed total must exceed what the checkpoint carried, whatever the machine's load.
    states = torch.load(last, map_location="cpu", weights_only=False)["callbacks"]
    carried = next(v["train_time_s"] for k, v in states.items() if k.startswith("RunSummary"))
    assert 0 < carried <= first_time
    trainer, summary = _fit(tmp_path, max_epochs=3, ckpt_path=last, success_threshold=-1.0)
    resumed = summary.summary
    assert resumed["status"] == "succeeded" and resumed["resumed_from"] == {"epoch": 1, "step": 8}
    assert (resumed["final"]["epoch"], resumed["final"]["step"]) == (2, 12)
    assert resumed["train_time_s"] > carried  # the interrupted part counts too (callback state)
    assert resumed["best"]["value"] >= written["best"]["value"]  # the earlier epochs still compete
    assert "(resumed from epoch 1, step 8)" in capsys.readouterr().out


def test_line_progress_every_n_steps(capsys):
    module = FactorizedClassifier("random:tiny-bert", task="sst2", factorization=Factorization("none"))
    trainer = quiet_trainer(max_steps=6, callbacks=[LineProgress(every_n_steps=2)], enable_progress_bar=True,
                            limit_val_batches=0)
    trainer.fit(module, synthetic_loader(24))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["2/6", "4/6", "6/6"]
    assert all(" loss " in ln and " it/s " in ln and " eta " in ln for ln in lines)
    with pytest.raises(UserError, match="every_n_steps=0"):
        LineProgress(every_n_steps=0)


@pytest.mark.parametrize("sanity_steps", [-1, 2])
def test_at_start_is_the_projected_models_dev_metric_only_after_a_full_sanity_check(tmp_path, sanity_steps):
    # The reference: validate the same (seeded, projected, untrained) model on its own.
    def module():
        import lightning as L

        L.seed_everything(0)
        return FactorizedClassifier("random:tiny-bert", task="sst2", learning_rate=1e-3, warmup_ratio=0.0,
                                    factorization=Factorization("lowrank", budget=0.5))

    expected = quiet_trainer().validate(module(), synthetic_loader(16, seed=1), verbose=False)[0]["val/accuracy"]
    summary = RunSummary(monitor="val/accuracy", mode="max")
    trainer = quiet_trainer(max_epochs=1, callbacks=[summary], num_sanity_val_steps=sanity_steps,
                            logger=TensorBoardLogger(tmp_path, name="run", version=0))
    trainer.fit(module(), synthetic_loader(16), synthetic_loader(16, seed=1))
    start = summary.summary["at_start"]
    if sanity_steps == -1:  # every dev batch: the model as projected, before the first step
        assert start["value"] == pytest.approx(expected) and start["step"] == 0
    else:  # 2 of 4 dev batches would mislead: nothing recorded
        assert start is None


def test_summary_follows_the_tasks_metric_whatever_checkpoint_comes_first(tmp_path):
    """A user's extra ModelCheckpoint (the README's resume recipe: one every step, no monitor) listed first is
    ``trainer.checkpoint_callback``; the summary still reports the task's metric and its best checkpoint."""
    module = FactorizedClassifier("random:tiny-bert", task="sst2", learning_rate=1e-3, warmup_ratio=0.0,
                                  factorization=Factorization("lowrank", budget=0.5))
    steps = ModelCheckpoint(dirpath=tmp_path / "steps", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="val/accuracy", mode="max", save_top_k=1)
    summary = RunSummary()
    trainer = quiet_trainer(max_epochs=2, callbacks=[steps, best, summary], num_sanity_val_steps=0,
                            logger=TensorBoardLogger(tmp_path, name="run", version=0), enable_checkpointing=True)
    trainer.fit(module, synthetic_loader(16), synthetic_loader(8, seed=1))
    assert trainer.checkpoint_callback is steps  # the first one: what the summary used to read
    written = summary.summary
    assert written["monitor"] == "val/accuracy"  # not val/loss (mode min)
    assert written["best_checkpoint"] == best.best_model_path and "/best/" in written["best_checkpoint"]
    assert written["best"]["value"] == pytest.approx(float(best.best_model_score))
