"""Switchable layers: the building block of *staged* factorization (one layer at a time during fine-tuning).

Projecting every layer of a pretrained transformer at once can wreck fine-tuning; factorizing them one by one
while training goes on avoids that. Rebuilding modules mid-run would mean rebuilding the optimizer and re-wrapping
DDP, so instead every planned ``nn.Linear`` becomes, before training starts, a :class:`SwitchableLinear` that
holds both paths:

* ``dense``: the original ``nn.Linear`` (weight and bias), live until the layer's stage;
* ``factorized``: the plan's :class:`~lit_factor.factorize.FactorizedLinear`, an empty shell until the stage,
  when :meth:`SwitchableLinear.switch_` projects the *current* (already fine-tuned) dense weight into it in place
  and flips the forward over to it.

Both paths share one bias ``Parameter`` so the bias keeps training across the switch. All parameters exist from
the start, so the optimizer built once holds them all; a path that the forward does not use gets no gradient and
AdamW leaves a parameter without gradient untouched (no update, no weight decay). The flag saying which path is
live is a persistent buffer, so a checkpoint restores the exact mid-staging architecture.

    switches = make_switchable(model, plan)     # before the optimizer is built
    switches["encoder.layer.0.attention.self.query"].switch_()   # at that layer's stage
    finalize(model)                             # after the last stage: drop the dense copies for export

This floor imports only torch, ``lit_factor.factorize`` and ``lit_factor.compress.surgery`` (no Lightning).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_factor.compress.surgery import (
    Plan,
    PlanEntry,
    PlanError,
    build_layer,
    check_linear,
    planned_module,
    relative_error,
    set_module,
    swapped_copy,
)
from lit_factor.factorize import FactorizedLinear, ProjectionStats
from lit_factor.factorize.inits import get_init


class SwitchableLinear(nn.Module):
    """An ``nn.Linear`` that becomes its planned factorized layer when :meth:`switch_` is called.

    Attributes:
        dense: the original ``nn.Linear`` (its weight stops training once switched).
        factorized: the factorized layer of the plan entry (trains from the switch on).
        switched: persistent bool buffer, ``True`` once the factorized path is live.
    """

    def __init__(self, linear: nn.Linear, entry: PlanEntry) -> None:
        super().__init__()
        check_linear(entry, linear)
        self.path = entry.path
        self.init = entry.init
        self.dense = linear
        # An unprojected shell: the projection happens at the stage, from the weights fine-tuned until then.
        self.factorized: FactorizedLinear = build_layer(entry, linear, project=False)
        if linear.bias is not None:
            # One bias Parameter for both paths (named_parameters() lists it once, as dense.bias).
            self.factorized.bias = linear.bias
        self.register_buffer("switched", torch.zeros((), dtype=torch.bool, device=linear.weight.device))
        # Python mirror of the buffer: reading a CUDA buffer in every forward would force a device sync.
        self._is_switched = False

    @property
    def is_switched(self) -> bool:
        return self._is_switched

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._is_switched = bool(self.switched)

    @property
    def in_features(self) -> int:
        return self.dense.in_features

    @property
    def out_features(self) -> int:
        return self.dense.out_features

    @property
    def weight(self) -> Tensor:
        """The live weight: model code written for ``nn.Linear`` reads ``.weight`` (HF T5: ``wo.weight.dtype``)."""
        return self.factorized.weight if self._is_switched else self.dense.weight

    @property
    def live_module(self) -> nn.Module:
        return self.factorized if self.is_switched else self.dense

    @property
    def live_params(self) -> int:
        """Parameters the forward uses now (weights + bias)."""
        return sum(p.numel() for p in self.live_module.parameters())

    def live_parameters(self) -> list[nn.Parameter]:
        return list(self.live_module.parameters())

    def replaced_parameters(self) -> list[nn.Parameter]:
        """Parameters that the forward no longer uses (the dense weight once switched; the factors before)."""
        live = {id(p) for p in self.live_module.parameters()}
        return [p for p in self.parameters() if id(p) not in live]

    @torch.no_grad()
    def switch_(self, stats: ProjectionStats | None = None) -> float | None:
        """Project the current dense weight into the factors (in place: the optimizer keeps the same
        ``Parameter`` objects) by the entry's ``init`` (``stats`` feeds a data-aware projection) and make the
        factorized path live. Returns the relative Frobenius error of the projection (``None`` for
        ``init="random"`` entries, whose factors keep their random init).

        Deterministic: the projection runs in float64 on the weight's device, so ranks holding identical
        weights compute identical factors (the staging callback also broadcasts them from rank 0 under DDP).
        """
        if self.is_switched:
            raise RuntimeError(f"{self.path}: already switched to its factorized layer")
        error = None
        if get_init(self.init).projects:  # the bias is shared with the dense path: nothing to copy
            self.factorized.project_(self.dense.weight, init=self.init, stats=stats)
            error = relative_error(self.dense.weight, self.factorized)
        # The dense weight is frozen from here on: drop any gradient it still holds (e.g. mid accumulation).
        self.dense.weight.grad = None
        self.switched.fill_(True)
        self._is_switched = True
        return error

    def forward(self, x: Tensor) -> Tensor:
        return self.factorized(x) if self._is_switched else self.dense(x)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, live={'factorized' if self.is_switched else 'dense'}"


def make_switchable(model: nn.Module, plan: Plan) -> dict[str, SwitchableLinear]:
    """Wrap every planned ``nn.Linear`` of ``model`` (in place) in a :class:`SwitchableLinear`, dense path live.

    Returns ``{path: SwitchableLinear}`` in plan order. Idempotent: layers that already are switchable (e.g. built
    by ``configure_model`` before a checkpoint loads) are kept. No factor is projected here: each is projected at
    its stage from the dense weight fine-tuned until then, and checkpoints restore factors and flags by
    ``load_state_dict``.
    """
    switches = {}
    for entry in plan.entries:
        module = planned_module(model, entry)
        if not isinstance(module, SwitchableLinear):
            module = SwitchableLinear(module, entry)
            set_module(model, entry.path, module)
        switches[entry.path] = module
    return switches


def find_switchable(model: nn.Module) -> dict[str, SwitchableLinear]:
    """``{path: SwitchableLinear}`` of ``model`` in module order (paths relative to ``model``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SwitchableLinear)}


