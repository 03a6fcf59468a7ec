"""The closing summary of a run: what it reached, where the best weights are, what the factorization bought.

:class:`RunSummary` (added by the CLI to every ``fit``, ``validate`` and ``test``) tracks the monitored dev metric
at every validation, and at the end prints a plain-text block on global rank 0 and writes it as JSON:

* ``fit``: ``<run dir>/summary.json`` -- status (the StabilityMonitor's verdict when one ran, see
  :func:`~lit_factor.train.callbacks.stability.run_failed`), best and final dev metrics with their epoch and step, the
  dev metrics *before training* (``at_start``: only when the sanity check covered the whole dev set,
  ``trainer.num_sanity_val_steps: -1``; after an all-at-once projection that is the metric right after it), the
  best checkpoint, dense -> factorized parameters and kept fractions, train time, the stability summary and, when a
  :class:`~lit_factor.callbacks.LatencyCallback` measured at ``fit_end``, the inference speedup;
* ``validate`` / ``test``: ``<log dir>/metrics.json`` with the metrics of that evaluation (``test`` runs on the
  labelled dev split: GLUE's test labels are hidden).

It reads the module only through the interface documented in :mod:`lit_factor.train.module` (``plan``, ``dense_params``,
``factorized_params``). Under DDP every rank tracks the same (synced) metrics; only rank 0 prints and writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from lit_factor.errors import UserError
from lit_factor.train.callbacks.stability import StabilityMonitor, run_failed
from lit_factor.train.interface import Factorizable

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.json"


def _scalars(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if key.startswith(prefix) and not key.startswith("latency/"):
            out[key] = number
    return dict(sorted(out.items()))


def params_summary(pl_module: Factorizable) -> dict[str, float | int]:
    """Dense and factorized parameter counts of the whole model and of the targeted layers, and the kept shares."""
    plan = pl_module.plan
    dense, factorized = int(pl_module.dense_params), int(pl_module.factorized_params)
    return {"dense_model": dense, "factorized_model": factorized,
            "targeted_dense": plan.params_dense if plan else 0,
            "targeted_factorized": plan.params_factorized if plan else 0,
            "kept_fraction": plan.kept_fraction if plan else 1.0,
            "model_kept_fraction": factorized / dense if dense else 1.0}


class SummarySection:
    """A callback that adds one section to the run summary (``summary.json``): the typed way for callbacks of other
    packages (the deploy package's LatencyCallback) to report here without this module importing them."""

    #: the key of the section in ``summary.json``
    summary_key: str = ""

    def summary_section(self) -> dict | None:
        """The section's content once the fit ended (None: nothing to report)."""
        return None


def sections(trainer: pl.Trainer) -> dict[str, dict | None]:
    """The sections of every :class:`SummarySection` callback (first one per key)."""
    found: dict[str, dict | None] = {}
    for callback in trainer.callbacks:
        if isinstance(callback, SummarySection) and found.get(callback.summary_key) is None:
            found[callback.summary_key] = callback.summary_section()
    return found


def _data_split(trainer: pl.Trainer) -> dict | None:
    """How the GLUE data module drew its training data when not from the official train split (a dev split)."""
    from lit_factor.train.data import GLUEDataModule

    datamodule = getattr(trainer, "datamodule", None)
    return datamodule.split_record() if isinstance(datamodule, GLUEDataModule) else None


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def task_monitor(pl_module: pl.LightningModule | None) -> str | None:
    """The monitored dev metric of the module's GLUE task (``val/accuracy`` for SST-2), or None."""
    return pl_module.task.monitor if isinstance(pl_module, Factorizable) else None


def monitored_checkpoint(trainer: pl.Trainer, pl_module: pl.LightningModule | None = None,
                         monitor: str | None = None) -> ModelCheckpoint | None:
    """The ModelCheckpoint that keeps the best weights by the run's monitored metric (``monitor``, else the task's):
    the one the CLI adds as ``checkpoint``. Not simply ``trainer.checkpoint_callback`` (the first ModelCheckpoint in
    the list), which is a user's extra one -- e.g. the README's resume recipe, a checkpoint every N steps -- when
    there is one. Without a match: ``trainer.checkpoint_callback`` (a plain Trainer with one ModelCheckpoint)."""
    monitor = monitor or task_monitor(pl_module)
    found = next((c for c in trainer.checkpoint_callbacks if monitor and c.monitor == monitor), None)
    return found or trainer.checkpoint_callback


class RunSummary(Callback):
    """Print and write the result of a run when it ends (see the module docstring).

    Args:
        monitor: the dev metric that picks the best epoch; ``None``: the module's GLUE task's main metric, else the
            first ModelCheckpoint's monitor, else ``val/loss``. The best checkpoint reported is that of the
            ModelCheckpoint monitoring it (:func:`monitored_checkpoint`), whatever other ModelCheckpoints run.
        mode: ``max`` or ``min`` for ``monitor``; ``None``: that ModelCheckpoint's mode, else ``min`` for a loss.
    """

    def __init__(self, monitor: str | None = None, mode: str | None = None) -> None:
        if mode not in (None, "max", "min"):
            raise UserError(f"RunSummary mode={mode!r} is not one of max, min")
        self.monitor, self.mode = monitor, mode
        self.best: dict[str, Any] | None = None
        self.final: dict[str, Any] | None = None
        self.train_time_s = 0.0  # accumulated over resumed fits (it is in the callback's checkpoint state)
        self.resumed_from: dict[str, int] | None = None
        self.at_start: dict[str, Any] | None = None  # the full sanity check's dev metrics, before any step
        #: what the last fit / evaluation wrote (rank 0): the summary dict and its file
        self.summary: dict[str, Any] = {}
        self.path: str | None = None
        self._start: float | None = None
        self._log_dir: str | None = None

    # --- what to track -----------------------------------------------------------------------------------------
    def _monitor_and_mode(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None = None) -> tuple[str, str]:
        ckpt = monitored_checkpoint(trainer, pl_module, self.monitor)
        monitor = self.monitor or task_monitor(pl_module) or getattr(ckpt, "monitor", None) or "val/loss"
        mode = self.mode or (ckpt.mode if ckpt is not None and ckpt.monitor == monitor else None)
        return monitor, mode or ("min" if monitor.endswith("loss") else "max")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.resumed_from = None  # set again by on_load_checkpoint when this fit resumes

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Where the checkpoint was taken (its epoch and optimizer step): where this fit goes on from.
        self.resumed_from = {"epoch": int(checkpoint.get("epoch", 0)), "step": int(checkpoint.get("global_step", 0))}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._log_dir = trainer.log_dir if trainer.loggers else None  # a broadcast under DDP: every rank asks

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write_evaluation(trainer, "validate", trainer.log_dir if trainer.loggers else None)
            return
        monitor, mode = self._monitor_and_mode(trainer, pl_module)
        metrics = _scalars(trainer.callback_metrics, prefix="val/")
        record = {"value": metrics.get(monitor), "epoch": trainer.current_epoch, "step": trainer.global_step,
                  "metrics": metrics}
        if trainer.sanity_checking:
            # Only a sanity check over the whole dev set measures the model; a few batches would mislead.
            if trainer.global_step == 0 and list(trainer.num_sanity_val_batches) == list(trainer.num_val_batches):
                self.at_start = record
            return
        self.final = record
        value, best = record["value"], (self.best or {}).get("value")
        if value is not None and math.isfinite(value) and (
                best is None or (value > best if mode == "max" else value < best)):
            self.best = record

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is not None:
            self.train_time_s += time.perf_counter() - self._start
            self._start = None

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_evaluation(trainer, "test", trainer.log_dir if trainer.loggers else None)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # After on_fit_end of every callback (the latency measurement, the stability verdict): the whole story.
        if stage == "fit":
            self._write_fit(trainer, pl_module)

    # --- what to write -----------------------------------------------------------------------------------------
    def fit_summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The ``summary.json`` dict of the fit that just ended."""
        monitor, _ = self._monitor_and_mode(trainer, pl_module)
        reasons = run_failed(trainer)
        stability = next((c.summary for c in trainer.callbacks if isinstance(c, StabilityMonitor) and c.summary),
                         None)
        best_path = getattr(monitored_checkpoint(trainer, pl_module, self.monitor), "best_model_path", "") or None
        return {"status": "failed" if reasons else "succeeded", "reasons": reasons,
                "task": pl_module.task.name if isinstance(pl_module, Factorizable) else None, "monitor": monitor,
                "at_start": self.at_start, "best": self.best, "final": self.final, "best_checkpoint": best_path,
                "train_time_s": round(self.train_time_s, 3), "params": params_summary(pl_module),
                "stability": stability, "latency": sections(trainer).get("latency"), "resumed_from": self.resumed_from,
                "data_split": _data_split(trainer)}

    def _write_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.summary = self.fit_summary(trainer, pl_module)
            self.path = _dump(self._log_dir, SUMMARY_FILE, self.summary)
            print(format_fit_summary(self.summary, self._log_dir, self.path), flush=True)

    @rank_zero_only
    def _write_evaluation(self, trainer: pl.Trainer, stage: str, log_dir: str | None) -> None:
        split = "dev"  # validate and test both read the labelled dev split (GLUE's test labels are hidden)
        self.summary = {"stage": stage, "split": split, "checkpoint": trainer.ckpt_path,
                        "metrics": _scalars(trainer.callback_metrics)}
        self.path = _dump(log_dir, METRICS_FILE, self.summary)
        lines = [f"{stage} on the {split} split" + (f" of {trainer.ckpt_path}" if trainer.ckpt_path else "") + ":"]
        lines += [f"  {k}: {v:.4f}" for k, v in self.summary["metrics"].items()]
        if self.path:
            lines.append(f"  written: {self.path}")
        print("\n".join(lines), flush=True)

    # --- checkpointing: a resumed fit summarizes the whole run -----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        running = time.perf_counter() - self._start if self._start is not None else 0.0  # saved mid-fit
        return {"best": self.best, "final": self.final, "train_time_s": self.train_time_s + running}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.final = state_dict.get("best"), state_dict.get("final")
        self.train_time_s = float(state_dict.get("train_time_s", 0.0))


def _dump(log_dir: str | None, name: str, data: dict[str, Any]) -> str | None:
    if not log_dir:  # no logger: no run directory to write into (log_dir would be the working directory)
        return None
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path


def _metric_line(summary: dict[str, Any]) -> str:
    best, final, monitor = summary["best"], summary["final"], summary["monitor"]
    if final is None:
        return f"{monitor}: never measured (no validation ran)"

    def at(r):
        value = "n/a" if r["value"] is None else f"{r['value']:.4f}"
        return f"{value} (epoch {r['epoch'] + 1}, step {r['step']})"  # counted from 1, like the progress lines

    start = summary.get("at_start")
    before = f", before training {start['value']:.4f}" if start and start["value"] is not None else ""
    return f"{monitor}: best {at(best) if best else 'n/a'}, final {at(final)}{before}"


def format_fit_summary(summary: dict[str, Any], run_dir: str | None, path: str | None) -> str:
    """The plain-text block printed at the end of a fit (one fact per line, no colours, fits a log file)."""
    p = summary["params"]
    dense = not p["targeted_dense"]  # no plan: nothing was factorized
    lines = [f"run {summary['status'].upper()}" + (f": {run_dir}" if run_dir else ""),
             f"  {_metric_line(summary)}",
             f"  best checkpoint: {summary['best_checkpoint'] or 'none saved'}",
             f"  parameters: {p['dense_model']:,} (dense fine-tuning, no factorization)" if dense else
             f"  parameters: {p['dense_model']:,} dense -> {p['factorized_model']:,} factorized "
             f"({p['model_kept_fraction']:.1%} of the model; {p['kept_fraction']:.1%} of the targeted weights kept)",
             f"  train time: {format_duration(summary['train_time_s'])}"
             + (f" (resumed from epoch {summary['resumed_from']['epoch']}, step {summary['resumed_from']['step']})"
                if summary["resumed_from"] else "")]
    if summary.get("data_split"):
        lines.append(f"  data: {summary['data_split']['note']}")
    if summary["reasons"]:
        lines.append(f"  failed because: {'; '.join(summary['reasons'])}")
    elif summary["stability"]:
        s = summary["stability"]
        beat = (f"{s['monitor']} {s['dev_metric']:.4f} > baseline {s['threshold']:.4f}"
                if s.get("dev_metric") is not None and s.get("threshold") is not None else "no divergence")
        lines.append(f"  stability: succeeded ({beat})")
    if summary["latency"] and summary["latency"].get("speedup") is None:  # a dense run: no twin to compare with
        lat = summary["latency"]
        lines.append(f"  inference: {lat['dense_ms']:.1f} ms per batch of {lat['batch_size']} x {lat['seq_len']} "
                     f"tokens (dense model, {lat['device']})")
    elif summary["latency"]:
        lat = summary["latency"]
        lines.append(f"  inference: {lat['speedup']:.2f}x the dense speed ({lat['dense_ms']:.1f} -> "
                     f"{lat['factorized_ms']:.1f} ms per batch of {lat['batch_size']} x {lat['seq_len']} tokens, "
                     f"{lat['device']})")
    if path:
        lines.append(f"  written: {path}")
    return "\n".join(lines)
