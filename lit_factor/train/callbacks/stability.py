"""Training stability: stop a diverging run, and say whether a run *succeeded*.

The seed paper measures stability as the share of seeds whose fine-tuning run succeeds. Here a run **succeeded**
when all of these hold:

1. its training never diverged: every step's loss was finite and never exceeded ``factor`` times a reference:
   the running (exponential moving average) loss once ``warmup_steps`` steps have built it, and before that, from
   the very first step, the untrained model's loss: ln(num_labels) for a classifier trained on its labels (read
   from the model's ``config.num_labels``), else (regression, distillation) the first step's loss, or
   ``initial_loss`` when given;
2. its final training loss is finite;
3. its final dev metric (``monitor``, the last validation value) beats the **majority-class baseline**: the score
   that always predicting the most frequent dev label gets with the same metric (accuracy: that label's share;
   binary F1: 2p/(1+p) if the majority label is the positive class 1, else 0; Matthews correlation, Pearson or
   Spearman correlation: 0), or ``success_threshold`` when given. Without ``monitor`` only 1-2 count;
4. on a classification task, its final dev accuracy (``accuracy``, when logged) also beats the majority class's
   share. An MCC or F1 above its baseline is not enough: a model that predicts the majority class almost everywhere
   scores MCC > 0 on CoLA, or F1 0.81 on MRPC, while its accuracy sits at or below the constant predictor's.

Why not Lightning's ``EarlyStopping(check_finite=True, divergence_threshold=...)``: it checks a logged metric at
epoch/validation ends against an absolute threshold; a run that explodes mid-epoch trains on garbage until then,
and a useful threshold is relative to the loss's own scale.

On divergence the step that produced the bad loss is skipped (all gradients dropped before the optimizer step,
so the weights keep their last finite values), the run stops, and a ``RUN FAILED`` line is printed. At the end of
training a ``RUN SUCCEEDED``/``RUN FAILED`` line is printed and (with a logger) the summary written to
``<log_dir>/stability.json`` (the verdict is a fact of the run, not a chart: no scalars are logged)
(also :attr:`StabilityMonitor.summary`). Under DDP every rank takes the same decision (any rank diverging stops all).
:func:`run_failed` turns the verdict into the reasons a command line reports (exit status 3, see the README).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from lit_factor.errors import UserError
from lit_factor.train.interface import Factorizable


def as_logged(score: float) -> float:
    """``score`` at the precision dev metrics are computed and logged in: float32. The majority class's accuracy
    on RTE (146/277) and CoLA (721/1043) rounds ~1e-8 *up* in float32, so a model that predicts that class
    everywhere would "beat" the exact float64 baseline and its run succeed. Both sides are compared as logged:
    one more correct dev example is worth far more than float32's resolution."""
    return float(torch.tensor(score, dtype=torch.float32))


def majority_baseline(metric: str, counts: dict[int, int]) -> float:
    """Score of the constant predictor of the most frequent label, for a metric named ``metric``."""
    total = sum(counts.values())
    if not total:
        raise ValueError("majority baseline: no dev labels were seen")
    label, top = max(counts.items(), key=lambda kv: (kv[1], -kv[0]))
    name = metric.lower()
    if "f1" in name:
        p = counts.get(1, 0) / total
        return 2 * p / (1 + p) if label == 1 else 0.0
    if "acc" in name:
        return top / total
    if any(k in name for k in ("mcc", "matthews", "pearson", "spearman", "corr")):
        return 0.0
    raise UserError(f"majority baseline: no rule for metric {metric!r} (known: acc, f1, mcc/matthews, "
                    "pearson/spearman/corr); give success_threshold")


