"""The LightningModule: a Hugging Face sequence classifier fine-tuned on a GLUE task while factorized.

The factorization ``plan`` (see :mod:`lit_factor.surgery`) is built from the dense model when the module is
created, applied in ``configure_model`` (all at once, or as switchable layers when a StagingCallback set
``staged``), and stored in the checkpoint and in the hyperparameters. Loading a checkpoint rebuilds the
factorized architecture from that plan before the weights load, so ``validate``/``test``/``predict`` with
``--ckpt_path`` and ``FactorizedClassifier.load_from_checkpoint(path)`` need nothing else.
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

from .data import GLUETask, get_task
from .factorize import METHODS
from .models import load_model
from .surgery import Plan, apply_plan, build_plan, count_params, format_report

FACTORIZATION_METHODS = ("none", *METHODS)


class ConfigError(ValueError):
    """A model/factorization setting that cannot work (reported as one line by the CLI)."""


@dataclass
class Factorization:
    """How to factorize the model's linear layers (the ``model.factorization`` section of a config).

    Args:
        method: ``none`` (dense fine-tuning), ``lowrank``, ``monarch`` or ``blockwise``.
        budget: kept fraction of the targeted linear layers' weights, in (0, 1]; ``null`` with a fixed ``rank``
            (or, for Monarch/block-wise, the default per-block rank min(m, n) / nblocks^2).
        targets: which linears: a preset (``bert``, ``roberta``, ``t5``), a regex or a list of regexes on module
            names; ``null`` picks the preset of the model type (attention Q/K/V/O and FFN of every block).
        nblocks: number of blocks for Monarch and block-wise low rank.
        rank: fixed rank (low rank) or per-block rank (Monarch/block-wise) instead of a budget.
        rank_multiple: round ranks down to a multiple of this (8 or 64 on GPUs).
        init: ``svd`` projects the pretrained weights onto the structure; ``random`` re-initialises the factors.

    Staged (layer-by-layer) factorization is switched on by adding ``lit_factor.callbacks.StagingCallback``
    to ``trainer.callbacks``; without it the whole plan is applied at once before training.
    """

    method: Literal["none", "lowrank", "monarch", "blockwise"] = "none"
    budget: float | None = 0.5
    targets: str | list[str] | None = None
    nblocks: int = 4
    rank: int | None = None
    rank_multiple: int = 1
    init: Literal["svd", "random"] = "svd"


def _as_factorization(value: Factorization | dict | None) -> Factorization:
    if value is None:
        return Factorization()
    if isinstance(value, dict):  # from a checkpoint's hyperparameters
        return Factorization(**value)
    return value


def check_factorization(f: Factorization) -> None:
    """Refuse settings that cannot work, with one line naming the value and what is allowed."""
    if f.method not in FACTORIZATION_METHODS:
        raise ConfigError(f"factorization.method={f.method!r} is not one of {', '.join(FACTORIZATION_METHODS)}")
    if f.init not in ("svd", "random"):
        raise ConfigError(f"factorization.init={f.init!r} is not one of svd, random")
    if f.budget is not None and not 0 < f.budget <= 1:
        raise ConfigError(f"factorization.budget={f.budget} is outside (0, 1]: it is the kept fraction of the "
                          "targeted linear layers' weights")
    if f.nblocks < 1 or f.rank_multiple < 1 or (f.rank is not None and f.rank < 1):
        raise ConfigError(f"factorization.nblocks={f.nblocks}, rank={f.rank}, rank_multiple={f.rank_multiple} "
                          "must be >= 1")


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
        """
        super().__init__()
        self.task = get_task(task)
        self.factorization = _as_factorization(factorization)
        check_factorization(self.factorization)
        self.save_hyperparameters(ignore=["factorization", "plan"])
        self.hparams["factorization"] = asdict(self.factorization)

        self.model = load_model(model_name_or_path, num_labels=self.task.num_labels)
        self.model.train()  # from_pretrained returns eval mode, and Lightning keeps submodules' modes: no dropout
        self.dense_params = count_params(self.model)
        self.staged: bool = False  # set by lit_factor.callbacks.StagingCallback before configure_model
        self._factorized = False
        self.plan: Plan | None = self._make_plan(plan)
        self.hparams["plan"] = self.plan.to_dict() if self.plan else None
        self.rel_errors: dict[str, float] = {}
        # Only pass what the architecture's forward accepts (T5 has no token_type_ids).
        self._forward_keys = set(inspect.signature(self.model.forward).parameters)

        suffixes = self.task.eval_suffixes
        self.metrics = nn.ModuleDict({
            stage: nn.ModuleList(MetricCollection({m: _metric(m, self.task) for m in self.task.metrics})
                                 for _ in suffixes)
            for stage in ("val", "test")
        })
        self.eval_losses = nn.ModuleDict({stage: nn.ModuleList(MeanMetric() for _ in suffixes)
                                          for stage in ("val", "test")})

    # --- the plan -----------------------------------------------------------------------------------------
    def _make_plan(self, plan: dict | None) -> Plan | None:
        if plan is not None:
            return Plan.from_dict(plan)
        f = self.factorization
        if f.method == "none":
            return None
        return build_plan(self.model, f.method, f.budget, targets=f.targets, nblocks=f.nblocks, rank=f.rank,
                          rank_multiple=f.rank_multiple, init=f.init)

    def _factorize(self, project: bool = True) -> dict | None:
        if self.staged:
            from .switchable import make_switchable  # provided by the staging feature

            return make_switchable(self.model, self.plan, project=project)
        return apply_plan(self.model, self.plan, project=project)

    def configure_model(self) -> None:
        # Runs on every rank after setup(); DDP then broadcasts rank 0's weights, so ranks start identical.
        if self._factorized or self.plan is None:
            return
        info = self._factorize(project=True)
        self._factorized = True
        # apply_plan returns {path: rel. error}; staged layers are projected later (StagingCallback logs theirs).
        self.rel_errors = {k: float(v) for k, v in info.items()} if isinstance(info, dict) and not self.staged else {}
        self._report()

    @property
    def factorized_params(self) -> int:
        """Whole-model parameters once every planned layer is factorized."""
        if self.plan is None:
            return self.dense_params
        return self.dense_params - self.plan.params_dense + self.plan.params_factorized

    def _report(self) -> None:
        lines = format_report(self.model, self.plan, self.rel_errors, dense_model_params=self.dense_params)
        lines = lines.splitlines()
        if self.staged:  # switchable layers hold dense and factors: report the final architecture's count
            lines = [ln if not ln.startswith("whole model params") else
                     f"whole model params: {self.dense_params:,} -> {self.factorized_params:,} "
                     f"({self.factorized_params / self.dense_params:.1%}) once every stage has switched"
                     for ln in lines]
        rank_zero_info("\n".join(lines))
        metrics = {
            "params/dense_model": self.dense_params,
            "params/factorized_model": self.factorized_params,
            "params/targeted_dense": self.plan.params_dense,
            "params/targeted_factorized": self.plan.params_factorized,
            "factorize/kept_fraction": self.plan.kept_fraction,
        }
        if self.rel_errors:
            metrics["factorize/rel_error_mean"] = sum(self.rel_errors.values()) / len(self.rel_errors)
            metrics.update({f"factorize/rel_error/{k}": v for k, v in self.rel_errors.items()})
        if self._trainer is not None:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=0)
                if hasattr(getattr(logger, "experiment", None), "add_text"):
                    logger.experiment.add_text("factorize/report", "```\n" + "\n".join(lines) + "\n```", 0)

    # --- checkpoints: the plan travels with the weights ----------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["factorization"] = {"plan": self.plan.to_dict() if self.plan else None, "staged": self.staged}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        info = checkpoint.get("factorization") or {"plan": None, "staged": False}
        saved = Plan.from_dict(info["plan"]) if info["plan"] else None
        if self._factorized:
            # Built from this run's config already (Trainer with ckpt_path): it must be the same architecture.
            if saved is None or saved.to_dict() != self.plan.to_dict() or info["staged"] != self.staged:
                raise ConfigError("the checkpoint's factorization differs from this run's config (method "
                                  f"{saved.method if saved else 'none'}, staged={info['staged']} in the checkpoint); "
                                  "run with the checkpoint's config.yaml or without a factorization section")
            return
        if saved is None:
            return
        # Build empty factorized shells so that load_state_dict finds every parameter with its shape.
        self.plan, self.staged = saved, bool(info["staged"])
        self.hparams["plan"] = saved.to_dict()
        self._factorize(project=False)
        self._factorized = True

    # --- steps --------------------------------------------------------------------------------------------
    def forward(self, batch: dict):
        return self.model(**{k: v for k, v in batch.items() if k in self._forward_keys})

    def _predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1) if self.task.is_regression else logits.argmax(-1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["labels"]),
                 sync_dist=True)
        return loss

    def _eval_step(self, stage: str, batch: dict, dataloader_idx: int) -> None:
        out = self(batch)
        labels = batch["labels"]
        self.metrics[stage][dataloader_idx].update(self._predictions(out.logits), labels)
        self.eval_losses[stage][dataloader_idx].update(out.loss, weight=len(labels))

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def _eval_epoch_end(self, stage: str) -> None:
        # Metrics are computed here, not in the step, so MNLI's two dataloaders get their own names
        # (val/accuracy_m, val/accuracy_mm) and torchmetrics syncs them across DDP ranks.
        values, scores = {}, []
        for suffix, metrics, loss in zip(self.task.eval_suffixes, self.metrics[stage], self.eval_losses[stage],
                                         strict=True):
            if not metrics[self.task.metrics[0]].update_called:
                continue
            for name, value in metrics.compute().items():
                values[f"{stage}/{name}{suffix}"] = value
                scores.append(value)
            values[f"{stage}/loss{suffix}"] = loss.compute()
            metrics.reset()
            loss.reset()
        if scores:
            values[f"{stage}/combined_score"] = torch.stack([s.float() for s in scores]).mean()
            # Already reduced across DDP ranks by torchmetrics; sync_dist only averages identical values.
            self.log_dict(values, prog_bar=False, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

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
