"""Test helper for tests/test_resume.py: a callback that kills its own process with SIGKILL (``kill -9``, no
clean-up, no last checkpoint) when training reaches a given optimizer step."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # The checkpoint of step ``step`` was written at the end of the previous batch: it is the latest one.
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
