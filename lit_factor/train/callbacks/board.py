"""What a run's TensorBoard shows first: the training story, then the facts (docs/tensorboard.md).

:class:`BoardCallback` (the CLI adds it to every ``fit``, ``validate`` and ``test``) writes, for TensorBoard 2.x:

* **the story first.** TensorBoard's Time Series and Scalars dashboards order tag groups by name, digits and
  capitals before lower case: the group ``Overview`` comes before ``epoch``, ``lr-AdamW``, ``train`` and ``val``. It
  holds three curves, written at the Trainer's ``log_every_n_steps`` and at every validation:
  ``Overview/train_loss``, ``Overview/dev_<metric>`` (the monitored dev metric, e.g. ``dev_accuracy``) and
  ``Overview/learning_rate``. The Custom Scalars dashboard gets one chart, "Overview", with the loss and the dev
  metric together.
* **facts once, as tables and figures**, not as charts of one point: ``facts/parameters`` and ``facts/layers``
  (per layer: kind, shape, structure, kept fraction, relative projection error) as text; the figures
  ``facts/rel_error_per_layer`` (one bar chart per layer kind: query, key, ..., output), ``facts/kept_fraction``
  and, for staged runs, ``facts/staging_timeline`` (which layer switched at which step) as images; at the end of
  the fit ``facts/result`` (best and final dev metric).
* **HParams for every fit**: task, model, factorization (method, budget, init, allocation, rank, nblocks, staged),
  learning rate and epochs, with the final dev metric (the monitored tag), its running best
  (``<monitor>_best``, e.g. ``val/accuracy_best``) and the epoch's training loss: several fits in one ``logs/``
  compare on the HParams page.
* ``validate`` / ``test`` of a checkpoint: their metrics as the text table ``evaluation/<stage>`` in that
  evaluation's own run (``<run>/test``).

It reads the module only through its public interface (``plan``, ``rel_errors``, ``dense_params``,
``factorized_params``, ``staged`` and the saved ``hparams``) and a StagingCallback's ``history``; it writes only
through a :class:`~lightning.pytorch.loggers.TensorBoardLogger` (other loggers get nothing from it) on global rank 0.
"""

from __future__ import annotations

import math
import re
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from lit_factor.train.callbacks.staging import StagingCallback

#: the tag group that sorts first in TensorBoard (capitals sort before the lower-case groups Lightning writes)
OVERVIEW = "Overview"
LOSS_TAG, LR_TAG = f"{OVERVIEW}/train_loss", f"{OVERVIEW}/learning_rate"
#: the loss Lightning logs every step (FactorizedClassifier.training_step: ``train/loss`` with on_step)
STEP_LOSS = "train/loss_step"
EPOCH_LOSS = "train/loss_epoch"


def dev_tag(monitor: str) -> str:
    """``val/accuracy`` -> ``Overview/dev_accuracy`` (the dev split is what ``val/`` measures)."""
    return f"{OVERVIEW}/dev_{monitor.split('/', 1)[-1]}"


def best_tag(monitor: str) -> str:
    return f"{monitor}_best"


def layer_kind(path: str) -> tuple[str, int | None]:
    """``bert.encoder.layer.3.attention.self.query`` -> (``attention.self.query``, 3): the part after the block
    index, and the index (None for a path without one)."""
    match = re.search(r"\.(\d+)\.(.+)$", path)
    return (match.group(2), int(match.group(1))) if match else (path, None)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (TensorBoard's Text dashboard renders it as a table)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.4f}" if abs(v) < 1000 else f"{v:,.0f}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _by_kind(values: dict[str, float]) -> dict[str, list[tuple[int, float]]]:
    kinds: dict[str, list[tuple[int, float]]] = {}
    for i, (path, value) in enumerate(values.items()):
        kind, block = layer_kind(path)
        kinds.setdefault(kind, []).append((block if block is not None else i, value))
    return kinds


def per_layer_figure(values: dict[str, float], title: str, ylabel: str, ylim: tuple[float, float] | None = None):
    """One bar chart per layer kind (x: block index), three to a row, sharing the y axis."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    kinds = _by_kind(values)
    cols = min(3, len(kinds))
    rows = math.ceil(len(kinds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows + 0.6), sharey=True, squeeze=False)
    for ax in axes.flat[len(kinds):]:
        ax.set_visible(False)
    for ax, (kind, points) in zip(axes.flat, kinds.items()):  # noqa: B905 (hidden axes left over)
        ax.bar([b for b, _ in points], [v for _, v in points], color="tab:blue")
        ax.set_title(kind, fontsize=8)
        ax.set_xlabel("block", fontsize=8)
        ax.tick_params(labelsize=7)
        if ylim:
            ax.set_ylim(*ylim)
    for row in axes:
        row[0].set_ylabel(ylabel, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def staging_figure(history: list[dict], order: list[str]):
    """The staging timeline: which layer (y, in plan order) switched to its factorized form at which step (x)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.12 * len(order) + 1)))
    position = {p: i for i, p in enumerate(order)}
    kinds = sorted({layer_kind(p)[0] for p in order})
    colors = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
    for kind in kinds:
        points = [(r["step"], position[p]) for r in history if r.get("stage") for p in r.get("layers", ())
                  if p in position and layer_kind(p)[0] == kind]
        if points:
            ax.scatter([s for s, _ in points], [y for _, y in points], s=14, color=colors[kind], label=kind)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer (plan order)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title("staging: when each layer was factorized", fontsize=10)
    fig.tight_layout()
    return fig


