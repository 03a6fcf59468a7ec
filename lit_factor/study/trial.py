"""One trial = one ``python cli.py fit`` subprocess with its own run directory, log file and CPU/GPU share.

The exit status decides what the trial *is* (docs/studies/README.md): 0 a run that succeeded, 3 a run that trained and
failed (diverged or ended at the majority baseline: a result, never retried), 2 bad settings (not retried),
anything else a crash (an error, retried once). Until every fit exits 3 on failure, a run that exits 0 but whose
``stability.json`` says it did not succeed also counts as failed.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from lit_factor.errors import EXIT_RUN_FAILED, EXIT_USAGE, UserError
from lit_factor.study.spec import SEED, StudySpec, cell_label

SUCCEEDED, FAILED, INVALID, ERROR, INTERRUPTED = "succeeded", "failed", "invalid", "error", "interrupted"
#: verdicts that are results of the experiment (the trial is COMPLETE and never rerun)
RESULTS = (SUCCEEDED, FAILED)


def fit_command() -> list[str]:
    """``lit-factor fit`` of the installed package, run by this interpreter (``python -m lit_factor fit``): no
    checkout needed, so a non-editable install runs studies too."""
    return [sys.executable, "-m", "lit_factor", "fit"]


def check_fit_args(arg_lists: list[list[str]]) -> list[str | None]:
    """Parse every argument list with ``fit``'s own parser, in one ``python -m lit_factor check-fit-args``
    subprocess (the parser lives above the study: lit_factor.cli), nothing instantiated; one error line or None each.
    """
    with tempfile.TemporaryDirectory(prefix="lit-factor-grid-") as tmp:
        path = Path(tmp) / "cells.json"
        path.write_text(json.dumps(arg_lists))
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, "-m", "lit_factor", "check-fit-args", str(path)], env=env,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
    try:
        results = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        results = None
    if proc.returncode != 0 or not isinstance(results, list) or len(results) != len(arg_lists):
        reason = " ".join((proc.stderr or proc.stdout).split())[-300:]
        raise UserError(f"cannot check the grid with fit's parser (exit status {proc.returncode}: {reason})")
    return results


def check_grid(spec: StudySpec, data_dir: str | None = None,
               checker: Callable[[list[list[str]]], list[str | None]] | None = None) -> None:
    """Refuse a grid any of whose cells ``fit`` would refuse (an unknown key, a value of the wrong type or not in
    its choices, a callback class that does not exist), before any trial starts or anything is stored.

    Each cell's arguments are those of its first seed (seeds only change ``--seed_everything``). A study with its
    own ``command`` (not lit-factor's ``fit``) is not checked: its parser is unknown here.
    """
    if spec.command is not None:
        return
    cells = spec.cells()
    arg_lists = []
    for cell in cells:
        params = {**cell, SEED: spec.seeds[0]}
        task = spec.task_of(params) if spec.stability is not None else None
        arg_lists.append(spec.fit_args(params, task) + (["--data.data_dir", data_dir] if data_dir else []))
    bad = [(cell, error) for cell, error in zip(cells, (checker or check_fit_args)(arg_lists), strict=True) if error]
    if bad:
        cell, error = bad[0]
        more = f" (and {len(bad) - 1} more of the {len(cells)} cells)" if len(bad) > 1 else ""
        raise UserError(f"{spec.source}: grid cell {cell_label(cell) or '(the only one)'} is refused by fit: {error}"
                        f"{more}; nothing was run or stored")


def trial_env(threads: int, gpu: str | None) -> dict[str, str]:
    """The environment of a fit: its share of CPU threads and, on GPU machines, its one GPU."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)  # torch's intra-op pool follows OMP_NUM_THREADS
    env["TOKENIZERS_PARALLELISM"] = "false"
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    env["PYTHONUNBUFFERED"] = "1"
    return env


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this (child) process when its parent dies: a killed worker leaves no fit training on.
    Elsewhere a no-op (then a killed worker's fit runs to its end, and its result is simply not recorded)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def execute(cmd: list[str], env: dict[str, str], log_file: Path, on_start: Callable[[int], None] | None = None) -> int:
    """Run ``cmd`` with stdout+stderr into ``log_file``; its exit code.

    The child runs in its own session, so a Ctrl-C at the terminal reaches the worker (which then stops the
    child and records the trial as interrupted) rather than the fit (which would shut down "gracefully").
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent)
    try:
        if on_start is not None:
            on_start(proc.pid)
        return proc.wait()
    except BaseException:
        stop(proc)
        raise


#: seconds a fit told to stop (SIGTERM) gets before it is killed: it saves a checkpoint at its next optimizer step
#: (CheckpointOnSigterm), which the trial's re-queued copy goes on from (carry_on.py). On one CPU core a step of an
#: MRPC fit takes ~10 s and the save of a MiniLM checkpoint (~200 MB) a few more.
STOP_GRACE = 60.0


def stop(proc: subprocess.Popen, grace: float = STOP_GRACE) -> None:
    """Terminate a fit, then kill it if it does not stop within ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def verdict(returncode: int, result: dict) -> str:
    """What a finished fit was: succeeded / failed (results) or invalid / error."""
    if returncode == 0:
        return FAILED if result.get("succeeded") is False else SUCCEEDED
    if returncode == EXIT_RUN_FAILED:
        return FAILED
    if returncode == EXIT_USAGE:
        return INVALID
    return ERROR


def tail(log_file: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file (what a crash said)."""
    try:
        with open(log_file, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
