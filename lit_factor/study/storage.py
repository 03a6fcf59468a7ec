"""Where a study lives: an Optuna study in an RDB storage (SQLite file by default, any SQLAlchemy URL).

Optuna holds the queue: a ``GridSampler`` over the grid x seeds hands each worker an unvisited cell, a trial
whose worker died stops sending heartbeats and is failed and re-queued (``RetryHeartbeatStaleTrialCallback``),
and many machines can run the same study against one database (``--storage postgresql://...``).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from lit_factor.errors import UserError
from lit_factor.study.spec import StudySpec

# heartbeats with ask/tell (not Study.optimize) and fail_stale_trials are what a multi-process grid needs
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

#: default folder of study databases and trial run directories
ROOT = Path("logs") / "studies"


def default_storage(name: str, root: Path = ROOT) -> str:
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / f'{name}.db').resolve()}"


def storage(url: str, heartbeat: int = 30, grace: int | None = None, retries: int = 1) -> RDBStorage:
    """An RDB storage with heartbeats: a RUNNING trial silent for ``grace`` s is failed and re-queued."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=grace or 4 * heartbeat,
                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=retries))
    except Exception as err:  # SQLAlchemy: bad URL, missing driver, unreachable server
        raise UserError(f"--storage {url!r}: cannot open ({' '.join(str(err).split())[:200]})") from None


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` after the last cell (meant for ``study.optimize``; the
    workers' own loop decides when the grid is done, and waits for running trials that may still go stale)."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def create(spec: StudySpec, store: RDBStorage) -> optuna.Study:
    """Create (or open) the study of ``spec``; the grid is recorded so that ``status``/``report`` need no file."""
    optuna.logging.set_verbosity(logging.ERROR)
    sampler = _GridSampler(spec.search_space())
    study = optuna.create_study(study_name=spec.name, storage=store, sampler=sampler, direction="maximize",
                                load_if_exists=True)
    saved = study.user_attrs.get("search_space")
    if saved is not None and saved != _jsonable(spec.search_space()):
        raise UserError(f"study {spec.name!r} in this storage has another grid ({saved}); give the study another "
                        "name, or use another --storage")
    settings = json.loads(json.dumps(spec.settings()))  # as stored: JSON types
    if saved is not None and study.user_attrs.get("settings", settings) != settings:
        changed = [k for k, v in settings.items() if study.user_attrs["settings"].get(k) != v]
        raise UserError(f"study {spec.name!r} ran with other settings ({', '.join(changed)} changed in "
                        f"{spec.source}); its trials would not be comparable: give the study another name")
    if saved is None:
        study.set_user_attr("settings", settings)
        study.set_user_attr("search_space", _jsonable(spec.search_space()))
        study.set_user_attr("axes", list(spec.axes))
        study.set_user_attr("source", spec.source)
    return study


def load(name: str, store: RDBStorage) -> optuna.Study:
    optuna.logging.set_verbosity(logging.ERROR)
    try:
        return optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(store)]
        raise UserError(f"no study named {name!r} in this storage; found: {', '.join(names) or '(none)'}") from None


def _jsonable(space: dict) -> dict:
    return {k: list(v) for k, v in space.items()}


@dataclass
class GridState:
    """Where the grid stands: cells (grid ids) never started, trials queued, trials running."""

    unstarted: set[int]
    waiting: int
    running: int


def grid_state(study: optuna.Study) -> GridState:
    space = study.user_attrs["search_space"]
    total = 1
    for values in space.values():
        total *= len(values)
    started, waiting, running = set(), 0, 0
    for t in study.get_trials(deepcopy=False):
        waiting += t.state == TrialState.WAITING
        running += t.state == TrialState.RUNNING
        if "grid_id" in t.system_attrs and t.state != TrialState.WAITING:
            started.add(t.system_attrs["grid_id"])
    return GridState(set(range(total)) - started, waiting, running)


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Put ``trial``'s grid point back in the queue: a WAITING copy with the same parameters and grid id."""
    study.add_trial(optuna.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        system_attrs={k: v for k, v in trial.system_attrs.items() if k in ("grid_id", "search_space")}))


def holder_of(study: optuna.Study, trial_number: int, grid_id: int) -> FrozenTrial | None:
    """Another trial already covering this grid cell, if any: then this one is a duplicate (two workers asked
    for the last free cell at the same moment). Of two running duplicates the older (lower number) keeps it."""
    for t in study.get_trials(deepcopy=False):
        if t.number == trial_number or t.system_attrs.get("grid_id") != grid_id or "duplicate_of" in t.user_attrs:
            continue
        if t.state in (TrialState.WAITING, TrialState.COMPLETE) or (
                t.state == TrialState.RUNNING and t.number < trial_number):
            return t
    return None
