"""The typed interface between lit-factor's callbacks and the LightningModule they drive.

Callbacks (staging, stability, summary, latency, TensorBoard) talk to the module only through
:class:`Factorizable`; :class:`~lit_factor.train.module.FactorizedClassifier` implements it, and so can any module a
user writes. A callback checks it once (``require_factorizable``) and gets one clear error for a module that does
not, instead of probing attributes with ``getattr``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from lit_factor.compress.surgery import Plan
from lit_factor.errors import UserError
from lit_factor.train.data import GLUETask


@runtime_checkable
class Factorizable(Protocol):
    """What a module offers the callbacks."""

    @property
    def factorized_model(self) -> nn.Module:
        """The model being trained (factorized in place)."""

    @property
    def plan(self) -> Plan | None:
        """The factorization plan, or None for dense fine-tuning."""

    @property
    def staged(self) -> bool:
        """Whether the planned layers are switchable (factorized stage by stage)."""

    @property
    def rel_errors(self) -> dict[str, float]:
        """Relative Frobenius error of each layer projected at once."""

    @property
    def dense_params(self) -> int:
        """Whole-model parameters of the dense model."""

    @property
    def factorized_params(self) -> int:
        """Whole-model parameters once every planned layer is factorized."""

    @property
    def task(self) -> GLUETask:
        """The GLUE task trained on (its name, metrics and monitored dev metric)."""

    @property
    def distilling(self) -> bool:
        """Whether the training loss is a distillation loss (another scale than the task loss)."""

    def enable_staging(self) -> None:
        """Ask for switchable layers (before the model is built)."""

    def factorize_stage(self, paths: list[str]) -> dict[str, float | None]:
        """Project the switchable layers at ``paths`` and make them live; ``{path: relative error}``."""


def require_factorizable(module: object, who: str) -> Factorizable:
    """``module`` if it implements :class:`Factorizable`, else one clear error naming the callback."""
    if not isinstance(module, Factorizable):
        raise UserError(f"{who} needs a LightningModule with lit-factor's interface "
                        f"(lit_factor.train.interface.Factorizable), got {type(module).__name__}")
    return module
