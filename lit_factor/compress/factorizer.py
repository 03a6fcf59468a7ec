"""The Factorizer: everything about compressing one model, as one object below Lightning.

It owns the plan (:mod:`lit_factor.compress.surgery`), the projection inits (:mod:`lit_factor.factorize.inits`),
calibration (:mod:`lit_factor.compress.calibration`), the global rank allocation
(:mod:`lit_factor.factorize.allocation`), the dense snapshot a staged run's teacher is taken from, and
:meth:`Factorizer.stage`. It returns data and never reaches for a trainer: whoever drives it (the LightningModule,
a script) hands it calibration batches and a forward function when :attr:`Factorizer.needs_calibration` says so.

    factorizer = Factorizer(model, Factorization(method="lowrank", budget=0.25, init="fisher"))
    factorizer.apply(batches=loader, forward=lambda b: model(**b))   # calibrate, allocate, project
    factorizer.rel_errors                                              # {path: relative Frobenius error}

Staged (layer by layer, Gupta et al. 2024, "An Empirical Investigation of Matrix Factorization Methods for
Pre-trained Transformers"): ``Factorizer(..., staged=True)``; :meth:`apply` then builds switchable layers and each
:meth:`stage` projects a group of them from their current (fine-tuned) weights. Loading a checkpoint:
:meth:`build` makes the checkpoint's architecture (empty shells the weights load into).

The life cycle is two facts: whether the model is built (:attr:`built`) and whether its plan is final
(:attr:`plan_final`: a checkpoint's plan, or one a global allocation has already distributed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from torch import nn

from lit_factor.compress.calibration import calibrate
from lit_factor.compress.surgery import Plan, apply_plan, build_plan, count_params, set_module
from lit_factor.compress.switchable import SwitchableLinear, dense_copy, find_switchable, make_switchable
from lit_factor.errors import UserError
from lit_factor.factorize import METHODS, ProjectionStats
from lit_factor.factorize.allocation import ALLOCATIONS, Allocation, RankChoice, allocate_ranks
from lit_factor.factorize.datawise import allocation_terms
from lit_factor.factorize.inits import INITS, Init

#: ``factorization.method`` of dense fine-tuning (no plan)
DENSE = "none"


class ConfigError(UserError):
    """A model/factorization setting that cannot work (one ``error:`` line from the CLI, exit status 2)."""


@dataclass
class Factorization:
    """How to factorize the model's linear layers (the ``model.factorization`` section of a config).

    Args:
        method: ``none`` (dense fine-tuning) or a structure of :data:`lit_factor.factorize.METHODS`:
            ``lowrank``, ``monarch``, ``blockwise`` (or any structure registered there).
        budget: kept fraction of the targeted linear layers' weights, in (0, 1]; ``null`` with a fixed ``rank``
            (or, for Monarch/block-wise, the default per-block rank min(m, n) / nblocks^2).
        targets: which linears: a preset (``bert``, ``roberta``, ``t5``), a regex or a list of regexes on module
            names; ``null`` picks the preset of the model type (attention Q/K/V/O and FFN of every block).
        nblocks: number of blocks for Monarch and block-wise low rank.
        rank: fixed rank (low rank) or per-block rank (Monarch/block-wise) instead of a budget.
        rank_multiple: round ranks down to a multiple of this (8 or 64 on GPUs).
        init: how the factors start, a registered init (:mod:`lit_factor.factorize.inits`): ``svd`` projects the
            pretrained weights onto the structure (least weight error); ``whitened`` minimizes the error on the
            layer's calibration inputs ||(W - W') X^T||; ``fisher`` weighs output rows by their Fisher information
            (FWSVD); ``random`` re-initialises the factors.
        allocation: per-layer ranks: ``uniform`` (every layer keeps ``budget``), or a global allocation meeting
            ``budget`` over all targeted weights: ``energy`` (normalized spectral energy) or ``fisher``
            (Fisher-weighted energy, comparable across layers); see ``lit_factor/factorize/allocation.py``.
        allocation_min_share: a floor for non-uniform allocations: every layer keeps at least this share of its
            uniform allocation (0: none; 0.5 keeps ``fisher`` from starving layers at small budgets).
        calibration_samples: training examples run through the model to gather the statistics of data-aware
            inits and global allocations (one pass, before projecting; per stage when staged).

    Staged (layer-by-layer) factorization is switched on by adding ``lit_factor.callbacks.StagingCallback``
    to ``trainer.callbacks``; without it the whole plan is applied at once before training.
    The settings are checked against the registries when the object is made, so a structure or init registered
    later is accepted, and Python users get the command line's one-line errors.
    """

    method: str = DENSE
    budget: float | None = 0.5
    targets: str | list[str] | None = None
    nblocks: int = 4
    rank: int | None = None
    rank_multiple: int = 1
    init: str = "svd"
    allocation: str = "uniform"
    allocation_min_share: float = 0.0
    calibration_samples: int = 256

    def __post_init__(self) -> None:
        methods = (DENSE, *METHODS)  # read at call time: a structure registered later is allowed too
        if self.method not in methods:
            raise ConfigError(f"factorization.method={self.method!r} is not one of {', '.join(methods)}")
        inits = METHODS[self.method].inits() if self.method in METHODS else tuple(INITS)
        if self.init not in inits:
            raise ConfigError(f"factorization.init={self.init!r} is not one of {', '.join(inits)}"
                              + (f" for {self.method}" if self.method in METHODS else ""))
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"factorization.allocation={self.allocation!r} is not one of {', '.join(ALLOCATIONS)}")
        if ALLOCATIONS[self.allocation].global_ and self.budget is None:
            raise ConfigError(f"factorization.allocation={self.allocation} distributes a budget: set "
                              "factorization.budget instead of a fixed rank")
        if not 0 <= self.allocation_min_share <= 1:
            raise ConfigError(f"factorization.allocation_min_share={self.allocation_min_share} must be in [0, 1]")
        if self.calibration_samples < 1:
            raise ConfigError(f"factorization.calibration_samples={self.calibration_samples} must be >= 1")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ConfigError(f"factorization.budget={self.budget} is outside (0, 1]: it is the kept fraction of "
                              "the targeted linear layers' weights")
        if self.nblocks < 1 or self.rank_multiple < 1 or (self.rank is not None and self.rank < 1):
            raise ConfigError(f"factorization.nblocks={self.nblocks}, rank={self.rank}, "
                              f"rank_multiple={self.rank_multiple} must be >= 1")

    @classmethod
    def coerce(cls, value: Factorization | dict | None) -> Factorization:
        """A Factorization from itself, a dict (a checkpoint's hyperparameters) or None (the defaults)."""
        if value is None:
            return cls()
        return cls(**value) if isinstance(value, dict) else value

    @property
    def init_spec(self) -> Init:
        return INITS[self.init]

    @property
    def allocation_spec(self) -> Allocation:
        return ALLOCATIONS[self.allocation]

    def to_dict(self) -> dict:
        return asdict(self)


#: ``forward(batch)`` runs the model on one batch and returns an output with ``.loss`` (for Fisher statistics)
Forward = Callable[[dict], object]


class Factorizer:
    """Plans, calibrates, allocates and applies the factorization of ``model`` (in place); see the module docstring.

    Args:
        model: the dense model (an ``nn.Module`` with ``nn.Linear`` layers to factorize).
        settings: the :class:`Factorization`.
        plan: a saved plan (a checkpoint's) to use instead of planning from ``settings``: final, never reallocated.
    """

    def __init__(self, model: nn.Module, settings: Factorization, plan: Plan | None = None) -> None:
        self.model = model
        self.settings = settings
        self.dense_params = count_params(model)
        self.staged = False
        self.built = False
        self.plan_final = plan is not None
        self.plan: Plan | None = plan if plan is not None else self._uniform_plan()
        #: {path: relative Frobenius error} of the layers projected when the plan was applied (all at once)
        self.rel_errors: dict[str, float] = {}

    def _uniform_plan(self) -> Plan | None:
        f = self.settings
        if f.method == DENSE:
            return None
        return build_plan(self.model, f.method, f.budget, targets=f.targets, nblocks=f.nblocks, rank=f.rank,
                          rank_multiple=f.rank_multiple, init=f.init)

    # --- what the driver needs to know ----------------------------------------------------------------------
    def request_staging(self) -> None:
        """Build switchable layers instead of factorizing at once (before :meth:`apply`)."""
        if self.built and not self.staged:
            raise ConfigError("staging was asked for after the model was factorized all at once: add the "
                              "StagingCallback before fitting (trainer.callbacks), not to a fitted module")
        self.staged = True

    @property
    def needs_calibration(self) -> bool:
        """Whether :meth:`apply` needs calibration batches: a global allocation still to compute, or a data-aware
        init applied all at once (staged layers calibrate at their stage)."""
        if self.plan is None or self.built:
            return False
        return self._allocates or (self.settings.init_spec.data_aware and not self.staged)

    @property
    def _allocates(self) -> bool:
        return self.settings.allocation_spec.global_ and not self.plan_final

    @property
    def factorized_params(self) -> int:
        """Whole-model parameters once every planned layer is factorized."""
        return self.plan.factorized_model_params(self.dense_params) if self.plan else self.dense_params

    # --- building the model -----------------------------------------------------------------------------------
    def apply(self, batches: Iterable[dict] | None = None, forward: Forward | None = None) -> dict[str, float]:
        """Factorize the model: calibrate and allocate when needed (``batches``/``forward``), then switchable
        layers (staged) or projected factorized layers (all at once). Returns :attr:`rel_errors`."""
        if self.built:
            raise ConfigError("the model is already factorized")
        stats = None
        if self.needs_calibration:
            spec = self.settings
            statistics = (*spec.init_spec.statistics, *spec.allocation_spec.statistics)
            stats = self.statistics(self.plan.paths, batches, forward, statistics)
            if self._allocates:
                self.plan = allocated_plan(self.model, self.plan, spec.allocation_spec, stats, targets=spec.targets,
                                           nblocks=spec.nblocks, rank_multiple=spec.rank_multiple,
                                           min_share=spec.allocation_min_share)
                self.plan_final = True
        if self.plan is not None:
            if self.staged:
                make_switchable(self.model, self.plan)  # each layer is projected at its stage
            else:
                self.rel_errors = {k: float(v) for k, v in apply_plan(self.model, self.plan, stats=stats).items()}
        self.built = True
        return self.rel_errors

    def build(self, plan: Plan | None, staged: bool) -> None:
        """The architecture of a checkpoint (its ``plan``, staged or not, or dense): empty factorized shells that
        ``load_state_dict`` fills; nothing is projected, nothing calibrated."""
        if self.built:
            raise ConfigError("the model is already built: a checkpoint's architecture is built before anything else")
        self.plan, self.staged, self.plan_final = plan, staged, True
        if plan is not None:
            make_switchable(self.model, plan) if staged else apply_plan(self.model, plan, project=False)
        self.built = True

    def adopt(self, saved: Plan | None, staged: bool) -> None:
        """Check that a checkpoint (plan ``saved``, ``staged``) fits the model built from this run's settings, up
        to the per-layer ranks of a global allocation (computed from the checkpoint's run: those rule, the model
        takes them); a ConfigError otherwise. A model built dense (no factorization settings) takes the
        checkpoint's architecture."""
        if self.plan is None:
            if saved is not None:  # a dense config takes any checkpoint's architecture: the model is still dense
                self.built = False
                self.build(saved, staged)
            return
        if saved is not None and self.plan is not None and staged == self.staged and \
                adopt_structures(self.model, self.plan, saved):
            self.plan, self.plan_final = saved, True
            return
        raise ConfigError("the checkpoint's factorization differs from this run's config (method "
                          f"{saved.method if saved else DENSE}, staged={staged} in the checkpoint); "
                          "run with the checkpoint's config.yaml or without a factorization section")

    # --- calibration, stages, teacher -------------------------------------------------------------------------
    def statistics(self, paths: list[str], batches: Iterable[dict] | None, forward: Forward | None,
                   statistics: Iterable[str]) -> dict[str, ProjectionStats]:
        """Calibration statistics of the layers at ``paths``: one pass over ``batches`` (Fisher when one of
        ``statistics`` needs gradients)."""
        if batches is None or forward is None:
            raise ConfigError("a data-aware factorization (a data-aware init or a global allocation) calibrates on "
                              "training data: run it through a Trainer with a datamodule (cli.py fit --data ...)")
        return calibrate(self.model, paths, batches, forward=forward, fisher="row_weights" in set(statistics))

    def stage(self, paths: list[str], batches: Iterable[dict] | None = None,
              forward: Forward | None = None) -> dict[str, float | None]:
        """Project the switchable layers at ``paths`` from their current dense weights and make the factors live
        (a staged run's stage); data-aware inits calibrate on the model as it is now. ``{path: rel. error}``."""
        init = self.settings.init_spec
        stats = self.statistics(paths, batches, forward, init.statistics) if init.data_aware else {}
        switches = find_switchable(self.model)
        return {path: switches[path].switch_(stats.get(path)) for path in paths}

    def dense_snapshot(self) -> nn.Module:
        """A copy of the dense model as it is now (switchable layers by their dense path): a staged run's
        ``self`` teacher, taken right before the first stage."""
        return dense_copy(self.model)


def allocated_plan(model: nn.Module, plan: Plan, allocation: Allocation, stats: dict[str, ProjectionStats], *,
                   targets, nblocks: int, rank_multiple: int, min_share: float = 0.0) -> Plan:
    """``plan`` (built from a budget) with per-layer ranks from the global ``allocation`` (energy or fisher)."""
    if plan.budget is None:
        raise UserError(f"factorization.allocation={allocation.name} distributes a budget: set factorization.budget "
                        "instead of a fixed rank")
    choices = []
    for e in plan.entries:
        shell = METHODS[e.method](e.in_features, e.out_features, bias=False, device="meta", **e.structure)
        weight = model.get_submodule(e.path).weight
        spectrum = shell.rank_spectrum(weight, allocation_terms(e.init, allocation.statistics, stats.get(e.path)))
        choices.append(RankChoice(spectrum, e.out_features * e.in_features, shell.weights_per_rank))
    ranks = allocate_ranks(choices, plan.budget, rank_multiple, normalize=allocation.normalize,
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
