"""The generated results page: sections replaced in place (``analyze --publish``), and the whole page rebuilt from
the committed study folders (tests/test_claims.py builds one from hand-made tables)."""

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


def test_a_joined_report_takes_the_place_of_the_sections_it_holds(tmp_path):
    """A report with report_with holds those studies' trials: their sections give way to it, others stay."""
    page = tmp_path / "results.md"
    for key in ("study a", "study b", "study c"):
        publish_section(page, key, _study(key[-1]))
    publish_section(page, "study a+", _study("a+"), supersedes=["study a", "study c"])
    text = page.read_text(encoding="utf-8")
    assert "<!-- begin study a (generated) -->" not in text and "<!-- begin study c (generated) -->" not in text
    assert text.index("<!-- begin study a+ (generated) -->") < text.index("<!-- begin study b (generated) -->")
    assert text.endswith("<!-- end study b -->\n")
    publish_section(page, "study a+", _study("a+", "again"), supersedes=["study a"])  # a rerun
    assert page.read_text(encoding="utf-8").count("<!-- begin study a+") == 1


def test_a_study_folder_is_named_by_the_header_its_report_wrote(tmp_path):
    assert name_of(tmp_path / "out", _study("rep")) == "rep"
    assert name_of(tmp_path / "out", "no header") == "out"
