"""``study run``: open the study, start the workers (one process each), print progress until they are done.

Workers share the machine: each gets ``cores // workers`` CPU threads and, where there are GPUs, one GPU
(worker i takes GPU i mod n). Rerunning the same command resumes: finished grid points are skipped, trials of
dead workers are re-queued once their heartbeat is stale.

Several variants of one study file (``--variant mrpc,rte,cola``) run as a queue: a worker that finds nothing left
to start in one study goes on to the next instead of idling until the others' last fits end (the calibration grid
is five such studies; a core idled for most of a fit at the end of each). Only the last study's workers wait for
its running trials; a trial of an earlier study whose worker dies is re-queued when that study runs again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lit_factor.hardware import describe_machine, emulates_bf16
from lit_factor.study import status as stat
from lit_factor.study import storage as st
from lit_factor.study import trial as tr
from lit_factor.study.spec import StudySpec, cell_label
from lit_factor.study.trial import die_with_parent


@dataclass
class RunOptions:
    workers: int = 1
    storage: str | None = None
    root: Path = st.ROOT
    data_dir: str | None = None
    gpus: list[str] | None = None  # None: every visible GPU (none on a CPU machine)
    threads: int | None = None  # per worker; None: cores // workers
    retry_errors: bool = False  # give grid points whose trials all errored (crashed) another try
    heartbeat: int = 30
    grace: int | None = None
    poll: float = 5.0


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def emulated_bf16(spec: StudySpec, gpus: list[str]) -> list[str]:
    """The cells that train in bf16 where that is emulated: on a CPU without native bf16, a step takes about ten
    times longer than in fp32 (docs/speed.md). Each fit warns in its own log; the study says it where it is seen."""
    if gpus or not emulates_bf16():
        return []
    return [cell_label(cell) for cell in spec.cells()
            if str(spec.overrides(cell).get("trainer.precision", "")).startswith("bf16")]


def worker_commands(spec_path: str, queue: list[tuple[str | None, str]], opts: RunOptions,
                    machine: str | None = None) -> list[list[str]]:
    """One worker command per worker; ``queue``: (variant, storage URL) of each study, in the order run;
    ``machine``: what their trials record they ran on (described once here, not by every worker)."""
    gpus = visible_gpus() if opts.gpus is None else opts.gpus
    threads = opts.threads or max(1, (os.cpu_count() or 1) // opts.workers)
    cmds = []
    for i in range(opts.workers):
        cmd = [sys.executable, "-m", "lit_factor.study.worker", spec_path, "--root", str(opts.root),
               "--index", str(i), "--threads", str(threads), "--heartbeat", str(opts.heartbeat)]
        for variant, url in queue:
            cmd += ["--variant", variant] if variant else []
            cmd += ["--storage", url]
        cmd += ["--gpu", gpus[i % len(gpus)]] if gpus else []
        cmd += ["--data-dir", opts.data_dir] if opts.data_dir else []
        cmd += ["--grace", str(opts.grace)] if opts.grace else []
        cmd += ["--machine", machine] if machine else []
        cmds.append(cmd)
    return cmds


def open_study(spec: StudySpec, opts: RunOptions, command: str | None, machine: str) -> tuple[str, object]:
    """Create or reopen the study (its grid already checked) and record the command and machine it runs with."""
    url = opts.storage or st.default_storage(spec.name, opts.root)
    study = st.create(spec, st.storage(url, opts.heartbeat, opts.grace))  # before workers race to it
    if command and command not in study.user_attrs.get("commands", []):
        study.set_user_attr("commands", [*study.user_attrs.get("commands", []), command])
    if machine not in study.user_attrs.get("machines", []):
        study.set_user_attr("machines", [*study.user_attrs.get("machines", []), machine])
    if opts.retry_errors:  # after a fix: the grid points whose every try crashed get one more
        errored = [ts[-1] for ts in stat.grid_points(study).values()
                   if stat.point_state(ts) == "errored" and ts[-1].user_attrs.get("verdict") == tr.ERROR]
        for trial in errored:
            st.requeue(study, trial)
        print(f"{spec.name}: re-queued {len(errored)} errored grid point(s)", flush=True)
    before = stat.counts(study)
    print(f"study {spec.name}: {spec.size()} trials ({len(spec.cells())} cells x {len(spec.seeds)} seeds), "
          f"{before['succeeded'] + before['failed']} already finished; storage {st.masked(url)}; "
          f"{opts.workers} worker(s) on {machine}", flush=True)
    return url, study


def run(spec_path: str, queue: list[tuple[StudySpec, str | None]], opts: RunOptions,
        command: str | None = None) -> int:
    """Run the studies of ``queue`` (each a spec and the variant it came from) to the end, in turn; 0 when every
    grid point of every study has a result, 1 when some errored, are left running or queued, or a worker died."""
    for spec, _ in queue:  # every new study's whole grid is checked before anything is stored
        if not stored(spec.name, opts):
            tr.check_grid(spec, opts.data_dir)
    gpus = visible_gpus() if opts.gpus is None else opts.gpus
    machine = describe_machine(gpus)
    opened = [(spec, variant, *open_study(spec, opts, command, machine)) for spec, variant in queue]
    for spec, *_ in opened:
        if slow := emulated_bf16(spec, gpus):
            print(f"warning: {spec.name}: {len(slow)} of {len(spec.cells())} cells train in bf16 (first: {slow[0]}) "
                  f"on a CPU without native bf16 (AVX-512 BF16, AMX, Arm BF16): emulated, about ten times slower "
                  f"than fp32 (docs/speed.md)", file=sys.stderr, flush=True)
    # workers die with this process (as their fits die with them): a killed run leaves nothing training
    cmds = worker_commands(spec_path, [(variant, url) for _, variant, url, _ in opened], opts, machine)
    for sig in (signal.SIGINT, signal.SIGTERM):  # `kill` stops the study like Ctrl-C
        signal.signal(sig, signal.default_int_handler)
    procs = [subprocess.Popen(cmd, preexec_fn=die_with_parent) for cmd in cmds]
    progress = [Progress(study, len(opened) > 1) for *_, study in opened]
    try:
        while running := [p for p in procs if p.poll() is None]:
            _wait(running[0], opts.poll)  # the run ends when its last worker does, not at the next poll
            for shown in progress:
                shown.show()
    except KeyboardInterrupt:
        print("interrupted: stopping the workers (their trials go back to the queue)", file=sys.stderr, flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        for p in procs:
            if p.poll() is None:
                p.terminate()  # after a Ctrl-C they have it already; after a `kill` of this process, not
        for p in procs:
            p.wait()
        return 130
    unfinished = []
    for shown in progress:
        final = shown.show(last=True)
        if final["errored"] or final["queued"] or final["running"]:
            unfinished.append(shown.study.study_name)
    bad = [p.returncode for p in procs if p.returncode != 0]
    if bad:
        print(f"warning: {len(bad)} worker(s) ended with exit status {bad}", file=sys.stderr, flush=True)
    if unfinished and len(progress) > 1:
        print(f"warning: not every grid point has a result in {', '.join(unfinished)}: rerun the command to resume",
              file=sys.stderr, flush=True)
    return 1 if bad or unfinished else 0


def stored(name: str, opts: RunOptions) -> bool:
    """Whether study ``name`` is already in the storage (nothing is created to find out, but a --storage
    database gets Optuna's tables)."""
    if opts.storage is None:
        return st.record_exists(name, opts.root) and st.exists(name, st.storage(st.default_storage(name, opts.root)))
    return st.exists(name, st.storage(opts.storage, opts.heartbeat, opts.grace))


def _wait(proc: subprocess.Popen, timeout: float) -> None:
    """Until ``proc`` ends or ``timeout`` seconds pass, whichever comes first."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass


def _finished(c) -> int:
    return c["succeeded"] + c["failed"] + c["errored"]


class Progress:
    """One study's progress line, printed when its counts change; in a queue, named, and timed from when its first
    trial started (so that a later study's ETA does not count the time spent on the ones before it)."""

    def __init__(self, study, named: bool) -> None:
        self.study, self.named = study, named
        self.before = stat.counts(study)
        self.start: float | None = None
        self.shown: str | None = None

    def show(self, last: bool = False):
        """Print the line if it changed (``last``: also a study that never started here, once)."""
        c = stat.counts(self.study)
        if self.start is None and (c["running"] or _finished(c) > _finished(self.before) or last):
            self.start = time.time()
        key = str(sorted(c.items()))
        if key != self.shown and self.start is not None:
            line = stat.progress(c, time.time() - self.start, _finished(c) - _finished(self.before))
            print(f"{self.study.study_name}: {line}" if self.named else line, flush=True)
            self.shown = key
        return c