class EvaluationLogger(TensorBoardLogger):
    """The TensorBoard logger of ``validate``/``test`` of a run's checkpoint (the CLI puts it in place of the fit's
    TensorBoardLogger): their metrics are one value each, so they appear only in :class:`BoardCallback`'s text
    table ``evaluation/<stage>``, not as one-dot charts. ``trainer.validate()`` still returns them (what it returns
    does not depend on what a logger writes)."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        return None


class BoardCallback(Callback):
    """Write the story first, facts as tables and figures, and HParams (see the module docstring)."""

    def __init__(self) -> None:
        self.best: float | None = None
        self._monitor, self._mode = "val/loss", "min"
        self._lr: float | None = None

    # --- where to write ------------------------------------------------------------------------------------------
    @staticmethod
    def _writers(trainer: pl.Trainer) -> list:
        return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def _monitor_and_mode(self, trainer: pl.Trainer) -> tuple[str, str]:
        ckpt = trainer.checkpoint_callback
        monitor = getattr(ckpt, "monitor", None) or "val/loss"
        mode = getattr(ckpt, "mode", None) if getattr(ckpt, "monitor", None) else None
        return monitor, mode or ("min" if monitor.endswith("loss") else "max")

    # --- fit: HParams and the facts at the start, the story as it goes, the result at the end ---------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._monitor, self._mode = self._monitor_and_mode(trainer)
        if trainer.is_global_zero:
            self._write_start(trainer, pl_module)

    def _write_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writers = self._writers(trainer)
        if not writers:
            return
        layout = {OVERVIEW: {"loss and dev metric": ["Multiline", [LOSS_TAG, dev_tag(self._monitor)]],
                             "learning rate": ["Multiline", [LR_TAG]]}}
        hparams = self.hparams(trainer, pl_module)
        for writer in writers:
            writer.add_custom_scalars(layout)
            _write_session(writer, hparams, [self._monitor, best_tag(self._monitor), EPOCH_LOSS])
            self._write_facts(writer, trainer, pl_module)

    def hparams(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The settings a fit is compared by on the HParams page (None shown as ``none``)."""
        hp = pl_module.hparams
        factorization = dict(hp.get("factorization") or {})
        plan = pl_module.plan
        values = {"task": hp.get("task"), "model": hp.get("model_name_or_path"),
                  "method": factorization.get("method", "none"), "budget": factorization.get("budget"),
                  "init": factorization.get("init"), "allocation": factorization.get("allocation"),
                  "rank": factorization.get("rank"), "nblocks": factorization.get("nblocks"),
                  "staged": bool(pl_module.staged), "learning_rate": hp.get("learning_rate"),
                  "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
                  "kept_fraction": plan.kept_fraction if plan is not None else 1.0,
                  "model_params": int(pl_module.factorized_params)}
        if values["method"] == "none":
            values.update(budget=None, init=None, allocation=None, rank=None, nblocks=None)
        return {k: ("none" if v is None else v) for k, v in values.items()}

    def _write_facts(self, writer, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plan, step = pl_module.plan, trainer.global_step
        dense, factorized = int(pl_module.dense_params), int(pl_module.factorized_params)
        rows = [["whole model", dense, factorized, factorized / dense if dense else 1.0]]
        if plan is not None:
            rows.append(["targeted linear layers", plan.params_dense, plan.params_factorized, plan.kept_fraction])
        title = "dense fine-tuning: no layer is factorized\n\n" if plan is None else ""
        writer.add_text("facts/parameters", title + markdown_table(
            ["parameters", "dense", "factorized" if plan is not None else "trained", "kept"], rows), step)
        if plan is None:
            return
        kept = {e.path: e.params_factorized / e.params_dense for e in plan.entries}
        writer.add_figure("facts/kept_fraction", per_layer_figure(
            kept, f"kept fraction of each layer's parameters ({plan.method}, budget {plan.budget})",
            "kept fraction", (0, 1)), step)
        if not pl_module.staged:  # staged layers are projected at their stage: written at the end of the fit
            self._write_layers(writer, pl_module, dict(pl_module.rel_errors), step)

    def _write_layers(self, writer, pl_module: pl.LightningModule, errors: dict[str, float], step: int) -> None:
        plan = pl_module.plan
        rows = []
        for e in plan.entries:
            kind, block = layer_kind(e.path)
            structure = ", ".join(f"{k} {v}" for k, v in sorted(e.structure.items()))
            error = errors.get(e.path)
            rows.append([e.path, kind, "" if block is None else block, f"{e.out_features}x{e.in_features}",
                         f"{e.method} ({structure})", e.params_factorized / e.params_dense,
                         "" if error is None else float(error)])
        writer.add_text("facts/layers", markdown_table(
            ["layer", "kind", "block", "out x in", "structure", "kept", "rel. error"], rows), step)
        errors = {p: float(v) for p, v in errors.items() if v is not None and math.isfinite(float(v))}
        if errors:
            mean = sum(errors.values()) / len(errors)
            writer.add_figure("facts/rel_error_per_layer", per_layer_figure(
                errors, f"relative projection error ||W - W'|| / ||W|| per layer (mean {mean:.3f})",
                "relative error"), step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # The rate this step trains with (the scheduler moves it after the step), as LearningRateMonitor logs it.
        self._lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Lightning logs the step's loss at step (optimizer steps - 1) whenever optimizer steps % log_every_n_steps
        # == 0: the same points, so the overview and the train/ curves line up.
        steps = trainer.global_step
        if not trainer.is_global_zero or steps % max(trainer.log_every_n_steps, 1):
            return
        metrics = {}
        loss = trainer.callback_metrics.get(STEP_LOSS)
        if loss is not None:
            metrics[LOSS_TAG] = float(loss)
        if self._lr is not None:
            metrics[LR_TAG] = self._lr
        self._log(trainer, metrics, steps - 1)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit":
            if trainer.state.fn == "validate":
                self._write_evaluation(trainer, "validate")
            return
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self._monitor)
        if value is None or not math.isfinite(float(value)):
            return
        value = float(value)
        if self.best is None or (value > self.best if self._mode == "max" else value < self.best):
            self.best = value
        if trainer.is_global_zero:
            self._log(trainer, {dev_tag(self._monitor): value, best_tag(self._monitor): self.best},
                      trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        staging = next((c for c in trainer.callbacks if isinstance(c, StagingCallback)), None)
        for writer in self._writers(trainer):
            step = trainer.global_step
            if pl_module.plan is not None and pl_module.staged and staging is not None:
                errors = {}
                for record in staging.history:
                    errors.update(record.get("rel_errors") or {})
                self._write_layers(writer, pl_module, errors, step)
                if any(r.get("stage") for r in staging.history):
                    writer.add_figure("facts/staging_timeline", staging_figure(staging.history,
                                                                               pl_module.plan.paths), step)
            rows = [[self._monitor, "best", self.best if self.best is not None else "n/a"]]
            final = trainer.callback_metrics.get(self._monitor)
            rows.append([self._monitor, "final", float(final) if final is not None else "n/a"])
            writer.add_text("facts/result", markdown_table(["metric", "", "value"], rows), step)
            _write_session_end(writer)
            writer.flush()

    # --- validate / test: one text table in that evaluation's run -------------------------------------------------
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_evaluation(trainer, "test")

    @rank_zero_only
    def _write_evaluation(self, trainer: pl.Trainer, stage: str) -> None:
        rows = []
        for key, value in sorted(trainer.callback_metrics.items()):
            try:
                rows.append([key, float(value)])
            except (TypeError, ValueError):
                continue
        split = "dev split (GLUE's test labels are hidden)"
        text = f"{stage} on the {split}" + (f" of `{trainer.ckpt_path}`" if trainer.ckpt_path else "")
        for writer in self._writers(trainer):
            writer.add_text(f"evaluation/{stage}", text + "\n\n" + markdown_table(["metric", "value"], rows), 0)
            writer.flush()

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        for writer in self._writers(trainer):
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)

    # --- a resumed fit keeps its running best ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")


def _write_session(writer, hparams: dict[str, Any], metrics: list[str]) -> None:
    """The HParams plugin's experiment and session-start records in this run's own event file; the metric values
    are read by TensorBoard from the named scalar tags (nothing is logged for them here)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    experiment, start, _ = hparams_summaries(hparams, {m: 0.0 for m in metrics})
    file_writer = writer._get_file_writer()  # as Lightning's TensorBoardLogger.log_hyperparams does
    file_writer.add_summary(experiment)
    file_writer.add_summary(start)


def _write_session_end(writer) -> None:
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    _, _, end = hparams_summaries({}, {})
    writer._get_file_writer().add_summary(end)
