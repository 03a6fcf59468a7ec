"""Test helper for tests/test_resume.py and tests/test_runs.py: a callback that sends its own process a signal
when training reaches a given optimizer step -- SIGKILL (``kill -9``: no clean-up, no last checkpoint) by default,
or SIGTERM (``kill``, a cluster's preemption: Lightning stops gracefully)."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAt(Callback):
    def __init__(self, step: int, sig: str = "SIGKILL") -> None:
        self.step = step
        self.sig = getattr(signal, sig)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # The checkpoint of step ``step`` was written at the end of the previous batch: it is the latest one.
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)
