"""lit-factor command line: one door for every command.

``python cli.py {fit,validate,test,predict} --config configs/<recipe>.yaml`` is a LightningCLI over
:class:`lit_factor.train.module.FactorizedClassifier` and :class:`lit_factor.train.data.GLUEDataModule`: ``data.task`` is linked
to the model (label count and metrics) and to the checkpoint's monitored metric; ``model.model_name_or_path`` is
linked to the data's tokenizer. Runs log to TensorBoard under ``logs/``.

``python cli.py {study,analyze,export} ...`` hand their arguments to the command's own ``main(argv)``
(:data:`COMMANDS`), imported only when asked for.

Bad settings or data stop with one line ``error: ...`` and exit status 2, before any training.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from jsonargparse import ActionConfigFile, DefaultHelpFormatter
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from lit_factor.compress.surgery import PlanError
from lit_factor.errors import EXIT_TERMINATED, UserError, fail
from lit_factor.factorize import BudgetError
from lit_factor.models import ModelSourceError
from lit_factor.train import runs
from lit_factor.train.callbacks.prediction import GLUEPredictionWriter
from lit_factor.train.callbacks.progress import LineProgress
from lit_factor.train.callbacks.summary import SUMMARY_FILE, RunSummary
from lit_factor.train.checkpoints import run_dir_of
from lit_factor.train.data import GLUEDataError, GLUEDataModule, get_task
from lit_factor.train.module import FactorizedClassifier

#: errors that mean "your settings or data are wrong": reported as one line, no traceback
USER_ERRORS = (UserError, PlanError, BudgetError, ModelSourceError, MisconfigurationException)

#: commands that are not Lightning subcommands: name -> (module with ``main(argv) -> int``, one-line summary)
COMMANDS = {
    "study": ("lit_factor.study.cli", "run a sweep of fits (budgets x methods x seeds) and tabulate the results"),
    "analyze": ("lit_factor.study.analyze", "analyze a model's or a run's factorization (spectra, projection errors)"),
    "export": ("lit_factor.deploy.export", "export a checkpoint's factorized model (ONNX) and check it"),
    "evaluate": ("lit_factor.deploy.evaluate", "an exported model's dev metrics (hf, dense, onnx, onnx int8), as test"),
}
EPILOG = "other commands (each with --help):\n" + "\n".join(
    f"  {name:<9} {summary}" for name, (_, summary) in COMMANDS.items())


def run_command(name: str, argv: list[str]) -> int:
    """Import the command's module only now (its dependencies are its own) and run its ``main(argv)``."""
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            fail(f"command {name!r} is not available in this installation (no module {module_name})")
        fail(f"command {name!r} needs the package {err.name!r}: pip install {err.name}")
    try:
        return int(module.main(argv) or 0)
    except USER_ERRORS as err:
        fail(err)


def _monitor(task: str) -> str:
    try:
        return get_task(task).monitor
    except GLUEDataError:
        return "val/loss"  # the data module reports the unknown task itself, with the list of tasks


def _exception_chain(ex: BaseException | None) -> list[BaseException]:
    chain: list[BaseException] = []
    while ex is not None and ex not in chain:
        chain.append(ex)
        ex = ex.__cause__ or ex.__context__
    return chain


def _failing_keys(chain: list[BaseException]) -> list[str]:
    """The ``dest`` of every argparse/jsonargparse action that was checking a value when an error of ``chain`` was
    raised, outermost first (``model.factorization``, then ``method`` in the nested parser of that group).
    A config file's own key counts only when nothing inside the file is to blame (e.g. the file is missing)."""
    actions: list[argparse.Action] = []
    for exc in chain:
        tb = exc.__traceback__
        while tb is not None:
            action = tb.tb_frame.f_locals.get("self")
            if isinstance(action, argparse.Action) and action not in actions:
                actions.append(action)
            tb = tb.tb_next
    inside = [a.dest for a in actions if not isinstance(a, ActionConfigFile)]
    return inside or [a.dest for a in actions]


def describe_parse_error(message: str, ex: BaseException | None) -> str:
    """One line for a jsonargparse error: the full key of the bad value and the innermost reason.

    jsonargparse nests one parser per typed group (``model.factorization`` holds ``method``); each level wraps the
    error of the level below in a new exception. The key is read from the action objects that raised along the
    chain, the reason is the innermost exception (it names the expected type and the value given): no parsing of
    message text, which an upgrade may reword.
    """
    chain = _exception_chain(ex)
    keys = _failing_keys(chain)
    if not chain or not keys:
        return " ".join(str(message).split())
    reason = " ".join(str(chain[-1]).split())
    return f"{'.'.join(keys)}: {reason[:1].lower()}{reason[1:]}"


