"""lit_factor/study/calibration.py against hand-made dense arms whose answers are known: which schedules trained,
which one each task is calibrated at, and the generated section."""

from __future__ import annotations

from pathlib import Path

from lit_factor.study import calibration as cb

MAJORITY = {"mrpc": {"f1": 0.81, "accuracy": 0.68}, "stsb": {"pearson": 0.0}}


def dense(study, f1s, accs, *, lr=1e-4, epochs=3, task="mrpc"):
    monitor = "val/pearson" if task == "stsb" else "val/f1"
    return [{"section": study, "study": study, "verdict": "succeeded", "task": task, "method": "none", "seed": seed,
             "final": f1, "monitor": monitor, "val/accuracy": acc, "max_train_samples": None, "max_epochs": epochs,
             "max_steps": -1, "learning_rate": lr}
            for seed, (f1, acc) in enumerate(zip(f1s, accs, strict=True), start=1)]


TRAINS = dict(f1s=[0.86, 0.87, 0.88], accs=[0.78, 0.80, 0.79])  # f1 lower bound ~ +0.035
TRAINS_SURER = dict(f1s=[0.880, 0.882, 0.884], accs=[0.80, 0.81, 0.80])  # narrow, higher
F1_ONLY = dict(f1s=[0.88, 0.89, 0.90], accs=[0.67, 0.69, 0.68])  # F1 above, accuracy at the majority class


def test_the_calibrated_schedule_is_the_surest_that_trained_on_both_metrics():
    rows = (dense("calibrate-mrpc", **TRAINS, lr=5e-5) + dense("calibrate-mrpc", **TRAINS_SURER, epochs=2)
            + dense("calibrate-mrpc", **F1_ONLY, lr=2e-4))
    arms = cb.dense_arms(rows, MAJORITY)
    trained = {(a.get("max_epochs"), a.get("learning_rate")): a.gate.ok for a in arms}
    assert trained == {(3, 5e-5): True, (2, 1e-4): True, (3, 2e-4): False}
    chosen = cb.calibrated(arms)["mrpc"]
    assert (chosen.get("max_epochs"), chosen.get("learning_rate")) == (2, 1e-4)


def test_ties_go_to_fewer_epochs_then_the_smaller_rate_and_only_calibration_studies_choose():
    rows = (dense("calibrate-mrpc", **TRAINS, epochs=3) + dense("calibrate-mrpc", **TRAINS, epochs=2, lr=2e-4)
            + dense("calibrate-mrpc", **TRAINS, epochs=2, lr=5e-5) + dense("claim-x", **TRAINS_SURER))
    chosen = cb.calibrated(cb.dense_arms(rows, MAJORITY))["mrpc"]
    assert (chosen.study, chosen.get("max_epochs"), chosen.get("learning_rate")) == ("calibrate-mrpc", 2, 5e-5)
    assert cb.calibrated(cb.dense_arms(dense("claim-x", **TRAINS), MAJORITY)) == {}


def test_a_task_that_never_trained_has_no_calibrated_schedule_and_the_section_says_why_not():
    rows = dense("calibrate-mrpc", **F1_ONLY) + dense("calibrate-mrpc", **TRAINS, lr=5e-5)[:2] + \
        dense("calibrate-stsb", [0.50, 0.55, 0.60], [None] * 3, task="stsb")
    arms = cb.dense_arms(rows, MAJORITY)
    assert set(cb.calibrated(arms)) == {"stsb"}  # regression: its metric alone decides
    text = cb.section(rows, MAJORITY)
    assert "stsb: lr 0.0001, 3 epochs (`calibrate-stsb`; claim 1 at it: not run yet)" in text
    lines = {line.split("|")[5].strip() + line.split("|")[2].strip(): line for line in text.splitlines()
             if line.startswith("| `")}
    assert lines["0.0001mrpc"].rstrip(" |").endswith("no")
    assert lines["5e-05mrpc"].rstrip(" |").endswith("fewer than 3 runs")
    assert "**yes** (calibrated)" in lines["0.0001stsb"]


def test_a_choice_from_an_unfinished_calibration_grid_is_provisional():
    rows = dense("calibrate-mrpc", **TRAINS)
    assert "(`calibrate-mrpc`; claim 1 at it: not run yet)." in cb.section(rows, MAJORITY)
    assert "(`calibrate-mrpc`, provisional: its grid is not finished; claim 1 at it: not run yet)" in \
        cb.section(rows, MAJORITY, {"calibrate-mrpc"})
    from lit_factor.study.publish import finished_grid
    assert finished_grid("**Progress:** 12 of 12 grid points finished (12 succeeded, 0 failed); ...")
    assert not finished_grid("**Progress:** 5 of 12 grid points finished (5 succeeded, 0 failed); ...")


ROOT = Path(__file__).resolve().parents[1]


