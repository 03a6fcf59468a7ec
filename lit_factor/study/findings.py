"""What a study's numbers say about the seed paper's claims, in generated sentences (no hand-typed numbers).

Each check runs only when the study holds the comparison it needs, and says *reproduced* (holds in every
comparison the study made), *not reproduced* (in none) or *mixed*, with the numbers behind it:

* claim 1, low rank beats Monarch and block-wise low rank at equal parameters: per task and budget, the mean
  final dev metric of low rank's successful runs against the best other structure's;
* claim 2, staging makes compression reliable: per method, budget and data regime, the success rate of staged
  runs against all-at-once runs;
* claim 4, low rank is faster than Monarch: per task and budget, the mean measured inference speedup;
* the compression goal (studies with a ``recipe`` axis, studies/compress.yaml): per task, structure and budget, the
  best recipe's mean final dev metric against the dense model trained the same way, within 1 point at 50 % kept
  and 2 points at 25 %.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from lit_factor.study.figures import regime
from lit_factor.study.report import fmt_stat


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), int | float)]
    return statistics.fmean(values) if values else None


def _verdict(wins: int, total: int) -> str:
    return "reproduced" if wins == total else "not reproduced" if wins == 0 else "mixed"


def _by(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r.get(k) for k in keys)].append(r)
    return groups


def _lowrank_vs_others(rows: list[dict], key: str, what: str) -> tuple[int, int, list[str]]:
    """Per (task, budget): low rank's mean ``key`` against the best other structure's: (wins, comparisons, lines)."""
    lines, wins, total = [], 0, 0
    for (task, budget), group in sorted(_by(rows, "task", "budget").items(), key=str):
        means = {m: _mean(rs, key) for (m,), rs in _by(group, "method").items()}
        means = {m: v for m, v in means.items() if v is not None and m != "none"}
        if "lowrank" not in means or len(means) < 2:
            continue
        other = max((m for m in means if m != "lowrank"), key=means.get)
        total += 1
        wins += means["lowrank"] > means[other]
        by_method = _by(group, "method")
        lows, others = ([r[key] for r in by_method[(m,)] if isinstance(r.get(key), int | float)]
                        for m in ("lowrank", other))
        lines.append(f"  - {task}, budget {budget}: low rank {fmt_stat(lows)} vs {other} {fmt_stat(others)} "
                     f"({what}, mean ± sd (n))")
    return wins, total, lines


def _tally(wins: int, total: int) -> str:
    return f"{wins} of {total} comparisons; **{_verdict(wins, total)}**"


def _failed_lines(flat: list[dict]) -> list[str]:
    """Per task with failed runs: how many, and the same comparison counting them (not part of the verdict).

    A run that ends below the majority baseline by the task's metric (MRPC's F1, say) still holds a trained
    classifier, so the comparison over every run is worth reading; it cannot count, since a structure that fails
    more often would be judged by its failures."""
    lines = []
    for (task,), rs in sorted(_by(flat, "task").items(), key=str):
        n_failed = sum(r["verdict"] == "failed" for r in rs)
        if not n_failed:
            continue
        lines.append(f"  - {task}: {n_failed} of {len(rs)} runs failed (diverged or ended at or below the majority "
                     "baseline) and are left out")
        wins, total, cells = _lowrank_vs_others(rs, "final", "final dev metric, failed runs included")
        if total:
            lines.append(f"    - counting them (not in the verdict): low rank ahead in {wins} of {total} comparisons")
            lines += ["    " + line for line in cells]
    return lines


def claim1(rows: list[dict]) -> list[str]:
    """Compared over runs that succeeded: a run ending at the majority baseline measures no structure."""
    flat = [r for r in rows if r["verdict"] in ("succeeded", "failed") and not r.get("staged")]
    wins, total, lines = _lowrank_vs_others([r for r in flat if r["verdict"] == "succeeded"], "final",
                                            "final dev metric")
    failed = _failed_lines(flat)
    if not total:
        return ["- **Claim 1:** no task and budget with successful runs of low rank and another structure",
                *failed] if failed else []
    return ["- **Claim 1, low rank beats Monarch and block-wise at equal parameters** (runs that succeeded): "
            "low rank ahead in " + _tally(wins, total), *lines, *failed]


def claim2(rows: list[dict]) -> list[str]:
    # staging alone: a distilled staged run (the one-run compress recipe) differs from all-at-once in more than that
    rows = [r for r in rows if r["verdict"] in ("succeeded", "failed") and r.get("method") not in (None, "none")
            and not r.get("teacher")]
    lines, wins, losses, total = [], 0, 0, 0
    for (method, budget, lr), group in sorted(_by(rows, "method", "budget", "learning_rate").items(), key=str):
        for data in sorted({regime(r) for r in group}):
            sel = [r for r in group if regime(r) == data]
            staged, flat = [r for r in sel if r.get("staged")], [r for r in sel if not r.get("staged")]
            if not staged or not flat:
                continue
            rate = [sum(r["verdict"] == "succeeded" for r in rs) / len(rs) for rs in (staged, flat)]
            line = (f"  - {method} {budget}, lr {lr}, {data}: staged {rate[0]:.0%} of {len(staged)} runs "
                    f"succeeded, all at once {rate[1]:.0%} of {len(flat)}")
            if rate == [0, 0]:  # nothing trained either way: the schedule, not staging, decided
                lines.append(line + " (uninformative: no run of either kind trained; not counted)")
                continue
            total += 1
            wins, losses = wins + (rate[0] > rate[1]), losses + (rate[0] < rate[1])
            lines.append(line + f"; final dev metric staged {fmt_stat(_finals(staged))} vs all at once "
                         f"{fmt_stat(_finals(flat))}")
    if not total:
        return ["- **Claim 2, staging makes compression reliable:** no informative comparison", *lines] if lines else []
    verdict = "reproduced" if wins and not losses else "not reproduced" if not wins else "mixed"
    return [f"- **Claim 2, staging makes compression reliable:** staged ahead in {wins}, behind in {losses}, "
            f"equal in {total - wins - losses} of {total} informative comparisons (success rate); **{verdict}**",
            *lines]


def _finals(rows: list[dict], key: str = "final") -> list[float]:
    return [r[key] for r in rows if isinstance(r.get(key), int | float)]


#: the compression goal: the largest drop below dense, per kept fraction (at least this much kept)
GOAL = ((0.5, 0.01), (0.0, 0.02))


def _distilled(row: dict) -> bool:
    """Whether a trial distilled: its recorded teacher; trials recorded before that fact existed (the GPU grid of
    studies/compress.yaml) by the recipe's name, which that file's convention keeps containing "distill"."""
    return row["teacher"] is not None if "teacher" in row else "distill" in str(row.get("recipe"))


def _one_per_seed(rows: list[dict]) -> list[dict]:
    """The dense reference's runs, one per seed: recipes that only change the projection or the allocation leave a
    dense model untouched, so the same seed under two such recipes is the same run twice, not two samples."""
    return list({r.get("seed", id(r)): r for r in rows}.values())


def _recipes_within(by_recipe: dict[str, list[float]], bar: float) -> str:
    """Which of a cell's recipes reach the goal on their own mean (said only when the cell compares several)."""
    measured = {recipe: finals for recipe, finals in by_recipe.items() if finals}
    if len(measured) < 2:
        return ""
    within = [recipe for recipe, finals in measured.items() if statistics.fmean(finals) >= bar]
    return f"; within the goal: {', '.join(within) or 'none'} ({len(within)} of {len(measured)} recipes)"


