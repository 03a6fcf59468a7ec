"""StabilityMonitor: divergence caught from the first step, the skipped step, the verdict and its reasons."""

import csv
import json
import math
import types

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lit_factor.errors import UserError
from lit_factor.train.callbacks.stability import StabilityMonitor, majority_baseline, run_failed
from lit_factor.train.module import Factorization, FactorizedClassifier
from tests.conftest import synthetic_loader, synthetic_rows
from tests.test_staging import BATCH, _module, _trainer


class Exploding(FactorizedClassifier):
    """The training loss is multiplied by ``scale`` at optimizer step ``at`` (nan: a non-finite loss)."""

    def __init__(self, *args, at: int = 0, scale: float = 1e4, **kw):
        super().__init__(*args, **kw)
        self.at, self.scale = at, scale

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * self.scale if self.global_step == self.at else loss


def _exploding(task: str = "sst2", **kw) -> Exploding:
    torch.manual_seed(0)
    return Exploding("random:tiny-bert", task=task, factorization=Factorization(method="lowrank"), **kw)


def _regression_loader(n: int) -> DataLoader:
    rows = [{**r, "labels": r["labels"].float() * 5} for r in synthetic_rows(n)]  # STS-B-like scores in [0, 5]
    return DataLoader(rows, batch_size=BATCH)


@pytest.mark.parametrize("at,scale", [(0, 1e4), (1, 1e4), (3, 1e4), (0, math.nan), (3, math.inf)])
def test_explosion_inside_the_warm_up_is_caught_at_once(tmp_path, at, scale):
    """Steps 0-3 lie inside the default 20-step warm-up: they are judged against ln(2), the untrained loss."""
    module, monitor = _exploding(at=at, scale=scale), StabilityMonitor()
    logger = CSVLogger(tmp_path)
    trainer = _trainer(tmp_path, [monitor], max_steps=12, logger=logger)
    with pytest.warns(UserWarning, match=rf"RUN FAILED: training diverged at step {at}: loss"):
        trainer.fit(module, synthetic_loader(48))
    assert monitor.diverged["step"] == at and monitor.succeeded is False
    reason = monitor.diverged["reason"]
    assert reason == "not finite" if not math.isfinite(scale) else "10x the untrained loss 0.6931" in reason
    assert trainer.global_step == at + 1  # stopped right after the bad step ...
    assert all(torch.isfinite(p).all() for p in module.parameters())  # ... which was skipped
    summary = json.load(open(f"{logger.log_dir}/stability.json"))
    assert summary["succeeded"] is False and summary["divergence"]["step"] == at
    assert summary["reasons"][0].startswith(f"diverged at step {at}")
    assert run_failed(trainer) == summary["reasons"]
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    assert rows and not any(key.startswith("stability/") for r in rows for key in r if r[key])  # no one-point charts


def test_absurd_learning_rate_inside_the_warm_up(tmp_path):
    """The reported case: lr 10 with a 20-step warm-up used to train on garbage and be judged only by the dev set."""
    monitor = StabilityMonitor(warmup_steps=20)
    trainer = _trainer(tmp_path, [monitor], max_steps=40)
    with pytest.warns(UserWarning, match="RUN FAILED: training diverged at step"):
        trainer.fit(_module(lr=1e4), synthetic_loader(40))
    assert monitor.diverged["step"] < 20 and trainer.global_step < 20
    assert monitor.summary["succeeded"] is False and run_failed(trainer)


def test_regression_judges_against_the_first_step(tmp_path):
    """A regression head has no ln(num_labels): the first step's loss is the reference until the average exists."""
    monitor = StabilityMonitor()
    module = _exploding("stsb", at=2, scale=1e3)
    with pytest.warns(UserWarning, match="diverged at step 2: .*than 10x the untrained loss"):
        _trainer(tmp_path, [monitor], max_steps=8).fit(module, _regression_loader(40))
    assert monitor.initial_loss == pytest.approx(monitor.state_dict()["initial_loss"]) and monitor.initial_loss > 0


