"""A study worker: takes grid cells from the study until none is left, running each as a ``fit`` subprocess.

Started by ``study run`` (one process per worker: ``python -m lit_factor.study.worker ...``), or by hand on
other machines against the same ``--storage``. Prints one line per finished trial.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from lit_factor.errors import UserError, fail
from lit_factor.hardware import describe_machine
from lit_factor.study import storage as st
from lit_factor.study import trial as tr
from lit_factor.study.carry_on import carry_on_point, process_alive
from lit_factor.study.results import read_run
from lit_factor.study.spec import SEED, StudySpec, cell_label, excluded, load_spec

#: lit-factor fits also save their latest state every 5 minutes of training (``latest-epoch=E-step=S.ckpt``, one
#: kept): what a copy of the trial goes on from when the worker dies (carry_on.py). The CLI's own checkpoint keeps
#: only the best epoch, which can be epochs behind; a time interval costs a GPU fit of a few minutes nothing.
KEEP_LATEST = ["--trainer.callbacks+=" + json.dumps({
    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
    "init_args": {"filename": "latest-{epoch}-{step}", "train_time_interval": "0:05:00", "save_top_k": 1}})]


@dataclass
class Worker:
    spec: StudySpec
    study: optuna.Study
    store: RDBStorage
    root: Path  # run directories go to <root>/<study name>/trial_NNNN
    index: int = 0
    threads: int = 1
    gpu: str | None = None
    data_dir: str | None = None
    heartbeat: float = 30.0
    #: what each trial records it ran on (``study run`` passes the study's description, made once for all its
    #: workers; None: this worker describes its own machine, once)
    machine: str | None = None
    #: waits between looks at a grid whose last trials are running elsewhere (tests: an event, not a clock)
    sleep: Callable[[float], None] = time.sleep
    #: fails and re-queues trials of dead workers (default: :meth:`reap_dead`; tests: an explicit event)
    reap: Callable[[optuna.Study], None] | None = None

    def __post_init__(self) -> None:
        if self.machine is None:
            self.machine = describe_machine([self.gpu] if self.gpu else [])

    def loop(self, wait: bool = True) -> int:
        """Run trials until the grid is done; the number run. ``wait=False``: return as soon as nothing is left to
        start (a queue's worker goes on to the next study; the running trials are their own workers')."""
        done = 0
        while True:
            (self.reap or self.reap_dead)(self.study)  # a dead worker's trial is failed and re-queued here
            state = st.grid_state(self.study)
            if not state.waiting and not state.unstarted:
                if not state.running or not wait:
                    return done
                self.sleep(self.heartbeat)  # a running trial may still turn out stale: wait and see
                continue
            trial = self.study.ask()
            trial.set_user_attr("host", os.uname().nodename)  # whose it is, at once: a copy inherits its
            trial.set_user_attr("worker_pid", os.getpid())   # original's, whose worker is dead (reap_dead)
            try:
                with Heartbeat(self.store, self.trial_id(trial), self.heartbeat):  # silent = dead worker
                    done += self.take(trial)
            except UpdateFinishedTrialError:  # declared dead meanwhile (no heartbeat within the grace period)
                print(f"warning: trial {trial.number} was re-queued by another worker (no heartbeat); left to it",
                      file=sys.stderr, flush=True)
            except KeyboardInterrupt:
                for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the bookkeeping short
                    signal.signal(sig, signal.SIG_IGN)
                self.interrupted(trial)
                raise

    def take(self, trial: optuna.Trial) -> int:
        """Run ``trial`` unless another trial already covers its grid point; 1 if it ran."""
        params = {axis: trial.suggest_categorical(axis, values)
                  for axis, values in self.study.user_attrs["search_space"].items()}
        if excluded(self.spec.exclude, params):  # Optuna's grid is the full product: this cell is not to run
            trial.set_user_attr("excluded", True)
            self.study.tell(trial, state=TrialState.PRUNED)
            return 0
        holder = st.holder_of(self.study, trial.number, self.frozen(trial.number).system_attrs.get("grid_id"))
        if holder is not None:
            trial.set_user_attr("duplicate_of", holder.number)
            self.study.tell(trial, state=TrialState.PRUNED)
            return 0
        self.run(trial, params)
        return 1

    def run(self, trial: optuna.Trial, params: dict) -> None:
        spec, number = self.spec, trial.number
        # a copy of a trial whose worker died goes on from the dead fit's checkpoint, in its run directory
        carry = carry_on_point(self.study, number, self.frozen(number).system_attrs.get("grid_id"))
        run_dir = carry.run_dir if carry else self.root / spec.name / f"trial_{number:04d}"
        task = spec.task_of(params) if spec.stability is not None else None  # the monitor needs the task
        cmd = (spec.command or tr.fit_command()) + spec.fit_args(params, task) + self.run_dir_args(run_dir)
        cmd += ([] if spec.command else KEEP_LATEST) + (carry.fit_args() if carry else [])
        log_file = run_dir / "fit.log"
        start = time.time()
        if carry:
            print(f"[worker {self.index}] trial {number} goes on from trial {carry.trial}'s checkpoint at step "
                  f"{carry.step} ({carry.checkpoint})", flush=True)
        trial.set_user_attr("carried_on", carry.as_attr() if carry else None)  # a copy inherits its original's
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("worker", self.index)
        # per trial, not only per study: a grid resumed elsewhere mixes machines, and speed compares within one
        trial.set_user_attr("machine", self.machine)
        trial.set_user_attr("verdict", "running")
        rc = tr.execute(cmd, tr.trial_env(self.threads, self.gpu), log_file,
                        on_start=lambda pid: trial.set_user_attr("pid", pid))
        result = read_run(run_dir) if run_dir.is_dir() else {}
        verdict = tr.verdict(rc, result)
        if carry and verdict == tr.INVALID:  # its settings passed the grid check, so what fit refused is what it went
            verdict = tr.ERROR  # on from (a checkpoint the code no longer fits): a crash, retried afresh (carry_on.py)
        self.record(trial, params, verdict, rc, result, time.time() - start, log_file)
        if not spec.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)

    def run_dir_args(self, run_dir: Path) -> list[str]:
        args = ["--trainer.logger.init_args.save_dir", str(run_dir.parent), "--trainer.logger.init_args.name", "",
                "--trainer.logger.init_args.version", run_dir.name]
        return args + (["--data.data_dir", self.data_dir] if self.data_dir else [])

    def record(self, trial, params, verdict: str, rc: int, result: dict, wall: float, log_file: Path) -> None:
        trial.set_user_attr("verdict", verdict)
        trial.set_user_attr("exit_code", rc)
        trial.set_user_attr("wall_s", round(wall, 1))
        trial.set_user_attr("result", result)
        trial.set_user_attr("log_tail", "" if verdict in tr.RESULTS else tr.tail(log_file))
        value = result.get("final")
        value = value if isinstance(value, float | int) and math.isfinite(value) else -math.inf
        self.study.tell(trial, value if verdict in tr.RESULTS else None,
                        state=TrialState.COMPLETE if verdict in tr.RESULTS else TrialState.FAIL)
        if verdict == tr.ERROR and self.crashes(trial.number) <= self.spec.retries:
            RetryHeartbeatStaleTrialCallback()(self.study, self.frozen(trial.number))  # a copy, its history extended
        print(progress_line(trial.number, params, verdict, result, wall, self.index), flush=True)

    def reap_dead(self, study: optuna.Study) -> None:
        """Fail and re-queue the trials of dead workers: those silent past the grace period (on any machine:
        Optuna's ``fail_stale_trials``), and at once those whose worker process on this machine is gone. So a
        study restarted after its session ended takes up its cut-short trials first (carry_on.py), instead of
        starting new cells while they wait out the grace."""
        fail_stale_trials(study)
        here = os.uname().nodename
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = t.user_attrs.get("worker_pid")
            if t.user_attrs.get("host") != here or not isinstance(pid, int) or process_alive(pid):
                continue
            started = t.datetime_start  # aware (journal) or naive local time (databases), as the storage keeps it
            if started is None or (datetime.datetime.now(started.tzinfo) - started).total_seconds() < self.heartbeat:
                continue  # just taken: its worker may not have written its own pid over its original's yet
            trial_id = self.trial_id(t)
            try:
                if not self.store.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except UpdateFinishedTrialError:  # another worker here got there first
                continue
            callback = self.store.get_heartbeat_stale_trial_callback()
            if callback is not None:
                callback(study, self.store.get_trial(trial_id))

    def crashes(self, number: int) -> int:
        """How many tries of this trial's grid point crashed, it included. Its tries cut short by a dead worker or a
        Ctrl-C do not count: those are the machine's doing, and re-queued however often they happen."""
        frozen = self.frozen(number)
        tries = set(frozen.system_attrs.get("retry_history", [])) | {number}
        return sum(t.user_attrs.get("verdict") == tr.ERROR for t in self.study.get_trials(deepcopy=False)
                   if t.number in tries)

    def interrupted(self, trial) -> None:
        """Ctrl-C or SIGTERM: the trial fails as ``interrupted`` and a copy goes back to the queue (not a retry)."""
        frozen = self.frozen(trial.number)
        if frozen.state != TrialState.RUNNING:
            return
        trial.set_user_attr("verdict", tr.INTERRUPTED)
        self.study.tell(trial, state=TrialState.FAIL)
        st.requeue(self.study, frozen)

    def trial_id(self, trial: optuna.Trial) -> int:
        """The storage's id of ``trial`` (what heartbeats are recorded under), through the storage's public API."""
        return self.store.get_trial_id_from_study_id_trial_number(self.store.get_study_id_from_name(
            self.study.study_name), trial.number)

    def frozen(self, number: int):
        return next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)


