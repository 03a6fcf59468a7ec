"""Test helper for tests/test_runs.py: a callback that sends its own process SIGTERM (as ``kill`` or a cluster's
preemption would) when training reaches a given optimizer step."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class TerminateAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