def compression_goal(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r["verdict"] in ("succeeded", "failed") and r.get("recipe") is not None]
    lines, met, total = [], 0, 0
    for (task,), group in sorted(_by(rows, "task").items(), key=str):
        # the reference: the dense model trained the same epoch without distillation
        reference = _one_per_seed([r for r in group if r.get("method") == "none" and not _distilled(r)])
        dense = _finals(reference)
        if not dense:
            continue
        teacher = _finals(reference, "at_start")  # dense runs start from the teacher: their metric before training
        if teacher:  # the reference moved from the teacher by training alike: the goal's bar depends on which way
            lines.append(f"  - {task}: the teacher scored {statistics.fmean(teacher):.4f} before that training; "
                         f"dense trained alike {fmt_stat(dense)}")
        for (method, budget), cell in sorted(_by(group, "method", "budget").items(), key=str):
            if method in (None, "none"):
                continue
            by_recipe = {recipe: _finals(rs) for (recipe,), rs in _by(cell, "recipe").items()}
            best = max(by_recipe, key=lambda k: statistics.fmean(by_recipe[k]) if by_recipe[k] else -1.0)
            if not by_recipe[best]:
                continue
            allowed = next(drop for kept, drop in GOAL if budget >= kept)
            gap = statistics.fmean(dense) - statistics.fmean(by_recipe[best])
            total, met = total + 1, met + (gap <= allowed)
            plain = f"; svd alone {fmt_stat(by_recipe['svd'])}" if by_recipe.get("svd") else ""
            lines.append(f"  - {task}, {method} {budget:.0%}: best {best} {fmt_stat(by_recipe[best])} vs dense "
                         f"{fmt_stat(dense)}: {100 * abs(gap):.1f} points {'below' if gap > 0 else 'above'} ("
                         f"{'within' if gap <= allowed else 'misses'} the {100 * allowed:.0f}-point goal){plain}"
                         f"{_recipes_within(by_recipe, statistics.fmean(dense) - allowed)}")
    if not total:
        return []
    return [f"- **Compression goal (within 1 point of dense at 50 % kept, 2 points at 25 %):** met in {met} of "
            f"{total} task/structure/budget cells by their best recipe (final dev metric, mean ± sd (n))", *lines]


def claim4(rows: list[dict]) -> list[str]:
    finished = [r for r in rows if r["verdict"] in ("succeeded", "failed")]
    wins, total, lines = _lowrank_vs_others(finished, "latency_speedup", "measured inference speedup over dense")
    settings = sorted({r["latency_setting"] for r in finished if r.get("latency_setting")})
    where = f" (LatencyCallback at the end of each fit: {'; '.join(settings)})" if settings else ""
    return ["- **Claim 4, low rank is faster than Monarch (and block-wise):** low rank faster in " + _tally(wins, total)
            + where, *lines] if total else []


def findings(rows: list[dict]) -> str:
    """The Markdown list of every claim this study can speak to ('' when none)."""
    lines = [*claim1(rows), *claim2(rows), *claim4(rows), *compression_goal(rows)]
    return "\n".join(["#### Findings (generated)", "", *lines, ""]) if lines else ""
