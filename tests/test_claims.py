"""The registered claims (lit_factor/study/claims.py) and their statistics (stats.py) against hand-made trial tables
whose answers are known: a significant win, a non-significant win, a tie, a ceiling, a floor, n < 3, a task that
did not train, a contradiction; and the generated page (publish.py) built from committed-style files."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy import stats as sps

from lit_factor.study import claims as cl
from lit_factor.study import stats as st

MAJORITY = {"sst2": {"accuracy": 0.5}, "cola": {"matthews": 0.0, "accuracy": 0.69},
            "mrpc": {"f1": 0.81, "accuracy": 0.68}}


def run(method, final, seed, *, task="sst2", budget=0.5, study="s", acc=None, verdict="succeeded", staged=False,
        schedule=None, kept=None, recipe=None, teacher=None, speedup=None, monitor=None):
    monitor = monitor or {"sst2": "val/accuracy", "cola": "val/matthews", "mrpc": "val/f1"}[task]
    row = {"section": study, "study": study, "verdict": verdict, "task": task, "method": method,
           "budget": None if method == "none" else budget, "seed": seed, "final": final, "monitor": monitor,
           "staged": staged, "schedule": schedule, "max_train_samples": 1000, "max_epochs": 2, "max_steps": -1,
           "learning_rate": 1e-4, "kept_fraction": kept if kept is not None else (1.0 if method == "none" else budget),
           "recipe": recipe, "teacher": teacher, "latency_speedup": speedup}
    row["val/accuracy"] = final if monitor == "val/accuracy" else acc
    return row


def arm(method, values, **kw):
    return [run(method, v, seed, **kw) for seed, v in enumerate(values, start=1)]


DENSE = arm("none", [0.90, 0.91, 0.92])


def claim1(rows):
    return cl.judge(cl.CLAIMS["1"], rows, MAJORITY)


def only(answer, other="Monarch"):
    return next(c for c in answer.comparisons if c.label.endswith(other))


# --- the statistics ------------------------------------------------------------------------------------------------
def test_welch_is_scipys_and_its_interval_covers_the_difference():
    a, b = [0.80, 0.82, 0.81, 0.79], [0.70, 0.75, 0.72]
    t = st.welch(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert t.p == pytest.approx(ref.pvalue) and t.effect == pytest.approx(sum(a) / 4 - sum(b) / 3)
    assert t.low < t.effect < t.high and t.method == "Welch's t"


def test_constant_arms_use_the_exact_permutation_test_not_a_zero_p():
    t = st.welch([0.6, 0.6, 0.6], [0.5, 0.5, 0.5])
    assert t.p == pytest.approx(0.1)  # 2 of the 20 splits of 3 + 3 values are as extreme: not p = 0
    assert (t.low, t.high) == (pytest.approx(0.1), pytest.approx(0.1))
    assert st.welch([0.5] * 3, [0.5] * 3).p == 1.0


def test_fisher_and_the_newcombe_interval():
    t = st.rates(8, 10, 1, 5)
    assert t.p == pytest.approx(sps.fisher_exact([[8, 2], [1, 4]])[1]) and t.p > 0.05  # 8/10 vs 1/5: p = 0.089
    newcombe = st.rates(56, 70, 48, 80)  # Newcombe (1998), Table II, example (a): method 10 gives 0.0524, 0.3339
    assert (newcombe.low, newcombe.high) == (pytest.approx(0.0524, abs=5e-4), pytest.approx(0.3339, abs=5e-4))


def test_holm_step_down():
    tests = [st.Test(0, 0, 0, p, "", (3, 3)) for p in (0.01, 0.04, 0.03, math.nan)]
    st.holm(tests)
    assert [t.p_adj for t in tests[:3]] == [pytest.approx(0.03), pytest.approx(0.06), pytest.approx(0.06)]
    assert tests[3].p_adj is None


# --- claim 1: the known answers ------------------------------------------------------------------------------------
def test_significant_win_is_supported():
    c = only(claim1(DENSE + arm("lowrank", [0.80, 0.81, 0.82]) + arm("monarch", [0.70, 0.71, 0.72])))
    assert c.verdict == st.SUPPORTED and c.test.low > 0 and c.test.effect == pytest.approx(0.10)


def test_non_significant_win_is_same_direction_not_a_win():
    c = only(claim1(DENSE + arm("lowrank", [0.70, 0.80, 0.75]) + arm("monarch", [0.69, 0.79, 0.74])))
    assert c.verdict == st.SAME and c.test.low < 0 < c.test.high


def test_tie_is_indistinguishable_never_a_loss():
    c = only(claim1(DENSE + arm("lowrank", [0.70, 0.72, 0.74]) + arm("monarch", [0.70, 0.72, 0.74])))
    assert c.verdict == st.INDISTINGUISHABLE and c.test.effect == 0


def test_significant_loss_is_contradicted():
    c = only(claim1(DENSE + arm("lowrank", [0.60, 0.61, 0.62]) + arm("monarch", [0.80, 0.81, 0.82])))
    assert c.verdict == st.CONTRADICTED


def test_fewer_than_three_runs_is_insufficient():
    c = only(claim1(DENSE + arm("lowrank", [0.80, 0.81]) + arm("monarch", [0.70, 0.71, 0.72])))
    assert c.verdict == st.INSUFFICIENT


def test_a_row_with_too_few_runs_says_so_on_the_page():
    from lit_factor.study.publish import claim_section

    answer = claim1(DENSE + arm("lowrank", [0.80, 0.81]) + arm("monarch", [0.70, 0.71, 0.72]))
    row = next(line for line in claim_section(answer, {}, None).splitlines() if "low rank vs Monarch" in line)
    assert row.rstrip(" |").endswith("fewer than 3 runs in an arm")


def test_a_findings_line_with_too_few_runs_says_so():
    from lit_factor.study.findings import comparison_line

    c = only(claim1(DENSE + arm("lowrank", [0.80, 0.81]) + arm("monarch", [0.70, 0.71, 0.72])))
    assert "**insufficient** (fewer than 3 runs in an arm);" in comparison_line(c)


def test_a_task_that_did_not_train_is_insufficient_even_with_a_big_gap():
    # CoLA: dense MCC above 0 but accuracy at the majority class: a constant predictor, not a trained model
    dense = [run("none", m, s, task="cola", acc=0.69) for s, m in ((1, 0.08), (2, 0.07), (3, 0.09))]
    low = [run("lowrank", 0.05 + 0.001 * s, s, task="cola", acc=0.69) for s in (1, 2, 3)]
    mon = [run("monarch", 0.00 + 0.001 * s, s, task="cola", acc=0.69) for s in (1, 2, 3)]
    c = only(claim1(dense + low + mon))
    assert c.verdict == st.INSUFFICIENT and c.reason.startswith("task did not train")
    assert cl.trained(dense, cl.key(dense[0]), MAJORITY).ok is False


def test_without_a_dense_arm_nothing_shows_the_task_trained():
    c = only(claim1(arm("lowrank", [0.80, 0.81, 0.82]) + arm("monarch", [0.70, 0.71, 0.72])))
    assert c.verdict == st.INSUFFICIENT and "no dense arm" in c.reason


def test_unequal_parameters_are_said():
    rows = DENSE + arm("lowrank", [0.80, 0.81, 0.82], kept=0.098) + arm("monarch", [0.70, 0.71, 0.72], kept=0.089)
    assert "+10.1%" in only(claim1(rows)).note
    assert only(claim1(DENSE + arm("lowrank", [0.8] * 3, kept=0.5) + arm("monarch", [0.7] * 3, kept=0.497))).note == ""


def test_holm_runs_over_the_whole_claim():
    rows = DENSE + arm("lowrank", [0.80, 0.81, 0.83]) + arm("monarch", [0.76, 0.78, 0.79]) + \
        arm("blockwise", [0.76, 0.78, 0.79])
    answer = claim1(rows)
    assert [c.test.p_adj for c in answer.comparisons] == [pytest.approx(2 * c.test.p) for c in answer.comparisons]


def test_holm_counts_only_the_comparisons_that_are_tests():
    """A comparison with fewer than 3 runs in an arm is insufficient, not performed: it must not enlarge Holm's
    family (claim 2 on MRPC read Holm 0.83 instead of 0.41 while its Monarch arm had two runs a cell)."""
    rows = DENSE + arm("lowrank", [0.80, 0.81, 0.83]) + arm("monarch", [0.76, 0.78, 0.79]) + \
        arm("blockwise", [0.70, 0.75])
    answer = claim1(rows)
    monarch, blockwise = only(answer), only(answer, "block-wise")
    assert blockwise.verdict == st.INSUFFICIENT and blockwise.test.p_adj is None
    assert monarch.test.p_adj == pytest.approx(monarch.test.p)


# --- claim 2: success rates ----------------------------------------------------------------------------------------
def claim2(staged_ok, flat_ok, n=5, dense=DENSE):
    staged = [run("lowrank", 0.8 if i < staged_ok else 0.5, i, staged=True, schedule="spread=0.5",
                  verdict="succeeded" if i < staged_ok else "failed") for i in range(n)]
    flat = [run("lowrank", 0.8 if i < flat_ok else 0.5, i, verdict="succeeded" if i < flat_ok else "failed")
            for i in range(n)]
    return cl.judge(cl.CLAIMS["2"], dense + staged + flat, MAJORITY).comparisons[0]


@pytest.mark.parametrize("ok", [0, 5], ids=["floor", "ceiling"])
def test_both_arms_at_0_or_100_percent_are_uninformative_alike(ok):
    c = claim2(ok, ok)
    assert c.verdict == st.INSUFFICIENT and "uninformative" in c.reason


def test_success_rates_decide_by_fishers_exact_test():
    assert claim2(5, 0).verdict == st.SUPPORTED  # p = 0.008
    assert claim2(4, 1).verdict == st.SAME  # 4/5 vs 1/5: p = 0.21
    assert claim2(0, 5).verdict == st.CONTRADICTED


def test_one_informative_comparison_is_its_own_answer_not_a_normal_approximation():
    """4/5 vs 1/5: Fisher's p is 0.21, but the normal reading of its (asymmetric, tiny-sample) Newcombe interval
    said p = 0.005 and made the claim "supported" (docs/results.md, claim 2 on MRPC, before the fix)."""
    staged = [run("lowrank", 0.8 if i < 4 else 0.5, i, staged=True, schedule="spread=0.5",
                  verdict="succeeded" if i < 4 else "failed") for i in range(5)]
    flat = [run("lowrank", 0.8 if i < 1 else 0.5, i, verdict="succeeded" if i < 1 else "failed") for i in range(5)]
    answer = cl.judge(cl.CLAIMS["2"], DENSE + staged + flat, MAJORITY)
    (c,) = answer.informative
    assert answer.pooled.p == pytest.approx(sps.fisher_exact([[4, 1], [1, 4]])[1]) == pytest.approx(0.2063, abs=1e-4)
    assert (answer.pooled.effect, answer.pooled.low, answer.pooled.high) == (c.test.effect, c.test.low, c.test.high)
    assert answer.verdict == c.verdict == st.SAME


def test_pooling_is_never_surer_than_each_comparisons_own_test():
    """k independent comparisons alike, each with exact p: the pooled z is each one's z (from its p) times sqrt(k);
    a comparison of p 1 still weighs, by its interval."""
    one = st.rates(4, 5, 1, 5)
    z = sps.norm.isf(one.p / 2)
    for k in (2, 3):
        pooled = st.pooled([one] * k)
        assert pooled.effect == pytest.approx(0.6) and pooled.extra["tau2"] == 0
        assert pooled.p == pytest.approx(2 * sps.norm.sf(z * math.sqrt(k)))
    flat = st.rates(2, 5, 1, 5)  # Fisher p = 1: no test-based error, the interval's stands
    assert flat.p == 1.0 and st.standard_error(flat) == pytest.approx((flat.high - flat.low) / (2 * 1.959964))
    assert st.pooled([one, flat]).extra["k"] == 2


def staged_runs(ok, schedule, n=5):
    return [run("lowrank", 0.8 if i < ok else 0.5, i, staged=True, schedule=schedule,
                verdict="succeeded" if i < ok else "failed") for i in range(n)]


def test_two_schedules_against_one_all_at_once_arm_pool_their_runs_not_the_best_row():
    """Staged a (4/5) and staged b (1/5) share the all-at-once arm (1/5): the claim's one independent test is
    staged (both schedules, 5/10) vs all at once (1/5), Fisher's exact -- not the row that happened to come first
    (or looked best), which said 4/5 vs 1/5. A schedule both at 0 % with the flat arm still counts its runs."""
    flat = [run("lowrank", 0.8 if i < 1 else 0.5, i, verdict="succeeded" if i < 1 else "failed") for i in range(5)]
    rows = DENSE + staged_runs(4, "spread=0.25") + staged_runs(1, "spread=0.5") + flat
    answer = cl.judge(cl.CLAIMS["2"], rows, MAJORITY)
    assert answer.pooled.extra["k"] == 1 and answer.pooled.effect == pytest.approx(0.5 - 0.2)
    assert answer.pooled.p == pytest.approx(sps.fisher_exact([[5, 5], [1, 4]])[1])
    flat0 = [run("lowrank", 0.5, i, verdict="failed") for i in range(5)]
    answer = cl.judge(cl.CLAIMS["2"], DENSE + staged_runs(4, "spread=0.25") + staged_runs(0, "spread=0.5") + flat0,
                      MAJORITY)
    assert [c.verdict for c in answer.comparisons].count(st.INSUFFICIENT) == 1  # 0/5 vs 0/5: uninformative
    assert answer.pooled.p == pytest.approx(sps.fisher_exact([[4, 6], [0, 5]])[1])


def test_low_rank_against_monarch_and_block_wise_pools_by_the_weaker_comparison():
    """Claim 1 says low rank beats each: its unit (one low-rank arm, two others) enters the pooling by the
    comparison least favourable to the claim, whichever row comes first."""
    lowrank = arm("lowrank", [0.80, 0.81, 0.83])
    for near, far in (("monarch", "blockwise"), ("blockwise", "monarch")):
        rows = DENSE + lowrank + arm(near, [0.79, 0.80, 0.82]) + arm(far, [0.70, 0.71, 0.72])
        answer = claim1(rows)
        weaker = only(answer, {"monarch": "Monarch", "blockwise": "block-wise"}[near])
        assert answer.pooled.extra["k"] == 1 and answer.pooled.effect == pytest.approx(weaker.test.effect)


def test_a_success_must_beat_the_majority_class_on_accuracy():
    fake = run("lowrank", 0.85, 1, task="mrpc", acc=0.68)  # F1 above the baseline, accuracy at the majority class
    assert not cl.succeeded(fake, MAJORITY)
    assert cl.succeeded(run("lowrank", 0.85, 1, task="mrpc", acc=0.75), MAJORITY)


def test_the_majority_class_read_back_in_float32_is_neither_a_success_nor_a_trained_task():
    # CoLA's majority class is 721 of 1043 dev sentences; logged in float32 it reads 1.2e-8 above 721/1043, which is
    # how a model that predicts "acceptable" everywhere (MCC 0.0256) once counted as a success
    majority = {"cola": {"matthews": 0.0, "accuracy": 721 / 1043}}
    at_majority, one_more = float(np.float32(721 / 1043)), float(np.float32(722 / 1043))
    assert at_majority > 721 / 1043
    assert not cl.succeeded(run("lowrank", 0.0256, 1, task="cola", acc=at_majority), majority)
    assert cl.succeeded(run("lowrank", 0.03, 1, task="cola", acc=one_more), majority)
    stuck = arm("none", [0.3, 0.31, 0.32], task="cola", acc=at_majority)  # MCC up, accuracy at the majority class
    gate = cl.trained(stuck, cl.key(stuck[0]), majority)
    assert not gate.ok and gate.tests["accuracy"].effect == 0.0
    assert cl.trained(arm("none", [0.3, 0.31, 0.32], task="cola", acc=one_more), cl.key(stuck[0]), majority).ok


def test_where_all_at_once_fails_counts_flat_runs_of_trained_tasks_only():
    at_majority = float(np.float32(0.68))
    flat = [run("lowrank", 0.85, 1, task="mrpc", acc=0.75), run("lowrank", 0.81, 2, task="mrpc", acc=at_majority),
            run("monarch", 0.5, 1, task="mrpc", acc=0.5, verdict="failed")]
    others = [run("lowrank", 0.85, 3, task="mrpc", acc=0.75, staged=True, schedule="spread=0.5"),  # staged
              run("lowrank", 0.85, 4, task="mrpc", acc=0.75, teacher="self"),  # distilled
              *arm("lowrank", [0.9, 0.9, 0.9], study="untrained")]  # no dense arm there: not counted
    dense = [run("none", 0.88, s, task="mrpc", acc=0.80 + 0.01 * s) for s in (1, 2, 3)]
    cells = cl.all_at_once(dense + flat + others, MAJORITY)
    assert [(c.study, c.task, c.budget) for c in cells] == [("s", "mrpc", 0.5)]
    assert cells[0].per_method == {"lowrank": (1, 2), "monarch": (0, 1)}
    assert (cells[0].succeeded, cells[0].runs) == (1, 3)


def test_the_claim2_section_says_where_all_at_once_fails(tmp_path):
    import json

    from lit_factor.study.publish import build_page

    studies = tmp_path / "studies"
    _write(studies / "a", DENSE + arm("lowrank", [0.80, 0.81, 0.82]) +
           [run("monarch", 0.5, s, verdict="failed") for s in (1, 2, 3)])
    (studies / "majority.json").write_text(json.dumps({"tasks": MAJORITY}))
    text = build_page(studies, tmp_path / "results.md").read_text()
    section = text[text.index("## Claim 2"):text.index("## Claim 3")]
    assert "**Where all at once fails**" in section
    assert "| sst2 | `s` | 50% | 3/6 | 3/3 | 0/3 | – |" in section  # the rows name their study


# --- the compression goal ------------------------------------------------------------------------------------------
def goal(recipe_values, dense_values, budget=0.5):
    dense = arm("none", dense_values, recipe="svd")
    rows = dense + arm("lowrank", recipe_values, recipe="fisher", budget=budget)
    return cl.judge_any(cl.CLAIMS["goal"], rows, MAJORITY).comparisons[0]


def test_goal_met_only_when_significantly_within_the_margin():
    assert goal([0.902, 0.904, 0.906], [0.900, 0.904, 0.908]).verdict == st.SUPPORTED
    assert goal([0.85, 0.86, 0.87], [0.90, 0.91, 0.92]).verdict == st.CONTRADICTED  # 5 points below
    assert goal([0.88, 0.90, 0.92], [0.90, 0.91, 0.92]).verdict in (st.SAME, st.INDISTINGUISHABLE)


def test_goal_checks_accuracy_too_on_mrpc():
    dense = [run("none", f, s, task="mrpc", acc=a, recipe="svd") for s, f, a in
             ((1, 0.870, 0.80), (2, 0.872, 0.81), (3, 0.874, 0.82))]
    good_f1_bad_acc = [run("lowrank", f, s, task="mrpc", acc=0.70, recipe="fisher") for s, f in
                       ((1, 0.871), (2, 0.873), (3, 0.875))]
    c = cl.judge_any(cl.CLAIMS["goal"], dense + good_f1_bad_acc, MAJORITY).comparisons[0]
    assert c.verdict != st.SUPPORTED and "accuracy" in c.metric


# --- the page ------------------------------------------------------------------------------------------------------
def _write(folder, rows, ran_on="CPU only, 2 CPU cores"):
    folder.mkdir(parents=True)
    cols = ["trial", "verdict", "compression", "seed", *[k for k in rows[0] if k not in ("verdict", "seed", "section")]]
    with open(folder / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({**{k: "" if v is None else v for k, v in r.items()}, "trial": i, "compression": r["method"]})
    (folder / "study.md").write_text(f"## Study `{folder.name}`\n\n**Ran on:** {ran_on}.\n")


def test_the_page_starts_with_one_row_per_claim_then_a_section_per_claim_then_the_studies(tmp_path):
    import json

    from lit_factor.study.publish import build_page

    studies = tmp_path / "studies"
    _write(studies / "a", DENSE + arm("lowrank", [0.80, 0.81, 0.82], speedup=1.5) +
           arm("monarch", [0.70, 0.71, 0.72], speedup=1.2))
    (studies / "majority.json").write_text(json.dumps({"tasks": MAJORITY}))
    page = build_page(studies, tmp_path / "results.md")
    text = page.read_text()
    table = text[text.index("## Answers at a glance"):text.index("## Claim 1")]
    assert [line.split("|")[1].strip()[:9] for line in table.splitlines() if line.startswith("| [")] == \
        ["[Claim 1:", "[Claim 2:", "[Claim 3:", "[Claim 4:", "[goal: Co"]
    assert "| **supported** |" in table.splitlines()[4]  # claim 1 on the hand-made win
    assert text.index("## Claim 1") < text.index("## Claim 4") < text.index("# Appendix") < text.index(
        "<!-- begin study a (generated) -->")
    assert (studies / "claims" / "claim_1.png").is_file() and "studies/claims/claim_1.png" in text
    assert "supported" in (studies / "a" / "report.md").read_text()
    assert build_page(studies, tmp_path / "results.md").read_text() == text  # regenerated: the same page


def test_the_answers_table_names_each_machine_once_though_a_study_ran_on_two(tmp_path):
    """A study resumed on a second machine records both ("A; B"); the claim's row named B twice when another
    study had run on B alone."""
    import json

    from lit_factor.study.publish import build_page

    studies = tmp_path / "studies"
    _write(studies / "a", DENSE + arm("lowrank", [0.80, 0.81, 0.82]) + arm("monarch", [0.70, 0.71, 0.72]),
           ran_on="CPU only (avx2), 2 CPU cores; CPU only (avx512f), 2 CPU cores")
    _write(studies / "b", [{**r, "study": "b"} for r in DENSE + arm("lowrank", [0.80, 0.82, 0.84]) +
                           arm("monarch", [0.70, 0.72, 0.74])], ran_on="CPU only (avx512f), 2 CPU cores")
    (studies / "majority.json").write_text(json.dumps({"tasks": MAJORITY}))
    text = build_page(studies, tmp_path / "results.md").read_text()
    claim1 = next(line for line in text.splitlines() if line.startswith("| [Claim 1:"))
    assert "| 2 / 0 / 0 / 0 / 0 |" in claim1  # both studies count
    assert claim1.endswith("| CPU only (avx2), 2 CPU cores; CPU only (avx512f), 2 CPU cores |")


def test_a_study_joined_into_another_report_counts_once(tmp_path):
    """``report_with``: the joined report's trials.csv holds the first study's trials too. Both folders are
    published; counted twice, the one claim-2 comparison pooled with itself (p 0.21 became 0.07)."""
    import json

    from lit_factor.study.publish import build_page

    staged = [run("lowrank", 0.8 if i < 4 else 0.5, i, staged=True, schedule="spread=0.5",
                  verdict="succeeded" if i < 4 else "failed") for i in range(5)]
    flat = [run("lowrank", 0.8 if i < 1 else 0.5, i, verdict="succeeded" if i < 1 else "failed") for i in range(5)]
    own = DENSE + staged + flat
    studies = tmp_path / "studies"
    _write(studies / "a", own)
    _write(studies / "b", own + [{**r, "study": "m"} for r in arm("monarch", [0.70, 0.71, 0.72])])
    (studies / "majority.json").write_text(json.dumps({"tasks": MAJORITY}))
    text = build_page(studies, tmp_path / "results.md").read_text()
    claim2 = next(line for line in text.splitlines() if line.startswith("| [Claim 2:"))
    assert "p = 0.206" in claim2 and "| 0 / 1 / 0 / 0 /" in claim2  # one comparison, Fisher's own p
    section = text[text.index("<!-- begin study a (generated) -->"):text.index("<!-- end study a -->")]
    assert "reported with `b`'s" in section and "#### Findings" not in section


def test_goal_reference_is_the_dense_model_trained_alike_once_per_seed_never_distilled():
    dense = arm("none", [0.900, 0.904, 0.908], recipe="svd")
    again = [{**r, "recipe": "whitened"} for r in dense]  # the same dense runs under a projection-only recipe
    distilled = [run("none", 0.99, s, recipe="kd", teacher="self") for s in (4, 5, 6)]  # not the reference
    rows = dense + again + distilled + arm("lowrank", [0.902, 0.904, 0.906], recipe="fisher")
    c = cl.judge_any(cl.CLAIMS["goal"], rows, MAJORITY).comparisons[0]
    assert c.test.n == (3, 3) and c.verdict == st.SUPPORTED and "dense trained alike 0.9040" in c.detail


def test_claim2_leaves_distilled_runs_out():
    staged = [run("lowrank", 0.8, s, staged=True, schedule="spread=0.5", teacher="self") for s in (1, 2, 3)]
    flat = [run("lowrank", 0.5, s, verdict="failed") for s in (1, 2, 3)]
    assert cl.judge(cl.CLAIMS["2"], DENSE + staged + flat, MAJORITY).comparisons == []


def test_claim4_compares_speedups_within_a_machine_when_a_grid_ran_on_two():
    """Seeds 1-3 on a CPU, seeds 4-6 resumed on a GPU: pooled, each arm's spread would be the machines' gap and
    low rank's clear lead (per machine) would drown in it. Each trial's recorded machine splits the comparison."""
    cpu, gpu = "CPU only (x, avx2), 2 CPU cores", "1 x H100, 16 CPU cores"

    def speedups(method, values, machine, first_seed):
        rows = [run(method, 0.8, seed, speedup=v) for seed, v in enumerate(values, start=first_seed)]
        return [{**r, "machine": machine} for r in rows]

    rows = (speedups("lowrank", [1.60, 1.62, 1.61], cpu, 1) + speedups("monarch", [1.40, 1.41, 1.42], cpu, 1)
            + speedups("lowrank", [3.10, 3.12, 3.11], gpu, 4) + speedups("monarch", [2.90, 2.91, 2.92], gpu, 4))
    answer = cl.judge(cl.CLAIMS["4"], rows, MAJORITY)
    labels = sorted(c.label for c in answer.comparisons)
    assert labels == [f"50%, low rank vs Monarch, on {gpu}", f"50%, low rank vs Monarch, on {cpu}"]
    assert all(c.test.effect == pytest.approx(0.20, abs=0.005) and c.test.p < 0.01 for c in answer.comparisons)
    # without the per-trial machine (rows recorded before it) both machines' seeds form one arm, as before
    legacy = [{k: v for k, v in r.items() if k != "machine"} for r in rows]
    (pooled,) = cl.judge(cl.CLAIMS["4"], legacy, MAJORITY).comparisons
    assert pooled.label == "50%, low rank vs Monarch" and pooled.test.p > 0.05
