"""The per-task Markdown tables of a study report (mean ± sd (n) per grid cell), from trial rows: the rows of a live
study (report.py) or of a committed trials.csv (publish.py) alike."""

from __future__ import annotations

import math

from lit_factor.study.stats import fmt_stat, mean_sd  # noqa: F401  (mean_sd: part of this module's interface)


def _numbers(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if isinstance(r.get(key), int | float) and not math.isnan(float(r[key]))]


def cell_groups(rows: list[dict], axes: list[str]) -> dict[str, dict[str, list[dict]]]:
    """task -> cell label (every axis but the task) -> finished rows (succeeded or failed)."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        if r["verdict"] not in ("succeeded", "failed"):
            continue
        label = " ".join(f"{a.removesuffix(' (axis)')}={r[a]}" for a in axes
                         if a not in ("data.task", "task (axis)")) or "(all)"
        groups.setdefault(str(r.get("task")), {}).setdefault(label, []).append(r)
    return groups


def task_tables(rows: list[dict], axes: list[str], success=None) -> str:
    """A Markdown table per task: per cell the final and best dev metric, success rate, kept fraction, speedup.
    ``success``: what counts as a succeeded run (default: the fit's verdict; docs/results.md also asks that it
    beat the majority class on accuracy, lit_factor/study/claims.py ``succeeded``)."""
    success = success or (lambda r: r["verdict"] == "succeeded")
    out = []
    for task, cells in cell_groups(rows, axes).items():
        monitor = next((r["monitor"] for rs in cells.values() for r in rs if r.get("monitor")), "dev metric")
        # "before training": the dev metric of a full sanity check (right after an all-at-once projection)
        start = any(_numbers(rs, "at_start") for rs in cells.values())
        out += [f"#### {task} ({monitor}, final and best epoch: mean ± sd (n))", "",
                "| cell | " + ("before training | " if start else "") +
                "final | best | succeeded | kept (targeted) | kept (model) | speedup | train s |",
                "|---|---|---|---|---|---|---|---|" + ("---|" if start else "")]
        for label, rs in cells.items():
            ok = sum(bool(success(r)) for r in rs)
            stats = [fmt_stat(_numbers(rs, key), digits) for key, digits in
                     (("kept_fraction", 3), ("model_kept_fraction", 3), ("latency_speedup", 2), ("train_time_s", 0))]
            first = f"{fmt_stat(_numbers(rs, 'at_start'))} | " if start else ""
            out.append(f"| {label} | {first}{fmt_stat(_numbers(rs, 'final'))} | {fmt_stat(_numbers(rs, 'best'))} | "
                       f"{ok}/{len(rs)} | " + " | ".join(stats) + " |")
        out.append("")
    return "\n".join(out)