#: subcommands that evaluate a checkpoint; with ``--ckpt_path`` of a run they write into ``<run>/<subcommand>/``
EVALUATIONS = ("validate", "test", "predict")


def _pop_option(argv: list[str], name: str) -> str | None:
    """Remove ``--name VALUE`` / ``--name=VALUE`` from ``argv`` (in place) and return VALUE (None when absent)."""
    for i, arg in enumerate(argv):
        if arg == name:
            if i + 1 >= len(argv):
                fail(f"{name} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def run_checkpoint(run: Path, which: str) -> Path:
    """The ``best`` or ``last`` checkpoint of a run directory (``<save_dir>/<name>/version_<N>``).

    best: the fit's ``summary.json`` names it; else the only checkpoint of the run. last: ``last.ckpt`` (with
    ``checkpoint.save_last``), else the most recently written checkpoint.
    """
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise UserError(f"run {str(run)!r} has no checkpoints ({run / 'checkpoints'}/*.ckpt)")
    if which == "last":
        last = run / "checkpoints" / "last.ckpt"
        return last if last.is_file() else ckpts[-1]
    summary = run / SUMMARY_FILE
    if summary.is_file():
        best = json.loads(summary.read_text()).get("best_checkpoint")
        if best and (run / "checkpoints" / Path(best).name).is_file():
            return run / "checkpoints" / Path(best).name
    candidates = [p for p in ckpts if p.name != "last.ckpt"]
    if len(candidates) == 1:
        return candidates[0]
    raise UserError(f"run {str(run)!r}: cannot tell the best of {len(candidates)} checkpoints without its "
                    f"{SUMMARY_FILE}; give --ckpt_path <file>")


def expand_run_option(argv: list[str]) -> list[str]:
    """``validate|test|predict --run DIR [--ckpt_path best|last|FILE]`` -> the run's ``config.yaml`` and checkpoint
    file (``best`` when not given); ``--ckpt_path best|last`` without ``--run`` is refused."""
    if not argv or argv[0] not in EVALUATIONS:
        return argv
    argv = list(argv)
    run, ckpt = _pop_option(argv, "--run"), _pop_option(argv, "--ckpt_path")
    if run is None:
        if ckpt in ("best", "last"):
            fail(f"--ckpt_path {ckpt} needs the run it belongs to: add --run <save_dir>/<name>/version_<N>")
        return argv + (["--ckpt_path", ckpt] if ckpt is not None else [])
    run_dir = Path(run)
    if not (run_dir / "config.yaml").is_file():
        fail(f"--run {run!r} is not a run directory (no config.yaml; expected <save_dir>/<name>/version_<N>)")
    if ckpt is None or ckpt in ("best", "last"):
        ckpt = str(run_checkpoint(run_dir, ckpt or "best"))
    return [argv[0], "--config", str(run_dir / "config.yaml"), *argv[1:], "--ckpt_path", ckpt]


def place_evaluation(config, subcommand: str) -> None:
    """``validate``/``test``/``predict`` of a run's checkpoint write into that run: ``<run>/<subcommand>/`` (events,
    config.yaml, metrics.json or the GLUE submission files), no new ``version_N``."""
    run = run_dir_of(config.get("ckpt_path")) if subcommand in EVALUATIONS and config.get("ckpt_path") else None
    logger = config.trainer.get("logger")
    if run is None or not (hasattr(logger, "get") and str(logger.get("class_path", "")).endswith("TensorBoardLogger")):
        return
    args = logger.init_args
    # Spelled as the checkpoint path was (relative or absolute), like the fit's ModelCheckpoint dirpath: the
    # restored ModelCheckpoint then finds its own directory and does not warn that "the dirpath has changed".
    relative = not os.path.isabs(str(config.ckpt_path))
    args.save_dir = os.path.relpath(run.save_dir) if relative else str(run.save_dir)
    args.name, args.version, args.sub_dir = run.name, run.version, subcommand


def add_output_callbacks(trainer, subcommand: str | None) -> None:
    """What every command prints at its end (RunSummary), progress lines when stdout is a file, GLUE files."""
    if subcommand in ("fit", "validate", "test") and not any(isinstance(c, RunSummary) for c in trainer.callbacks):
        trainer.callbacks.append(RunSummary())  # last: it reads what the other callbacks concluded
    if subcommand == "predict" and not any(isinstance(c, GLUEPredictionWriter) for c in trainer.callbacks):
        trainer.callbacks.append(GLUEPredictionWriter())
    if not sys.stdout.isatty():  # a bar redrawn with carriage returns shows nothing useful in a log file
        trainer.callbacks = [LineProgress() if isinstance(c, (TQDMProgressBar, RichProgressBar)) else c
                             for c in trainer.callbacks]


def _not_an_advertisement(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip:")


def quiet_expected_noise() -> None:
    """Silence what every run would print and no run needs: Lightning's advertisement for its cloud logger, and
    deprecations inside Lightning's pytree helper and torchdata's loader (nothing a user can act on). Idempotent."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_advertisement)
    warnings.filterwarnings("ignore", module=r"lightning\.pytorch\.utilities\._pytree")
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated", module=r"torchdata\.")


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, keeping the line breaks of the epilog (the table of the other commands)."""


class OneLineErrorParser(LightningArgumentParser):
    """Reports a bad argument as one ``error: ...`` line (exit 2) instead of the full usage text."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # a nested parser: the top-level one reports
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        fail(f"{describe_parse_error(message, ex)} (see: {prog} --help)")


class LitFactorCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.mode": "max", "checkpoint.save_last": False})
        parser.link_arguments("data.task", "model.task")
        parser.link_arguments("data.task", "checkpoint.monitor", compute_fn=_monitor)
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        add_output_callbacks(trainer, self.subcommand)
        if self.subcommand in ("validate", "test"):
            self.config_init[self.subcommand]["verbose"] = False  # RunSummary prints the same metrics, plainly
        return trainer

    # --- checked before anything is written; resume into the same run; exit status (lit_factor/runs.py) ---------
    def _parse_ckpt_path(self) -> None:
        # Lightning merges the checkpoint's hyperparameters into the model's settings here: check the file first.
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        self.loaded_checkpoint = runs.checkpoint_to_load(config.get("ckpt_path")) if config else None
        asked = config.model.get("factorization") if config else None
        super()._parse_ckpt_path()
        if self.loaded_checkpoint is not None:
            runs.warn_other_factorization(asked, self.loaded_checkpoint)

    def before_instantiate_classes(self) -> None:
        if self.subcommand:
            config = self.config[self.subcommand]
            runs.place_run_dir(config, self.loaded_checkpoint, resuming=self.subcommand == "fit")
            place_evaluation(config, self.subcommand)

    def _before_run(self) -> None:
        self.datamodule.check(self.subcommand)  # bad data stops here, before a run directory exists
        if self.subcommand == "fit":
            runs.check_fit_limits(self.trainer)
            runs.add_fit_callbacks(self.trainer)
        elif self.loaded_checkpoint is not None:
            runs.adopt_checkpoint(self.trainer, self.model, self.loaded_checkpoint)

    before_fit = before_validate = before_test = before_predict = _before_run

    def after_fit(self) -> None:
        status = runs.fit_exit_status(self.trainer)  # 3: trained but failed (diverged, or not above the baseline)
        if status:
            raise SystemExit(status)


def main(args: list[str] | None = None, run: bool = True) -> LitFactorCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``); settings errors exit 2 with one ``error:`` line.

    ``study``/``analyze``/``export`` exit with their command's status (SystemExit); the Lightning subcommands
    return the LitFactorCLI (its model, datamodule and trainer) to a Python caller.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMMANDS:
        raise SystemExit(run_command(argv[0], argv[1:]))
    quiet_expected_noise()
    runs.info_to_stdout()
    argv = expand_run_option(argv)
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself from a shell (and warns when given both)
    else:
        args = argv
    try:
        return LitFactorCLI(
            FactorizedClassifier,
            GLUEDataModule,
            subclass_mode_model=False,
            subclass_mode_data=False,
            parser_class=OneLineErrorParser,
            parser_kwargs={"epilog": EPILOG, "formatter_class": HelpFormatter},
            seed_everything_default=42,
            trainer_defaults={
                "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                           "init_args": {"save_dir": "logs", "default_hp_metric": False}},
                "log_every_n_steps": 10,
                "enable_model_summary": False,  # the factorization report and RunSummary give the parameters
            },
            save_config_kwargs={"overwrite": True},
            args=args,  # None from a shell: LightningCLI reads sys.argv itself (and warns when given both)
            run=run,
        )
    except USER_ERRORS as err:
        fail(err)
    except SIGTERMException:
        # Lightning stops gracefully on SIGTERM (a cluster's preemption, `kill`, a study stopping its trials) by
        # raising a bare SystemExit, i.e. status 0: a run that did not finish must never read as a success.
        print(f"run terminated by SIGTERM (exit status {EXIT_TERMINATED})", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_TERMINATED) from None
    except (TypeError, ValueError) as err:
        # jsonargparse wraps what a class's own constructor refused (e.g. StagingCallback(spread=2)) in its own
        # "does not validate" error: report the refusal itself.
        refusal = next((e for e in _exception_chain(err) if isinstance(e, USER_ERRORS)), None)
        if refusal is None:
            raise
        fail(refusal)


if __name__ == "__main__":
    main()
