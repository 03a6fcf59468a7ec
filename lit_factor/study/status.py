"""Where a study stands: one state per grid point (cell x seed), counted per cell, and a progress bar with ETA."""

from __future__ import annotations

from collections import Counter

import optuna
from optuna.trial import FrozenTrial, TrialState

from lit_factor.study.spec import SEED, cell_label, excluded

#: states of a grid point, in the order printed
STATES = ("succeeded", "failed", "errored", "running", "queued")


def grid_points(study: optuna.Study) -> dict[tuple, list[FrozenTrial]]:
    """Every grid point (tuple of values in search-space order) -> its trials, oldest first; duplicates and the
    study file's ``exclude``d cells left out."""
    space = study.user_attrs["search_space"]
    rules = (study.user_attrs.get("settings") or {}).get("exclude") or []
    keys = [()]
    for values in space.values():
        keys = [k + (v,) for k in keys for v in values]
    points: dict[tuple, list[FrozenTrial]] = {
        k: [] for k in keys if not excluded(rules, dict(zip(space, k, strict=True)))}
    for t in study.get_trials(deepcopy=False):
        if "duplicate_of" in t.user_attrs or "excluded" in t.user_attrs or set(t.params) != set(space):
            continue
        points.setdefault(tuple(t.params[a] for a in space), []).append(t)
    return points


def point_state(trials: list[FrozenTrial]) -> str:
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        return "succeeded" if complete[-1].user_attrs.get("verdict") == "succeeded" else "failed"
    states = {t.state for t in trials}
    if TrialState.RUNNING in states:
        return "running"
    if TrialState.WAITING in states or not trials:
        return "queued"
    return "errored"


def final_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The trial that stands for a grid point: its latest complete one, else its latest one."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    return (complete or trials or [None])[-1]


def counts(study: optuna.Study) -> Counter:
    return Counter(point_state(ts) for ts in grid_points(study).values())


def cell_table(study: optuna.Study) -> str:
    """``study status``: states per grid cell (seeds counted), then the totals."""
    axes = [a for a in study.user_attrs["search_space"] if a != SEED]
    per_cell: dict[str, Counter] = {}
    for key, trials in grid_points(study).items():
        params = dict(zip(study.user_attrs["search_space"], key, strict=True))
        per_cell.setdefault(cell_label({a: params[a] for a in axes}), Counter())[point_state(trials)] += 1
    width = max(len(c) for c in per_cell)
    lines = [f"{'cell':<{width}}  " + "  ".join(f"{s:>9}" for s in STATES)]
    lines += [f"{c:<{width}}  " + "  ".join(f"{n[s]:>9}" for s in STATES) for c, n in per_cell.items()]
    total = sum(per_cell.values(), Counter())
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{total[s]:>9}" for s in STATES))
    return "\n".join(lines)


def progress(c: Counter, elapsed: float, finished_here: int, width: int = 30) -> str:
    """``[#####.....] 12/24 finished (3 failed, 0 errored), 2 running, 14 min, ETA 15 min``."""
    total = sum(c.values())
    finished = c["succeeded"] + c["failed"] + c["errored"]
    bar = "#" * round(width * finished / total) if total else ""
    eta = "?"
    if finished_here and finished < total:
        eta = f"{elapsed / finished_here * (total - finished) / 60:.0f} min"
    elif finished == total:
        eta = "done"
    return (f"[{bar:.<{width}}] {finished}/{total} finished ({c['failed']} failed, {c['errored']} errored), "
            f"{c['running']} running, {elapsed / 60:.0f} min, ETA {eta}")