def test_a_healthy_run_succeeds(tmp_path):
    monitor = StabilityMonitor(factor=3.0, warmup_steps=2)
    trainer = _trainer(tmp_path, [monitor], max_steps=8)
    trainer.fit(_module(), synthetic_loader(40))
    assert monitor.succeeded is True and monitor.diverged is None and run_failed(trainer) == []
    assert monitor.initial_loss == pytest.approx(math.log(2))


def test_the_untrained_loss_is_ln_labels_only_for_a_plain_classifier():
    def module(num_labels, problem_type=None, distilling=False):
        config = types.SimpleNamespace(num_labels=num_labels, problem_type=problem_type)
        # lit-factor's callback interface (lit_factor.train.interface.Factorizable), nothing more
        return types.SimpleNamespace(factorized_model=types.SimpleNamespace(config=config), distilling=distilling,
                                     plan=None, staged=False, rel_errors={}, dense_params=1, factorized_params=1,
                                     enable_staging=lambda: None, factorize_stage=lambda paths: {},
                                     task=types.SimpleNamespace(name="sst2", monitor="val/accuracy"))

    for pl_module, expected in ((module(3), math.log(3)), (module(1, "regression"), None),
                                (module(2, distilling=True), None)):
        monitor = StabilityMonitor()
        monitor.on_fit_start(None, pl_module)
        assert monitor.initial_loss == (pytest.approx(expected) if expected else None)


def test_without_a_monitor_a_non_finite_loss_still_fails(tmp_path):
    trainer = _trainer(tmp_path, [], max_steps=6)
    trainer.fit(_exploding(at=4, scale=math.nan), synthetic_loader(40))
    assert run_failed(trainer) and "nan" in run_failed(trainer)[0]
    healthy = _trainer(tmp_path, [], max_steps=4)
    healthy.fit(_module(), synthetic_loader(40))
    assert run_failed(healthy) == []


def test_success_needs_the_dev_metric_above_the_majority_baseline(tmp_path):
    val = synthetic_rows(12, seed=5)
    share = max(sum(int(r["labels"]) for r in val), sum(1 - int(r["labels"]) for r in val)) / len(val)
    for threshold, expect in ((None, None), (-1.0, True), (1.0, False)):
        monitor = StabilityMonitor(monitor="val/accuracy", success_threshold=threshold)
        trainer = _trainer(tmp_path, [monitor], max_steps=4, limit_val_batches=None, num_sanity_val_steps=0)
        trainer.fit(_module(), synthetic_loader(16), DataLoader(val, batch_size=BATCH))
        acc = float(trainer.callback_metrics["val/accuracy"])
        s = monitor.summary
        assert s["dev_metric"] == pytest.approx(acc)
        if threshold is None:
            assert s["threshold"] == pytest.approx(share) and s["threshold_kind"] == "majority-class"
            expect = acc > share
        assert s["succeeded"] is expect and s["diverged"] is False
        assert bool(run_failed(trainer)) is not expect


def test_majority_baseline_rules():
    counts = {0: 30, 1: 70}
    assert majority_baseline("val/accuracy", counts) == pytest.approx(0.7)
    assert majority_baseline("val/f1", counts) == pytest.approx(1.4 / 1.7)
    assert majority_baseline("val/f1", {0: 70, 1: 30}) == 0.0
    assert majority_baseline("val/matthews", counts) == 0.0
    with pytest.raises(UserError, match="no rule for metric 'val/loss'"):
        StabilityMonitor(monitor="val/loss")
    assert math.isfinite(StabilityMonitor(monitor="val/loss", success_threshold=0.5).success_threshold)


@pytest.mark.parametrize("kw,match", [({"factor": 1.0}, "factor=1.0 must be > 1"),
                                      ({"smoothing": 1.0}, r"smoothing=1.0 must be in \[0, 1\)"),
                                      ({"warmup_steps": -1}, "warmup_steps=-1 must be >= 0"),
                                      ({"initial_loss": 0.0}, "initial_loss=0.0 must be a finite loss"),
                                      ({"accuracy": "val/f1"}, "accuracy='val/f1' must name a logged dev accuracy")])
def test_settings_are_user_errors(kw, match):
    with pytest.raises(UserError, match=match):
        StabilityMonitor(**kw)



