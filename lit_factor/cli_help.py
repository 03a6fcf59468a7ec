"""What ``lit-factor --help`` and each subcommand's ``--help`` say: lit-factor's own words, not Lightning's.

LightningCLI takes each subcommand's one-line summary (the listing of ``lit-factor --help``) and the help of its
arguments (``--ckpt_path``, ``--verbose``) from the docstring of the Trainer method it calls. :class:`Trainer` is
Lightning's Trainer with those four docstrings rewritten, passed as LightningCLI's public ``trainer_class``; the
methods themselves are Lightning's (``functools.wraps`` keeps their signatures, which the CLI's arguments follow).
:func:`parser_kwargs` gives the top-level parser its description and the list of every command, and each
subcommand a short usage line and a description that shows ``--run`` (handled by
:func:`lit_factor.cli.expand_run_option` before parsing) first.
"""

from __future__ import annotations

import functools
import os
import sys
import textwrap

import lightning.pytorch as pl

DESCRIPTION = """\
lit-factor: fine-tune a Hugging Face encoder on a GLUE task while its linear layers are factorized (low rank,
Monarch, block-wise low rank), and measure what it costs and buys.

  %(prog)s fit --config configs/quickstart_minilm_sst2.yaml --data.data_dir ../shared/glue
  %(prog)s test --run logs/quickstart_minilm_sst2/version_0
  %(prog)s export --run logs/quickstart_minilm_sst2/version_0 --to out/hf --format hf
"""

#: --run, as every evaluating command takes it
RUN_HELP = """\
  --run RUN_DIR         a fit's run directory (<save_dir>/<name>/version_<N>): its config.yaml and its best
                        checkpoint (the one summary.json names); results go into RUN_DIR/{sub}/
  --ckpt_path best|last|FILE
                        with --run: best (default) or last of that run; without --run: a .ckpt file
                        (best and last need --run)"""

#: what each Lightning subcommand does in lit-factor: (one-line summary, description paragraph)
SUBCOMMANDS = {
    "fit": ("train (and factorize) a model; logs, checkpoints and summary.json go to "
            "<save_dir>/<name>/version_<N>",
            "Fine-tune the model on the task's train split, validating on its dev split after every epoch."),
    "validate": ("evaluate a checkpoint on the task's dev split (validation metrics)",
                 "Run one validation epoch of a trained checkpoint over the dev split."),
    "test": ("evaluate a checkpoint on the task's labelled dev split (GLUE's test labels are hidden)",
             "Run one evaluation epoch of a trained checkpoint over the dev split: GLUE's test labels are hidden, "
             "so the metrics are named dev/..."),
    "predict": ("write GLUE submission files (index, label) for a checkpoint on the unlabelled test split",
                "Predict labels with a trained checkpoint for the task's test split (or dev, "
                "--data.predict_split dev) and write <TASK>.tsv."),
}


def program() -> str:
    """How the user called us: ``cli.py``, ``python -m lit_factor`` or ``lit-factor``."""
    name = os.path.basename(sys.argv[0] or "lit-factor")
    return "python -m lit_factor" if name == "__main__.py" else name


def _subcommand_kwargs(name: str) -> dict:
    description = textwrap.fill(SUBCOMMANDS[name][1], 110)
    prog = f"{program()} {name}"
    if name == "fit":
        return {"description": description, "usage": f"{prog} --config CONFIG [--section.key VALUE ...]"}
    run = RUN_HELP.format(sub=name)
    return {"description": f"{description}\n\nwhich checkpoint:\n{run}",
            "usage": f"{prog} --run RUN_DIR [--ckpt_path best|last|FILE] [--section.key VALUE ...]\n"
                     f"       {prog} --config CONFIG --ckpt_path FILE [--section.key VALUE ...]"}


def parser_kwargs(epilog: str, formatter_class, others=()) -> dict:
    """LightningCLI's ``parser_kwargs``: the top-level parser's (its usage names ``others`` too, the commands that
    are not Lightning's: study, analyze, export), then one dict per subcommand."""
    commands = ",".join([*SUBCOMMANDS, *others])
    kwargs = {"prog": program(), "usage": f"{program()} {{{commands}}} [--help] ...", "description": DESCRIPTION,
              "epilog": epilog, "formatter_class": formatter_class}
    kwargs.update({name: {**_subcommand_kwargs(name), "formatter_class": formatter_class} for name in SUBCOMMANDS})
    return kwargs


_CKPT_PATH = """ckpt_path: the checkpoint to evaluate: a .ckpt file written by fit; best or last only
                with --run RUN_DIR (which also supplies the run's config.yaml)."""
_EVAL_ARGS = f"""
        Args:
            model: set by the CLI (--model.*).
            dataloaders: set by the CLI (--data.*).
            {_CKPT_PATH}
            verbose: print Lightning's metrics table (the CLI prints its own summary instead).
            datamodule: set by the CLI (--data.*).
            weights_only: load only tensors and primitive types from the checkpoint (None: Lightning's default).
"""


def _documented(name: str, doc: str):
    base = getattr(pl.Trainer, name)

    @functools.wraps(base)
    def method(self, *args, **kwargs):
        return base(self, *args, **kwargs)

    method.__doc__ = doc
    return method


class Trainer(pl.Trainer):
    """Lightning's Trainer; only the docstrings of fit/validate/test/predict differ (they are the CLI's help)."""

    fit = _documented("fit", SUBCOMMANDS["fit"][0] + """

        Args:
            model: set by the CLI (--model.*).
            train_dataloaders: set by the CLI (--data.*).
            val_dataloaders: set by the CLI (--data.*).
            datamodule: set by the CLI (--data.*).
            ckpt_path: resume an interrupted fit from this .ckpt file (it continues in the same run directory).
            weights_only: load only tensors and primitive types from the checkpoint (None: Lightning's default).
""")
    validate = _documented("validate", SUBCOMMANDS["validate"][0] + "\n" + _EVAL_ARGS)
    test = _documented("test", SUBCOMMANDS["test"][0] + "\n" + _EVAL_ARGS)
    predict = _documented("predict", SUBCOMMANDS["predict"][0] + """

        Args:
            model: set by the CLI (--model.*).
            dataloaders: set by the CLI (--data.*).
            datamodule: set by the CLI (--data.*).
            return_predictions: keep the predictions in memory (the CLI writes them to files).
            """ + _CKPT_PATH + """
            weights_only: load only tensors and primitive types from the checkpoint (None: Lightning's default).
""")
