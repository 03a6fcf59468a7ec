"""The generated results page: sections replaced in place, and the verdicts at a glance read back from them."""

from lit_factor.study.publish import HEADER, publish_section, verdict_rows


def _study(verdict: str) -> str:
    return ("## Study `a`\n\n**Ran on:** CPU only, 2 CPU cores.\n\n#### Findings (generated)\n\n"
            "- **Claim 1, low rank beats Monarch and block-wise at equal parameters** (runs that succeeded): low rank "
            f"ahead in 1 of 2 comparisons; **{verdict}**\n  - sst2, budget 0.25: low rank 0.8 (1) vs monarch 0.7 (1)\n"
            "- **Compression goal (within 1 point of dense at 50 % kept, 2 points at 25 %):** met in 1 of 2 "
            "task/structure/budget cells\n")


def test_publishing_keeps_one_verdict_table_before_the_sections_and_rewrites_it(tmp_path):
    page = tmp_path / "results.md"
    page.write_text(HEADER + "\nA hand-written index.\n", encoding="utf-8")
    publish_section(page, "study a", _study("mixed"))
    publish_section(page, "analyze m", "## Analyze\n\n**Claim 3, pretrained matrices are close to full rank:** "
                                       "a 10 % error needs 0.65 of full rank; **reproduced**.")
    text = page.read_text(encoding="utf-8")
    assert text.index("A hand-written index.") < text.index("## Verdicts at a glance") < text.index(
        "<!-- begin study a (generated) -->") < text.index("<!-- begin analyze m (generated) -->")
    assert verdict_rows(text) == [
        ("Claim 1", "`a`", "CPU only, 2 CPU cores", "mixed",
         "(runs that succeeded): low rank ahead in 1 of 2 comparisons"),
        ("Claim 3", "analyze `m`", "no training", "reproduced", "a 10 % error needs 0.65 of full rank"),
        ("Compression goal", "`a`", "CPU only, 2 CPU cores", "met in 1 of 2",
         "met in 1 of 2 task/structure/budget cells")]
    publish_section(page, "study a", _study("reproduced"))  # a rerun: the row follows, nothing is duplicated
    text = page.read_text(encoding="utf-8")
    assert text.count("## Verdicts at a glance") == 1 and text.count("<!-- begin study a") == 1
    assert "| Claim 1 | `a` | CPU only, 2 CPU cores | reproduced |" in text
    assert text.index("## Verdicts at a glance") < text.index("<!-- begin study a (generated) -->")


def test_a_page_without_findings_has_no_verdict_table(tmp_path):
    page = publish_section(tmp_path / "results.md", "study b", "## Study `b`\n\nno claims here\n")
    assert "Verdicts" not in page.read_text(encoding="utf-8")


def test_a_joined_report_takes_the_place_of_the_sections_it_holds(tmp_path):
    """A report with report_with holds those studies' trials: their sections give way to it, others stay."""
    page = tmp_path / "results.md"
    for key in ("study a", "study b", "study c"):
        publish_section(page, key, _study("mixed").replace("`a`", f"`{key[-1]}`"))
    publish_section(page, "study a+", _study("reproduced").replace("`a`", "`a+`"), supersedes=["study a", "study c"])
    text = page.read_text(encoding="utf-8")
    assert "<!-- begin study a (generated) -->" not in text and "<!-- begin study c (generated) -->" not in text
    assert text.index("<!-- begin study a+ (generated) -->") < text.index("<!-- begin study b (generated) -->")
    assert [row[1] for row in verdict_rows(text) if row[0] == "Claim 1"] == ["`a+`", "`b`"]
    assert text.endswith("<!-- end study b -->\n")
    publish_section(page, "study a+", _study("mixed").replace("`a`", "`a+`"), supersedes=["study a"])  # a rerun
    assert page.read_text(encoding="utf-8").count("<!-- begin study a+") == 1
