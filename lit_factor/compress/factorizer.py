"""Data-aware compression inside a run: calibrate on training data, allocate ranks globally, then project.

Used by :class:`~lit_factor.train.module.FactorizedClassifier` when ``factorization.init`` is ``whitened`` / ``fisher``
or ``factorization.allocation`` is ``energy`` / ``fisher``:

1. :func:`module_stats` runs ``factorization.calibration_samples`` training examples from the trainer's datamodule
   through the model (one pass, hooks on every planned layer; :mod:`lit_factor.compress.calibration`);
2. :func:`allocated_plan` turns the uniform plan into per-layer ranks meeting the same total budget
   (:mod:`lit_factor.factorize.allocation`); the plan records each layer's structure;
3. ``apply_plan(..., stats=...)`` projects each layer with its statistics (:mod:`lit_factor.factorize.datawise`).

In staged runs the plan (and so the allocation) is fixed before training, from the model as loaded; each stage
then calibrates again on the model as it is at that stage before projecting its layers (:func:`module_stats`
called by the StagingCallback through ``module.stage_stats``).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lit_factor.compress.calibration import calibrate, calibration_loader
from lit_factor.compress.surgery import Plan, build_plan, set_module
from lit_factor.compress.switchable import SwitchableLinear
from lit_factor.errors import UserError
from lit_factor.factorize import METHODS, ProjectionStats
from lit_factor.factorize.allocation import RankChoice, allocate_ranks
from lit_factor.factorize.datawise import allocation_terms


def needs_fisher(init: str, allocation: str) -> bool:
    return init == "fisher" or allocation == "fisher"


def module_stats(module, paths: Iterable[str], *, fisher: bool, samples: int) -> dict[str, ProjectionStats]:
    """Calibration statistics of the layers at ``paths`` of ``module.factorized_model``, from ``samples``
    examples of the trainer's datamodule's training split, on the model's device."""
    trainer = getattr(module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None:
        raise UserError("a data-aware factorization (init whitened/fisher or allocation energy/fisher) calibrates on "
                        "training data: run it through a Trainer with a datamodule (cli.py fit/validate --data ...)")
    loader = calibration_loader(datamodule, samples)
    return calibrate(module.factorized_model, list(paths), loader, forward=module, fisher=fisher)


def allocated_plan(model: nn.Module, plan: Plan, allocation: str, stats: dict[str, ProjectionStats], *,
                   targets, nblocks: int, rank_multiple: int, min_share: float = 0.0) -> Plan:
    """``plan`` (built from a budget) with per-layer ranks from the global ``allocation`` (energy or fisher)."""
    if plan.budget is None:
        raise UserError(f"factorization.allocation={allocation} distributes a budget: set factorization.budget "
                        "instead of a fixed rank")
    choices = []
    for e in plan.entries:
        shell = METHODS[e.method](e.in_features, e.out_features, bias=False, device="meta", **e.structure)
        weight = model.get_submodule(e.path).weight
        spectrum = shell.rank_spectrum(weight, allocation_terms(e.init, allocation, stats.get(e.path)))
        choices.append(RankChoice(spectrum, e.out_features * e.in_features, shell.weights_per_rank))
    ranks = allocate_ranks(choices, plan.budget, rank_multiple, normalize=allocation == "energy",
                           min_share=min_share)
    structures = {e.path: {**e.structure, "rank": r} for e, r in zip(plan.entries, ranks, strict=True)}
    return build_plan(model, plan.method, plan.budget, targets=targets, nblocks=nblocks, rank_multiple=rank_multiple,
                      init=plan.entries[0].init, structures=structures)


def adopt_structures(model: nn.Module, current: Plan, saved: Plan) -> bool:
    """Give ``model`` (factorized by ``current``) the per-layer structures of ``saved``, a checkpoint's plan that
    differs only in them (its allocation was computed from the data and weights of the run that wrote it).

    The differing layers get empty shells for the checkpoint's weights; returns False, changing nothing, when the
    plans differ in anything else (layers, methods, inits, shapes).
    """
    def key(plan: Plan) -> list[tuple]:
        return [(e.path, e.method, e.init, e.out_features, e.in_features, e.bias) for e in plan.entries]
    if key(current) != key(saved):
        return False
    for old, new in zip(current.entries, saved.entries, strict=True):
        if old.structure == new.structure:
            continue
        module = model.get_submodule(new.path)
        switch = module if isinstance(module, SwitchableLinear) else None
        target = switch.factorized if switch is not None else module
        ref = next(target.parameters())
        shell = METHODS[new.method](new.in_features, new.out_features, bias=new.bias, device=ref.device,
                                    dtype=ref.dtype, **new.structure)
        if switch is None:
            set_module(model, new.path, shell)
        else:
            if new.bias:
                shell.bias = switch.dense.bias  # one bias for both paths, as SwitchableLinear builds it
            switch.factorized = shell
    return True
