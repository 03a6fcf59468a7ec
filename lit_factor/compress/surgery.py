"""Model surgery: find the target linears of a Hugging Face model, plan their factorization, apply the plan.

The **plan** is the single source of truth for a factorized architecture. It is plain JSON (one entry per
targeted module: path, method, shape, bias, structure, init; parameter counts are derived from the structure's
formula), goes into hyperparameters and checkpoints, and rebuilds the factorized model before its weights load
(``apply_plan(project=False)``). Structures are looked up by method name in :data:`lit_factor.factorize.METHODS`
only (:func:`layer_class`); nothing here knows a particular structure.

    plan = build_plan(model, method="lowrank", budget=0.5)
    errors = apply_plan(model, plan)           # project the current weights; relative Frobenius errors
    print(format_report(model, plan, errors))
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lit_factor.factorize import METHODS, BudgetError, FactorizedLinear, ProjectionStats, check_saves
from lit_factor.factorize.inits import get_init

# Module-name regular expressions (``re.search`` on the dotted path) of the linears factorized by default:
# attention Q/K/V/O and the FFN in/out of every transformer block. Never embeddings, pooler or classifier.
_BERT_LIKE = (r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
              r"|intermediate\.dense|output\.dense)$")
TARGET_PRESETS: dict[str, list[str]] = {
    "bert": [_BERT_LIKE],
    "roberta": [_BERT_LIKE],
    "t5": [
        r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.(q|k|v|o)$",
        r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.DenseReluDense\.(wi|wi_0|wi_1|wo)$",
    ],
    # MPNet names attention q/k/v/o itself (``attention.attn.q``); its FFN is named like BERT's
    "mpnet": [r"encoder\.layer\.\d+\.(attention\.attn\.(q|k|v|o)|intermediate\.dense|output\.dense)$"],
}
# Other BERT-shaped families share the preset.
for _family in ("distilroberta", "xlm-roberta", "camembert", "electra", "ernie", "megatron-bert"):
    TARGET_PRESETS.setdefault(_family, [_BERT_LIKE])
#: Fallback for architectures without a preset: every nn.Linear except these.
_NEVER_BY_DEFAULT = re.compile(r"(classifier|classification_head|pooler|embed|lm_head|score|qa_outputs)")


class PlanError(ValueError):
    """A plan that does not fit the model (no targets, wrong shapes, unknown method)."""


def layer_class(method: str) -> type[FactorizedLinear]:
    """The structure registered as ``method`` in :data:`~lit_factor.factorize.METHODS`."""
    try:
        return METHODS[method]
    except KeyError:
        raise PlanError(f"method={method!r} is not one of {', '.join(METHODS)}") from None


#: Keys that plans written before the counts were derived still carry; ignored when read.
_DERIVED_KEYS = ("params_dense", "params_factorized")


@dataclass
class PlanEntry:
    """How one ``nn.Linear`` is factorized. Parameter counts are derived from the structure's formula."""

    path: str
    method: str
    out_features: int
    in_features: int
    bias: bool
    structure: dict  # keyword arguments of the layer class, e.g. {"rank": r} or {"nblocks": b, "rank": R}
    init: str = "svd"  # one of the structure's INITS: a projection of the dense weight, or "random"

    @classmethod
    def from_dict(cls, data: dict) -> PlanEntry:
        return cls(**{k: v for k, v in data.items() if k not in _DERIVED_KEYS})

    @property
    def bias_params(self) -> int:
        return self.out_features if self.bias else 0

    @property
    def params_dense(self) -> int:
        """Weights + bias of the ``nn.Linear``."""
        return self.out_features * self.in_features + self.bias_params

    @property
    def params_factorized(self) -> int:
        """Weights + bias of the factorized layer (the structure's ``param_count`` plus the bias)."""
        weights = layer_class(self.method).param_count(self.out_features, self.in_features, **self.structure)
        return weights + self.bias_params


@dataclass
class Plan:
    """The factorization of a whole model. ``budget`` is the requested kept fraction of targeted weights."""

    method: str
    budget: float | None
    entries: list[PlanEntry] = field(default_factory=list)

    # --- JSON round trip -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"method": self.method, "budget": self.budget, "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        return cls(data["method"], data.get("budget"), [PlanEntry.from_dict(e) for e in data["entries"]])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    # --- summary numbers -------------------------------------------------------------------------------
    @property
    def paths(self) -> list[str]:
        return [e.path for e in self.entries]

    @property
    def params_dense(self) -> int:
        return sum(e.params_dense for e in self.entries)

    @property
    def params_factorized(self) -> int:
        return sum(e.params_factorized for e in self.entries)

    @property
    def bias_params(self) -> int:
        return sum(e.bias_params for e in self.entries)

    @property
    def kept_fraction(self) -> float:
        """Kept fraction of the targeted layers' weights (the budget's unit; biases excluded)."""
        dense = self.params_dense - self.bias_params
        return (self.params_factorized - self.bias_params) / dense if dense else 1.0

    def factorized_model_params(self, dense_model_params: int) -> int:
        """Whole-model parameters once every planned layer of a ``dense_model_params`` model is factorized."""
        return dense_model_params - self.params_dense + self.params_factorized


