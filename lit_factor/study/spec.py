"""A study file: a base recipe, grid axes over config keys, and seeds (format: docs/studies/README.md).

.. code-block:: yaml

    name: claim1                         # default: the file's stem
    base: configs/quickstart_minilm_sst2.yaml   # one recipe or a list (each becomes a --config)
    args: {trainer.max_epochs: 1}        # fixed overrides for every trial (dotted config keys)
    stability: {factor: 10.0}            # optional: append a StabilityMonitor judging the task's dev metric
    axes:
      data.task: [sst2, rte]             # a list: each value is passed as --data.task <value>
      compression:                       # a mapping: named options, each a bundle of overrides
        dense: {model.factorization.method: none}
        lowrank-25: {model.factorization.method: lowrank, model.factorization.budget: 0.25}
        staged: {config: configs/x.yaml, callbacks: [{class_path: ..., init_args: {...}}]}
    seeds: [1, 2, 3]                     # each becomes --seed_everything <seed>
    exclude:                             # grid cells not to run (every listed axis matches; a list: any of)
      - {compression: dense, data.task: rte}
    retries: 1                           # a crashed trial is retried this many times
    keep_checkpoints: false              # delete each trial's checkpoints/ when it ends
    command: [python, cli.py, fit]       # default: this checkout's cli.py fit, with the running Python
    variants:                            # --variant full: these top-level keys replace (args/axes: update) the above
      full: {args: {data.max_train_samples: null}, seeds: [1, 2, 3, 4, 5]}
      lowrank: {axes: {compression: [lowrank-25]}}   # a list of a named axis's options selects them
    report_with: [claim1-pilot]          # report these studies' trials in one table with this one's (same
                                         # base, args and axis names: a study that adds cells to another)

Inside a bundle (and ``args``) two keys are special: ``config`` (a path or list of paths: extra ``--config``
files, given right after the base) and ``callbacks`` (a list of ``{class_path, init_args}``: each appended with
``--trainer.callbacks+=``). Every other key is a dotted config key passed as ``--key value``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lit_factor.errors import UserError

SEED = "seed"
_KEYS = {"name", "base", "args", "stability", "axes", "seeds", "variants", "retries", "keep_checkpoints", "command",
         "exclude", "report_with"}
_SPECIAL = ("config", "callbacks")
_SCALAR = (str, int, float, bool, type(None))


@dataclass
class StudySpec:
    """A parsed study file. ``axes`` maps an axis name to its values (list) or named option bundles (dict)."""

    name: str
    base: list[str]
    axes: dict[str, list | dict[str, dict]]
    seeds: list[int]
    args: dict[str, Any] = field(default_factory=dict)
    stability: dict[str, Any] | None = None
    retries: int = 1
    keep_checkpoints: bool = False
    command: list[str] | None = None  # the fit command; None: ``python cli.py fit`` of this checkout
    exclude: list[dict[str, list]] = field(default_factory=list)  # cells left out: axis -> the values that match
    report_with: list[str] = field(default_factory=list)  # studies reported in one table with this one (not run)
    source: str | None = None

    # --- the grid ------------------------------------------------------------------------------------------------
    def search_space(self) -> dict[str, list]:
        """Optuna GridSampler search space: every axis (option names for bundles) plus the seeds."""
        space = {axis: list(values) for axis, values in self.axes.items()}
        space[SEED] = list(self.seeds)
        return space

    def cells(self) -> list[dict[str, Any]]:
        """Every grid cell (axis -> value) the study runs, seeds and ``exclude``d cells left out, in file order."""
        cells: list[dict[str, Any]] = [{}]
        for axis, values in self.axes.items():
            cells = [{**c, axis: v} for c in cells for v in values]
        return [c for c in cells if not excluded(self.exclude, c)]

    def settings(self) -> dict[str, Any]:
        """Everything that shapes a trial's command besides its grid point (compared on resume)."""
        settings = {"base": self.base, "args": self.args, "axes": self.axes, "stability": self.stability,
                    "command": self.command}
        return {**settings, "exclude": self.exclude} if self.exclude else settings  # absent: as older studies

    def size(self) -> int:
        return len(self.cells()) * len(self.seeds)

    # --- one trial's command line ----------------------------------------------------------------------------------
    def bundles(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """The override bundles of one trial: fixed ``args``, then one per axis (in file order)."""
        out = [self.args]
        for axis, values in self.axes.items():
            value = params[axis]
            out.append(values[value] if isinstance(values, dict) else {axis: value})
        return out

    def overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """Dotted key -> value of one trial, as passed (later bundles win); ``config``/``callbacks`` left out."""
        merged: dict[str, Any] = {}
        for bundle in self.bundles(params):
            merged.update({k: v for k, v in bundle.items() if k not in _SPECIAL})
        return merged

    def fit_args(self, params: dict[str, Any], task: str | None = None) -> list[str]:
        """``fit`` arguments of one trial: configs first (so that keys override them), then keys, then callbacks."""
        bundles = self.bundles(params)
        args = [a for path in self.base for a in ("--config", path)]
        args += [a for b in bundles for path in _as_list(b.get("config")) for a in ("--config", path)]
        args += [a for key, value in self.overrides(params).items() for a in (f"--{key}", cli_value(value))]
        callbacks = [cb for b in bundles for cb in _as_list(b.get("callbacks"))]
        if self.stability is not None:
            monitor = {"monitor": monitor_of(task)} if task else {}
            callbacks.append({"class_path": "lit_factor.callbacks.StabilityMonitor",
                              "init_args": {**monitor, **self.stability}})
        args += [f"--trainer.callbacks+={json.dumps(cb)}" for cb in callbacks]
        return args + ["--seed_everything", str(params[SEED])]

    def task_of(self, params: dict[str, Any]) -> str | None:
        """The trial's GLUE task: its ``data.task`` override, else the base recipes' (last one wins)."""
        task = self.overrides(params).get("data.task")
        if task is not None:
            return str(task)
        for path in reversed(self.base):
            found = (_read_yaml(Path(path)).get("data") or {}).get("task")
            if found:
                return str(found)
        return None


def excluded(rules: list[dict[str, list]], params: dict[str, Any]) -> bool:
    """Whether a grid point matches one of the ``exclude`` rules (every axis a rule names has one of its values)."""
    return any(all(params.get(axis) in values for axis, values in rule.items()) for rule in rules)


def cli_value(value: Any) -> str:
    """A YAML value as jsonargparse reads it from the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def monitor_of(task: str) -> str:
    from lit_factor.train.data import get_task  # imported late: it pulls in datasets/transformers

    return get_task(task).monitor


def cell_label(params: dict[str, Any]) -> str:
    """``axis=value axis=value`` of a trial's grid cell (seed left out)."""
    return " ".join(f"{k}={v}" for k, v in params.items() if k != SEED)


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, list | tuple) else [value]


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: no such file (paths in a study file are relative to the current directory)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


