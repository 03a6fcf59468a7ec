"""The LightningModule: a Hugging Face sequence classifier fine-tuned on a GLUE task while factorized.

The factorization ``plan`` (see :mod:`lit_factor.compress.surgery`) is built from the dense model when the module is
created, applied in ``configure_model`` (all at once, or as switchable layers once a StagingCallback called
:meth:`FactorizedClassifier.enable_staging`), and stored once, in the hyperparameters. Loading a checkpoint
rebuilds the factorized architecture from that plan before the weights load, so ``validate``/``test``/``predict``
with ``--ckpt_path`` and ``FactorizedClassifier.load_from_checkpoint(path)`` need nothing else.

The interface callbacks rely on (and nothing else of the module):

* ``module.factorized_model``: the Hugging Face model being trained (an ``nn.Module``);
* ``module.plan``: the :class:`~lit_factor.compress.surgery.Plan`, or ``None`` for dense fine-tuning;
* ``module.staged``: read-only, whether the planned layers are switchable (staged) rather than factorized at once;
* ``module.enable_staging()``: ask for switchable layers; called by the StagingCallback before ``configure_model``;
* ``module.dense_params`` / ``module.factorized_params``: whole-model parameter counts before and once every
  planned layer is factorized (read by the RunSummary).
* optional, called by the StagingCallback when the module has them: ``module.stage_stats(paths)`` (calibration
  statistics for the layers projected at a stage) and ``module.freeze_teacher()`` (right before the first stage:
  ``distillation.teacher: self`` becomes the dense model as fine-tuned so far).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import Accuracy, BinaryF1Score, BinaryMatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from lit_factor.compress.distillation import (
    SELF,
    Distillation,
    Teacher,
    dense_copy,
    distillation_loss,
    load_dense_weights,
    load_teacher,
)
from lit_factor.compress.factorizer import adopt_structures, allocated_plan, module_stats, needs_fisher
from lit_factor.compress.surgery import Plan, apply_plan, build_plan, count_params, format_report
from lit_factor.compress.switchable import make_switchable
from lit_factor.errors import UserError
from lit_factor.factorize import METHODS
from lit_factor.factorize.allocation import ALLOCATIONS
from lit_factor.models import load_model
from lit_factor.train.data import GLUETask, get_task

#: metric-name prefix of each evaluation stage: ``test`` runs on the labelled dev split (GLUE's test labels are
#: hidden), so its metrics are named for that split: ``dev/accuracy``, not ``test/accuracy``
STAGE_PREFIX = {"val": "val", "test": "dev"}


class ConfigError(UserError):
    """A model/factorization setting that cannot work (one ``error:`` line from the CLI, exit status 2)."""


@dataclass
class Factorization:
    """How to factorize the model's linear layers (the ``model.factorization`` section of a config).

    Args:
        method: ``none`` (dense fine-tuning) or a structure of :data:`lit_factor.factorize.METHODS`:
            ``lowrank``, ``monarch``, ``blockwise``.
        budget: kept fraction of the targeted linear layers' weights, in (0, 1]; ``null`` with a fixed ``rank``
            (or, for Monarch/block-wise, the default per-block rank min(m, n) / nblocks^2).
        targets: which linears: a preset (``bert``, ``roberta``, ``t5``), a regex or a list of regexes on module
            names; ``null`` picks the preset of the model type (attention Q/K/V/O and FFN of every block).
        nblocks: number of blocks for Monarch and block-wise low rank.
        rank: fixed rank (low rank) or per-block rank (Monarch/block-wise) instead of a budget.
        rank_multiple: round ranks down to a multiple of this (8 or 64 on GPUs).
        init: how the factors start: ``svd`` projects the pretrained weights onto the structure (least weight
            error); ``whitened`` minimizes the error on the layer's calibration inputs ||(W - W') X^T||; ``fisher``
            weighs output rows by their Fisher information (FWSVD); ``random`` re-initialises the factors.
            Details and what Monarch/block-wise minimize: ``lit_factor/factorize/datawise.py``, ``project_``.
        allocation: per-layer ranks: ``uniform`` (every layer keeps ``budget``), or a global allocation meeting
            ``budget`` over all targeted weights: ``energy`` (normalized spectral energy) or ``fisher``
            (Fisher-weighted energy, comparable across layers); see ``lit_factor/factorize/allocation.py``.
        allocation_min_share: a floor for non-uniform allocations: every layer keeps at least this share of its
            uniform allocation (0: none; 0.5 keeps ``fisher`` from starving layers at small budgets).
        calibration_samples: training examples run through the model to gather the statistics of ``whitened``,
            ``fisher`` and the non-uniform allocations (one pass, before projecting; per stage when staged).

    Staged (layer-by-layer) factorization is switched on by adding ``lit_factor.callbacks.StagingCallback``
    to ``trainer.callbacks``; without it the whole plan is applied at once before training.
    The settings are checked here, once, so Python users get the command line's one-line errors.
    """

    method: Literal["none", "lowrank", "monarch", "blockwise"] = "none"
    budget: float | None = 0.5
    targets: str | list[str] | None = None
    nblocks: int = 4
    rank: int | None = None
    rank_multiple: int = 1
    init: Literal["svd", "whitened", "fisher", "random"] = "svd"
    allocation: Literal["uniform", "energy", "fisher"] = "uniform"
    allocation_min_share: float = 0.0
    calibration_samples: int = 256

    def __post_init__(self) -> None:
        methods = ("none", *METHODS)  # read at call time: a structure registered later is allowed too
        if self.method not in methods:
            raise ConfigError(f"factorization.method={self.method!r} is not one of {', '.join(methods)}")
        inits = METHODS[self.method].INITS if self.method in METHODS else ("svd", "whitened", "fisher", "random")
        if self.init not in inits:
            raise ConfigError(f"factorization.init={self.init!r} is not one of {', '.join(inits)}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"factorization.allocation={self.allocation!r} is not one of {', '.join(ALLOCATIONS)}")
        if self.allocation != "uniform" and self.budget is None:
            raise ConfigError(f"factorization.allocation={self.allocation} distributes a budget: set "
                              "factorization.budget instead of a fixed rank")
        if not 0 <= self.allocation_min_share <= 1:
            raise ConfigError(f"factorization.allocation_min_share={self.allocation_min_share} must be in [0, 1]")
        if self.calibration_samples < 1:
            raise ConfigError(f"factorization.calibration_samples={self.calibration_samples} must be >= 1")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ConfigError(f"factorization.budget={self.budget} is outside (0, 1]: it is the kept fraction of "
                              "the targeted linear layers' weights")
        if self.nblocks < 1 or self.rank_multiple < 1 or (self.rank is not None and self.rank < 1):
            raise ConfigError(f"factorization.nblocks={self.nblocks}, rank={self.rank}, "
                              f"rank_multiple={self.rank_multiple} must be >= 1")

    @classmethod
    def coerce(cls, value: Factorization | dict | None) -> Factorization:
        """A Factorization from itself, a dict (a checkpoint's hyperparameters) or None (the defaults)."""
        if value is None:
            return cls()
        return cls(**value) if isinstance(value, dict) else value


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
            distillation: train against a teacher's soft targets (see :class:`lit_factor.compress.distillation.Distillation`).
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
        self._dense_ready = False
        self._plan_given = plan is not None  # a checkpoint's plan: its per-layer ranks are final

        self.model = load_model(model_name_or_path, num_labels=self.task.num_labels)
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps submodules' modes: no dropout
        self.dense_params = count_params(self.model)
        self._staged = False
        self._factorized = False
        self.plan: Plan | None = self._make_plan(plan)
        self.hparams["plan"] = self.plan.to_dict() if self.plan else None  # the checkpoint's one copy of the plan
        self.rel_errors: dict[str, float] = {}
        # Only pass what the architecture's forward accepts (T5 has no token_type_ids).
        self._forward_keys = set(inspect.signature(self.model.forward).parameters)
        # Logged as metric objects: Lightning computes, syncs (through torchmetrics) and resets them per epoch.
        self.metrics = nn.ModuleDict({stage: _eval_metrics(self.task, prefix)
                                      for stage, prefix in STAGE_PREFIX.items()})
        self.eval_losses = nn.ModuleDict({stage: nn.ModuleList(MeanMetric() for _ in self.task.eval_suffixes)
                                          for stage in STAGE_PREFIX})

    # --- the interface of the callbacks --------------------------------------------------------------------
    @property
    def factorized_model(self) -> nn.Module:
        """The Hugging Face model being trained (factorized in place by ``configure_model``)."""
        return self.model

    @property
    def staged(self) -> bool:
        """Whether the planned layers are switchable (factorized stage by stage) instead of replaced at once."""
        return self._staged

    def enable_staging(self) -> None:
        """Build switchable layers in ``configure_model`` (the StagingCallback calls this before it runs)."""
        if self._factorized and not self._staged:
            raise ConfigError("staging was asked for after the model was factorized all at once: add the "
                              "StagingCallback before fitting (trainer.callbacks), not to a fitted module")
        self._staged = True

    # --- the plan -----------------------------------------------------------------------------------------
    def _make_plan(self, plan: dict | None) -> Plan | None:
        if plan is not None:
            return Plan.from_dict(plan)
        f = self.factorization
        if f.method == "none":
            return None
        return build_plan(self.model, f.method, f.budget, targets=f.targets, nblocks=f.nblocks, rank=f.rank,
                          rank_multiple=f.rank_multiple, init=f.init)

    def _factorize(self, project: bool = True, stats: dict | None = None) -> dict:
        if self._staged:
            return make_switchable(self.model, self.plan)  # each layer is projected at its stage
        return apply_plan(self.model, self.plan, project=project, stats=stats)

    def _start_from_dense(self) -> None:
        """Once, under a Trainer: the dense starting weights (``init_checkpoint``), then, when fitting, the teacher
        (``self`` is a copy of the model as it is now, before factorization)."""
        if self._dense_ready or self._trainer is None:
            return
        self._dense_ready = True
        if self.hparams.get("init_checkpoint"):
            load_dense_weights(self.model, self.hparams.init_checkpoint)
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if self.distillation.enabled and fitting and self._teacher is None and not self._teacher_at_first_stage:
            self._teacher = load_teacher(self.distillation.teacher, num_labels=self.task.num_labels,
                                         as_loaded=self.model)

    @property
    def _teacher_at_first_stage(self) -> bool:
        """``teacher: self`` in a staged run: the teacher is the model as fine-tuned until the first stage."""
        return self._staged and self.distillation.teacher == SELF

    def freeze_teacher(self) -> None:
        """Called by the StagingCallback right before its first stage: with ``distillation.teacher: self`` the
        teacher becomes a frozen copy of the dense model as fine-tuned so far (see lit_factor.compress.distillation)."""
        if self._teacher_at_first_stage and self._teacher is None:
            self._teacher = Teacher(dense_copy(self.model)).to(self.device)

    def _calibrate_and_allocate(self) -> dict | None:
        """Statistics for data-aware projection and allocation (None when neither is asked for now); a
        non-uniform allocation replaces the plan by its per-layer one."""
        f = self.factorization
        allocate = f.allocation != "uniform" and not self._plan_given
        if not allocate and (f.init not in ("whitened", "fisher") or self._staged):
            return None  # staged layers calibrate at their stage (stage_stats)
        if self._trainer is not None:
            self.to(self.trainer.strategy.root_device)  # calibrate on the device the run uses
        stats = module_stats(self, self.plan.paths, fisher=needs_fisher(f.init, f.allocation),
                             samples=f.calibration_samples)
        if allocate:
            self.plan = allocated_plan(self.model, self.plan, f.allocation, stats, targets=f.targets,
                                       nblocks=f.nblocks, rank_multiple=f.rank_multiple,
                                       min_share=f.allocation_min_share)
            self.hparams["plan"] = self.plan.to_dict()
        return stats

    def stage_stats(self, paths: list[str]) -> dict:
        """Calibration statistics for the layers a StagingCallback projects now, from the model as it is at this
        stage (``{}`` unless ``init`` is data-aware)."""
        f = self.factorization
        if f.init not in ("whitened", "fisher"):
            return {}
        return module_stats(self, paths, fisher=f.init == "fisher", samples=f.calibration_samples)

    def configure_model(self) -> None:
        # Runs on every rank after setup(); DDP then broadcasts rank 0's weights, so ranks start identical.
        if self._factorized:
            return
        self._start_from_dense()
        if self.plan is None:
            return
        if self._trainer is None and self._plan_given and self.factorization.init in ("whitened", "fisher"):
            info = self._factorize(project=False)  # load_from_checkpoint: no data here, the weights come next
        else:
            info = self._factorize(project=True, stats=self._calibrate_and_allocate())
        self._factorized = True
        # apply_plan returns {path: rel. error}; staged layers are projected later (StagingCallback logs theirs).
        self.rel_errors = {} if self._staged else {k: float(v) for k, v in info.items()}
        self._report()

    @property
    def factorized_params(self) -> int:
        """Whole-model parameters once every planned layer is factorized."""
        return self.plan.factorized_model_params(self.dense_params) if self.plan else self.dense_params

    def _report(self) -> None:
        report = format_report(self.model, self.plan, self.rel_errors, dense_model_params=self.dense_params,
                               staged=self._staged)
        rank_zero_info(report)
        if self._trainer is not None:
            self._log_report(report)

    def _log_report(self, report: str) -> None:
        # The report as one text table; the numbers in it (parameters, kept fractions, per-layer errors) are drawn
        # as tables and figures by lit_factor.train.callbacks.board, not as one-point scalar charts.
        for logger in self.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_text"):
                logger.experiment.add_text("factorize/report", f"```\n{report}\n```", 0)

    # --- checkpoints: the plan (in the hyperparameters) travels with the weights ------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["factorization"] = {"staged": self._staged}
        if self._teacher_at_first_stage and self._teacher is not None:  # no file holds it: it travels here
            checkpoint[TEACHER_KEY] = self._teacher.model.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if TEACHER_KEY in checkpoint and self._teacher_at_first_stage:  # resuming after the first stage
            teacher = dense_copy(self.model)
            teacher.load_state_dict(checkpoint[TEACHER_KEY])
            self._teacher = Teacher(teacher).to(self.device)
        saved_dict = (checkpoint.get("hyper_parameters") or {}).get("plan")
        saved = Plan.from_dict(saved_dict) if saved_dict else None
        staged = bool((checkpoint.get("factorization") or {}).get("staged", False))
        if self._factorized:
            # Built from this run's config already (Trainer with ckpt_path): it must be the same architecture, up
            # to the per-layer ranks of a global allocation (computed from the checkpoint's run: those rule).
            if saved is not None and staged == self._staged and adopt_structures(self.model, self.plan, saved):
                self.plan = saved
                self.hparams["plan"] = saved.to_dict()
            if saved is None or saved.to_dict() != self.plan.to_dict() or staged != self._staged:
                raise ConfigError("the checkpoint's factorization differs from this run's config (method "
                                  f"{saved.method if saved else 'none'}, staged={staged} in the checkpoint); "
                                  "run with the checkpoint's config.yaml or without a factorization section")
            return
        if saved is None:
            return
        # Build empty factorized shells so that load_state_dict finds every parameter with its shape.
        self.plan, self._staged = saved, staged
        self.hparams["plan"] = saved.to_dict()
        self._factorize(project=False)
        self._factorized = True

    def adopt_checkpoint_architecture(self, checkpoint: dict) -> None:
        """Before a Trainer evaluates ``checkpoint``: build its architecture (its plan, staged or not, or dense)
        instead of the one this module's settings ask for, so that validate/test/predict of any checkpoint need no
        factorization settings and no StagingCallback. Nothing is projected: the weights come from the checkpoint."""
        if self._factorized:
            raise ConfigError("adopt_checkpoint_architecture: the model is already built (call it before the Trainer)")
        self.plan, self.hparams["plan"], self._staged = None, None, False
        self.on_load_checkpoint(checkpoint)
        self._factorized = True  # configure_model builds nothing more (no init_checkpoint, no calibration)

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
