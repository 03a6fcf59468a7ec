"""Test helper for tests/test_resume.py and tests/test_runs.py: a callback that sends its own process a signal
when training reaches a given optimizer step -- SIGKILL (``kill -9``: no clean-up, no last checkpoint) by default,
or SIGTERM (``kill``, a cluster's preemption: Lightning stops gracefully)."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAt(Callback):
    """``during``: ``train`` (the signal comes as the batch after optimizer step ``step`` starts) or ``validation``
    (as the first validation batch after step ``step`` starts; not the sanity check)."""

    def __init__(self, step: int, sig: str = "SIGKILL", during: str = "train", rank: int | None = None) -> None:
        self.step = step
        self.sig = getattr(signal, sig)
        self.during = during
        self.rank = rank  # only this rank's process gets the signal (None: every rank)
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # The checkpoint of step ``step`` was written at the end of the previous batch: it is the latest one.
        if self.during == "train" and trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.sig)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if (self.during == "validation" and not trainer.sanity_checking and trainer.global_step == self.step
                and not self.sent and self.rank in (None, trainer.global_rank)):
            self.sent = True
            os.kill(os.getpid(), self.sig)