# --- reading and checking a study file ---------------------------------------------------------------------------
def load_spec(path: str | Path, variant: str | None = None) -> StudySpec:
    """Parse and check a study file; ``variant`` applies one entry of its ``variants`` section."""
    path = Path(path)
    data = _read_yaml(path)
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_KEYS))}")
    variants = data.pop("variants", None) or {}
    name = str(data.get("name") or path.stem)
    if variant is not None:
        if variant not in variants:
            raise UserError(f"{path}: variant={variant!r} not found; allowed: {', '.join(variants) or '(none)'}")
        data = _apply_variant(data, variants[variant], f"{path}: variants.{variant}")
        name = f"{name}-{variant}"
    where = str(path)
    spec = StudySpec(name=name, base=_strings(data.get("base"), f"{where}: base"),
                     axes=_axes(data.get("axes"), where), seeds=_seeds(data.get("seeds"), where),
                     args=_bundle(data.get("args") or {}, f"{where}: args"),
                     stability=_stability(data.get("stability"), where),
                     retries=int(data.get("retries", 1)), keep_checkpoints=bool(data.get("keep_checkpoints", False)),
                     command=_strings(data["command"], f"{where}: command") if data.get("command") else None,
                     report_with=_names(data.get("report_with"), f"{where}: report_with"), source=where)
    spec.exclude = _exclude(data.get("exclude"), spec.axes, where)
    if not spec.cells():
        raise UserError(f"{where}: exclude leaves no grid cell to run")
    for base in spec.base:
        _read_yaml(Path(base))
    return spec


def _apply_variant(data: dict, variant, where: str) -> dict:
    if not isinstance(variant, dict) or set(variant) - (_KEYS - {"variants", "name"}):
        raise UserError(f"{where}: expected a mapping of study keys (base, args, axes, seeds, ...)")
    out = dict(data)
    for key, value in variant.items():
        merge = key in ("args", "axes") and isinstance(value, dict)
        out[key] = {**(data.get(key) or {}), **value} if merge else value
    if isinstance(variant.get("axes"), dict):
        out["axes"] = {axis: _select(data.get("axes"), axis, values, where)
                       for axis, values in out["axes"].items()}
        if "exclude" not in variant:  # the study's rules, less what they say of the options left out
            out["exclude"] = _narrow(data.get("exclude"), data.get("axes") or {}, out["axes"])
    return out


