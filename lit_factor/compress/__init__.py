"""Compression of a model, below Lightning (plain torch and data; no trainer is ever reached for).

Owns: surgery (targets, the JSON plan, applying it), the :class:`~lit_factor.compress.factorizer.Factorizer`
(plan, projection inits, calibration, allocation, the teacher snapshot, ``stage(paths)``), switchable layers for
staged runs, calibration statistics, and the distillation loss. May import :mod:`lit_factor.factorize`,
:mod:`lit_factor.models` and :mod:`lit_factor.errors`; never train, deploy, study or Lightning.
"""
