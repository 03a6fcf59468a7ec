"""What a command-line run settles before it starts, and the exit status it ends with (used by ``cli.py``).

Before anything is written:

* the ``--ckpt_path`` file is checked (:func:`lit_factor.train.checkpoints.read_checkpoint`: one line if it is missing,
  truncated or corrupted) and the data files are read, checked and tokenized (``GLUEDataModule.check``), so a
  bad input stops with one line and no empty ``version_N`` behind;
* ``--trainer.default_root_dir`` moves everything a run writes: a relative logger ``save_dir`` is taken inside it;
* a fit resumed from a checkpoint of a run continues that run: same TensorBoard directory and version, the
  interrupted run's events after the checkpoint's step purged;
* ``validate``/``test``/``predict`` build the checkpoint's own architecture (no factorization settings or
  StagingCallback needed; one warning line when the command line asked for another one);
* every fit saves its random state for exact resume (:class:`~lit_factor.train.callbacks.resume.ExactResume`, first in
  the callback list), saves a checkpoint to resume from when SIGTERM stops it
  (:class:`~lit_factor.train.callbacks.resume.CheckpointOnSigterm`, exit status 143) and logs its learning-rate curve
  (``LearningRateMonitor``).

Exit status (README "Exit codes"): 0 success, 2 bad settings or data, 3 a fit that trained but failed
(:func:`lit_factor.train.callbacks.stability.run_failed`), 1 a crash.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_factor.errors import EXIT_RUN_FAILED, UserError
from lit_factor.hardware import emulates_bf16
from lit_factor.train.callbacks.resume import CheckpointOnSigterm, ExactResume
from lit_factor.train.callbacks.stability import run_failed
from lit_factor.train.callbacks.staging import StagingCallback
from lit_factor.train.checkpoints import RunDir, read_checkpoint, run_dir_of
from lit_factor.train.module import Factorization

#: ``--ckpt_path`` values that Lightning resolves itself (not files)
CKPT_KEYWORDS = ("best", "last", "hpc")


def info_to_stdout() -> None:
    """Lightning's informational lines ("Seed set to 42", "GPU available: ...") go to stdout: stderr is for
    warnings and the one ``error:`` line of a refused input (a script can read it alone)."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.__stderr__:
                handler.setStream(sys.stdout)


def checkpoint_to_load(ckpt_path: Any) -> dict[str, Any] | None:
    """The checkpoint a subcommand will load, checked now; None when there is none or Lightning resolves it."""
    if ckpt_path is None or str(ckpt_path) in CKPT_KEYWORDS or str(ckpt_path).startswith("registry"):
        return None
    return read_checkpoint(ckpt_path)


def _tensorboard_args(config) -> Any | None:
    """The TensorBoardLogger's ``init_args`` in a parsed subcommand config (None for another or no logger)."""
    logger = config.trainer.get("logger")
    if hasattr(logger, "get") and str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        return logger.init_args
    return None


def place_run_dir(config, checkpoint: dict[str, Any] | None, resuming: bool) -> None:
    """Where the run writes: inside ``default_root_dir``, or the run a resumed fit's checkpoint belongs to."""
    args = _tensorboard_args(config)
    if args is None:
        return
    root = config.trainer.get("default_root_dir")
    if root and not os.path.isabs(str(args.save_dir)):
        args.save_dir = os.path.join(str(root), str(args.save_dir))
    run = run_dir_of(config.get("ckpt_path")) if resuming and checkpoint is not None else None
    if run is not None and args.get("version") is None:
        args.save_dir, args.name, args.version = _spelled_as_saved(run, checkpoint), run.name, run.version
        if args.get("purge_step") is None:  # the interrupted run logged past its last checkpoint: drop that part
            args.purge_step = int(checkpoint.get("global_step", 0))
        # Continuing a run, its checkpoint directory is of course not empty.
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def _spelled_as_saved(run: RunDir, checkpoint: dict[str, Any]) -> str:
    """The run's save_dir spelled as the interrupted fit spelled it (relative or absolute): a ModelCheckpoint
    restores its best-k bookkeeping only when its directory reads exactly as it was saved."""
    for state in (checkpoint.get("callbacks") or {}).values():
        dirpath = state.get("dirpath") if isinstance(state, dict) else None
        if dirpath and os.path.realpath(dirpath) == os.path.realpath(run.save_dir / run.name / f"version_{run.version}"
                                                                     / "checkpoints"):
            return os.path.dirname(os.path.dirname(os.path.dirname(str(dirpath))))
    return str(run.save_dir)


