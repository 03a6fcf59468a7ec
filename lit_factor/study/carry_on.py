"""A re-queued trial carries on the fit its dead predecessor left, from that fit's newest checkpoint.

A study outlives its machine through its record (storage.py); a fit outlives its worker through its checkpoints.
When a worker dies -- a session ends, a machine is preempted, a SIGKILL -- its running trial is failed and a copy
is re-queued (worker.py). Started over, the copy would throw away everything the fit had trained: an hour per MRPC
fit on a CPU core. Instead the copy continues the predecessor's run directory with ``fit --ckpt_path`` from its
newest readable checkpoint, and purges the TensorBoard events the dead fit logged after that checkpoint's step.
:class:`lit_factor.train.callbacks.resume.ExactResume` makes the continued fit end as the uninterrupted one would.

Only a run that was *cut short* is carried on: a trial failed while running (its worker died: verdict still
``running``) or stopped by Ctrl-C/SIGTERM (``interrupted``: the fit saved a checkpoint on SIGTERM). A crash
(``error``) is retried from scratch, since its checkpoint may carry the cause -- and so is a copy whose line of
tries holds one (a try carried on from a checkpoint that then crashed). A carried-on try that ``fit`` refuses (exit
status 2: say the code changed and the checkpoint no longer fits the model) counts as a crash too, not as bad
settings -- its settings passed the grid check -- so its cell is retried afresh instead of ending. The run must
be on this host (the record travels between machines, run directories do not) and its fit process gone: a trial
declared dead while its fit still trains (late heartbeats) leaves the copy to start afresh in its own directory,
never in the same one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from lit_factor.study import trial as tr

#: verdicts of a failed trial whose fit was cut short (not a result, not a crash)
CUT_SHORT = ("running", tr.INTERRUPTED)


@dataclass(frozen=True)
class CarryOn:
    """Where a re-queued trial's fit goes on from."""

    trial: int  # the predecessor whose run directory is continued
    run_dir: Path
    checkpoint: Path
    step: int  # the checkpoint's global step: events logged after it are purged

    def fit_args(self) -> list[str]:
        return ["--ckpt_path", str(self.checkpoint), "--trainer.logger.init_args.purge_step", str(self.step)]

    def as_attr(self) -> dict:
        return {"trial": self.trial, "checkpoint": str(self.checkpoint), "step": self.step}


def carry_on_point(study: optuna.Study, number: int, grid_id: int | None, host: str | None = None) -> CarryOn | None:
    """The newest checkpoint left by an unbroken line of cut-short tries of the same grid cell on this host, the
    latest first; None if there is none. A try that ended otherwise (a crash, refused settings) breaks the line:
    whatever it went on from may be the cause, so the copy starts afresh."""
    host = host or os.uname().nodename
    earlier = sorted((t for t in study.get_trials(deepcopy=False)
                      if t.number < number and grid_id is not None and t.system_attrs.get("grid_id") == grid_id
                      and t.state == TrialState.FAIL and "duplicate_of" not in t.user_attrs),
                     key=lambda t: t.number, reverse=True)
    for t in earlier:  # the latest try first: a continued run only ever moves forward
        if t.user_attrs.get("verdict") not in CUT_SHORT:
            return None
        if t.user_attrs.get("host") != host or not t.user_attrs.get("run_dir"):
            continue  # its run directory is elsewhere: an older try's, here, may still be there
        if process_alive(t.user_attrs.get("pid")):
            return None  # its fit still writes to that directory
        found = newest_checkpoint(Path(t.user_attrs["run_dir"]))
        if found is not None:
            checkpoint, step = found
            return CarryOn(t.number, Path(t.user_attrs["run_dir"]), checkpoint, step)
    return None


def newest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The most recently written checkpoint of a run that loads, with its global step (one cut off by the kill
    that ended the fit is passed over for the one before it)."""
    from lit_factor.train.checkpoints import CheckpointError, read_checkpoint  # torch: only when there is a run

    for path in sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError:
            continue
        return path, int(checkpoint.get("global_step", 0))
    return None


def process_alive(pid: object) -> bool:
    """Whether process ``pid`` of this machine exists (a reused pid reads as alive: the safe side)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone's process: not ours to judge
    return True
