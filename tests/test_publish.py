"""The generated results page: sections replaced in place (``analyze --publish``), and the whole page rebuilt from
the committed study folders (tests/test_claims.py builds one from hand-made tables, a joined study included)."""

from lit_factor.study.publish import HEADER, name_of, publish_section


def _study(name: str, body: str = "x") -> str:
    return f"## Study `{name}`\n\n**Ran on:** CPU only, 2 CPU cores.\n\n{body}\n"


def test_a_section_is_replaced_in_place_and_never_duplicated(tmp_path):
    page = tmp_path / "results.md"
    publish_section(page, "analyze m", "## Analyze\n\nfirst")
    publish_section(page, "study a", _study("a"))
    publish_section(page, "analyze m", "## Analyze\n\nsecond")
    text = page.read_text(encoding="utf-8")
    assert text.startswith(HEADER) and text.count("<!-- begin analyze m (generated) -->") == 1
    assert "second" in text and "first" not in text
    assert text.index("<!-- begin analyze m") < text.index("<!-- begin study a")


def test_a_study_folder_is_named_by_the_header_its_report_wrote(tmp_path):
    assert name_of(tmp_path / "out", _study("rep")) == "rep"
    assert name_of(tmp_path / "out", "no header") == "out"
