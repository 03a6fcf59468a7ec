"""Generated pages: a report's Markdown goes into a section of a docs page (e.g. docs/results.md), between
markers, so that several studies (and ``analyze``) publish into one page and a rerun replaces only its section."""

from __future__ import annotations

from pathlib import Path

HEADER = ("# Results\n\nThis page is generated: every section below is written by `python cli.py study report ... "
          "--publish` or `python cli.py analyze ... --publish` from the runs themselves. Do not edit it by hand; "
          "rerun the command shown in the section.\n")


def publish_section(page: Path, key: str, markdown: str) -> Path:
    """Write ``markdown`` as the section ``key`` of ``page`` (replacing that section, keeping the others)."""
    begin, end = f"<!-- begin {key} (generated) -->", f"<!-- end {key} -->"
    text = page.read_text(encoding="utf-8") if page.is_file() else HEADER
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text, encoding="utf-8")
    return page
