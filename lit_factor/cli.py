"""lit-factor command line: one door for every command.

``python cli.py {fit,validate,test,predict} --config configs/<recipe>.yaml`` is a LightningCLI over
:class:`lit_factor.train.module.FactorizedClassifier` and :class:`lit_factor.train.data.GLUEDataModule`:
``data.task`` is linked to the model (label count and metrics) and to the checkpoint's monitored metric;
``model.model_name_or_path`` is linked to the data's tokenizer. Runs log to TensorBoard under ``logs/``.

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
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lit_factor import cli_help
from lit_factor.compress.distillation import Distillation
from lit_factor.compress.factorizer import Factorization
from lit_factor.compress.surgery import PlanError
from lit_factor.errors import EXIT_TERMINATED, EXIT_USAGE, UserError, fail
from lit_factor.factorize import BudgetError
from lit_factor.models import ModelSourceError, weights_from_checkpoint
from lit_factor.train import runs
from lit_factor.train.callbacks.board import BoardCallback
from lit_factor.train.callbacks.prediction import GLUEPredictionWriter
from lit_factor.train.callbacks.progress import LineProgress
from lit_factor.train.callbacks.summary import RunSummary
from lit_factor.train.checkpoints import run_checkpoint, run_dir_of
from lit_factor.train.data import GLUEDataError, GLUEDataModule, get_task
from lit_factor.train.module import FactorizedClassifier

#: errors that mean "your settings or data are wrong": reported as one line, no traceback
USER_ERRORS = (UserError, PlanError, BudgetError, ModelSourceError, MisconfigurationException)

#: commands that are not Lightning subcommands: name -> (module with ``main(argv) -> int``, one-line summary)
COMMANDS = {
    "study": ("lit_factor.study.cli", "run a sweep of fits (budgets x methods x seeds) and tabulate the results"),
    "analyze": ("lit_factor.study.analyze", "analyze a model's or a run's factorization (spectra, projection errors)"),
    "export": ("lit_factor.deploy.export", "export a run's model (hf, dense or ONNX), checked against its logits"),
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


#: subcommands that take ``--run DIR``: the evaluations (default checkpoint ``best``) and fit (resume: ``last``)
RUN_DEFAULT_CHECKPOINT = {"validate": "best", "test": "best", "predict": "best", "fit": "last"}


def expand_run_option(argv: list[str]) -> list[str]:
    """``validate|test|predict|fit --run DIR [--ckpt_path best|last|FILE]`` -> the run's ``config.yaml`` and
    checkpoint file (``best`` when not given; for ``fit``, which resumes the run, ``last``); ``--ckpt_path
    best|last`` without ``--run`` is refused (Lightning would look for them in a run nobody named: ``fit --ckpt_path
    last`` silently trained from scratch)."""
    if not argv or argv[0] not in RUN_DEFAULT_CHECKPOINT:
        return argv
    argv = list(argv)
    run, ckpt = _pop_option(argv, "--run"), _pop_option(argv, "--ckpt_path")
    if run is None:
        if ckpt in ("best", "last"):
            fail(f"--ckpt_path {ckpt} needs the run it belongs to: add --run <save_dir>/<name>/version_<N>, or give "
                 "the checkpoint file")
        return argv + (["--ckpt_path", ckpt] if ckpt is not None else [])
    run_dir = Path(run)
    if not (run_dir / "config.yaml").is_file():
        fail(f"--run {run!r} is not a run directory (no config.yaml; expected <save_dir>/<name>/version_<N>)")
    if ckpt is None or ckpt in ("best", "last"):
        ckpt = str(run_checkpoint(run_dir, ckpt or RUN_DEFAULT_CHECKPOINT[argv[0]]))
    return [argv[0], "--config", str(run_dir / "config.yaml"), *argv[1:], "--ckpt_path", ckpt]


#: appended to a dense fit's run name: ``logs/quickstart_minilm_sst2-dense/version_0`` beside the factorized runs
DENSE_SUFFIX = "-dense"


def name_dense_run(config) -> None:
    """A dense fit (``model.factorization.method none``) logs under ``<name>-dense``, so that a baseline is told apart
    from the recipe's factorized runs in ``logs/`` and in TensorBoard's run list. A run whose version is given (a
    resumed fit, a study trial) keeps its place."""
    logger = config.trainer.get("logger")
    factorization = config.model.get("factorization")
    method = factorization.get("method") if hasattr(factorization, "get") else getattr(factorization, "method", None)
    if method != "none" or not (hasattr(logger, "get") and str(logger.get("class_path", "")).endswith(
            "TensorBoardLogger")):
        return
    args = logger.init_args
    name = str(args.get("name") or "")
    if args.get("version") is None and name and not name.endswith(DENSE_SUFFIX):
        args.name = name + DENSE_SUFFIX


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
    if subcommand in ("validate", "test"):  # one value per metric: a text table (BoardCallback), no one-dot charts
        logger.class_path = "lit_factor.train.callbacks.board.EvaluationLogger"


def add_output_callbacks(trainer, subcommand: str | None) -> None:
    """What every command prints at its end (RunSummary) and shows in TensorBoard (BoardCallback), progress lines
    when stdout is a file, GLUE files."""
    if subcommand in ("fit", "validate", "test") and not any(isinstance(c, BoardCallback) for c in trainer.callbacks):
        trainer.callbacks.append(BoardCallback())  # TensorBoard: the story first, facts as tables, HParams
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


def quiet_checkpoint_evaluation() -> warnings.catch_warnings:
    """Evaluating a fit's checkpoint needs none of the fit's stateful callbacks (ExactResume, RunSummary, the
    staging schedule): Lightning's warning that they are missing would only alarm. A resumed fit still warns.
    Returns the entered ``catch_warnings`` that holds the filter (exit it to drop the filter)."""
    quiet = warnings.catch_warnings()
    quiet.__enter__()
    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create the "
                                              r"checkpoint need to be provided")
    return quiet


def model_source_error(name, err: OSError) -> str:
    """One line for a model that cannot be loaded (transformers raises OSError with a paragraph of advice)."""
    reason = " ".join(str(err).split()).split(". ")[0].rstrip(".")
    return (f"model.model_name_or_path={name!r} cannot be loaded ({reason}); allowed: a local model folder, minilm, "
            f"random:<preset>, or a Hugging Face hub name (downloaded once, needs the network)")


def monitored_first(trainer, checkpoint) -> None:
    """Put the CLI's ``checkpoint`` (the task's monitored metric, best weights) before any other ModelCheckpoint a
    user adds (e.g. a step checkpoint for resume): ``trainer.checkpoint_callback`` -- the first one -- is then the
    monitored one for everything that reads it (Lightning's own ``ckpt_path="best"``, loggers, RunSummary)."""
    if not isinstance(checkpoint, ModelCheckpoint) or checkpoint not in trainer.callbacks:
        return
    others = [c for c in trainer.callbacks if c is not checkpoint]
    first = next((i for i, c in enumerate(others) if isinstance(c, ModelCheckpoint)), len(others))
    trainer.callbacks = [*others[:first], checkpoint, *others[first:]]


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

    def instantiate_classes(self) -> None:
        try:
            if self.subcommand in EVALUATIONS and self.loaded_checkpoint is not None:
                self._quiet = quiet_checkpoint_evaluation()
                with weights_from_checkpoint():  # no "newly initialized classifier" line: the checkpoint's head loads
                    return super().instantiate_classes()
            return super().instantiate_classes()
        except OSError as err:  # transformers: no such local folder, no such hub model, or the hub unreachable
            config = self.config[self.subcommand] if self.subcommand else self.config
            raise UserError(model_source_error(config.model.get("model_name_or_path"), err)) from None

    def _after_evaluation(self) -> None:
        quiet = getattr(self, "_quiet", None)
        if quiet is not None:  # the warning filter ends with the command (a Python caller's next fit warns again)
            quiet.__exit__(None, None, None)
            self._quiet = None

    after_validate = after_test = after_predict = _after_evaluation

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        config_init = self.config_init[self.subcommand] if self.subcommand else self.config_init
        monitored_first(trainer, config_init.get("checkpoint"))
        add_output_callbacks(trainer, self.subcommand)
        if self.subcommand in ("validate", "test"):
            self.config_init[self.subcommand]["verbose"] = False  # RunSummary prints the same metrics, plainly
        return trainer

    # --- checked before anything is written; resume into the same run; exit status (lit_factor/runs.py) ---------
    def parse_arguments(self, parser, args) -> None:
        # Right after this (public) hook LightningCLI reads the --ckpt_path file to merge its hyperparameters into
        # the model's settings: check the file first (one error line for a missing, truncated or corrupted one) and
        # keep the factorization the command line asked for, compared with the checkpoint's once merged.
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        self.loaded_checkpoint = runs.checkpoint_to_load(config.get("ckpt_path")) if config else None
        self._asked_factorization = config.model.get("factorization") if config else None

    def before_instantiate_classes(self) -> None:
        if self.loaded_checkpoint is not None:
            runs.warn_other_factorization(self._asked_factorization, self.loaded_checkpoint)
        if self.subcommand:
            config = self.config[self.subcommand]
            runs.place_run_dir(config, self.loaded_checkpoint, resuming=self.subcommand == "fit")
            place_evaluation(config, self.subcommand)
            if self.subcommand == "fit":
                name_dense_run(config)

    def _before_run(self) -> None:
        self.datamodule.check(self.subcommand)  # bad data stops here, before a run directory exists
        runs.warn_emulated_bf16(self.trainer)
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


def build_cli(args: list[str] | None, run: bool = True, cli_class: type[LitFactorCLI] = LitFactorCLI) -> LitFactorCLI:
    """The LightningCLI of ``fit``/``validate``/``test``/``predict`` with lit-factor's defaults."""
    return cli_class(
        FactorizedClassifier,
        GLUEDataModule,
        subclass_mode_model=False,
        subclass_mode_data=False,
        parser_class=OneLineErrorParser,
        parser_kwargs=cli_help.parser_kwargs(EPILOG, HelpFormatter, others=COMMANDS),
        trainer_class=cli_help.Trainer,  # Lightning's, with lit-factor's help texts (lit_factor/cli_help.py)
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


# --- the grid check of a study: every cell parsed as its fit would parse it, nothing instantiated ----------------
#: internal command (not in --help): ``python -m lit_factor check-fit-args FILE`` with FILE a JSON list of ``fit``
#: argument lists; prints one JSON line, the list of errors (None where the arguments parse). Used by ``study run``
#: (lit_factor/study/trial.py: check_fit_args) before any trial starts or anything is stored.
CHECK_FIT_ARGS = "check-fit-args"


class _Parsed(Exception):
    """Raised once the arguments parsed and were checked, before any class is instantiated."""


class _ParseOnlyCLI(LitFactorCLI):
    def before_instantiate_classes(self) -> None:
        # The settings dataclasses check themselves against the registries (a structure or init registered later
        # is allowed): build them -- plain data, nothing else is instantiated.
        model = self.config[self.subcommand].model if self.subcommand else self.config.model
        for key, cls in (("factorization", Factorization), ("distillation", Distillation)):
            section = model.get(key)
            if section is not None:
                cls(**(section.as_dict() if hasattr(section, "as_dict") else dict(section)))
        raise _Parsed


def check_fit_args(arg_lists: list[list[str]]) -> list[str | None]:
    """For each ``fit`` argument list, None when the fit's own parser accepts it, else the one-line error."""
    import contextlib
    import io

    quiet_expected_noise()
    results: list[str | None] = []
    argv0 = sys.argv[:1]
    for args in arg_lists:
        err, saved_argv = io.StringIO(), sys.argv
        sys.argv = argv0  # else LightningCLI warns that it was given both args and a command line
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_cli(["fit", *args], run=True, cli_class=_ParseOnlyCLI)
            results.append("the arguments parsed, but the check did not stop before instantiation")
        except _Parsed:
            results.append(None)
        except SystemExit:
            lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("error: ")]
            results.append(lines[-1].removeprefix("error: ") if lines else " ".join(err.getvalue().split())[-300:])
        except USER_ERRORS as refusal:
            results.append(" ".join(str(refusal).split()))
        finally:
            sys.argv = saved_argv
    return results


def _check_fit_args_command(argv: list[str]) -> int:
    if len(argv) != 1:
        fail(f"usage: {CHECK_FIT_ARGS} FILE (a JSON list of fit argument lists)")
    arg_lists = json.loads(Path(argv[0]).read_text())
    print(json.dumps(check_fit_args(arg_lists)), flush=True)
    return 0


def main(args: list[str] | None = None, run: bool = True) -> LitFactorCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``); settings errors exit 2 with one ``error:`` line.

    ``study``/``analyze``/``export`` exit with their command's status (SystemExit); the Lightning subcommands
    return the LitFactorCLI (its model, datamodule and trainer) to a Python caller.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMMANDS:
        raise SystemExit(run_command(argv[0], argv[1:]))
    if argv and argv[0] == CHECK_FIT_ARGS:
        raise SystemExit(_check_fit_args_command(argv[1:]))
    quiet_expected_noise()
    runs.info_to_stdout()
    argv = expand_run_option(argv)
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself from a shell (and warns when given both)
    else:
        args = argv
    try:
        return build_cli(args, run=run)
    except USER_ERRORS as err:
        if rank_zero_only.rank:  # under DDP every rank refuses alike: one line, from rank 0
            raise SystemExit(EXIT_USAGE) from None
        fail(err)
    except SIGTERMException:
        # Lightning stops gracefully on SIGTERM (a cluster's preemption, `kill`, a study stopping its trials) by
        # raising a bare SystemExit, i.e. status 0: a run that did not finish must never read as a success.
        # CheckpointOnSigterm (every CLI fit) has said where it saved the checkpoint to resume from.
        if not rank_zero_only.rank:
            print(f"run terminated by SIGTERM (exit status {EXIT_TERMINATED})", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_TERMINATED) from None
    except (TypeError, ValueError) as err:
        # jsonargparse wraps what a class's own constructor refused (e.g. StagingCallback(spread=2)) in its own
        # "does not validate" error: report the refusal itself.
        refusal = next((e for e in _exception_chain(err) if isinstance(e, USER_ERRORS)), None)
        if refusal is None:
            raise
        if rank_zero_only.rank:
            raise SystemExit(EXIT_USAGE) from None
        fail(refusal)


if __name__ == "__main__":
    main()