def check_fit_limits(trainer: pl.Trainer) -> None:
    """An endless fit is refused now, before a run directory exists (the LR schedule would refuse it later)."""
    if trainer.max_steps == -1 and trainer.max_epochs == -1:
        raise UserError("trainer.max_epochs=-1 with trainer.max_steps=-1 never ends, and the linear warm-up/decay "
                        "schedule needs a finite run: set trainer.max_epochs >= 1 or trainer.max_steps >= 1")


def warn_emulated_bf16(trainer: pl.Trainer) -> None:
    """One warning line when bf16 runs on a CPU known to lack native bf16 (lit_factor.hardware): PyTorch emulates it
    there, and a training step is an order of magnitude slower than in fp32 (docs/speed.md). A warning, not an
    error: the results are valid, and a run that must match a bf16 study's other arms may need it."""
    precision = str(trainer.precision)
    if precision.startswith("bf16") and isinstance(trainer.accelerator, CPUAccelerator) and emulates_bf16():
        _warn(f"trainer.precision={precision!r} on a CPU without native bf16 (AVX-512 BF16, AMX, Arm BF16): PyTorch "
              f"emulates it, and a step takes about ten times longer than in fp32 (docs/speed.md); use "
              f"--trainer.precision 32-true on this machine unless the run must match bf16 runs")


class DiscardNewRunDir(Callback):
    """A setting refused inside ``fit`` (e.g. a StagingCallback under the wrong strategy) comes after Lightning
    created the run directory: remove it, and the parents it created, when this fit made them. An existing run
    (a resumed fit) is never touched."""

    def __init__(self, log_dir: str | None) -> None:
        self.new_dirs: list[str] = []
        path = os.path.abspath(log_dir) if log_dir else None
        while path and not os.path.exists(path):  # the run directory and its not yet existing parents
            self.new_dirs.append(path)
            path = os.path.dirname(path)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (UserError, MisconfigurationException)) or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            getattr(logger, "finalize", lambda status: None)("failed")  # close the event file before removing it
        if self.new_dirs:
            shutil.rmtree(self.new_dirs[0], ignore_errors=True)
        for path in self.new_dirs[1:]:
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)


def add_fit_callbacks(trainer: pl.Trainer) -> None:
    """Exact resume for every fit (first: it restores the random state before other callbacks draw from it), a
    checkpoint on SIGTERM, a learning-rate curve (when there is a logger to draw it), and no run directory left by a
    refused setting."""
    if not any(isinstance(c, ExactResume) for c in trainer.callbacks):
        trainer.callbacks.insert(0, ExactResume())
    if not any(isinstance(c, CheckpointOnSigterm) for c in trainer.callbacks):
        trainer.callbacks.append(CheckpointOnSigterm())  # a preempted fit leaves a checkpoint to resume from
    if trainer.loggers and not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks):
        trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))
    if trainer.logger is not None:
        trainer.callbacks.append(DiscardNewRunDir(trainer.logger.log_dir))


def _describe(factorization: dict) -> str:
    if factorization.get("method", "none") == "none":
        return "dense, no factorization"
    shown = {k: v for k, v in factorization.items() if v is not None and k != "method"}
    return f"{factorization['method']}: " + ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))


def warn_other_factorization(asked: Any, checkpoint: dict[str, Any]) -> None:
    """One warning line when the command line asked for a factorization other than the checkpoint's (which is
    used: the weights only fit their own architecture; LightningCLI merges the checkpoint's hyperparameters)."""
    asked = Factorization.coerce(asked.as_dict() if hasattr(asked, "as_dict") else asked)
    saved = (checkpoint.get("hyper_parameters") or {}).get("factorization")
    if asked == Factorization() or not isinstance(saved, dict):
        return  # nothing asked for (the defaults), or a checkpoint without settings to compare with
    saved = asdict(Factorization.coerce(saved))
    if asdict(asked) != saved:
        _warn(f"ckpt_path: using the checkpoint's factorization ({_describe(saved)}) instead of the command line's "
              f"({_describe(asdict(asked))})")


@rank_zero_only
def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)  # one line, like the error lines


def adopt_checkpoint(trainer: pl.Trainer, model, checkpoint: dict[str, Any]) -> None:
    """``validate``/``test``/``predict``: the model takes the checkpoint's architecture (its plan, staged or not);
    a StagingCallback has nothing to do there and is dropped."""
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, StagingCallback)]
    model.adopt_checkpoint_architecture(checkpoint)


def fit_exit_status(trainer: pl.Trainer) -> int:
    """0 for a fit that succeeded, 3 (printing why on stderr) for one that trained but failed."""
    reasons = run_failed(trainer)
    if not reasons:
        return 0
    if trainer.is_global_zero:
        print(f"RUN FAILED (exit status {EXIT_RUN_FAILED}): {'; '.join(reasons)}", file=sys.stderr, flush=True)
    return EXIT_RUN_FAILED
