"""A study's record lives in the repository (docs/studies/<name>/journal.log, Optuna's journal file storage), so a
grid started on one machine finishes on a fresh clone elsewhere, with no finished trial run again.

Driven by tests/_study_fake_fit.py (a stand-in for ``fit`` that starts in milliseconds).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from lit_factor.study import storage as st
from lit_factor.study.spec import load_spec
from lit_factor.study.worker import Worker

REPO = Path(__file__).resolve().parent.parent
FAKE = [sys.executable, str(REPO / "tests" / "_study_fake_fit.py")]
NAME = "half"


def _points(study) -> list[tuple]:
    return sorted((t.params["model.factorization.method"], t.params["seed"]) for t in study.get_trials()
                  if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs)


@pytest.mark.slow
def test_half_a_grid_then_only_the_committed_files_finish_it_on_a_fresh_clone(tmp_path, monkeypatch):
    first, clone = tmp_path / "machine-a", tmp_path / "machine-b"
    first.mkdir()
    (first / "base.yaml").write_text(yaml.safe_dump({"data": {"task": "sst2"}}))
    (first / "studies").mkdir()
    (first / "studies" / "half.yaml").write_text(yaml.safe_dump({
        "name": NAME, "base": "base.yaml", "command": FAKE,
        "axes": {"model.factorization.method": ["lowrank", "monarch"]}, "seeds": [1, 2]}))

    # machine A: the default storage is the record under docs/studies/; two grid points finish, a third is
    # running when the machine goes away (its heartbeat stops)
    monkeypatch.chdir(first)
    spec = load_spec("studies/half.yaml")
    url = st.default_storage(NAME)
    store = st.storage(url, heartbeat=1, grace=2)
    assert url.startswith(st.JOURNAL_SCHEME) and (first / "docs" / "studies" / NAME / "journal.log").is_file()
    study = st.create(spec, store)
    worker = Worker(spec, study, store, st.ROOT)
    for _ in range(2):
        assert worker.take(study.ask()) == 1
    orphan = study.ask()
    store.record_heartbeat(orphan._trial_id)
    finished = _points(study)
    assert len(finished) == 2

    # what a commit carries: the study file, its base recipe and the record; no run directory, no database
    for rel in ("base.yaml", "studies/half.yaml", f"docs/studies/{NAME}/journal.log"):
        (clone / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(first / rel, clone / rel)
    assert not (clone / "logs").exists()
    time.sleep(2.5)  # the orphan's heartbeat is now older than the grace period

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "lit_factor.study.cli", "run", "studies/half.yaml",
                           "--heartbeat", "1", "--grace", "2"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 already finished" in done.stdout

    record = clone / "docs" / "studies" / NAME / "journal.log"
    resumed = st.load(NAME, st.storage(st.JOURNAL_SCHEME + str(record).lstrip("/")))
    assert _points(resumed) == [("lowrank", 1), ("lowrank", 2), ("monarch", 1), ("monarch", 2)]
    ran_here = (clone / "logs" / "studies" / "invocations.txt").read_text().splitlines()
    assert len(ran_here) == 2  # only the two unfinished points ran on the clone (the orphan among them)
    assert not {(ln.split()[0], int(ln.split()[2])) for ln in ran_here} & set(finished)
    orphaned = next(t for t in resumed.get_trials() if t.number == orphan.number)
    assert orphaned.state.name == "FAIL"  # stale on the clone: failed and its grid point re-queued


def test_snapshot_of_a_live_record_keeps_whole_lines_only(tmp_path):
    record = tmp_path / "journal.log"
    record.write_bytes(b'{"op_code": 0}\n{"op_code": 1}\n{"op_co')  # a line being appended
    copy = st.snapshot(record, tmp_path / "copy" / "journal.log")
    assert copy.read_bytes() == b'{"op_code": 0}\n{"op_code": 1}\n'


def test_a_legacy_sqlite_study_is_copied_into_a_record_never_over_one(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = optuna.create_study(study_name="old", storage=url)
    old.set_user_attr("source", "studies/old.yaml")
    old.add_trial(optuna.create_trial(value=0.5, params={}, distributions={}, user_attrs={"verdict": "succeeded"}))
    record = st.journal_from(url, "old", tmp_path / "docs" / "old" / "journal.log")
    copied = st.load("old", st.storage(st.JOURNAL_SCHEME + str(record).lstrip("/")))
    assert copied.user_attrs["source"] == "studies/old.yaml"
    assert [t.user_attrs["verdict"] for t in copied.get_trials()] == ["succeeded"]
    with pytest.raises(Exception, match="never overwritten"):
        st.journal_from(url, "old", record)


def _ask_params(study, spec) -> dict:
    trial = study.ask()
    return {axis: trial.suggest_categorical(axis, values) for axis, values in spec.search_space().items()}


def test_a_new_grid_runs_in_seed_rounds_so_a_partial_grid_holds_whole_rounds(tmp_path):
    """A CPU session finishes a share of a GPU-sized grid: that share must be n seeds in every cell (the dense
    arm included), not five seeds in some cells and none in others."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data": {"task": "sst2"}}))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "name": "rounds", "base": str(tmp_path / "base.yaml"), "command": FAKE,
        "axes": {"compression": ["dense", "lowrank", "monarch"], "staging": ["flat", "staged"]},
        "seeds": [1, 2, 3]}))
    spec = load_spec(tmp_path / "s.yaml")
    store = st.storage(st.JOURNAL_SCHEME + str(tmp_path / "journal.log").lstrip("/"), heartbeat=1, grace=2)
    study = st.create(spec, store)
    assert study.user_attrs["grid_order"] == st.SEED_ROUNDS
    first = [_ask_params(study, spec) for _ in range(12)]
    cells = [(p["compression"], p["staging"]) for p in first]
    assert [p["seed"] for p in first] == [1] * 6 + [2] * 6          # whole rounds first
    assert cells[:6] == [(c, s) for c in ("dense", "lowrank", "monarch") for s in ("flat", "staged")]  # file order
    assert cells[6:] == cells[:6]
    reopened = st.create(spec, store)  # a second worker opening the same study continues the same order
    rest = [_ask_params(reopened, spec) for _ in range(6)]
    assert {(p["compression"], p["staging"], p["seed"]) for p in rest} == {
        (c, s, 3) for c in ("dense", "lowrank", "monarch") for s in ("flat", "staged")}
    assert st.grid_state(study).unstarted == set()
    assert _ask_params(study, spec)["seed"] == 1  # past the grid: the worker's holder check prunes it as a duplicate