@pytest.mark.parametrize("majority,total", [(146, 277), (721, 1043)])  # RTE's and CoLA's dev sets
def test_a_model_at_the_majority_class_fails_although_float32_rounds_its_accuracy_up(majority, total):
    """The accuracy a constant predictor logs (torchmetrics, float32) is ~1e-8 above the exact float64 share of the
    majority class on RTE and CoLA: compared unrounded, such a run succeeded. One more correct example succeeds."""
    from torchmetrics.classification import Accuracy

    target = torch.tensor([1] * majority + [0] * (total - majority))
    for extra in (0, 1):
        preds = torch.ones(total, dtype=torch.long)
        preds[total - extra:] = 0  # extra = 1: the last minority example predicted right too
        acc = Accuracy(task="multiclass", num_classes=2)(preds, target)
        assert acc.dtype == torch.float32 and float(acc) > majority / total  # the trap, for both
        monitor = StabilityMonitor(monitor="val/accuracy")
        monitor.steps, monitor.ema = 1, 0.5  # a finite running loss: only the dev metric decides
        monitor._label_counts = {1: majority, 0: total - majority}
        trainer = types.SimpleNamespace(callback_metrics={"val/accuracy": acc}, world_size=1, loggers=[],
                                        global_step=10)
        monitor.on_train_end(trainer, None)
        assert monitor.succeeded is bool(extra), (extra, float(acc), monitor.summary["reasons"])


def _judge(monitor: StabilityMonitor, counts: dict[int, int], metrics: dict) -> StabilityMonitor:
    """The verdict at the end of a run with a finite running loss, these dev label counts and logged metrics."""
    monitor.steps, monitor.ema = 1, 0.5
    monitor._label_counts = dict(counts)
    trainer = types.SimpleNamespace(callback_metrics=metrics, world_size=1, loggers=[], global_step=10)
    monitor.on_train_end(trainer, None)
    return monitor


@pytest.mark.parametrize("true_negatives,expect", [(40, False), (200, True)])
def test_on_cola_an_mcc_above_zero_fails_when_accuracy_is_below_the_majority_class(true_negatives, expect):
    """CoLA's dev set (721 acceptable, 322 not): predicting "not acceptable" for 100 sentences of which 40 are
    right gives MCC > 0 (the monitored metric's baseline) but accuracy 0.672 < 0.691, the majority class's share:
    not a trained classifier, so the run fails (issue 21). With 200 of them right it beats both and succeeds."""
    from torchmetrics.classification import Accuracy, MatthewsCorrCoef

    target = torch.tensor([1] * 721 + [0] * 322)
    preds = torch.ones_like(target)
    preds[721 - (100 - true_negatives):721] = 0  # wrong "not acceptable" calls
    preds[721:721 + true_negatives] = 0  # right ones
    metrics = {"val/matthews": MatthewsCorrCoef(task="binary")(preds, target),
               "val/accuracy": Accuracy(task="binary")(preds, target)}
    assert float(metrics["val/matthews"]) > 0
    assert (float(metrics["val/accuracy"]) > 721 / 1043) is expect
    monitor = _judge(StabilityMonitor(monitor="val/matthews"), {1: 721, 0: 322}, metrics)
    assert monitor.succeeded is expect, monitor.summary["reasons"]
    assert monitor.summary["accuracy_threshold"] == pytest.approx(721 / 1043)
    if not expect:
        assert monitor.summary["reasons"] == [f"val/accuracy {float(metrics['val/accuracy']):.4f} <= majority class "
                                              f"{721 / 1043:.4f}"]
    # accuracy=None turns the rule off: MCC alone decides, as before
    assert _judge(StabilityMonitor(monitor="val/matthews", accuracy=None), {1: 721, 0: 322}, metrics).succeeded


def test_the_accuracy_rule_skips_regression_and_unlogged_accuracy():
    """No integer labels counted (STS-B's float scores) or no accuracy logged: rule 4 does not apply."""
    pearson = {"val/pearson": torch.tensor(0.3)}
    assert _judge(StabilityMonitor(monitor="val/pearson"), {}, pearson).succeeded
    assert "accuracy" not in _judge(StabilityMonitor(monitor="val/f1"), {1: 279, 0: 129},
                                    {"val/f1": torch.tensor(0.85)}).summary
