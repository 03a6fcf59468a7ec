"""The LightningModule: a Hugging Face sequence classifier fine-tuned on a GLUE task while factorized.

All compression is the :class:`~lit_factor.compress.factorizer.Factorizer`'s (plan, inits, calibration,
allocation, stages); this module holds one and calls it from Lightning's hooks, handing it what only a trainer has
(calibration batches from the datamodule, the device). The plan is stored once, in the hyperparameters; loading a
checkpoint rebuilds the checkpoint's architecture from that plan before the weights load, so
``validate``/``test``/``predict`` with ``--ckpt_path`` and ``FactorizedClassifier.load_from_checkpoint(path)`` need
nothing else.

The interface callbacks rely on is :class:`~lit_factor.train.interface.Factorizable` (and nothing else of the
module): ``factorized_model``, ``plan``, ``staged``, ``rel_errors``, ``dense_params``, ``factorized_params``,
``distilling``,
``enable_staging()`` and ``factorize_stage(paths)``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import Accuracy, BinaryF1Score, BinaryMatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from lit_factor.compress.calibration import calibration_loader
from lit_factor.compress.distillation import SELF, Distillation, Teacher, distillation_loss
from lit_factor.compress.factorizer import ConfigError, Factorization, Factorizer
from lit_factor.compress.surgery import Plan, format_report
from lit_factor.models import load_model
from lit_factor.train.data import GLUETask, get_task
from lit_factor.train.teachers import load_dense_weights, load_teacher

__all__ = ["ConfigError", "Factorization", "FactorizedClassifier"]

#: metric-name prefix of each evaluation stage: ``test`` runs on the labelled dev split (GLUE's test labels are
#: hidden), so its metrics are named for that split: ``dev/accuracy``, not ``test/accuracy``
STAGE_PREFIX = {"val": "val", "test": "dev"}


def _metric(name: str, task: GLUETask):
    if name == "accuracy":
        return Accuracy(task="multiclass", num_classes=task.num_labels)
    if name == "f1":
        return BinaryF1Score()
    if name == "matthews":
        return BinaryMatthewsCorrCoef()
    if name == "pearson":
        return PearsonCorrCoef()
    if name == "spearman":
        return SpearmanCorrCoef()
    raise ConfigError(f"unknown metric {name!r}")


def _eval_metrics(task: GLUETask, prefix: str) -> nn.ModuleList:
    """One MetricCollection per evaluation dataloader, named ``<prefix>/<metric><suffix>`` (MNLI: _m, _mm)."""
    return nn.ModuleList(MetricCollection({m: _metric(m, task) for m in task.metrics}, prefix=f"{prefix}/",
                                          postfix=suffix) for suffix in task.eval_suffixes)


#: checkpoint key of a staged run's ``self`` teacher (frozen at the first stage)
TEACHER_KEY = "distillation_teacher"


def checkpoint_architecture(checkpoint: dict) -> tuple[Plan | None, bool]:
    """The plan (None: dense) and the staged flag a checkpoint of this module was written with."""
    saved = (checkpoint.get("hyper_parameters") or {}).get("plan")
    staged = bool((checkpoint.get("factorization") or {}).get("staged", False))
    return (Plan.from_dict(saved) if saved else None), staged


class FactorizedClassifier(L.LightningModule):
    """Fine-tune ``AutoModelForSequenceClassification`` on a GLUE task with factorized linear layers."""

    def __init__(
        self,
        model_name_or_path: str = "minilm",
        task: str = "sst2",
        factorization: Factorization | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        adam_epsilon: float = 1e-8,
        plan: dict | None = None,
        distillation: Distillation | None = None,
        init_checkpoint: str | None = None,
    ) -> None:
        """
        Args:
            model_name_or_path: HF hub name or local directory (``roberta-base``, ``bert-base-uncased``,
                ``t5-base`` ...), ``minilm`` for the packaged pretrained all-MiniLM-L6-v2 (offline), or a random
                preset ``random:tiny-bert`` / ``random:tiny-roberta`` / ``random:tiny-t5`` / ``random:bert-base``.
            task: GLUE task; sets the label count and metrics (the CLI links it from ``data.task``).
            factorization: which layers to factorize and how (see :class:`Factorization`).
            learning_rate: peak AdamW learning rate (reached after warm-up, then decays linearly to 0).
            weight_decay: AdamW weight decay; never applied to biases and normalisation weights.
            warmup_ratio: fraction of all optimizer steps spent warming the learning rate up from 0.
            adam_epsilon: AdamW epsilon.
            plan: a saved factorization plan (``Plan.to_dict()``) to use instead of planning from
                ``factorization``; filled in automatically in checkpoints, normally left empty.
            distillation: train against a teacher's soft targets (see
                :class:`lit_factor.compress.distillation.Distillation`).
            init_checkpoint: a *dense* checkpoint of this project (same ``model_name_or_path``) whose weights the
                model starts from before it is factorized: compress after fine-tuning.
        """
        super().__init__()
        self.task = get_task(task)
        self.factorization = Factorization.coerce(factorization)
        self.distillation = Distillation(**distillation) if isinstance(distillation, dict) else \
            distillation or Distillation()
        self.save_hyperparameters(ignore=["factorization", "plan", "distillation"])
        self.hparams["factorization"] = asdict(self.factorization)
        self.hparams["distillation"] = asdict(self.distillation)
        self._teacher: Teacher | None = None  # not an nn.Module: no optimizer state, not in the state_dict

        self.model = load_model(model_name_or_path, num_labels=self.task.num_labels)
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps submodules' modes: no dropout
        self.factorizer = Factorizer(self.model, self.factorization, Plan.from_dict(plan) if plan else None)
        self._sync_plan()
        # Only pass what the architecture's forward accepts (T5 has no token_type_ids).
        self._forward_keys = set(inspect.signature(self.model.forward).parameters)
        # Logged as metric objects: Lightning computes, syncs (through torchmetrics) and resets them per epoch.
        self.metrics = nn.ModuleDict({stage: _eval_metrics(self.task, prefix)
                                      for stage, prefix in STAGE_PREFIX.items()})
        self.eval_losses = nn.ModuleDict({stage: nn.ModuleList(MeanMetric() for _ in self.task.eval_suffixes)
                                          for stage in STAGE_PREFIX})

    # --- the interface of the callbacks (lit_factor.train.interface.Factorizable) ----------------------------
    @property
    def factorized_model(self) -> nn.Module:
        """The Hugging Face model being trained (factorized in place by ``configure_model``)."""
        return self.model

    @property
    def plan(self) -> Plan | None:
        """The factorization plan (None: dense fine-tuning); per-layer once a global allocation has run."""
        return self.factorizer.plan

    @property
    def staged(self) -> bool:
        """Whether the planned layers are switchable (factorized stage by stage) instead of replaced at once."""
        return self.factorizer.staged

    @property
    def rel_errors(self) -> dict[str, float]:
        """Relative Frobenius error of each layer projected at once (staged layers: the StagingCallback's)."""
        return self.factorizer.rel_errors

    @property
    def dense_params(self) -> int:
        """Whole-model parameters of the dense model."""
        return self.factorizer.dense_params

    @property
    def factorized_params(self) -> int:
        """Whole-model parameters once every planned layer is factorized."""
        return self.factorizer.factorized_params

    @property
    def distilling(self) -> bool:
        """Whether the training loss is the distillation loss (``distillation.teacher`` set)."""
        return self.distillation.enabled

    def enable_staging(self) -> None:
        """Build switchable layers in ``configure_model`` (the StagingCallback calls this before it runs)."""
        self.factorizer.request_staging()

    def factorize_stage(self, paths: list[str]) -> dict[str, float | None]:
        """Project the switchable layers at ``paths`` and make them live (the StagingCallback's stage); before the
        first stage, ``distillation.teacher: self`` freezes the dense model as fine-tuned so far as the teacher.
        Returns ``{path: relative error}``."""
        if self._teacher_at_first_stage and self._teacher is None:
            self._teacher = Teacher(self.factorizer.dense_snapshot()).to(self.device)
        data_aware = self.factorization.init_spec.data_aware
        return self.factorizer.stage(paths, *self._calibration() if data_aware else (None, None))

    # --- building the model (Lightning hooks) -----------------------------------------------------------------
    def _attached_trainer(self):
        """The Trainer this module runs under, or None (``load_from_checkpoint``, plain Python)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning's public answer to "not attached to a Trainer"
            return None

    def _calibration(self) -> tuple:
        """Calibration batches and the forward they run through: the datamodule's training split, on the device
        the run uses."""
        trainer = self._attached_trainer()
        datamodule = trainer.datamodule if trainer is not None else None
        if datamodule is None:
            raise ConfigError("a data-aware factorization (a data-aware init or a global allocation) calibrates on "
                              "training data: run it through a Trainer with a datamodule (cli.py fit --data ...)")
        self.to(trainer.strategy.root_device)
        return calibration_loader(datamodule, self.factorization.calibration_samples), self

    def configure_model(self) -> None:
        # Runs on every rank after setup(); DDP then broadcasts rank 0's weights, so ranks start identical.
        if self.factorizer.built:
            return
        trainer = self._attached_trainer()
        if trainer is None and self.factorizer.plan_final:
            return  # load_from_checkpoint: on_load_checkpoint builds the checkpoint's architecture next
        if trainer is not None:
            self._start_from_dense(fitting=trainer.state.fn == "fit")
        batches, forward = self._calibration() if self.factorizer.needs_calibration else (None, None)
        self.factorizer.apply(batches, forward)
        self._sync_plan()
        if self.plan is not None:
            self._report()

    def _start_from_dense(self, fitting: bool) -> None:
        """Under a Trainer, before factorizing: the dense starting weights (``init_checkpoint``), then, when
        fitting, the teacher (``self`` is a copy of the model as it is now, before factorization)."""
        if self.hparams.get("init_checkpoint"):
            load_dense_weights(self.model, self.hparams.init_checkpoint)
        if self.distillation.enabled and fitting and self._teacher is None and not self._teacher_at_first_stage:
            self._teacher = load_teacher(self.distillation.teacher, num_labels=self.task.num_labels,
                                         as_loaded=self.model)

    @property
    def _teacher_at_first_stage(self) -> bool:
        """``teacher: self`` in a staged run: the teacher is the model as fine-tuned until the first stage."""
        return self.staged and self.distillation.teacher == SELF

    def _sync_plan(self) -> None:
        self.hparams["plan"] = self.plan.to_dict() if self.plan else None  # the checkpoint's one copy of the plan

    def _report(self) -> None:
        report = format_report(self.model, self.plan, self.rel_errors, dense_model_params=self.dense_params,
                               staged=self.staged)
        rank_zero_info(report)
        if self._attached_trainer() is not None:
            self._log_report(report)

    def _log_report(self, report: str) -> None:
        # The report as one text table; the numbers in it (parameters, kept fractions, per-layer errors) are drawn
        # as tables and figures by lit_factor.train.callbacks.board, not as one-point scalar charts.
        for logger in self.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_text"):
                logger.experiment.add_text("factorize/report", f"```\n{report}\n```", 0)

    # --- checkpoints: the plan (in the hyperparameters) travels with the weights ------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["factorization"] = {"staged": self.staged}
        if self._teacher_at_first_stage and self._teacher is not None:  # no file holds it: it travels here
            checkpoint[TEACHER_KEY] = self._teacher.model.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, staged = checkpoint_architecture(checkpoint)
        if self.factorizer.built:
            self.factorizer.adopt(saved, staged)  # built from this run's config: it must be the same architecture
        else:
            self.factorizer.build(saved, staged)  # load_from_checkpoint: empty shells the weights load into
        self._sync_plan()
        if TEACHER_KEY in checkpoint and self._teacher_at_first_stage:  # resuming after the first stage
            teacher = self.factorizer.dense_snapshot()
            teacher.load_state_dict(checkpoint[TEACHER_KEY])
            self._teacher = Teacher(teacher).to(self.device)

    def adopt_checkpoint_architecture(self, checkpoint: dict) -> None:
        """Before a Trainer evaluates ``checkpoint``: build its architecture (its plan, staged or not, or dense)
        instead of the one this module's settings ask for, so that validate/test/predict of any checkpoint need no
        factorization settings and no StagingCallback. Nothing is projected: the weights come from the checkpoint."""
        if self.factorizer.built:
            raise ConfigError("adopt_checkpoint_architecture: the model is already built (call it before the Trainer)")
        self.factorizer.build(*checkpoint_architecture(checkpoint))
        self._sync_plan()

    # --- steps --------------------------------------------------------------------------------------------
    def forward(self, batch: dict):
        return self.model(**{k: v for k, v in batch.items() if k in self._forward_keys})

    def _predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1) if self.task.is_regression else logits.argmax(-1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss if self._teacher is None else self._distillation_loss(batch)
        # A plain tensor (not a torchmetrics object): sync_dist averages the epoch value over DDP ranks.
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["labels"]),
                 sync_dist=True)
        return loss

    def _distillation_loss(self, batch: dict) -> torch.Tensor:
        """The student's loss against the teacher (see lit_factor.compress.distillation); its parts are logged."""
        inputs = {k: v for k, v in batch.items() if k in self._forward_keys}
        if self.distillation.hidden_weight > 0:
            inputs["output_hidden_states"] = True
        loss, parts = distillation_loss(self.distillation, self.model(**inputs), self._teacher(**inputs),
                                        batch.get("attention_mask"))
        self.log_dict({f"train/distill_{k}": v for k, v in parts.items()}, on_step=True, on_epoch=True,
                      batch_size=len(batch["labels"]), sync_dist=True)
        return loss

    def on_fit_start(self) -> None:
        if self._teacher is not None:
            self._teacher.to(self.device)

    def _eval_step(self, stage: str, batch: dict, dataloader_idx: int) -> None:
        out = self(batch)
        labels = batch["labels"]
        metrics, loss = self.metrics[stage][dataloader_idx], self.eval_losses[stage][dataloader_idx]
        metrics.update(self._predictions(out.logits), labels)
        loss.update(out.loss, weight=len(labels))
        # Metric objects: Lightning computes them at epoch end (synced by torchmetrics) and resets them.
        # add_dataloader_idx=False: MNLI's two dev loaders are told apart by the collections' _m/_mm postfix.
        self.log_dict(metrics, on_step=False, on_epoch=True, add_dataloader_idx=False)
        suffix = self.task.eval_suffixes[dataloader_idx]
        self.log(f"{STAGE_PREFIX[stage]}/loss{suffix}", loss, on_step=False, on_epoch=True, add_dataloader_idx=False)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def _log_combined_score(self, stage: str) -> None:
        # The GLUE score: the mean of every metric of every dev loader. Metric.compute() caches its (synced)
        # result, so Lightning's own compute at the end of this epoch reuses it; Lightning resets afterwards.
        scores = [value.float() for metrics in self.metrics[stage] if metrics[self.task.metrics[0]].update_called
                  for value in metrics.compute().values()]
        if scores:
            self.log(f"{STAGE_PREFIX[stage]}/combined_score", torch.stack(scores).mean())

    def on_validation_epoch_end(self) -> None:
        self._log_combined_score("val")

    def on_test_epoch_end(self) -> None:
        self._log_combined_score("test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        return {"idx": batch["idx"], "pred": self._predictions(self(batch).logits)}

    # --- optimization -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        from transformers import get_linear_schedule_with_warmup

        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                # Biases and LayerNorm/RMSNorm weights (all 1-D) are not decayed.
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.learning_rate, eps=self.hparams.adam_epsilon)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError("the linear warm-up/decay schedule needs a finite run: set trainer.max_epochs >= 1 "
                              "or trainer.max_steps >= 1")
        total = int(total)
        warmup = int(self.hparams.warmup_ratio * total)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
