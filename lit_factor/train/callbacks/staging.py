"""Staged factorization: factorize the planned layers one group at a time while fine-tuning goes on.

Projecting all layers of a pretrained transformer at once often makes fine-tuning unstable; projecting them one
by one, each from its already fine-tuned weights, fixes that. :class:`StagingCallback` drives it:

* before the model is built it asks the module for *switchable* layers (``pl_module.enable_staging()``; its
  Factorizer then builds :class:`~lit_factor.compress.switchable.SwitchableLinear` layers instead of applying the
  plan), so every factor exists before the optimizer is built and the optimizer is never rebuilt, nor DDP
  re-wrapped;
* at each stage it has the module project the stage's layers from their current dense weights and make the
  factors live (``pl_module.factorize_stage(paths)``, the one typed call of
  :class:`~lit_factor.train.interface.Factorizable`): replaced dense weights get no gradient from then on, so AdamW
  neither updates nor decays them; the factors train from their first step in their group, with its
  learning-rate schedule and weight-decay rule;
* it is stateful: the stages done and the schedule go into checkpoints (and the live path of every layer is a
  buffer of the model), so ``fit --ckpt_path`` resumes into the same architecture and state.

YAML (LightningCLI)::

    trainer:
      strategy: ddp_find_unused_parameters_true   # only for multi-device runs
      callbacks:
        - class_path: lit_factor.callbacks.StagingCallback
          init_args: {granularity: block, order: bottom_up, spread: 0.5}

Stages happen at optimizer-step boundaries, before the forward of the step they are due at.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.nn.parallel import DistributedDataParallel

from lit_factor.compress.switchable import SwitchableLinear, find_switchable
from lit_factor.errors import UserError
from lit_factor.train.interface import require_factorizable

_ORDERS = ("bottom_up", "top_down")
_GRANULARITIES = ("block", "matrix")
# A transformer block is the module path up to its first numeric component: "bert.encoder.layer.3",
# "transformer.encoder.block.0", "model.layers.11".
_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def block_of(path: str) -> str:
    """The transformer block a module path belongs to (the path itself if it has no numeric component)."""
    match = _BLOCK.match(path)
    return match.group(1) if match else path


class StagingError(UserError):
    """A staging setting that cannot work (one ``error:`` line from the CLI, exit status 2)."""


def check_grouping(granularity: str, order: str | list[str]) -> list[re.Pattern] | None:
    """Check ``granularity`` and ``order`` (the one place both :func:`plan_stages` and the callback use).

    Returns the compiled regular expressions of an explicit ``order`` list, ``None`` for a named order.
    """
    if granularity not in _GRANULARITIES:
        raise StagingError(f"staging granularity={granularity!r} is not one of {', '.join(_GRANULARITIES)}")
    if isinstance(order, str):
        if order not in _ORDERS:
            raise StagingError(f"staging order={order!r} is not one of {', '.join(_ORDERS)} or a list of regexes")
        return None
    if not order:
        raise StagingError("staging order=[] is empty: give bottom_up, top_down or one regex per stage")
    regexes = []
    for pattern in order:
        try:
            regexes.append(re.compile(pattern))
        except (re.error, TypeError) as err:
            raise StagingError(f"staging order entry {pattern!r} is not a valid regular expression: {err}") from None
    return regexes


def _stages_by_regex(paths: list[str], regexes: list[re.Pattern]) -> list[list[str]]:
    stages, owner = [], {}
    for regex in regexes:
        stage = [p for p in paths if regex.search(p)]
        if not stage:
            raise StagingError(f"staging order entry {regex.pattern!r} matches no planned layer (e.g. {paths[0]!r})")
        for p in stage:
            if p in owner:
                raise StagingError(f"staging: layer {p!r} matches both {owner[p]!r} and {regex.pattern!r}")
            owner[p] = regex.pattern
        stages.append(stage)
    missing = [p for p in paths if p not in owner]
    if missing:
        raise StagingError(f"staging order leaves {len(missing)} planned layers out (first: {missing[0]!r}); "
                           "every planned layer needs a stage")
    return stages


def plan_stages(paths: list[str], granularity: str = "block", order: str | list[str] = "bottom_up") -> list[list[str]]:
    """Group planned layer paths (in module order, i.e. bottom-up) into stages.

    ``granularity`` ``block`` puts the matrices of one transformer block in one stage, ``matrix`` gives each its
    own. ``order`` is ``bottom_up``, ``top_down``, or an explicit list: one regular expression per stage,
    ``re.search``-ed on the layer paths (then ``granularity`` is not used); every layer must match exactly one.
    """
    regexes = check_grouping(granularity, order)
    if not paths:
        raise StagingError("staging: the model has no switchable layers (a factorization method other than "
                           "'none' is needed, and module.enable_staging() before configure_model)")
    if regexes is not None:
        return _stages_by_regex(paths, regexes)
    if granularity == "matrix":
        stages = [[p] for p in paths]
    else:
        groups: dict[str, list[str]] = {}
        for p in paths:
            groups.setdefault(block_of(p), []).append(p)
        stages = list(groups.values())
    return stages[::-1] if order == "top_down" else stages


def _check_schedule(every_n_steps: int | None, every_n_epochs: int | None, spread: float | None,
                    offset: int) -> float | None:
    """Exactly one schedule (default ``spread=0.5``), each in its range; returns the effective ``spread``."""
    given = {k: v for k, v in dict(every_n_steps=every_n_steps, every_n_epochs=every_n_epochs,
                                   spread=spread).items() if v is not None}
    if len(given) > 1:
        raise StagingError(f"staging: give one schedule, not {', '.join(f'{k}={v}' for k, v in given.items())}")
    if not given:
        spread = 0.5
    if every_n_steps is not None and every_n_steps < 1:
        raise StagingError(f"staging every_n_steps={every_n_steps} must be >= 1")
    if every_n_epochs is not None and every_n_epochs < 1:
        raise StagingError(f"staging every_n_epochs={every_n_epochs} must be >= 1")
    if spread is not None and not 0 < spread <= 1:
        raise StagingError(f"staging spread={spread} must be in (0, 1]: the fraction of training with stages")
    if offset < 0:
        raise StagingError(f"staging offset={offset} must be >= 0")
    return spread


class StagingCallback(Callback):
    """Factorize the planned layers progressively during ``fit`` (see the module docstring).

    Exactly one schedule among ``every_n_steps``, ``every_n_epochs`` and ``spread`` (default: ``spread=0.5``).

    Args:
        granularity: ``block`` (one transformer block per stage) or ``matrix`` (one linear layer per stage).
        order: ``bottom_up``, ``top_down``, or a list of regexes on layer paths, one per stage.
        every_n_steps: a stage every N optimizer steps, the first after ``offset`` steps.
        every_n_epochs: a stage at the start of every N-th epoch, the first at epoch ``offset``.
        spread: the stages spread evenly over this fraction of the run's optimizer steps (after ``offset``):
            stage i (of k) at step ``offset + (i + 1) * (spread * total - offset) / k``, so the last one lands at
            ``spread`` of the run and the rest trains the fully factorized model.
        offset: optimizer steps (epochs with ``every_n_epochs``) of dense fine-tuning before the first stage.
    """

    def __init__(self, granularity: Literal["block", "matrix"] = "block",
                 order: Literal["bottom_up", "top_down"] | list[str] = "bottom_up",
                 every_n_steps: int | None = None, every_n_epochs: int | None = None, spread: float | None = None,
                 offset: int = 0) -> None:
        spread = _check_schedule(every_n_steps, every_n_epochs, spread, offset)
        check_grouping(granularity, order)
        self.granularity, self.order = granularity, order if isinstance(order, str) else list(order)
        self.every_n_steps, self.every_n_epochs, self.spread = every_n_steps, every_n_epochs, spread
        self.offset = offset
        # Run state (what a checkpoint stores).
        self.stages: list[list[str]] = []
        self.stage_steps: list[int] | None = None  # optimizer step of each stage (step schedules)
        self.done = 0
        self.history: list[dict[str, Any]] = []
        self._restored = False
        self._last_loss: torch.Tensor | None = None
        self._switches: dict[str, SwitchableLinear] = {}

    # --- setup ---------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Runs before the module's configure_model: ask it for switchable layers instead of apply_plan.
        require_factorizable(pl_module, "StagingCallback").enable_staging()
        if stage == "fit" and not isinstance(trainer.strategy, (DDPStrategy, SingleDeviceStrategy)):
            raise MisconfigurationException(
                f"StagingCallback supports single-device and DDP strategies, not {type(trainer.strategy).__name__}")

    @staticmethod
    def _check_ddp(trainer: pl.Trainer) -> None:
        """Under DDP, the wrapper (public torch attributes, read once it exists) must tolerate unused parameters:
        the not-yet-live factors and the replaced dense weights get no gradient."""
        wrapped = trainer.strategy.model
        if isinstance(wrapped, DistributedDataParallel) and (not wrapped.find_unused_parameters
                                                             or wrapped.static_graph):
            raise MisconfigurationException(
                "StagingCallback under DDP needs strategy='ddp_find_unused_parameters_true' (the not-yet-live "
                "factors and the replaced dense weights get no gradient), and no static_graph")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model, a checkpoint's module/callback state and configure_optimizers.
        self._check_ddp(trainer)
        self._switches = find_switchable(pl_module.factorized_model)
        if self._restored:
            # The checkpoint's stages rule (they define what "done" means); they must cover this model's layers.
            if sorted(p for s in self.stages for p in s) != sorted(self._switches):
                raise RuntimeError(f"staging: the checkpoint's {len(self.stages)} stages do not cover this model's "
                                   f"{len(self._switches)} switchable layers (a different plan?)")
        else:
            self.stages = plan_stages(list(self._switches), self.granularity, self.order)
            self.stage_steps = self._schedule(trainer)
            self.history = []
            # A module that arrives partly switched (e.g. a second fit call) continues where it stands.
            self.done = 0
            while self.done < len(self.stages) and all(self._switches[p].is_switched for p in self.stages[self.done]):
                self.done += 1
        self._check_consistent()
        self._check_optimizers(trainer)
        rank_zero_info(f"staging: {len(self.stages)} stages ({self._describe()}), {self.done} done; "
                       f"{sum(map(len, self.stages))} layers")
        if not self._restored:
            self._log_stage(trainer, pl_module, stage=0, errors={})

    def _describe(self) -> str:
        order = self.order if isinstance(self.order, str) else "explicit order"
        if self.every_n_epochs is not None:
            when = f"every {self.every_n_epochs} epochs from epoch {self.offset}"
        else:
            when = f"at optimizer steps {self.stage_steps}"
        return f"{self.granularity}, {order}, {when}"

    def _schedule(self, trainer: pl.Trainer) -> list[int] | None:
        k = len(self.stages)
        if self.every_n_epochs is not None:
            return None
        if self.every_n_steps is not None:
            steps = [self.offset + i * self.every_n_steps for i in range(k)]
        else:
            total = trainer.estimated_stepping_batches
            if total == float("inf"):
                raise MisconfigurationException("staging spread needs a finite run: set max_steps or max_epochs")
            span = self.spread * total - self.offset
            if span <= 0:
                raise MisconfigurationException(f"staging: spread={self.spread} of {int(total)} steps ends before "
                                                f"offset={self.offset}")
            # Stage i closes the i-th of k equal intervals: every layer is fine-tuned dense before its projection,
            # and the last stage lands at spread x the run.
            steps = [self.offset + int((i + 1) * span / k) for i in range(k)]
        total = trainer.estimated_stepping_batches
        if steps[-1] >= total:
            rank_zero_warn(f"staging: the last stage is due at step {steps[-1]} but the run has {int(total)} steps; "
                           "late stages will not happen and their layers stay dense")
        return steps

    def _check_consistent(self) -> None:
        expected = {p for stage in self.stages[: self.done] for p in stage}
        actual = {p for p, s in self._switches.items() if s.is_switched}
        if expected != actual:
            extra = sorted(actual - expected) or sorted(expected - actual)
            raise RuntimeError(f"staging: {self.done} stages done but the model's switched layers disagree "
                               f"(e.g. {extra[0]!r}); checkpoint and callback state do not belong together")

    def _check_optimizers(self, trainer: pl.Trainer) -> None:
        # Pitfall: layers built after the optimizer silently never train. All factors must be in it from the start.
        in_optim = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        for path, switch in self._switches.items():
            for p in switch.parameters():
                if p.requires_grad and id(p) not in in_optim:
                    raise MisconfigurationException(
                        f"staging: a parameter of {path} is in no optimizer; build switchable layers in "
                        "configure_model (before configure_optimizers) and optimize all parameters")

    # --- stages --------------------------------------------------------------------------------------------
    def _due(self, trainer: pl.Trainer, i: int) -> bool:
        if self.every_n_epochs is not None:
            return trainer.current_epoch >= self.offset + i * self.every_n_epochs
        return trainer.global_step >= self.stage_steps[i]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Only at the start of an optimizer step (not between accumulated micro-batches).
        if batch_idx % trainer.accumulate_grad_batches:
            return
        while self.done < len(self.stages) and self._due(trainer, self.done):
            self._run_stage(trainer, pl_module, self.done)

    def _run_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, i: int) -> None:
        # The module projects the stage's layers (its Factorizer: data-aware inits calibrate on the model as it is
        # now; at the first stage a `self` teacher is frozen); what is left here is the trainer's share.
        errors = pl_module.factorize_stage(self.stages[i])
        for path in self.stages[i]:
            switch = self._switches[path]
            self._sync_from_rank0(switch)
            for opt in trainer.optimizers:
                # The replaced weight is frozen for good: its Adam moments are dead memory.
                opt.state.pop(switch.dense.weight, None)
        self.done = i + 1
        self._log_stage(trainer, pl_module, stage=self.done, errors=errors)

    @staticmethod
    def _sync_from_rank0(switch: SwitchableLinear) -> None:
        # Ranks hold identical dense weights and the float64 projection is deterministic, but a broadcast makes
        # "identical factors on every rank" a guarantee rather than an observation (a few KB-MB, once per stage).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for name, p in switch.factorized.named_parameters():
                if name != "bias":
                    torch.distributed.broadcast(p.data, src=0)

    def live_params(self, pl_module: pl.LightningModule) -> int:
        """Parameters the forward uses now (replaced dense weights and not-yet-live factors excluded)."""
        total = sum(p.numel() for p in pl_module.parameters())
        return total - sum(p.numel() for s in self._switches.values() for p in s.replaced_parameters())

    def _log_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: int,
                   errors: dict[str, float | None]) -> None:
        switched = sum(s.is_switched for s in self._switches.values())
        errs = [e for e in errors.values() if e is not None]
        record = {"stage": stage, "step": trainer.global_step, "epoch": trainer.current_epoch,
                  "layers_factorized": switched, "params": self.live_params(pl_module),
                  "loss": float(self._last_loss) if self._last_loss is not None else None,
                  "rel_error": sum(errs) / len(errs) if errs else None, "layers": list(errors),
                  "rel_errors": {k: float(v) for k, v in errors.items() if v is not None}}
        # No scalar charts of one point per stage: lit_factor.train.callbacks.board draws the history as the staging
        # timeline and the per-layer errors once, at the end of the fit.
        self.history.append(record)
        if stage:
            err = f", mean rel. error {record['rel_error']:.4f}" if errs else ""
            loss = f", loss {record['loss']:.4f}" if record["loss"] is not None else ""
            rank_zero_info(f"staging: stage {stage}/{len(self.stages)} at step {trainer.global_step}: "
                           f"{self._stage_name(stage - 1)}{err}{loss}; "
                           f"{switched} factorized, {record['params']:,} live params")

    def _stage_name(self, i: int) -> str:
        layers = self.stages[i]
        if len(layers) == 1:
            return layers[0]
        blocks = {block_of(p) for p in layers}
        return f"{len(layers)} layers of {blocks.pop()}" if len(blocks) == 1 else f"{len(layers)} layers"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._last_loss = loss.detach()  # read (synced) only when a stage logs it

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.done < len(self.stages):
            left = sum(len(s) for s in self.stages[self.done:])
            rank_zero_warn(f"staging: training ended after {self.done} of {len(self.stages)} stages; {left} planned "
                           "layers are still dense (a longer run or an earlier schedule factorizes them)")

    # --- checkpointing ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"stages": self.stages, "stage_steps": self.stage_steps, "done": self.done, "history": self.history,
                "schedule": self._schedule_key()}

    def _schedule_key(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "order": self.order, "every_n_steps": self.every_n_steps,
                "every_n_epochs": self.every_n_epochs, "spread": self.spread, "offset": self.offset}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["schedule"] != self._schedule_key():
            rank_zero_warn(f"staging: resuming with the checkpoint's schedule {state_dict['schedule']} "
                           f"(this run asked for {self._schedule_key()})")
        self.stages = [list(s) for s in state_dict["stages"]]
        self.stage_steps = state_dict["stage_steps"]
        self.done = state_dict["done"]
        self.history = list(state_dict.get("history", []))
        self.every_n_epochs = state_dict["schedule"]["every_n_epochs"]
        self.offset = state_dict["schedule"]["offset"]
        self._restored = True