def test_a_requeued_trial_takes_no_position_so_no_cell_is_skipped(tmp_path):
    """Both trials of round 2 die with their workers and are re-queued (new trial numbers, same cells). Round 3 must
    still start with its first cell, the dense arm: re-queued copies used to take positions, and round 3 was skipped
    until the trial numbers ran past the grid (claim2_mrpc-lowrank lost round 3's dense run so, 2026-12-02)."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data": {"task": "sst2"}}))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "name": "requeue", "base": str(tmp_path / "base.yaml"), "command": FAKE,
        "axes": {"compression": ["dense", "lowrank"]}, "seeds": [1, 2, 3, 4]}))
    spec = load_spec(tmp_path / "s.yaml")
    store = st.storage(st.JOURNAL_SCHEME + str(tmp_path / "journal.log").lstrip("/"), heartbeat=1, grace=2)
    study = st.create(spec, store)
    trials = []
    for _ in range(4):  # rounds 1 and 2 start on four workers
        trials.append(study.ask())
        _ = {axis: trials[-1].suggest_categorical(axis, values) for axis, values in spec.search_space().items()}
    for trial in trials[:2]:
        study.tell(trial, 0.5)
    for trial in trials[2:]:  # round 2 dies with its workers
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        st.requeue(study, study.trials[trial.number])
    retried = [_ask_params(study, spec) for _ in range(2)]  # the queue first: the same round-2 cells
    assert [(p["compression"], p["seed"]) for p in retried] == [("dense", 2), ("lowrank", 2)]
    assert [(p["compression"], p["seed"]) for p in (_ask_params(study, spec) for _ in range(2))] == [
        ("dense", 3), ("lowrank", 3)]


def test_a_study_created_before_seed_rounds_keeps_optunas_order(tmp_path):
    """Grid ids of an older study mean cells of Optuna's shuffled order: resuming it must not reinterpret them."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data": {"task": "sst2"}}))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "name": "old", "base": str(tmp_path / "base.yaml"), "command": FAKE,
        "axes": {"compression": ["dense", "lowrank"]}, "seeds": [1, 2, 3]}))
    spec = load_spec(tmp_path / "s.yaml")
    store = st.storage(st.JOURNAL_SCHEME + str(tmp_path / "journal.log").lstrip("/"), heartbeat=1, grace=2)
    study = st.create(spec, store)
    study.set_user_attr("grid_order", None)  # as recorded before grid_order existed
    old = st.create(spec, store)
    assert isinstance(old.sampler, optuna.samplers.GridSampler)
    seen = {(p["compression"], p["seed"]) for p in (_ask_params(old, spec) for _ in range(6))}
    assert len(seen) == 6  # Optuna's grid sampler still hands out every cell once


def test_the_one_private_optuna_name_the_record_uses_still_fits(tmp_path, monkeypatch):
    """JournalRecord's heartbeats implement ``optuna.storages._heartbeat.BaseHeartbeat``: Optuna has no public
    heartbeat base (5.0), and ``fail_stale_trials`` recognizes a storage with heartbeats only through it. An
    Optuna upgrade that moves or reshapes it fails here, naming what changed, instead of silently never
    re-queueing a dead worker's trial."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    ours = {"record_heartbeat", "_get_stale_trial_ids", "get_heartbeat_interval",
            "get_heartbeat_stale_trial_callback"}
    assert BaseHeartbeat.__abstractmethods__ <= ours, BaseHeartbeat.__abstractmethods__ - ours
    clock = [time.time() + 1.0]  # just after the trial starts (its start time counts as a beat too)
    monkeypatch.setattr(st.time, "time", lambda: clock[0])
    record = st.storage(st.JOURNAL_SCHEME + str(tmp_path / "journal.log").lstrip("/"), heartbeat=1, grace=2)
    assert isinstance(record, BaseHeartbeat) and is_heartbeat_enabled(record)
    study = optuna.create_study(storage=record, study_name="beats")
    trial = study.ask()
    record.record_heartbeat(trial._trial_id)
    clock[0] += 1.5  # within the grace period: alive
    optuna.storages.fail_stale_trials(study)
    assert study.get_trials()[0].state.name == "RUNNING"
    clock[0] += 1.0  # 2.5 s since the last beat: stale, failed (and re-queued by the retry callback)
    optuna.storages.fail_stale_trials(study)
    states = sorted(t.state.name for t in study.get_trials())
    assert states == ["FAIL", "WAITING"]