def _narrow(rules, before: dict, after: dict) -> list:
    """``exclude`` rules for a variant that selected options of named axes: a selected axis keeps the rule's values
    still in it; a rule left with none can no longer match and is dropped. A name that is no option of the study's
    axis at all stays, so that ``_exclude`` refuses it as it would in the study itself."""
    out = []
    for rule in _as_list(rules):
        if not isinstance(rule, dict):
            out.append(rule)  # malformed: _exclude says so
            continue
        kept = dict(rule)
        for axis, values in rule.items():
            if isinstance(before.get(axis), dict) and isinstance(after.get(axis), dict) and before[axis] != after[axis]:
                kept[axis] = [v for v in _as_list(values) if v in after[axis] or v not in before[axis]]
        if all(kept.values()):
            out.append(kept)
    return out


def _select(axes, axis: str, values, where: str):
    """A variant's axis given as a list of option *names* of the study's named-options axis selects those options
    (``task: [mrpc]``), so that a one-task variant does not restate the task's bundle."""
    options = (axes or {}).get(axis) if isinstance(axes, dict) else None
    if not isinstance(options, dict) or not isinstance(values, list):
        return values
    unknown = [v for v in values if v not in options]
    if unknown:
        raise UserError(f"{where}: axes.{axis}: option(s) {', '.join(map(repr, unknown))} not in the study's "
                        f"axis; allowed: {', '.join(options)}")
    return {name: options[name] for name in values}


def _strings(value, where: str) -> list[str]:
    items = _as_list(value)
    if not items or not all(isinstance(v, str) for v in items):
        raise UserError(f"{where}: expected a config path or a list of them, got {value!r}")
    return items


def _names(value, where: str) -> list[str]:
    names = _as_list(value)
    if not all(isinstance(v, str) and v for v in names):
        raise UserError(f"{where}: expected a study name or a list of them, got {value!r}")
    return names


def _seeds(value, where: str) -> list[int]:
    seeds = _as_list(value)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise UserError(f"{where}: seeds: expected a list of distinct integers, got {value!r}")
    return seeds


def _stability(value, where: str) -> dict | None:
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: stability: expected StabilityMonitor arguments (a mapping) or true")
    return dict(value)


def _bundle(value, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping of dotted config keys to values, got {value!r}")
    for key, item in value.items():
        if key == "callbacks" and not all(isinstance(c, dict) and "class_path" in c for c in _as_list(item)):
            raise UserError(f"{where}: callbacks: expected a list of {{class_path, init_args}} mappings")
        if key == "config":
            _strings(item, f"{where}: config")
    return dict(value)


def _axes(value, where: str) -> dict[str, list | dict]:
    if not isinstance(value, dict) or not value:
        raise UserError(f"{where}: axes: expected a mapping of axis name to a list of values or named options")
    axes: dict[str, list | dict] = {}
    for axis, values in value.items():
        at = f"{where}: axes.{axis}"
        if axis == SEED:
            raise UserError(f"{at}: 'seed' is reserved; list seeds under 'seeds'")
        if isinstance(values, dict) and values:
            axes[axis] = {str(k): _bundle(v or {}, f"{at}.{k}") for k, v in values.items()}
        elif isinstance(values, list) and values and all(isinstance(v, _SCALAR) for v in values):
            if len(set(map(repr, values))) != len(values):
                raise UserError(f"{at}: values repeat: {values!r}")
            axes[axis] = list(values)
        else:
            raise UserError(f"{at}: expected a non-empty list of scalar values or a mapping of named options, "
                            f"got {values!r}")
    return axes


def _exclude(value, axes: dict[str, list | dict], where: str) -> list[dict[str, list]]:
    """``exclude``: a list of {axis: value or list of values}; every axis and value must be in the grid."""
    rules = []
    for i, rule in enumerate(_as_list(value)):
        at = f"{where}: exclude[{i}]"
        if not isinstance(rule, dict) or not rule:
            raise UserError(f"{at}: expected a mapping of axis name to a value or a list of values, got {rule!r}")
        for axis, values in rule.items():
            if axis not in axes:
                raise UserError(f"{at}: axis={axis!r} is not in the grid; axes: {', '.join(axes)}")
            allowed = list(axes[axis])
            bad = [v for v in _as_list(values) if v not in allowed]
            if bad or not _as_list(values):
                raise UserError(f"{at}: {axis}={bad[0] if bad else values!r} is not a value of that axis; "
                                f"allowed: {', '.join(map(str, allowed))}")
        rules.append({axis: _as_list(values) for axis, values in rule.items()})
    return rules
