"""Checkpoint files as the user points at them: checked before anything runs, and the run directory they belong to.

A fit writes ``<save_dir>/<name>/version_<N>/checkpoints/<file>.ckpt``. :func:`read_checkpoint` refuses a missing,
truncated or corrupted file with one line (a :class:`CheckpointError`) and loads the rest with ``weights_only=True``
(memory-mapped: only what is read is paged in); :func:`run_dir_of` finds the run directory a checkpoint belongs to,
so a resumed fit logs into the same TensorBoard run.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from lit_factor.errors import UserError


class CheckpointError(UserError):
    """A ``--ckpt_path`` that is not a readable checkpoint: missing, a directory, truncated, corrupted."""


class RunDir(NamedTuple):
    save_dir: Path
    name: str
    version: int


_ALLOWED = "a .ckpt file written by fit (<run>/checkpoints/*.ckpt)"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` (tensors memory-mapped), or a one-line :class:`CheckpointError` saying why not."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"ckpt_path {str(path)!r}: no such file (expected {_ALLOWED})")
    if not path.is_file():
        raise CheckpointError(f"ckpt_path {str(path)!r} is not a file (expected {_ALLOWED})")
    if path.stat().st_size == 0:
        raise CheckpointError(f"ckpt_path {str(path)!r} is empty (0 bytes; expected {_ALLOWED})")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; a cut-off copy loses the archive's directory at its end.
        raise CheckpointError(f"ckpt_path {str(path)!r} is truncated or not a checkpoint (no complete torch.save "
                              f"archive; expected {_ALLOWED})")
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()  # every member against its CRC: a flipped byte in a tensor loads silently otherwise
    if bad is not None:
        raise CheckpointError(f"ckpt_path {str(path)!r} is corrupted: member {bad!r} fails its checksum")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, OSError) as err:
        problem = " ".join(str(err).split())[:200]
        raise CheckpointError(f"ckpt_path {str(path)!r} is corrupted and cannot be loaded ({problem})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"ckpt_path {str(path)!r} holds no Lightning checkpoint (no state_dict; expected "
                              f"{_ALLOWED})")
    return checkpoint


def run_dir_of(path: str | Path) -> RunDir | None:
    """``<save_dir>/<name>/version_<N>`` for a checkpoint at ``.../version_<N>/checkpoints/<file>``, else None."""
    parts = Path(path).resolve().parts
    if len(parts) < 5 or parts[-2] != "checkpoints" or not parts[-3].startswith("version_"):
        return None
    try:
        version = int(parts[-3].removeprefix("version_"))
    except ValueError:
        return None
    return RunDir(Path(*parts[:-4]), parts[-4], version)


def run_checkpoint(run: str | Path, which: str = "best") -> Path:
    """The ``best`` or ``last`` checkpoint of a fit's run directory (``<save_dir>/<name>/version_<N>``).

    best: the one the fit's ``summary.json`` names (the task's monitored metric's checkpoint), else the only
    checkpoint of the run. last: the most recently written checkpoint (``last.ckpt`` with ``checkpoint.save_last``,
    a step checkpoint, or the one a SIGTERM left). The one rule of every ``--run`` (fit, the evaluations, export).
    """
    import json

    run = Path(run)
    if not (run / "config.yaml").is_file() and not (run / "checkpoints").is_dir():
        raise UserError(f"--run {str(run)!r} is not a run directory (no config.yaml or checkpoints/; expected "
                        "<save_dir>/<name>/version_<N>)")
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise UserError(f"run {str(run)!r} has no checkpoints ({run / 'checkpoints'}/*.ckpt)")
    if which == "last":
        last = run / "checkpoints" / "last.ckpt"  # written together with another one: the same moment
        return last if last.is_file() and last.stat().st_mtime >= ckpts[-1].stat().st_mtime else ckpts[-1]
    summary = run / "summary.json"  # lit_factor.train.callbacks.summary.SUMMARY_FILE
    if summary.is_file():
        best = json.loads(summary.read_text()).get("best_checkpoint")
        if best and (run / "checkpoints" / Path(best).name).is_file():
            return run / "checkpoints" / Path(best).name
    candidates = [p for p in ckpts if p.name != "last.ckpt"]
    if len(candidates) == 1:
        return candidates[0]
    raise UserError(f"run {str(run)!r}: cannot tell the best of {len(candidates)} checkpoints without its "
                    "summary.json; give --ckpt_path <file>")
