"""Exact resume: the random number generators travel in fit checkpoints, and a resumed run says where it resumed.

Lightning checkpoints hold the weights, the optimizer and LR scheduler, the loops' progress, every callback's state
and -- for a ``StatefulDataLoader`` (what :class:`lit_factor.train.data.GLUEDataModule` returns) -- the train loader's
position and its shuffle generator. What they lack is the global random state that dropout draws from.
:class:`ExactResume` adds it: the torch (and CUDA), numpy and Python generators of *every* rank, captured when a
checkpoint is written, and put back on each rank when training continues. With deterministic settings a run
resumed from any of its checkpoints then ends bit-identical to the uninterrupted run (on CPU; see the README's
staging section for the exact guarantee).

Where they are restored matters: at the start of the first training epoch after the restore
(``on_train_epoch_start``), which is after everything the resumed process does differently (building the model,
loading the checkpoint, a sanity check) and before the first training step or the next epoch's shuffle. The data
loaders own their generators, so nothing between a checkpoint and that point draws from the global generators in
either run. Callbacks listed before this one that draw random numbers in ``on_train_epoch_start`` would see the
un-restored state: the CLI puts it first.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_factor.train.lightning_private import reload_train_loader_state


def rng_states() -> dict[str, Any]:
    """This process's global generators, in types that ``torch.load(weights_only=True)`` accepts."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class ExactResume(Callback):
    """Save every rank's random state in fit checkpoints and restore it on resume; report ``resumed at ...``.

    Attributes:
        resumed_from: ``{"epoch": E, "step": S, "checkpoint": path}`` when this fit resumed, else ``None``.
    """

    def __init__(self) -> None:
        self.resumed_from: dict[str, Any] | None = None
        self._pending: list[dict[str, Any]] | None = None  # per-rank states read from a checkpoint

    def state_dict(self) -> dict[str, Any]:
        # Lightning builds the checkpoint dict on every rank and rank 0 writes it: gather every rank's states.
        states = rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
            return {"rng": gathered}
        return {"rng": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng") or None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resumed_from = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the loops' progress is restored (on_fit_start comes before it): the step and epoch are known.
        if self._pending is None:
            return
        reload_train_loader_state(trainer)  # Lightning issue #20550: see lit_factor/train/lightning_private.py
        self.resumed_from = {"epoch": trainer.current_epoch, "step": trainer.global_step,
                             "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None}
        rank_zero_info(f"resumed at epoch {trainer.current_epoch}, step {trainer.global_step} "
                       f"(from {trainer.ckpt_path})")
        for logger in trainer.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_text"):
                logger.experiment.add_text("resume", f"resumed at epoch {trainer.current_epoch}, step "
                                           f"{trainer.global_step} from `{trainer.ckpt_path}`", trainer.global_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pending = None  # states read by validate/test/predict --ckpt_path are not for a later fit

    # A restart inside an epoch resumes at a batch (no on_train_epoch_start); one at an epoch's end at an epoch.
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_rng(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._restore_rng(trainer)

    def _restore_rng(self, trainer: pl.Trainer) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        if len(states) != trainer.world_size:
            rank_zero_warn(f"resume: the checkpoint holds the random state of {len(states)} rank(s), this run has "
                           f"{trainer.world_size}; dropout masks and other draws will differ from the interrupted run")
        set_rng_states(states[trainer.global_rank % len(states)])


class CheckpointOnSigterm(Callback):
    """On SIGTERM (``kill``, a cluster's preemption, a study stopping its trials), save a checkpoint to resume from
    at the next optimizer-step boundary, then stop (the CLI exits 143).

    Lightning's own SIGTERM handling only stops the fit -- at the end of the running batch or inside a validation --
    with no checkpoint, so a fit preempted before its first periodic checkpoint had nothing to resume from. Under
    DDP it is also unsafe in Lightning 2.6: its signal handler broadcasts from inside the handler, at whatever point
    the rank was, and gloo aborts on the mismatched collective. So from ``on_train_start`` (when training begins;
    before that there is nothing to save) this callback puts its own handler in place of Lightning's, which only
    notes the signal. At every ``on_train_batch_end`` the ranks agree whether *any* of them got it
    (``strategy.reduce_boolean_decision``: one small all-reduce per step under DDP, nothing on one device); if so,
    every rank saves at that same step with ``trainer.save_checkpoint`` -- the hook and state of a
    ``ModelCheckpoint(every_n_train_steps=1)``, hence bit-identical on resume with :class:`ExactResume` -- rank 0
    says where on stderr, and every rank raises Lightning's ``SIGTERMException`` (the CLI turns it into exit status
    143). A validation under way when the signal comes runs to its end first (its checkpoint and metrics are
    written as usual): the checkpoint is saved at the end of the next training batch. A SIGTERM during the last
    validation of a fit lets the fit finish. Lightning restores the handlers it found when the fit ends.

    The file is ``<checkpoint dir>/sigterm-epoch=E-step=S.ckpt``: the newest checkpoint of the run, so
    ``fit --run <run dir>`` (``--ckpt_path last``) resumes from it. With ``accumulate_grad_batches > 1`` the batch
    end can fall inside an accumulation: the checkpoint is still saved (accumulated gradients are in no Lightning
    checkpoint: the resumed run starts that accumulation again) and the message says so.

    Attributes:
        saved: the checkpoint written (None when no SIGTERM came).
    """

    def __init__(self) -> None:
        self.saved: str | None = None
        self.received = False
        self._step_at_batch_start = -1

    def _note(self, signum: int, frame: Any) -> None:
        self.received = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received = False
        if threading.current_thread() is threading.main_thread():  # Python sets handlers in the main thread only
            self.received = bool(trainer.received_sigterm)  # came before training started
            signal.signal(signal.SIGTERM, self._note)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        received = self.received or bool(trainer.received_sigterm)
        if not trainer.strategy.reduce_boolean_decision(received, all=False):
            return
        inside = trainer.global_step == self._step_at_batch_start  # no optimizer step in this batch
        path = os.path.join(self._dirpath(trainer), f"sigterm-epoch={trainer.current_epoch}-step={trainer.global_step}"
                                                    ".ckpt")
        trainer.save_checkpoint(path)
        self.saved = path
        if trainer.is_global_zero:
            note = " (inside a gradient accumulation: the resumed run starts it again)" if inside else ""
            shown = os.path.normpath(path)
            print(f"SIGTERM: saved a checkpoint at epoch {trainer.current_epoch}, step {trainer.global_step}{note}: "
                  f"{shown} (resume: the same fit command with --ckpt_path {shown}, or fit --run <its run dir>)",
                  file=sys.stderr, flush=True)
        raise SIGTERMException  # every rank, at the same step

    @staticmethod
    def _dirpath(trainer: pl.Trainer) -> str:
        """The run's checkpoint folder: the ModelCheckpoints' (the CLI's ``checkpoint`` first), else
        ``<log dir>/checkpoints``."""
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                return str(callback.dirpath)
        return os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