def target_patterns(model: nn.Module, targets: str | Iterable[str] | None = None) -> list[str]:
    """Resolve ``targets``: None -> the preset of the model's ``config.model_type``; a preset name; or regexes."""
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return TARGET_PRESETS.get(model_type, [])
    if isinstance(targets, str):
        return TARGET_PRESETS.get(targets, [targets])
    return list(targets)


def find_targets(model: nn.Module, targets: str | Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules whose dotted names match ``targets`` (see :func:`target_patterns`)."""
    patterns = target_patterns(model, targets)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise PlanError(f"targets pattern {pattern!r} is not a valid regular expression: {err}") from None
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, FactorizedLinear):
            continue
        if patterns:
            if any(re.search(p, name) for p in patterns):
                found[name] = module
        elif not _NEVER_BY_DEFAULT.search(name):
            found[name] = module
    if not found:
        raise PlanError(f"targets {patterns or 'default'} match no nn.Linear in {type(model).__name__}")
    return found


def build_plan(model: nn.Module, method: str, budget: float | None = 0.5, *,
               targets: str | Iterable[str] | None = None, nblocks: int = 4, rank: int | None = None,
               rank_multiple: int = 1, init: str = "svd", structures: Mapping[str, dict] | None = None) -> Plan:
    """Plan the factorization of every target linear of ``model``.

    Args:
        method: a key of :data:`~lit_factor.factorize.METHODS` (``lowrank``, ``monarch``, ``blockwise``).
        budget: kept fraction of each targeted layer's weights, in (0, 1]. ``None`` with an explicit
            ``rank`` (or the structure's default, e.g. min(m, n) / b^2 per block for Monarch/block-wise).
        targets: a preset name (``bert``, ``roberta``, ``t5``, ``mpnet``), a regex, or a list of regexes on module
            names;
            ``None`` picks the preset of ``model.config.model_type``.
        nblocks: blocks b for the block structures (Monarch, block-wise low rank).
        rank: fixed rank (low rank) or per-block rank (Monarch, block-wise) instead of a budget.
        rank_multiple: round ranks down to this multiple (8 or 64 on GPUs).
        init: a registered init the structure takes (:mod:`lit_factor.factorize.inits`): ``svd`` projects the
            current dense weights; ``random`` re-initialises the factors.
        structures: per-layer structures by path (e.g. ranks from a global allocation,
            :mod:`lit_factor.factorize.allocation`) replacing the budget's for those layers; each must save weights.
    """
    layer_cls = layer_class(method)
    if init not in layer_cls.inits():
        raise PlanError(f"init={init!r} is not one of {', '.join(map(repr, layer_cls.inits()))} for {method}")
    if budget is not None and rank is not None:
        raise PlanError(f"give a budget or a rank, not both (budget={budget}, rank={rank})")
    entries = []
    for path, linear in find_targets(model, targets).items():
        m, n = linear.out_features, linear.in_features
        try:
            if structures and path in structures:
                structure = dict(structures[path])
                check_saves(layer_cls, m, n, **structure)
            else:
                structure = layer_cls.planned_structure(m, n, budget, rank=rank, nblocks=nblocks,
                                                        rank_multiple=rank_multiple)
        except BudgetError as err:
            raise BudgetError(f"{path}: {err}") from None
        entries.append(PlanEntry(path=path, method=method, out_features=m, in_features=n,
                                 bias=linear.bias is not None, structure=structure, init=init))
    return Plan(method=method, budget=budget, entries=entries)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


@torch.no_grad()
def swapped_copy(model: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """A deep copy of ``model`` in which every submodule for which ``swap(module)`` returns a module is replaced by
    that module (outermost first; a replaced module's children are not visited). ``model`` is left as it is.

    The one copy-and-swap walker: a staged run's dense teacher, the deployed (live) copy, the dense equivalent of a
    factorized model are all ``swapped_copy`` with their own ``swap`` (:mod:`lit_factor.compress.switchable`).
    """
    clone = copy.deepcopy(model)

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            replacement = swap(child)
            if replacement is None:
                visit(child)
            else:
                setattr(parent, name, replacement)

    visit(clone)
    return clone


def planned_module(model: nn.Module, entry: PlanEntry) -> nn.Module:
    """The module at ``entry.path``, or a PlanError naming the path when the model has none."""
    try:
        return model.get_submodule(entry.path)
    except AttributeError:
        raise PlanError(f"plan entry {entry.path!r} is not a module of {type(model).__name__}") from None


def check_linear(entry: PlanEntry, module: nn.Module) -> nn.Linear:
    """``module`` if it is the ``nn.Linear`` that ``entry`` plans for (same shape), else a PlanError."""
    shape = (entry.out_features, entry.in_features)
    if not isinstance(module, nn.Linear) or (module.out_features, module.in_features) != shape:
        found = repr(module) if isinstance(module, nn.Linear) else type(module).__name__
        raise PlanError(f"plan entry {entry.path!r} expects nn.Linear {shape[0]}x{shape[1]}, found {found}")
    return module


def build_layer(entry: PlanEntry, linear: nn.Linear, project: bool = True,
                stats: ProjectionStats | None = None) -> FactorizedLinear:
    """The factorized layer for ``entry``: projected from ``linear`` by the plan's ``init`` (``stats`` for a
    data-aware one; random if the plan says so), or an empty shell of the right shape, dtype and device when
    ``project=False`` (weights come from a checkpoint)."""
    layer_cls = layer_class(entry.method)
    if project:
        return layer_cls.from_linear(linear, init=entry.init, stats=stats, **entry.structure)
    w = linear.weight
    return layer_cls(entry.in_features, entry.out_features, bias=entry.bias, device=w.device, dtype=w.dtype,
                     **entry.structure)


def relative_error(dense: torch.Tensor, layer: FactorizedLinear) -> float:
    """||W - W_hat||_F / ||W||_F of a projection."""
    w = dense.detach().to(torch.float64)
    diff = w - layer.to_dense().detach().to(torch.float64)
    return (diff.norm() / w.norm().clamp_min(1e-300)).item()


@torch.no_grad()
def apply_plan(model: nn.Module, plan: Plan, project: bool = True,
               stats: Mapping[str, ProjectionStats] | None = None) -> dict[str, float]:
    """Replace every planned ``nn.Linear`` in ``model`` (in place) by its factorized layer.

    ``project=True`` projects the current weights (``stats``: ``{path: ProjectionStats}`` for data-aware
    projections) and returns each projected layer's relative Frobenius error; ``project=False`` builds empty
    shells to ``load_state_dict`` a factorized checkpoint into (returns {}).
    """
    errors = {}
    stats = stats or {}
    for entry in plan.entries:
        linear = check_linear(entry, planned_module(model, entry))
        layer = build_layer(entry, linear, project, stats.get(entry.path))
        if project and get_init(entry.init).projects:
            errors[entry.path] = relative_error(linear.weight, layer)
        set_module(model, entry.path, layer)
    return errors


def count_params(model: nn.Module) -> int:
    """The real number of parameters of ``model`` (each shared ``Parameter`` once)."""
    return sum(p.numel() for p in model.parameters())


def format_report(model: nn.Module, plan: Plan, errors: dict[str, float] | None = None,
                  dense_model_params: int | None = None, *, staged: bool = False) -> str:
    """A table of every planned layer (structure, params before/after, relative error) and the totals.

    ``model`` is the factorized model; the dense whole-model count is derived from the plan unless given. With
    ``staged=True`` the model holds switchable layers (dense weights and factors side by side): the whole-model
    line then reports the final architecture, once every stage has switched.
    """
    errors = errors or {}
    rows = [("layer", "method", "shape", "structure", "dense", "factorized", "kept", "rel. error")]
    for e in plan.entries:
        struct = ",".join(f"{k}={v}" for k, v in e.structure.items())
        err = f"{errors[e.path]:.4f}" if e.path in errors else "-"
        rows.append((e.path, e.method, f"{e.out_features}x{e.in_features}", struct, f"{e.params_dense:,}",
                     f"{e.params_factorized:,}", f"{e.params_factorized / e.params_dense:.1%}", err))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    rule = "-" * len(lines[0])
    budget = f"budget {plan.budget}" if plan.budget is not None else "fixed structure"
    lines = [lines[0], rule, *lines[1:], rule,
             f"targeted layers: {len(plan.entries)} ({plan.method}, {budget}); "
             f"weights kept: {plan.kept_fraction:.1%} of targeted linear weights",
             f"targeted params (incl. bias): {plan.params_dense:,} -> {plan.params_factorized:,} "
             f"({plan.params_factorized / max(plan.params_dense, 1):.1%})",
             _whole_model_line(model, plan, dense_model_params, staged)]
    if errors:
        vals = list(errors.values())
        lines.append(f"relative Frobenius error: mean {sum(vals) / len(vals):.4f}, max {max(vals):.4f}")
    return "\n".join(lines)


def _whole_model_line(model: nn.Module, plan: Plan, dense_model_params: int | None, staged: bool) -> str:
    now = count_params(model)
    if staged:  # switchable layers: every dense parameter plus the factors' weights (the bias is shared)
        dense = dense_model_params or now - (plan.params_factorized - plan.bias_params)
        final = plan.factorized_model_params(dense)
        return f"whole model params: {dense:,} -> {final:,} ({final / max(dense, 1):.1%}) once every stage has switched"
    dense = dense_model_params or now + plan.params_dense - plan.params_factorized
    return f"whole model params: {dense:,} -> {now:,} ({now / max(dense, 1):.1%})"