def finished_calibrations() -> dict:
    """The committed record's calibrated schedules whose grid has finished (a provisional choice binds nothing)."""
    from lit_factor.study import publish

    return {task: s for task, s in publish.calibrated_schedules(ROOT / "docs" / "studies").items() if s.final}


def runs_at_calibration(path: Path, final: dict) -> set[str]:
    """Checks that every cell of the study file ``path`` -- the whole study and each variant -- whose task has a
    finished calibration runs at its schedule; returns the tasks of the whole study."""
    import yaml

    from lit_factor.study.spec import load_spec

    whole = load_spec(path)
    for variant in (None, *yaml.safe_load(path.read_text())["variants"]):
        spec = load_spec(path, variant) if variant else whole
        for cell in spec.cells():
            task = spec.task_of(cell)
            if task in final:
                keys = spec.overrides({**cell, "seed": 1})
                assert (keys.get("model.learning_rate"), keys.get("trainer.max_epochs")) == \
                    (final[task].learning_rate, final[task].max_epochs), (path.name, variant, task, final[task].study)
    return {whole.task_of(cell) for cell in whole.cells()}


def test_claim1_trained_runs_each_task_at_its_finished_calibration():
    """studies/claim1_trained.yaml promises claim 1 on every task that trains "at the calibrated schedule": every task
    it runs has a finished calibration grid (docs/results.md, "Calibrated:") and runs at its schedule, in the whole
    study and in each variant, so no cell runs at a guessed one; and every task whose grid has finished is there, or
    left out because a published study already holds the whole grid (every compression option, full training set,
    3 seeds) at that schedule."""
    import yaml

    from lit_factor.study.spec import load_spec

    final = finished_calibrations()
    path = ROOT / "studies" / "claim1_trained.yaml"
    run = runs_at_calibration(path, final)
    assert run <= set(final), f"{run - set(final)} run before their calibration grid has finished"
    assert set(yaml.safe_load(path.read_text())["variants"]) == run  # one study per task, as the queue runs them
    arms = {(b.get("model.factorization.method"), b.get("model.factorization.budget"))
            for b in load_spec(path).axes["compression"].values()}
    assert arms == set(cb.CLAIM1_ARMS)  # what claim1_at looks for is what the study file runs
    for task in set(final) - run:
        assert final[task].claim1, f"{task} calibrated at {final[task]}: add it, no published study holds its grid"


def test_claim2_runs_each_task_at_its_finished_calibration():
    """Claim 2's grid (studies/claim2_mrpc.yaml: MRPC, and CoLA in its variant) runs every task whose calibration
    grid has finished at the calibrated schedule, in every variant."""
    final = finished_calibrations()
    assert "mrpc" in runs_at_calibration(ROOT / "studies" / "claim2_mrpc.yaml", final) and "mrpc" in final


def test_a_calibrated_schedule_is_read_from_the_committed_studies(tmp_path):
    import json

    from lit_factor.study import publish

    folder = tmp_path / "calibrate-mrpc"
    folder.mkdir()
    rows = dense("calibrate-mrpc", **TRAINS, epochs=2)
    columns = ["study", "verdict", "task", "method", "max_train_samples", "max_epochs", "max_steps",
               "learning_rate", "seed", "final", "monitor", "val/accuracy"]
    (folder / "trials.csv").write_text(
        ",".join(columns) + "\n" + "".join(",".join("" if r[c] is None else str(r[c]) for c in columns) + "\n"
                                           for r in rows), encoding="utf-8")
    (folder / publish.STUDY_HEADER).write_text(
        "## Study `calibrate-mrpc`\n\n**Progress:** 3 of 4 grid points finished\n", encoding="utf-8")
    (tmp_path / "majority.json").write_text(json.dumps({"tasks": MAJORITY}), encoding="utf-8")
    found = publish.calibrated_schedules(tmp_path)["mrpc"]
    assert (found.learning_rate, found.max_epochs, found.study, found.final) == (1e-4, 2, "calibrate-mrpc", False)


def test_claim1_at_names_only_a_study_with_the_whole_grid_at_the_schedule():
    arm = cb.dense_arms(dense("calibrate-mrpc", **TRAINS), MAJORITY)[0]  # lr 1e-4, 3 epochs, full set

    def grid(study, lr=1e-4, leave_out=None):
        rows = dense(study, **TRAINS, lr=lr)
        for method, budget in cb.CLAIM1_ARMS[1:]:
            if (method, budget) != leave_out:
                rows += [{**r, "method": method, "budget": budget} for r in dense(study, **TRAINS, lr=lr)]
        return rows

    rows = grid("whole") + grid("no-blockwise-25", leave_out=("blockwise", 0.25)) + grid("other-rate", lr=5e-5)
    assert cb.claim1_at(rows, arm) == ["whole"]
    staged = [{**r, "staged": True} if r["method"] == "monarch" else r for r in grid("whole")]
    assert cb.claim1_at(staged, arm) == []  # claim 1 compares all-at-once runs
