"""A study's *Findings*: the comparisons the registered claims (lit_factor/study/claims.py, the seed paper's claims
and the compression goal) make on its trials, one line each with the effect, its 95 % interval, the p-value (Holm-
corrected over the claim's comparisons) and the verdict class. Generated, never typed.

``findings(rows)`` judges the rows given (a study's own report.md); docs/results.md judges every committed study
together (publish.py) and shows each study its share of those pooled answers, so the two never disagree on the
page.
"""

from __future__ import annotations

import json
from pathlib import Path

from lit_factor.study import claims as cl
from lit_factor.study.stats import INSUFFICIENT, fmt_test

#: the majority-class scores of the GLUE dev sets (written by ``python -m lit_factor.study.publish --majority``)
MAJORITY = Path("docs") / "studies" / "majority.json"


def load_majority(path: Path = MAJORITY) -> dict:
    """task -> metric -> majority-class score; {} when the file is absent (then no task counts as trained)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))["tasks"]
    except (OSError, ValueError, KeyError):
        return {}


def comparison_line(c: cl.Comparison) -> str:
    why = f" ({c.why})" if c.why else ""
    note = f"; {c.note}" if c.note else ""
    return (f"  - {c.task}, {c.label}: {fmt_test(c.test)} -- **{c.verdict}**{why}; {c.detail}{note}")


def answer_lines(answer: cl.Answer, section: str | None = None) -> list[str]:
    """The lines of one claim (restricted to one published study folder when ``section`` is given)."""
    shown = getattr(answer, "all_recipes", answer.comparisons)  # the goal: every recipe, not just each cell's best
    comps = [c for c in shown if section is None or c.study == section]
    if not comps:
        return []
    informative = sum(c.verdict != INSUFFICIENT for c in comps)
    head = (f"- **{_label(answer.claim)}** ({answer.claim.measure}): {informative} of {len(comps)} comparisons "
            "informative")
    return [head, *(comparison_line(c) for c in comps)]


def _label(claim: cl.Claim) -> str:
    return f"Claim {claim.key}, {claim.title[0].lower() + claim.title[1:]}" if claim.key != "goal" else claim.title


def findings(rows: list[dict], majority: dict | None = None, answers: list[cl.Answer] | None = None,
             section: str | None = None) -> str:
    """The Markdown list of every claim the rows speak to ('' when none)."""
    if answers is None:
        for r in rows:
            r.setdefault("section", r.get("study") or "this study")
        answers = cl.answers(rows, load_majority() if majority is None else majority)
    lines = [line for a in answers for line in answer_lines(a, section)]
    if not lines:
        return ""
    return "\n".join(["#### Findings (generated)", "",
                      "Effect [95 % interval], p (Holm over the claim's comparisons) -- verdict; the arms. "
                      "How a verdict is judged: docs/results.md.", "", *lines, ""])
