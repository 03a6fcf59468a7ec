"""Training with Lightning: the LightningModule (it holds a Factorizer), the GLUE DataModule, the callbacks, run
directories and summaries, checkpoints and teachers.

May import :mod:`lit_factor.compress`, :mod:`lit_factor.factorize`, :mod:`lit_factor.models`,
:mod:`lit_factor.errors` and Lightning; never deploy, study or the CLI.
"""
