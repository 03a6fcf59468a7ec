"""How a factorized layer's factors start: the one registry of projection inits.

An init either *projects* the dense weight onto the structure -- minimizing the weight error (``svd``) or an error
weighted by calibration statistics -- or keeps the structure's random init (``random``, the from-scratch baseline).
Each :class:`Init` declares the statistics it needs (fields of :class:`~lit_factor.factorize.base.ProjectionStats`:
``input_cov`` = activations, ``row_weights`` = Fisher information) and turns them into the terms of the weighted
objective that structures minimize (:func:`lit_factor.factorize.datawise.weighted_factors`):

    min ||D (W - W') S||_F    with S = sqrt(E[x x^T]) (``second_moment``) and D = diag(sqrt f) (``row_weights``)

A structure never names an init: it asks :func:`get_init` for the terms and projects with them (no terms: the plain
truncated SVD). Calibration (:mod:`lit_factor.compress.calibration`) gathers exactly what the chosen init declares.
Adding an init is one entry in :data:`INITS` (``tests/test_registry.py`` registers a toy one).
"""

from __future__ import annotations

from dataclasses import dataclass

#: each statistic an init may need -> the keyword of ``weighted_factors`` it feeds
STATISTICS = {"input_cov": "second_moment", "row_weights": "row_weights"}


@dataclass(frozen=True)
class Init:
    """One way to start a factorized layer.

    Attributes:
        name: the value of ``factorization.init`` (and of a plan entry's ``init``).
        statistics: the :class:`ProjectionStats` fields it needs, from :data:`STATISTICS` (empty: data-free).
        projects: False when the factors keep their random init (nothing is projected, no bias copied).
        summary: one line for help texts and docs.
    """

    name: str
    statistics: tuple[str, ...] = ()
    projects: bool = True
    summary: str = ""

    def __post_init__(self) -> None:
        unknown = [s for s in self.statistics if s not in STATISTICS]
        if unknown:
            raise ValueError(f"init {self.name!r}: unknown statistics {unknown} (known: {', '.join(STATISTICS)})")

    @property
    def data_aware(self) -> bool:
        """Whether the init needs calibration statistics (and so calibration data)."""
        return bool(self.statistics)

    @property
    def needs_fisher(self) -> bool:
        """Whether calibration must take gradients (Fisher row weights), not only activations."""
        return "row_weights" in self.statistics

    def terms(self, stats) -> dict:
        """The keyword arguments of ``weighted_factors`` from ``stats`` (a ProjectionStats or None); ``{}`` for a
        data-free init. A missing statistic is named."""
        terms = {}
        for field in self.statistics:
            value = getattr(stats, field, None) if stats is not None else None
            if value is None:
                raise ValueError(f"init={self.name!r} needs calibration statistics ({field}); gather them with "
                                 "lit_factor.compress.calibration (factorization.calibration_samples)")
            terms[STATISTICS[field]] = value
        return terms


#: name -> Init; the one place an init is defined (configs, plans, structures and calibration read it)
INITS: dict[str, Init] = {init.name: init for init in (
    Init("svd", summary="project the weights onto the structure (least weight error, Eckart-Young)"),
    Init("whitened", ("input_cov",), summary="least error on the layer's calibration inputs ||(W - W') X^T||"),
    Init("fisher", ("row_weights",), summary="output rows weighted by their Fisher information (FWSVD)"),
    Init("random", projects=False, summary="keep the structure's random init (the from-scratch baseline)"),
)}


def get_init(name: str) -> Init:
    """The registered init called ``name``, or a ValueError listing the registered ones."""
    try:
        return INITS[name]
    except KeyError:
        raise ValueError(f"init={name!r} is not one of {', '.join(map(repr, INITS))}") from None
