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

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


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
        _reload_train_loader_state(trainer)
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


def _reload_train_loader_state(trainer: pl.Trainer) -> None:
    """Work around Lightning issue #20550 (open in 2.6): a train loader set up before the checkpoint's loop state
    is restored (``configure_optimizers`` asking ``trainer.estimated_stepping_batches`` sets it up early) never
    receives its saved position. Load the pending states and re-create the fetcher's iterator, as Lightning's own
    resume path would; a no-op where Lightning already loaded them."""
    loop = trainer.fit_loop
    pending = list(getattr(loop, "_combined_loader_states_to_load", None) or [])
    if not pending or loop._combined_loader is None:
        return
    # Not loop._load_combined_loader_states(): it skips a checkpoint written after validation at an epoch's end
    # (Lightning does not count that as "restarting"), whose loader must still start the next epoch's shuffle.
    loop._combined_loader._load_state_dicts(pending)
    loop._combined_loader_states_to_load = []
    for dl in loop._combined_loader.flattened:
        # The epoch Lightning sets only at the next epoch start: a DistributedSampler draws its order from it now.
        _set_sampler_epoch(dl, loop.epoch_progress.current.processed)
    stateful = [dl for dl in loop._combined_loader.flattened if hasattr(dl, "load_state_dict")]
    for loader, state in zip(stateful, pending, strict=False):
        if state.get("_num_yielded", 0) >= trainer.num_training_batches:
            # Saved after the epoch's last batch: Lightning counts that epoch as done, so the loader must start
            # the next one (else Lightning runs an empty epoch and the run ends one epoch short).
            for _ in loader:
                pass
    iter(loop._data_fetcher)
