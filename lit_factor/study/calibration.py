"""Where the dense model trains, and the schedule each task is calibrated at.

Issue 21's first finding was that most tasks never trained under the CPU schedules: a comparison of two
factorizations on a task whose dense model sits at the majority class compares two untrained models. Every claim
therefore gates on :func:`lit_factor.study.claims.trained`. This module shows that gate for every study setting
with a dense arm (the task's metric and accuracy, dense minus the majority-class score, with their 95 % intervals),
and picks the **calibrated schedule** of each task from the calibration studies (``studies/calibrate.yaml``, study
names ``calibrate-<task>``): among the schedules (learning rate x epochs) whose dense arm trained, the one with the
largest lower bound of the task metric's margin -- the schedule that shows most surely that the task trains --
with fewer epochs, then the smaller learning rate, breaking ties. The rule is fixed before the grid runs, so the
choice is not a winner's pick on the claims it later serves (it looks at dense runs only).
"""

from __future__ import annotations

from dataclasses import dataclass

from lit_factor.study import claims as cl
from lit_factor.study import stats as st

#: a study whose name starts so is a calibration grid (one task per study: calibrate-mrpc, calibrate-cola, ...)
CALIBRATION = "calibrate"
#: the arms of claim 1 on a task that trains (studies/claim1_trained.yaml): dense, and each structure at 50 % and
#: 25 % of the targeted weights, all at once
CLAIM1_ARMS = (("none", None), *((m, b) for b in (0.5, 0.25) for m in ("lowrank", "monarch", "blockwise")))


@dataclass(frozen=True)
class DenseArm:
    setting: tuple  #: claims.SETTING values
    runs: int
    metric: str
    gate: cl.Trained

    def get(self, name: str):
        return self.setting[cl.SETTING.index(name)]

    @property
    def study(self) -> str:
        return self.get("section")

    @property
    def margin(self) -> st.Test | None:
        """Dense minus the majority class on the task's metric."""
        return self.gate.tests.get(self.metric)


@dataclass(frozen=True)
class Schedule:
    """A calibrated schedule: what a later grid sets for the task (``final``: its calibration grid finished;
    ``claim1``: the published studies that already hold claim 1's whole grid at it, :func:`claim1_at`)."""
    learning_rate: float
    max_epochs: int
    study: str
    final: bool
    claim1: tuple[str, ...] = ()


def dense_arms(rows: list[dict], majority: dict) -> list[DenseArm]:
    """Every (study, setting) with finished dense runs (distilled ones aside), in study then setting order."""
    dense = [r for r in cl.finished(rows) if r.get("method") == "none" and not cl.distilled(r)]
    out = []
    for setting, runs in sorted(cl.group(dense, cl.SETTING).items(), key=str):
        runs = cl.one_per_seed(runs)
        out.append(DenseArm(setting, len(runs), cl.metric_of(runs[0]), cl.trained(rows, setting, majority)))
    return out


def calibrated(arms: list[DenseArm]) -> dict[str, DenseArm]:
    """task -> its calibrated schedule (see the module doc); tasks whose calibration trained nowhere are absent."""
    best: dict[str, DenseArm] = {}
    for arm in arms:
        if not arm.study.startswith(CALIBRATION) or not arm.gate.ok or arm.margin is None:
            continue
        task, current = arm.get("task"), best.get(arm.get("task"))
        if current is None or _rank(arm) > _rank(current):
            best[task] = arm
    return best


def claim1_at(rows: list[dict], arm: DenseArm) -> list[str]:
    """The studies holding claim 1's whole grid (every arm of :data:`CLAIM1_ARMS`, at least ``MIN_N`` seeds, all
    at once, not distilled) in the setting of the dense arm ``arm`` (its task, training set, epochs and rate):
    claims compare arms within one study, so one study must hold them all."""
    where = {name: arm.get(name) for name in cl.SETTING if name != "section"}
    seeds: dict[str, dict[tuple, set]] = {}
    for r in cl.finished(rows):
        if all(r.get(k) == v for k, v in where.items()) and not r.get("staged") and not cl.distilled(r):
            seeds.setdefault(r["section"], {}).setdefault((r.get("method"), r.get("budget")), set()).add(r.get("seed"))
    return sorted(study for study, arms in seeds.items()
                  if all(len(arms.get(a, ())) >= st.MIN_N for a in CLAIM1_ARMS))


def _rank(arm: DenseArm) -> tuple:
    return arm.margin.low, -(arm.get("max_epochs") or 0), -(arm.get("learning_rate") or 0)


def _trained(arm: DenseArm) -> str:
    if arm.gate.ok:
        return "yes"
    tested = [t for t in arm.gate.tests.values() if t.n[0] >= st.MIN_N]
    return "no" if tested and any(not t.low > 0 for t in tested) else f"fewer than {st.MIN_N} runs"


def _num(value) -> str:
    return "–" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _fmt(t: st.Test | None) -> str:
    if t is None:
        return "–"
    return f"{t.effect:+.4f} [{t.low:+.4f}, {t.high:+.4f}]" if t.low == t.low else f"{t.effect:+.4f}"


def section(rows: list[dict], majority: dict, unfinished: set[str] = frozenset()) -> str:
    """The generated 'Where the dense model trains' section of docs/results.md; a choice made from a calibration
    study in ``unfinished`` (grid points not yet run) is marked provisional: a schedule still to come may win."""
    arms = dense_arms(rows, majority)
    chosen = calibrated(arms)
    lines = ["## Where the dense model trains", "",
             "Every study setting with a dense arm: dense minus the majority-class score on the task's metric and on "
             "accuracy (95 % interval, one-sample t). A task *trained* when both intervals lie above zero; only then "
             "do its comparisons count (every claim above). The calibration grids (`studies/calibrate.yaml`, "
             "studies `calibrate-<task>`) pick each task's schedule: among those that trained, the largest lower "
             "bound on the task's metric (fewer epochs, then the smaller learning rate, breaking ties); "
             "`lit_factor/study/calibration.py` says why.", ""]
    if chosen:
        lines += ["**Calibrated:** " + "; ".join(
            f"{task}: lr {_num(a.get('learning_rate'))}, {_num(a.get('max_epochs'))} epochs (`{a.study}`"
            + (", provisional: its grid is not finished" if a.study in unfinished else "")
            + "; claim 1 at it: " + (", ".join(f"`{s}`" for s in claim1_at(rows, a)) or "not run yet") + ")"
            for task, a in sorted(chosen.items())) + ".", ""]
    else:
        lines += ["**Calibrated:** no calibration grid has a schedule that trained yet.", ""]
    lines += ["| study | task | train examples | epochs | lr | dense runs | metric: dense - majority | "
              "accuracy: dense - majority | trained |", "|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        samples = a.get("max_train_samples")
        mark = "**yes** (calibrated)" if chosen.get(a.get("task")) is a else _trained(a)
        acc = a.gate.tests.get("accuracy") if a.metric != "accuracy" else None
        cells = [f"`{a.study}`", a.get("task"), "all" if samples is None else samples, _num(a.get("max_epochs")),
                 _num(a.get("learning_rate")), a.runs, f"{a.metric} {_fmt(a.margin)}",
                 _fmt(acc) if a.metric != "accuracy" else "(the metric)", mark]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
