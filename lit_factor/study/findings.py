"""What a study's numbers say about the seed paper's claims, in generated sentences (no hand-typed numbers).

Each check runs only when the study holds the comparison it needs, and says *reproduced* (holds in every
comparison the study made), *not reproduced* (in none) or *mixed*, with the numbers behind it:

* claim 1, low rank beats Monarch and block-wise low rank at equal parameters: per task and budget, the mean
  final dev metric of low rank's successful runs against the best other structure's;
* claim 2, staging makes compression reliable: per method, budget and data regime, the success rate of staged
  runs against all-at-once runs;
* claim 4, low rank is faster than Monarch: per task and budget, the mean measured inference speedup.
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


def _lowrank_vs_others(rows: list[dict], key: str, what: str) -> list[str]:
    """Per (task, budget): low rank's mean ``key`` against the best other structure's."""
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
    return [f"{wins} of {total} comparisons; **{_verdict(wins, total)}**", *lines] if total else []


def claim1(rows: list[dict]) -> list[str]:
    """Compared over runs that succeeded: a run ending at the majority baseline measures no structure."""
    flat = [r for r in rows if r["verdict"] in ("succeeded", "failed") and not r.get("staged")]
    lines = _lowrank_vs_others([r for r in flat if r["verdict"] == "succeeded"], "final", "final dev metric")
    failed = [f"  - {task}: {sum(r['verdict'] == 'failed' for r in rs)} of {len(rs)} runs failed (diverged or "
              "ended at or below the majority baseline) and are left out"
              for (task,), rs in sorted(_by(flat, "task").items(), key=str)
              if any(r["verdict"] == "failed" for r in rs)]
    if not lines:
        return ["- **Claim 1:** no task and budget with successful runs of low rank and another structure",
                *failed] if failed else []
    return ["- **Claim 1, low rank beats Monarch and block-wise at equal parameters** (runs that succeeded): "
            "low rank ahead in " + lines[0], *lines[1:], *failed]


def claim2(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r["verdict"] in ("succeeded", "failed") and r.get("method") not in (None, "none")]
    lines, wins, losses, total = [], 0, 0, 0
    for (method, budget, lr), group in sorted(_by(rows, "method", "budget", "learning_rate").items(), key=str):
        for data in sorted({regime(r) for r in group}):
            sel = [r for r in group if regime(r) == data]
            staged, flat = [r for r in sel if r.get("staged")], [r for r in sel if not r.get("staged")]
            if not staged or not flat:
                continue
            rate = [sum(r["verdict"] == "succeeded" for r in rs) / len(rs) for rs in (staged, flat)]
            total += 1
            wins, losses = wins + (rate[0] > rate[1]), losses + (rate[0] < rate[1])
            lines.append(f"  - {method} {budget}, lr {lr}, {data}: staged {rate[0]:.0%} of {len(staged)} runs "
                         f"succeeded, all at once {rate[1]:.0%} of {len(flat)}")
    if not total:
        return []
    verdict = "reproduced" if wins and not losses else "not reproduced" if not wins else "mixed"
    return [f"- **Claim 2, staging makes compression reliable:** staged ahead in {wins}, behind in {losses}, "
            f"equal in {total - wins - losses} of {total} comparisons; **{verdict}**", *lines]


def claim4(rows: list[dict]) -> list[str]:
    finished = [r for r in rows if r["verdict"] in ("succeeded", "failed")]
    lines = _lowrank_vs_others(finished, "latency_speedup", "measured inference speedup over dense")
    settings = sorted({r["latency_setting"] for r in finished if r.get("latency_setting")})
    where = f" (LatencyCallback at the end of each fit: {'; '.join(settings)})" if settings else ""
    return ["- **Claim 4, low rank is faster than Monarch (and block-wise):** low rank faster in " + lines[0]
            + where, *lines[1:]] if lines else []


def findings(rows: list[dict]) -> str:
    """The Markdown list of every claim this study can speak to ('' when none)."""
    lines = [*claim1(rows), *claim2(rows), *claim4(rows)]
    return "\n".join(["#### Findings (generated)", "", *lines, ""]) if lines else ""
