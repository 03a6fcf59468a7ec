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
import sqlalchemy
from optuna.exceptions import DuplicatedStudyError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from lit_factor.errors import UserError
from lit_factor.study.spec import StudySpec

# heartbeats with ask/tell (not Study.optimize) and fail_stale_trials are what a multi-process grid needs
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

#: default folder of study databases and trial run directories
ROOT = Path("logs") / "studies"


def default_path(name: str, root: Path = ROOT) -> Path:
    """The SQLite file of study ``name`` when no ``--storage`` is given."""
    return root / f"{name}.db"


def default_storage(name: str, root: Path = ROOT) -> str:
    """The default storage URL of study ``name`` (its folder is created: only call it to store something)."""
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{default_path(name, root).resolve()}"


#: attempts at opening a storage whose tables another process is creating at the same instant
OPEN_ATTEMPTS = 5


def storage(url: str, heartbeat: int = 30, grace: int | None = None, retries: int = 1) -> RDBStorage:
    """An RDB storage with heartbeats: a RUNNING trial silent for ``grace`` s is failed and re-queued.

    Opening a fresh database creates Optuna's tables. Two workers doing that at the same instant against one
    PostgreSQL server collide (one gets an IntegrityError or "relation already exists": PostgreSQL's DDL takes no
    table lock before it checks); the loser opens it again, and then finds the tables there."""
    if heartbeat < 1 or (grace is not None and grace < 1):
        raise UserError(f"--heartbeat {heartbeat} / --grace {grace}: both must be at least 1 (seconds)")
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(OPEN_ATTEMPTS):
        try:
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat,
                              grace_period=grace or 4 * heartbeat,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=retries))
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as err:
            if attempt == OPEN_ATTEMPTS - 1:  # not a race after all
                raise UserError(f"--storage {masked(url)!r}: cannot open ({_short(err)})") from None
        except Exception as err:  # SQLAlchemy: bad URL, missing driver, unreachable server
            raise UserError(f"--storage {masked(url)!r}: cannot open ({_short(err)})") from None
    raise AssertionError("unreachable")


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def masked(url: str) -> str:
    """A storage URL without its password (it goes into error lines and logs)."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide
        return url


def exists(name: str, store: RDBStorage) -> bool:
    return name in optuna.get_all_study_names(store)


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its ``study.stop()`` after the last cell (meant for ``study.optimize``; the
    workers' own loop decides when the grid is done, and waits for running trials that may still go stale)."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def create(spec: StudySpec, store: RDBStorage) -> optuna.Study:
    """Create (or open) the study of ``spec``; the grid is recorded so that ``status``/``report`` need no file."""
    optuna.logging.set_verbosity(logging.ERROR)
    sampler = _GridSampler(spec.search_space())
    try:
        study = optuna.create_study(study_name=spec.name, storage=store, sampler=sampler, direction="maximize",
                                    load_if_exists=True)
    except (DuplicatedStudyError, sqlalchemy.exc.IntegrityError):  # another worker created it at this instant
        study = optuna.load_study(study_name=spec.name, storage=store, sampler=sampler)
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
        # Two processes that created the study at once both found it empty and wrote; the last write stands.
        # Whoever's grid or settings are not the stored ones (another file of the same name) stops here.
        stored = optuna.load_study(study_name=spec.name, storage=store, sampler=sampler).user_attrs
        if stored.get("search_space") != _jsonable(spec.search_space()) or stored.get("settings") != settings:
            raise UserError(f"study {spec.name!r} was created at the same moment from another file with other "
                            "settings; give the study another name, or use another --storage")
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