class StabilityMonitor(Callback):
    """Stop diverging runs and record whether the run succeeded (see the module docstring for the definition).

    Args:
        factor: a step's loss above ``factor`` x the reference loss counts as divergence.
        warmup_steps: optimizer steps that build the running loss before it becomes the reference; until then
            the reference is the untrained loss (non-finite losses count from the first step).
        smoothing: decay of the exponential moving average of the loss (0.98 ~ the last 50 steps).
        monitor: logged dev metric that must beat the baseline (e.g. ``val/acc``); ``None`` checks only the loss.
        success_threshold: the dev metric must exceed this; ``None`` uses the majority-class baseline.
        initial_loss: the untrained model's expected loss, the reference until the running loss exists; ``None``:
            ln(num_labels) for a classifier with 2+ labels (not distilling), else the first step's loss.
        accuracy: logged dev accuracy that must also beat the majority class's share on a classification task
            (rule 4; skipped where the monitor is that accuracy or it was not logged); ``None`` turns rule 4 off.
    """

    def __init__(self, factor: float = 10.0, warmup_steps: int = 20, smoothing: float = 0.98,
                 monitor: str | None = None, success_threshold: float | None = None,
                 initial_loss: float | None = None, accuracy: str | None = "val/accuracy") -> None:
        if not factor > 1:
            raise UserError(f"StabilityMonitor factor={factor} must be > 1 (times the reference loss)")
        if not 0 <= smoothing < 1:
            raise UserError(f"StabilityMonitor smoothing={smoothing} must be in [0, 1)")
        if warmup_steps < 0:
            raise UserError(f"StabilityMonitor warmup_steps={warmup_steps} must be >= 0")
        if initial_loss is not None and not (math.isfinite(initial_loss) and initial_loss > 0):
            raise UserError(f"StabilityMonitor initial_loss={initial_loss} must be a finite loss > 0 (or null)")
        if accuracy is not None and "acc" not in accuracy.lower():
            raise UserError(f"StabilityMonitor accuracy={accuracy!r} must name a logged dev accuracy "
                            "(e.g. val/accuracy), or be null to judge the monitored metric alone")
        if monitor is not None and success_threshold is None:
            majority_baseline(monitor, {0: 1})  # fail now, not after training, on a metric without a baseline rule
        self.factor, self.warmup_steps, self.smoothing = factor, warmup_steps, smoothing
        self.monitor, self.success_threshold, self.accuracy = monitor, success_threshold, accuracy
        self.initial_loss = initial_loss  # the reference before the running loss exists (None: found at step 0)
        self.ema = 0.0
        self.steps = 0  # steps folded into the running loss
        self.diverged: dict[str, Any] | None = None
        self.summary: dict[str, Any] = {}
        self._window: list[torch.Tensor] = []
        self._label_counts: dict[int, int] = {}

    # --- divergence --------------------------------------------------------------------------------------------
    @property
    def running_loss(self) -> float | None:
        """Bias-corrected moving average of the loss (None before the first step)."""
        return self.ema / (1 - self.smoothing ** self.steps) if self.steps else None

    @property
    def succeeded(self) -> bool | None:
        """The verdict: True / False once training ended (False as soon as it diverged), None before."""
        if self.diverged is not None:
            return False
        return self.summary.get("succeeded")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A distilling module's loss has another scale (soft targets x T^2, hidden-state terms): its first step sets
        # the reference instead.
        # Any LightningModule can be monitored; only lit-factor's interface says what the untrained loss is.
        if self.initial_loss is None and isinstance(pl_module, Factorizable) and not pl_module.distilling:
            # An untrained classifier with k labels predicts ~uniformly: its cross-entropy is about ln(k).
            config = getattr(pl_module.factorized_model, "config", None)  # a Hugging Face model's, when it has one
            labels = getattr(config, "num_labels", None)
            if isinstance(labels, int) and labels >= 2 and getattr(config, "problem_type", None) in (
                    None, "single_label_classification"):
                self.initial_loss = math.log(labels)

    def _reference(self) -> tuple[float, str] | None:
        """What a step's loss is compared with, and its name (None: nothing yet, only finiteness counts)."""
        if self.steps >= max(self.warmup_steps, 1):
            return self.running_loss, "the running loss"
        if self.initial_loss is not None:
            return self.initial_loss, "the untrained loss"
        return None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # The loss is already divided by accumulate_grad_batches; undo it to compare like with like.
        self._window.append(loss.detach() * trainer.accumulate_grad_batches)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if not self._window:
            return
        loss = float(torch.stack(self._window).float().mean())
        self._window.clear()
        reason, reference = None, self._reference()
        if not math.isfinite(loss):
            reason = "not finite"
        elif reference is not None and loss > self.factor * reference[0]:
            reason = f"more than {self.factor:g}x {reference[1]} {reference[0]:.4g}"
        if trainer.strategy.reduce_boolean_decision(reason is not None, all=False):
            reason = reason or "diverged on another rank"
            self._fail(trainer, optimizer, loss, reason)
            return
        if self.initial_loss is None:  # regression or an unknown head: the first finite loss is the reference
            self.initial_loss = loss
        self.ema = self.smoothing * self.ema + (1 - self.smoothing) * loss
        self.steps += 1

    def _fail(self, trainer: pl.Trainer, optimizer, loss: float, reason: str) -> None:
        # Skip this step: AdamW leaves parameters without gradient untouched, so the weights stay finite.
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        trainer.should_stop = True
        if self.diverged is None:
            self.diverged = {"step": trainer.global_step, "loss": loss, "reason": reason}
            rank_zero_warn(f"RUN FAILED: training diverged at step {trainer.global_step}: loss {loss:.4g} "
                           f"({reason}); stopping")

    # --- dev labels for the majority baseline ------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._label_counts = {}

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        labels = batch.get("labels") if isinstance(batch, Mapping) else None  # dict or transformers BatchEncoding
        if isinstance(labels, torch.Tensor) and not labels.is_floating_point():
            values, counts = labels.unique(return_counts=True)
            for v, c in zip(values.tolist(), counts.tolist(), strict=True):
                self._label_counts[v] = self._label_counts.get(v, 0) + c

    def _global_label_counts(self, trainer: pl.Trainer) -> dict[int, int]:
        if trainer.world_size == 1:
            return dict(self._label_counts)
        # Each rank saw a shard of the dev set: sum the counts (labels are small non-negative integers).
        size = trainer.strategy.reduce(torch.tensor(max(self._label_counts, default=-1) + 1.0,
                                                    device=trainer.strategy.root_device), reduce_op="max")
        vec = torch.zeros(int(size), device=trainer.strategy.root_device)
        for k, c in self._label_counts.items():
            vec[k] = c
        vec = trainer.strategy.reduce(vec, reduce_op="sum")
        return {k: int(c) for k, c in enumerate(vec.tolist()) if c}

    # --- the verdict ---------------------------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        summary: dict[str, Any] = {"diverged": self.diverged is not None, "divergence": self.diverged,
                                   "running_loss": self.running_loss, "steps": trainer.global_step}
        reasons = []
        if self.diverged:
            reasons.append(f"diverged at step {self.diverged['step']} (loss {self.diverged['loss']:.4g}, "
                           f"{self.diverged['reason']})")
        elif self.running_loss is None or not math.isfinite(self.running_loss):
            reasons.append("no finite training loss")
        if self.monitor is not None:
            counts = self._global_label_counts(trainer)  # collective: every rank runs it
            value = metrics.get(self.monitor)
            value = float(value) if value is not None else None
            threshold = self.success_threshold
            if threshold is None and counts:
                threshold = majority_baseline(self.monitor, counts)
            elif threshold is None and any(k in self.monitor.lower() for k in ("pearson", "spearman", "corr")):
                threshold = 0.0  # regression (STS-B): float labels go uncounted; a constant predictor correlates 0
            summary.update(monitor=self.monitor, dev_metric=value, threshold=threshold,
                           threshold_kind="given" if self.success_threshold is not None else "majority-class")
            if value is None or not math.isfinite(value):
                reasons.append(f"no dev metric {self.monitor!r} was logged")
            elif threshold is None:
                reasons.append("no dev labels seen for the majority baseline (give success_threshold)")
            elif as_logged(value) <= as_logged(threshold):
                reasons.append(f"{self.monitor} {value:.4f} <= baseline {threshold:.4f}")
            reasons += self._accuracy_reasons(metrics, counts, summary)
        summary["succeeded"] = not reasons
        summary["reasons"] = reasons
        self.summary = summary
        # trainer.log_dir is a collective under DDP: every rank reads it. No logger: no file (log_dir would be cwd).
        self._report(trainer.log_dir if trainer.loggers else None, summary)

    def _accuracy_reasons(self, metrics: Mapping[str, Any], counts: dict[int, int],
                          summary: dict[str, Any]) -> list[str]:
        """Rule 4: on a classification task (integer dev labels were counted) the logged dev accuracy must beat
        the majority class's share too, unless the monitored metric already is that accuracy."""
        if not self.accuracy or self.accuracy == self.monitor or not counts or metrics.get(self.accuracy) is None:
            return []
        value, share = float(metrics[self.accuracy]), majority_baseline("accuracy", counts)
        summary.update(accuracy=value, accuracy_threshold=share)
        if math.isfinite(value) and as_logged(value) > as_logged(share):
            return []
        return [f"{self.accuracy} {value:.4f} <= majority class {share:.4f}"]

    @rank_zero_only
    def _report(self, log_dir: str | None, summary: dict[str, Any]) -> None:
        if summary["succeeded"]:
            detail = (f"{summary['monitor']} {summary['dev_metric']:.4f} > baseline {summary['threshold']:.4f}"
                      if self.monitor else "finite loss, no divergence")
            if "accuracy" in summary:
                detail += (f", {self.accuracy} {summary['accuracy']:.4f} > majority class "
                           f"{summary['accuracy_threshold']:.4f}")
            rank_zero_info(f"RUN SUCCEEDED: {detail}")
        else:
            rank_zero_info(f"RUN FAILED: {'; '.join(summary['reasons'])}")
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            with open(os.path.join(log_dir, "stability.json"), "w") as f:
                json.dump(summary, f, indent=1)

    # --- checkpointing -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "steps": self.steps, "diverged": self.diverged, "initial_loss": self.initial_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema, self.steps, self.diverged = state_dict["ema"], state_dict["steps"], state_dict["diverged"]
        self.initial_loss = state_dict.get("initial_loss", self.initial_loss)


def run_failed(trainer: pl.Trainer) -> list[str]:
    """Why a finished ``fit`` counts as failed (empty: it did not), for the exit status of a command line.

    With a :class:`StabilityMonitor` its verdict rules (divergence, non-finite loss, dev metric or, classifying,
    dev accuracy at or below the majority baseline). Without one, a non-finite final training loss still fails the run.
    """
    monitors = [c for c in trainer.callbacks if isinstance(c, StabilityMonitor)]
    if monitors:
        m = monitors[0]
        if m.succeeded is False:
            return list(m.summary.get("reasons") or [f"diverged at step {m.diverged['step']}"])
        return [] if m.succeeded else ["training ended before the stability verdict"]
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/loss")}
    return [f"final {k} is {v}" for k, v in losses.items() if not math.isfinite(v)]
