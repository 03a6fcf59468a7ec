"""Progress as plain lines, for output that is not a terminal (``nohup``, a cluster job's log, CI).

A terminal progress bar redraws one line with carriage returns; redirected to a file it shows nothing useful for
the whole run. :class:`LineProgress` is a Lightning :class:`~lightning.pytorch.callbacks.ProgressBar` that prints
a line every ``every_n_steps`` optimizer steps or ``every_seconds`` seconds (whichever comes first)::

    step 120/500 (24%)  epoch 1 of 2  loss 0.4512  3.41 it/s  elapsed 0:35  eta 1:51

a line when training starts (and, with the automatic interval, after the first step), and one line per validation
with its metrics. The CLI uses it instead of the bar when stdout is not a terminal.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar

from lit_factor.errors import UserError


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def epoch_of(trainer: pl.Trainer) -> str:
    """``epoch 1 of 2`` for the first of two epochs: counted from 1, as people count (Lightning counts from 0)."""
    limit = f" of {trainer.max_epochs}" if (trainer.max_epochs or 0) > 0 else ""
    return f"epoch {trainer.current_epoch + 1}{limit}"


class LineProgress(ProgressBar):
    """Plain progress lines on stdout (global rank 0), for logs written to a file.

    Args:
        every_n_steps: a line at least every this many optimizer steps; ``None``: about 20 lines per run
            (every total/20 steps, at least 1, at most 50).
        every_seconds: a line at least every this many seconds (when steps are slow).
    """

    def __init__(self, every_n_steps: int | None = None, every_seconds: float = 60.0) -> None:
        super().__init__()
        if (every_n_steps is not None and every_n_steps < 1) or not every_seconds > 0:
            raise UserError(f"LineProgress every_n_steps={every_n_steps} must be >= 1 (or null) and every_seconds="
                             f"{every_seconds} > 0")
        self.every_n_steps, self.every_seconds = every_n_steps, every_seconds
        self._enabled = True
        self._interval = every_n_steps or 1
        self._start = self._last_time = 0.0
        self._start_step = self._last_step = 0
        self._batches = 0  # batches since the last line (it/s counts batches, like Lightning's bar)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last_time = time.monotonic()
        self._start_step = self._last_step = trainer.global_step
        self._batches = 0
        total = trainer.estimated_stepping_batches
        if self.every_n_steps is None:
            self._interval = min(max(int(total) // 20, 1), 50) if math.isfinite(total) else 50
        if self.is_enabled:  # the first step line may be a minute away: say that training has started
            steps = f"{int(total)} optimizer steps" if math.isfinite(total) else "until max_time or max_epochs"
            self.print(f"training started at step {trainer.global_step}: {steps}, a line every {self._interval} "
                       f"steps or {self.every_seconds:g} s")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batches += 1
        now, step = time.monotonic(), trainer.global_step
        # With the automatic interval, the first step gets a line too: it gives the pace at once.
        first = self.every_n_steps is None and step == self._start_step + 1
        if self.is_enabled and step > self._last_step and (
                first or step - self._last_step >= self._interval or now - self._last_time >= self.every_seconds):
            self.print(self.step_line(trainer, now))
            self._last_time, self._last_step, self._batches = now, step, 0

    def step_line(self, trainer: pl.Trainer, now: float) -> str:
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        rate = self._batches / max(now - self._last_time, 1e-9)
        per_step = (now - self._start) / max(step - self._start_step, 1)
        parts = [f"step {step}/{total} ({step / total:.0%})" if math.isfinite(total) else f"step {step}",
                 epoch_of(trainer)]
        loss = self.get_metrics(trainer, trainer.lightning_module).get("train/loss_step")
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts += [f"{rate:.2f} it/s", f"elapsed {_clock(now - self._start)}",
                  f"eta {_clock((total - step) * per_step)}" if math.isfinite(total) else "eta ?"]
        return "  ".join(parts)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_enabled and not trainer.sanity_checking and trainer.state.fn == "fit":
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
            self.print(f"validation at {epoch_of(trainer)}, step {trainer.global_step}: {shown}")

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, file=sys.stdout, flush=True, **kwargs)
