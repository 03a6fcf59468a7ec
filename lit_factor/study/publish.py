"""Generated pages: a report's Markdown goes into a section of a docs page (e.g. docs/results.md), between
markers, so that several studies (and ``analyze``) publish into one page and a rerun replaces only its section.

Every publish also rewrites the page's *verdicts at a glance*: one table row per claim line of every section's
generated findings, placed before the first section. It is read back from the page itself (the sections are the
record of what was published), so it never holds a number that a section does not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

HEADER = ("# Results\n\nThis page is generated: every section below is written by `python cli.py study report ... "
          "--publish` or `python cli.py analyze ... --publish` from the runs themselves. Do not edit it by hand; "
          "rerun the command shown in the section.\n")

VERDICTS = "verdicts"
_SECTION = re.compile(r"<!-- begin (study|analyze) (\S+) \(generated\) -->\n(.*?)<!-- end \1 \2 -->", re.S)
_CLAIM = re.compile(r"^(?:- )?\*\*((?:Claim \d|Compression goal)[^*]*?):?\*\*:?\s*(.*)$")
_VERDICT = re.compile(r";?\s*\*\*(reproduced|not reproduced|mixed)\*\*\.?")
_RAN_ON = re.compile(r"\*\*Ran on:\*\* (.*?)\.?\n")


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- begin {key} (generated) -->", f"<!-- end {key} -->"


def _replace(text: str, key: str, markdown: str, before: str | None = None) -> str:
    """``text`` with section ``key`` replaced, or added (at the end, or just before ``before`` when given)."""
    begin, end = _markers(key)
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    if before is not None and before in text:
        head, rest = text.split(before, 1)
        return head + block + "\n\n" + before + rest
    return text.rstrip("\n") + "\n\n" + block + "\n"


def verdict_rows(text: str) -> list[tuple[str, str, str, str, str]]:
    """(claim, section, ran on, verdict, evidence) for every claim line in the page's generated sections."""
    rows = []
    for kind, name, body in _SECTION.findall(text):
        ran = _RAN_ON.search(body)
        where = ran.group(1) if ran else "no training"
        for line in body.splitlines():
            match = _CLAIM.match(line)
            if not match:
                continue
            label, rest = match.groups()
            verdict = _VERDICT.search(rest)
            met = re.search(r"met in (\d+ of \d+)", rest)
            shown = verdict.group(1) if verdict else f"met in {met.group(1)}" if met else "–"
            evidence = _VERDICT.sub("", rest).replace("**", "").replace("|", "/").strip()
            claim = re.match(r"Claim \d|Compression goal", label).group(0)
            section = f"`{name}`" if kind == "study" else f"analyze `{name}`"
            rows.append((claim, section, where, shown, evidence))
    return sorted(rows, key=lambda r: r[0])  # stable: the page's order within a claim


def verdicts_markdown(text: str) -> str:
    rows = verdict_rows(text)
    if not rows:
        return ""
    table = ["| claim | section | ran on | verdict | evidence |", "|---|---|---|---|---|",
             *(f"| {' | '.join(row)} |" for row in rows)]
    return "\n".join(["## Verdicts at a glance", "",
                      "Generated from the *Findings* of every section below, rewritten whenever a section is "
                      "published. The studies differ in task, data, schedule and machine: read a section before "
                      "quoting its verdict.", "", *table])


def _supersede(text: str, key: str, old: str) -> str:
    """Section ``old`` gives way to ``key``: ``key`` takes its place when new to the page, else ``old`` goes."""
    (old_begin, old_end), (begin, end) = _markers(old), _markers(key)
    if old_begin not in text or old_end not in text:
        return text
    if begin not in text:
        return text.replace(old_begin, begin).replace(old_end, end)
    head, rest = text.split(old_begin, 1)
    tail = rest.split(old_end, 1)[1].lstrip("\n")
    return head.rstrip("\n") + "\n\n" + tail if tail else head.rstrip("\n") + "\n"


def publish_section(page: Path, key: str, markdown: str, supersedes: Sequence[str] = ()) -> Path:
    """Write ``markdown`` as the section ``key`` of ``page`` (replacing that section, keeping the others), then
    refresh the page's verdicts at a glance. ``supersedes``: sections whose content this one holds (a report with
    ``report_with`` has those studies' trials): the first gives its place to ``key``, all are removed."""
    text = page.read_text(encoding="utf-8") if page.is_file() else HEADER
    for old in supersedes:
        text = _supersede(text, key, old)
    text = _replace(text, key, markdown)
    summary = verdicts_markdown(text)
    if summary:
        first = re.search(r"<!-- begin .*? \(generated\) -->", text).group(0)  # where a new summary goes
        text = _replace(text, VERDICTS, summary, before=first)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text, encoding="utf-8")
    return page
