"""Preemption: a trial whose worker died is re-queued however often that happens (a crash is retried only
``retries`` times), and its copy goes on from the dead fit's checkpoint (lit_factor/study/carry_on.py): which runs
qualify, which checkpoint is taken, the command the copy runs, and -- with real tiny fits -- that a trial carried
on from a checkpoint ends exactly as the same trial run whole."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from lit_factor.study import storage as st
from lit_factor.study.carry_on import carry_on_point
from lit_factor.study.spec import load_spec
from lit_factor.study.worker import KEEP_LATEST, Worker
from tests.test_study import FAKE, _declare_dead, write_study

HOST = os.uname().nodename


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def save_checkpoint(run_dir: Path, step: int, mtime: float, truncated: bool = False) -> Path:
    path = run_dir / "checkpoints" / f"epoch=0-step={step}.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": step}, path)
    if truncated:  # what a kill in the middle of a save leaves
        path.write_bytes(path.read_bytes()[:100])
    os.utime(path, (mtime, mtime))
    return path


def make_study(tmp_path: Path, name: str, url: str | None = None, **study):
    path = write_study(tmp_path / f"{name}.yaml", base=str(write_study(tmp_path / "base.yaml", data={"task": "sst2"})),
                       command=FAKE, axes={"model.factorization.method": ["lowrank", "monarch"]}, seeds=[1], **study)
    spec = load_spec(path)
    url = url or st.default_storage(name, tmp_path / "logs")  # the journal record, or a database
    store = st.storage(url, heartbeat=3600)  # stale only when a test says
    return spec, st.create(spec, store), store


def died(study, store, run_dir: Path | None, *, verdict="running", host=HOST, pid=None) -> int:
    """A trial that took the first cell and whose worker died (its copy re-queued); its number."""
    trial = study.ask()
    for axis, values in study.user_attrs["search_space"].items():
        trial.suggest_categorical(axis, values)
    attrs = {"verdict": verdict, "host": host, "pid": dead_pid() if pid is None else pid}
    attrs |= {"run_dir": str(run_dir)} if run_dir is not None else {}
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    _declare_dead(study, store, trial.number)
    return trial.number


def copy_of(study, number: int):
    """The latest re-queued copy of trial ``number`` (a copy's retry history lists the trials before it)."""
    return max((t for t in study.get_trials() if number in t.system_attrs.get("retry_history", [])),
               key=lambda t: t.number)


@pytest.mark.parametrize("record", ["journal", "database"])
def test_a_grid_point_preempted_again_and_again_is_requeued_every_time(tmp_path, record):
    url = f"sqlite:///{tmp_path / 'again.db'}" if record == "database" else None
    spec, study, store = make_study(tmp_path, "again", url)
    number = died(study, store, None)
    for _ in range(3):  # its copy's worker dies too, three times
        copy = study.ask()
        assert copy.number == copy_of(study, number).number
        for axis, values in study.user_attrs["search_space"].items():
            copy.suggest_categorical(axis, values)
        copy.set_user_attr("verdict", "running")
        _declare_dead(study, store, copy.number)
        number = copy.number
    assert copy_of(study, number).state == TrialState.WAITING
    worker = Worker(spec, study, store, tmp_path / "logs", sleep=lambda s: pytest.fail("nothing to wait for"))
    assert worker.loop() == 2
    assert sorted(t.params["model.factorization.method"] for t in study.get_trials()
                  if t.state == TrialState.COMPLETE) == ["lowrank", "monarch"]


def test_a_crash_after_a_preemption_still_gets_its_retry(tmp_path):
    spec, study, store = make_study(tmp_path, "crash", args={"fake.exit": 1}, retries=1)
    died(study, store, None)
    worker = Worker(spec, study, store, tmp_path / "logs", sleep=lambda s: pytest.fail("nothing to wait for"))
    worker.loop()
    runs = [ln.split()[0] for ln in (tmp_path / "logs" / "invocations.txt").read_text().splitlines()]
    assert sorted(runs) == ["lowrank", "lowrank", "monarch", "monarch"]  # each point: a try and its one retry
    assert {t.user_attrs["verdict"] for t in study.get_trials()} == {"running", "error"}


def test_copy_goes_on_from_the_newest_readable_checkpoint_in_the_dead_runs_directory(tmp_path):
    spec, study, store = make_study(tmp_path, "carry")
    run_dir = tmp_path / "logs" / "carry" / "trial_0000"
    older = save_checkpoint(run_dir, 5, mtime=1_000)
    save_checkpoint(run_dir, 9, mtime=2_000, truncated=True)  # the newest, cut off by the kill: passed over
    dead = died(study, store, run_dir)
    worker = Worker(spec, study, store, tmp_path / "logs", sleep=lambda s: pytest.fail("nothing to wait for"))
    assert worker.loop() == 2

    lines = [ln.split() for ln in (tmp_path / "logs" / "invocations.txt").read_text().splitlines()]
    assert sorted((ln[0], ln[3], ln[4]) for ln in lines) == [("lowrank", "trial_0000", str(older)),
                                                              ("monarch", "trial_0002", "-")]
    copy = copy_of(study, dead)
    assert copy.state == TrialState.COMPLETE and copy.user_attrs["run_dir"] == str(run_dir)
    assert copy.user_attrs["carried_on"] == {"trial": dead, "checkpoint": str(older), "step": 5}
    command = (run_dir / "fit.log").read_text().splitlines()[0]
    assert f"--ckpt_path {older} --trainer.logger.init_args.purge_step 5" in command
    assert KEEP_LATEST[0] not in command  # a custom command is not given lit-factor's checkpoint options


@pytest.mark.parametrize("case", ["crashed", "other_host", "fit_alive", "no_checkpoint", "finished_elsewhere",
                                  "carried_on_then_crashed"])
def test_a_run_that_was_not_cut_short_here_is_not_carried_on(tmp_path, case):
    spec, study, store = make_study(tmp_path, "fresh")
    run_dir = tmp_path / "logs" / "fresh" / "trial_0000"
    if case != "no_checkpoint":
        save_checkpoint(run_dir, 5, mtime=1_000)
    dead = died(study, store, run_dir, verdict="error" if case == "crashed" else "running",
                host="elsewhere" if case == "other_host" else HOST, pid=os.getpid() if case == "fit_alive" else None)
    if case == "finished_elsewhere":  # the record came from another clone: the dead run's directory is not here
        shutil.rmtree(run_dir)
    if case == "carried_on_then_crashed":  # the copy went on from that checkpoint and crashed: the line is broken
        crashed = study.ask()
        for axis, values in study.user_attrs["search_space"].items():
            crashed.suggest_categorical(axis, values)
        crashed.set_user_attr("verdict", "error")
        study.tell(crashed, state=TrialState.FAIL)
        RetryHeartbeatStaleTrialCallback()(study, next(t for t in study.get_trials() if t.number == crashed.number))
        dead = crashed.number
    copy = copy_of(study, dead)
    assert carry_on_point(study, copy.number, copy.system_attrs["grid_id"]) is None


def test_a_carried_on_try_refused_by_fit_is_retried_afresh_not_ended(tmp_path):
    spec, study, store = make_study(tmp_path, "refused", args={"fake.exit_resumed": 2}, retries=1)
    run_dir = tmp_path / "logs" / "refused" / "trial_0000"
    checkpoint = save_checkpoint(run_dir, 5, mtime=1_000)
    dead = died(study, store, run_dir)
    worker = Worker(spec, study, store, tmp_path / "logs", sleep=lambda s: pytest.fail("nothing to wait for"))
    worker.loop()
    lines = [ln.split() for ln in (tmp_path / "logs" / "invocations.txt").read_text().splitlines()]
    assert sorted((ln[0], ln[4]) for ln in lines) == [("lowrank", "-"), ("lowrank", str(checkpoint)), ("monarch", "-")]
    carried, afresh = sorted((t for t in study.get_trials() if dead in t.system_attrs.get("retry_history", [])),
                             key=lambda t: t.number)
    assert carried.user_attrs["carried_on"]["checkpoint"] == str(checkpoint)
    assert carried.user_attrs["verdict"] == "error"  # not "invalid": that would have ended the cell
    assert afresh.state == TrialState.COMPLETE and afresh.user_attrs["carried_on"] is None


def test_the_latest_try_with_a_checkpoint_is_carried_on(tmp_path):
    spec, study, store = make_study(tmp_path, "chain")
    first, second = tmp_path / "runs" / "first", tmp_path / "runs" / "second"
    save_checkpoint(first, 5, mtime=1_000)
    a = died(study, store, first)
    # the copy of `a` went on from `first` and died before it saved: its copy still finds `first`'s checkpoint
    copy_a = study.ask()
    assert copy_a.number == copy_of(study, a).number
    for axis, values in study.user_attrs["search_space"].items():
        copy_a.suggest_categorical(axis, values)
    for key, value in {"verdict": "running", "host": HOST, "pid": dead_pid(), "run_dir": str(second)}.items():
        copy_a.set_user_attr(key, value)
    _declare_dead(study, store, copy_a.number)
    copy_b = copy_of(study, copy_a.number)
    point = carry_on_point(study, copy_b.number, copy_b.system_attrs["grid_id"])
    assert (point.trial, point.run_dir, point.step) == (a, first, 5)
    save_checkpoint(second, 8, mtime=2_000)  # had it saved, its own run would be the one to go on from
    point = carry_on_point(study, copy_b.number, copy_b.system_attrs["grid_id"])
    assert (point.trial, point.run_dir, point.step) == (copy_a.number, second, 8)


@pytest.mark.slow
def test_real_trial_carried_on_from_an_epoch_checkpoint_ends_as_the_whole_run(tmp_path, glue_writer, monkeypatch,
                                                                            capsys):
    """Two studies of one real tiny fit (2 epochs): one runs whole; the other's first try "dies" after epoch 1 (its
    run directory: the whole run's, cut back to the epoch-1 checkpoint). The copy's dev metric and its whole loss
    curve equal the uninterrupted run's: the copy resumed exactly, and the dead try's later events were purged."""
    glue_writer("SST-2", n_train=16, n_dev=8)
    base = write_study(tmp_path / "tiny.yaml", seed_everything=1, trainer={
        "max_epochs": 2, "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False},
        model={"model_name_or_path": "random:tiny-bert"},
        data={"task": "sst2", "batch_size": 8, "max_seq_length": 16})
    study = {"base": str(base), "args": {"checkpoint.save_top_k": -1}, "keep_checkpoints": True,
             "axes": {"model.factorization.budget": [0.5]}, "seeds": [1]}
    monkeypatch.chdir(tmp_path)  # run directories are recorded relative to where the study runs, as in a checkout
    from lit_factor.study import worker as wk  # the latest state saved every 10 ms instead of 5 min: at every step

    monkeypatch.setattr(wk, "KEEP_LATEST", [wk.KEEP_LATEST[0].replace("0:05:00", "0:00:00.010")])

    def worker(name: str):
        spec = load_spec(write_study(tmp_path / f"{name}.yaml", **study))
        store = st.storage(st.default_storage(name, Path("logs")), heartbeat=3600)
        return Worker(spec, st.create(spec, store), store, Path("logs"), data_dir=str(tmp_path / "glue")), store

    whole_worker, _ = worker("whole")
    assert whole_worker.loop() == 1
    whole = whole_worker.study.get_trials()[0]
    assert whole.user_attrs["verdict"] == "succeeded", whole.user_attrs.get("log_tail")
    whole_dir = Path(whole.user_attrs["run_dir"])
    assert sorted(p.name for p in (whole_dir / "checkpoints").glob("epoch=*.ckpt")) == [
        "epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt"]
    assert [p.name for p in (whole_dir / "checkpoints").glob("latest-*.ckpt")] == ["latest-epoch=1-step=4.ckpt"]

    dead_dir = Path("logs/cut/trial_0000")
    shutil.copytree(whole_dir, dead_dir)
    for path in [*(dead_dir / "checkpoints").iterdir(), dead_dir / "summary.json"]:
        if path.name != "epoch=0-step=2.ckpt":
            path.unlink()  # the dead try had saved epoch 1 only, and written no summary
    cut_worker, store = worker("cut")
    dead = died(cut_worker.study, store, dead_dir)
    assert cut_worker.loop() == 1
    assert f"goes on from trial {dead}'s checkpoint at step 2" in capsys.readouterr().out
    copy = copy_of(cut_worker.study, dead)
    assert copy.state == TrialState.COMPLETE and copy.user_attrs["run_dir"] == str(dead_dir)
    assert "resumed at epoch" in (dead_dir / "fit.log").read_text()
    ran, ref = copy.user_attrs["result"], whole.user_attrs["result"]
    assert ran["final"] == ref["final"] and ran["best"] == ref["best"]
    assert ran["train_loss"] == ref["train_loss"] and [s for s, _ in ran["train_loss"]] == [0, 1, 2, 3]


def test_a_carried_on_runs_events_read_as_one_curve_without_a_warning(tmp_path, caplog):
    """A carried-on fit logs again from its checkpoint's step with ``purge_step``: the reader drops the dead try's
    later events (one curve, each step once), and the study's output does not warn of a "TensorFlow restart"."""
    from torch.utils.tensorboard import SummaryWriter

    from lit_factor.study.results import read_scalars

    dead = SummaryWriter(str(tmp_path))
    for step in range(5):
        dead.add_scalar("train/loss", 10.0 + step, step)
    dead.close()
    # (event files are named by the second they were opened in, then a per-process counter: this one sorts after)
    carried = SummaryWriter(str(tmp_path), purge_step=2)
    for step in range(2, 5):
        carried.add_scalar("train/loss", float(step), step)
    carried.close()
    with caplog.at_level(logging.WARNING):
        loss = read_scalars(tmp_path)["train/loss"]
    assert [(s, v) for s, v, _ in loss] == [(0, 10.0), (1, 11.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert not [r for r in caplog.records if "restart" in r.getMessage()]


def taken_by_a_dead_worker(study) -> int:
    """A trial RUNNING in the record whose worker process on this machine is gone (a session that ended)."""
    trial = study.ask()
    for axis, values in study.user_attrs["search_space"].items():
        trial.suggest_categorical(axis, values)
    for key, value in {"verdict": "running", "host": HOST, "worker_pid": dead_pid()}.items():
        trial.set_user_attr(key, value)
    return trial.number


def test_a_restarted_study_takes_up_its_dead_workers_trials_at_once(tmp_path):
    spec, study, store = make_study(tmp_path, "restart")
    dead = taken_by_a_dead_worker(study)
    time.sleep(0.3)  # older than the worker's heartbeat below: no longer "just taken"
    worker = Worker(spec, study, store, tmp_path / "logs", heartbeat=0.2,
                    sleep=lambda s: pytest.fail("waited for the grace period"))
    assert worker.loop() == 2
    first = min((t for t in study.get_trials() if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    assert first.system_attrs["retry_history"] == [dead]  # the dead worker's cell ran first, then the free one


def test_a_trial_just_taken_is_not_reaped_for_its_inherited_dead_pid(tmp_path):
    spec, study, store = make_study(tmp_path, "young")
    dead = taken_by_a_dead_worker(study)  # as a copy looks between its ask and its worker writing its own pid
    Worker(spec, study, store, tmp_path / "logs", heartbeat=3600).reap_dead(study)
    assert next(t for t in study.get_trials() if t.number == dead).state == TrialState.RUNNING
