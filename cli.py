"""lit-factor command line: ``python cli.py {fit,validate,test,predict} --config configs/<recipe>.yaml``.

A LightningCLI over :class:`lit_factor.module.FactorizedClassifier` and :class:`lit_factor.data.GLUEDataModule`.
``data.task`` is linked to the model (label count and metrics) and to the checkpoint's monitored metric;
``model.model_name_or_path`` is linked to the data's tokenizer. Runs log to TensorBoard under ``logs/``.
Bad settings stop with one line ``error: ...`` and exit status 2, before any training.
"""

from __future__ import annotations

import re
import sys

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_factor.data import GLUEDataError, GLUEDataModule, get_task, write_submission
from lit_factor.factorize import BudgetError
from lit_factor.models import ModelSourceError
from lit_factor.module import ConfigError, FactorizedClassifier
from lit_factor.surgery import PlanError

#: errors that mean "your settings or data are wrong": reported as one line, no traceback
USER_ERRORS = (ConfigError, GLUEDataError, PlanError, BudgetError, ModelSourceError, MisconfigurationException)


def _monitor(task: str) -> str:
    try:
        return get_task(task).monitor
    except GLUEDataError:
        return "val/loss"  # the data module reports the unknown task itself, with the list of tasks


class GLUEPredictionWriter(BasePredictionWriter):
    """Writes ``predict`` outputs to ``<run dir>/<TASK>.tsv`` in GLUE submission format (labels by name)."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")
        self.written: list[str] = []

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        dm = trainer.datamodule
        out_dir = trainer.log_dir  # a collective (broadcast) under DDP: every rank must ask
        per_loader = predictions if len(dm.predict_file_names()) > 1 else [predictions]
        for name, outputs in zip(dm.predict_file_names(), per_loader, strict=True):
            idx = torch.cat([o["idx"] for o in outputs]).tolist() if outputs else []
            pred = torch.cat([o["pred"] for o in outputs]).tolist() if outputs else []
            if trainer.world_size > 1:  # gather every rank's share; DistributedSampler pads with repeats
                shares = [None] * trainer.world_size
                torch.distributed.all_gather_object(shares, (idx, pred))
                merged = {i: p for share_idx, share_pred in shares for i, p in zip(share_idx, share_pred, strict=True)}
                idx, pred = list(merged), list(merged.values())
            if trainer.is_global_zero:
                path = write_submission(f"{out_dir}/{name}.tsv", dm.task, idx, pred)
                self.written.append(str(path))
                print(f"wrote {len(idx)} predictions to {path}")


def one_line(message: str) -> str:
    """Condense a jsonargparse error (nested keys, union alternatives, usage) to one readable line."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    keys = re.findall(r'Parser key "([^"]+)"', message)
    key = ".".join(keys)
    got = next((ln for ln in lines if "Got value" in ln), None)
    if got:
        return f"{key}: {got[0].lower()}{got[1:]}" if key else got
    if keys:
        expected = [m for ln in lines for m in re.findall(r"Expected an? (.+)", ln)]
        given = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Given value:")), None)
        if expected and given is not None:
            return f"{key}: expected {' or '.join(expected)}; got value: {given}"
    return " ".join(lines)


class OneLineErrorParser(LightningArgumentParser):
    """Reports a bad argument as one ``error: ...`` line (exit 2) instead of the full usage text."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        print(f"error: {one_line(message)} (see: {prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class LitFactorCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.mode": "max", "checkpoint.save_last": False})
        parser.link_arguments("data.task", "model.task")
        parser.link_arguments("data.task", "checkpoint.monitor", compute_fn=_monitor)
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")

    def before_predict(self) -> None:
        if not any(isinstance(c, GLUEPredictionWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(GLUEPredictionWriter())


def main(args: list[str] | None = None, run: bool = True) -> LitFactorCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``); settings errors exit 2 with one ``error:`` line."""
    try:
        return LitFactorCLI(
            FactorizedClassifier,
            GLUEDataModule,
            subclass_mode_model=False,
            subclass_mode_data=False,
            parser_class=OneLineErrorParser,
            seed_everything_default=42,
            trainer_defaults={
                "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                           "init_args": {"save_dir": "logs", "default_hp_metric": False}},
                "log_every_n_steps": 10,
            },
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