class Heartbeat:
    """Record a trial's heartbeat every ``interval`` s from a thread while the block runs (as Study.optimize does)."""

    def __init__(self, store: RDBStorage, trial_id: int, interval: float) -> None:
        self.store, self.trial_id, self.interval = store, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            self.store.record_heartbeat(self.trial_id)
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        self.store.record_heartbeat(self.trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def progress_line(number: int, params: dict, verdict: str, result: dict, wall: float, worker: int) -> str:
    metric = result.get("monitor") or "dev"
    value = result.get("final")
    shown = f" {metric}={value:.4f}" if isinstance(value, float | int) else ""
    return (f"[worker {worker}] trial {number} {verdict}:{shown} in {wall / 60:.1f} min "
            f"({cell_label(params)} {SEED}={params[SEED]})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lit_factor.study.worker", description=__doc__)
    p.add_argument("spec")
    p.add_argument("--variant", action="append", default=[],
                   help="repeatable, with one --storage each: the studies of a queue, in turn")
    p.add_argument("--storage", action="append", required=True)
    p.add_argument("--root", default=str(st.ROOT))
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gpu")
    p.add_argument("--data-dir")
    p.add_argument("--heartbeat", type=float, default=30.0)
    p.add_argument("--grace", type=float)
    p.add_argument("--machine", help="what the trials ran on, as recorded (default: this machine, described)")
    args = p.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):  # stop like Ctrl-C (even if started with SIGINT ignored)
        signal.signal(sig, signal.default_int_handler)  # the running trial goes back to the queue
    try:
        variants = args.variant or [None]
        if len(variants) != len(args.storage):
            raise UserError(f"{len(args.variant)} --variant for {len(args.storage)} --storage: give one of each "
                            f"per study")
        for i, (variant, url) in enumerate(zip(variants, args.storage, strict=True)):
            spec = load_spec(args.spec, variant)
            store = st.storage(url, int(args.heartbeat), args.grace and int(args.grace))
            if not st.exists(spec.name, store):  # started by hand as the study's first worker: check the grid
                tr.check_grid(spec, args.data_dir)
            worker = Worker(spec, st.create(spec, store), store, Path(args.root), args.index, args.threads, args.gpu,
                            args.data_dir, args.heartbeat, args.machine)
            worker.loop(wait=i == len(variants) - 1)  # only the queue's last study waits for others' trials
    except UserError as err:
        fail(err)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
