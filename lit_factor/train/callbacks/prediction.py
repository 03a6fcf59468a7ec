"""Write ``predict`` outputs as GLUE submission files (``index<TAB>prediction``, labels by name).

The CLI adds :class:`GLUEPredictionWriter` to every ``predict`` run; in Python, pass it to the Trainer with a
:class:`~lit_factor.train.data.GLUEDataModule` (it reads the task and the file names from the datamodule).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lit_factor.train.data import write_submission


class GLUEPredictionWriter(BasePredictionWriter):
    """Writes ``predict`` outputs to ``<run dir>/<TASK>.tsv`` (MNLI: ``MNLI-m.tsv`` and ``MNLI-mm.tsv``)."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")
        #: paths written by the last run (rank 0)
        self.written: list[str] = []

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions, batch_indices):
        dm = trainer.datamodule
        out_dir = trainer.log_dir  # a collective (broadcast) under DDP: every rank must ask
        names = dm.predict_file_names()
        per_loader = predictions if len(names) > 1 else [predictions]
        for name, outputs in zip(names, per_loader, strict=True):
            idx, pred = self._gather(trainer, outputs)
            if trainer.is_global_zero:
                path = write_submission(f"{out_dir}/{name}.tsv", dm.task, idx, pred)
                self.written.append(str(path))
                print(f"wrote {len(idx)} predictions to {path}")

    @staticmethod
    def _gather(trainer: pl.Trainer, outputs: list[dict]) -> tuple[list, list]:
        idx = torch.cat([o["idx"] for o in outputs]).tolist() if outputs else []
        pred = torch.cat([o["pred"] for o in outputs]).tolist() if outputs else []
        if trainer.world_size > 1:  # every rank's share; DistributedSampler pads with repeats (deduplicated by idx)
            shares = [None] * trainer.world_size
            torch.distributed.all_gather_object(shares, (idx, pred))
            merged = {i: p for share_idx, share_pred in shares for i, p in zip(share_idx, share_pred, strict=True)}
            idx, pred = list(merged), list(merged.values())
        return idx, pred