def finalize(model: nn.Module, strict: bool = True) -> dict[str, str]:
    """Replace each :class:`SwitchableLinear` in ``model`` by its live layer, dropping the unused copy (export).

    After all stages the model then has exactly the architecture (and ``state_dict`` keys) that
    ``apply_plan(model, plan)`` gives. With ``strict=True`` a layer whose stage never came raises; with
    ``strict=False`` it stays a dense ``nn.Linear``. Returns ``{path: "factorized" | "dense"}``.
    """
    switches = find_switchable(model)
    pending = [p for p, s in switches.items() if not s.is_switched]
    if strict and pending:
        raise PlanError(f"finalize: {len(pending)} planned layers were never switched (first: {pending[0]}); "
                        "finish the staging or pass strict=False to keep them dense")
    result = {}
    for path, switch in switches.items():
        set_module(model, path, switch.live_module)
        result[path] = "factorized" if switch.is_switched else "dense"
    return result


# --- copies of a model (all through surgery.swapped_copy) -------------------------------------------------------
def dense_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every switchable layer replaced by its dense ``nn.Linear`` (a staged run's teacher:
    the dense model as fine-tuned so far, whatever has been switched since)."""
    return swapped_copy(model, lambda m: m.dense if isinstance(m, SwitchableLinear) else None)


def live_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` as it would be exported now: every switchable layer replaced by its live path."""
    return swapped_copy(model, lambda m: m.live_module if isinstance(m, SwitchableLinear) else None)


def dense_equivalent(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every factorized (or switchable) layer replaced by the dense ``nn.Linear`` it
    represents: same weights up to the factorization's rounding, same device and dtype -- the fair baseline of a
    latency comparison and the ``dense`` export."""
    def dense_of(module: nn.Module) -> nn.Module | None:
        live = module.live_module if isinstance(module, SwitchableLinear) else module
        if isinstance(live, FactorizedLinear):
            return live.to_linear()
        return live if live is not module else None

    return swapped_copy(model, dense_of)
