"""lit-factor command line: one door for every command.

``python cli.py {fit,validate,test,predict} --config configs/<recipe>.yaml`` is a LightningCLI over
:class:`lit_factor.module.FactorizedClassifier` and :class:`lit_factor.data.GLUEDataModule`: ``data.task`` is linked
to the model (label count and metrics) and to the checkpoint's monitored metric; ``model.model_name_or_path`` is
linked to the data's tokenizer. Runs log to TensorBoard under ``logs/``.

``python cli.py {study,analyze,export} ...`` hand their arguments to the command's own ``main(argv)``
(:data:`COMMANDS`), imported only when asked for.

Bad settings or data stop with one line ``error: ...`` and exit status 2, before any training.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jsonargparse import ActionConfigFile, DefaultHelpFormatter
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_factor.callbacks.prediction import GLUEPredictionWriter
from lit_factor.data import GLUEDataError, GLUEDataModule, get_task
from lit_factor.errors import UserError, fail
from lit_factor.factorize import BudgetError
from lit_factor.models import ModelSourceError
from lit_factor.module import FactorizedClassifier
from lit_factor.surgery import PlanError

#: errors that mean "your settings or data are wrong": reported as one line, no traceback
USER_ERRORS = (UserError, PlanError, BudgetError, ModelSourceError, MisconfigurationException)

#: commands that are not Lightning subcommands: name -> (module with ``main(argv) -> int``, one-line summary)
COMMANDS = {
    "study": ("lit_factor.study.cli", "run a sweep of fits (budgets x methods x seeds) and tabulate the results"),
    "analyze": ("lit_factor.analyze", "analyze a model's or a run's factorization (spectra, projection errors)"),
    "export": ("lit_factor.export", "export a checkpoint's factorized model (ONNX) and check it"),
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

    def before_predict(self) -> None:
        if not any(isinstance(c, GLUEPredictionWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(GLUEPredictionWriter())


def main(args: list[str] | None = None, run: bool = True) -> LitFactorCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``); settings errors exit 2 with one ``error:`` line.

    ``study``/``analyze``/``export`` exit with their command's status (SystemExit); the Lightning subcommands
    return the LitFactorCLI (its model, datamodule and trainer) to a Python caller.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMMANDS:
        raise SystemExit(run_command(argv[0], argv[1:]))
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
            },
            save_config_kwargs={"overwrite": True},
            args=args,  # None from a shell: LightningCLI reads sys.argv itself (and warns when given both)
            run=run,
        )
    except USER_ERRORS as err:
        fail(err)
    except (TypeError, ValueError) as err:
        # jsonargparse wraps what a class's own constructor refused (e.g. StagingCallback(spread=2)) in its own
        # "does not validate" error: report the refusal itself.
        refusal = next((e for e in _exception_chain(err) if isinstance(e, USER_ERRORS)), None)
        if refusal is None:
            raise
        fail(refusal)


if __name__ == "__main__":
    main()
