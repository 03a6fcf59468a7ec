"""Where a study lives: an Optuna study in its *record*, a journal file in the repository (the default), or in
an RDB storage (any SQLAlchemy URL; a SQLite file of a study started before records existed is kept).

The record (``docs/studies/<name>/journal.log``, Optuna's ``JournalStorage`` with a file backend: one JSON line
per change, appended under a file lock) is committed with the study's report, so a grid started on one machine
resumes on a fresh clone elsewhere: finished trials are never rerun, trials that were running when the copy was
taken have stale heartbeats and go back to the queue. Optuna's journal storage has no heartbeats of its own:
:class:`JournalRecord` keeps them as a trial system attribute (a line per beat), which is all that
``optuna.storages.fail_stale_trials`` needs.

Optuna holds the queue: a ``GridSampler`` over the grid x seeds hands each worker an unvisited cell, a trial
whose worker died stops sending heartbeats and is failed and re-queued (``RetryHeartbeatStaleTrialCallback``),
and many machines can run the same study against one database (``--storage postgresql://...``).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
from optuna.exceptions import DuplicatedStudyError
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat  # public as optuna.storages._heartbeat only (Optuna 5.0)
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from lit_factor.errors import UserError
from lit_factor.study.spec import SEED, StudySpec

# heartbeats with ask/tell (not Study.optimize) and fail_stale_trials are what a multi-process grid needs
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")

#: default folder of study databases and trial run directories
ROOT = Path("logs") / "studies"


#: where study records are committed (relative to the repository root, the working directory of ``study run``)
RECORDS = Path("docs") / "studies"
JOURNAL = "journal.log"
#: the scheme of a journal-file storage "URL" (``journal:///abs/path/journal.log``)
JOURNAL_SCHEME = "journal:///"


def record_path(name: str, root: Path = ROOT) -> Path:
    """The journal file of study ``name``: under docs/studies/ for the default run root (the committed record),
    beside the run directories for any other ``--root`` (tests, scratch studies)."""
    base = RECORDS if Path(root) == ROOT else Path(root)
    return base / name / JOURNAL


def default_storage(name: str, root: Path = ROOT) -> str:
    """The study's journal record, unless a SQLite database of the same study exists under ``root`` (a study
    started before records existed carries on where it is; ``journal_from`` copies it into a record)."""
    legacy = Path(root) / f"{name}.db"
    if legacy.is_file():
        return f"sqlite:///{legacy.resolve()}"
    path = record_path(name, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JOURNAL_SCHEME + str(path.resolve()).lstrip("/")


def record_exists(name: str, root: Path = ROOT) -> bool:
    """Whether study ``name`` has a default storage already (a journal record or a legacy SQLite file)."""
    return (Path(root) / f"{name}.db").is_file() or record_path(name, root).is_file()


class JournalRecord(JournalStorage, BaseHeartbeat):
    """Optuna's journal file storage with heartbeats (a ``heartbeat`` system attribute, time.time() of the beat)."""

    def __init__(self, path: str | Path, heartbeat: int = 30, grace: int | None = None,
                 callback: RetryHeartbeatStaleTrialCallback | None = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(JournalFileBackend(str(path)))
        self.path, self.heartbeat, self.grace = Path(path), heartbeat, grace or 4 * heartbeat
        self.callback = callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, "heartbeat", time.time())
        except optuna.exceptions.UpdateFinishedTrialError:  # told meanwhile: nothing left to keep alive
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now, stale = time.time(), []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beats = [b for b in (t.system_attrs.get("heartbeat"),
                                 t.datetime_start.timestamp() if t.datetime_start else None) if b is not None]
            if "heartbeat" in t.system_attrs and now - max(beats) > self.grace:  # never beat: not ours to judge
                stale.append(self.get_trial_id_from_study_id_trial_number(study_id, t.number))
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat

    def get_heartbeat_stale_trial_callback(self):
        return self.callback


#: attempts at opening a storage whose tables another process is creating at the same instant
OPEN_ATTEMPTS = 5


def storage(url: str, heartbeat: int = 30, grace: int | None = None) -> BaseStorage:
    """A storage with heartbeats: a RUNNING trial silent for ``grace`` s is failed and re-queued, however often
    that happens (its worker died: a preempted machine, an ended session; the fit, a subprocess, is not to blame --
    crashes are counted against ``retries`` by the worker). ``url``: a journal file (``journal:///path``) or any
    SQLAlchemy URL.

    Opening a fresh database creates Optuna's tables. Two workers doing that at the same instant against one
    PostgreSQL server collide (one gets an IntegrityError or "relation already exists": PostgreSQL's DDL takes no
    table lock before it checks); the loser opens it again, and then finds the tables there."""
    if heartbeat < 1 or (grace is not None and grace < 1):
        raise UserError(f"--heartbeat {heartbeat} / --grace {grace}: both must be at least 1 (seconds)")
    if url.startswith(JOURNAL_SCHEME):
        return JournalRecord("/" + url.removeprefix(JOURNAL_SCHEME), heartbeat, grace,
                             RetryHeartbeatStaleTrialCallback())

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(OPEN_ATTEMPTS):
        try:
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat,
                              grace_period=grace or 4 * heartbeat,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback())
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


class SeedRounds(optuna.samplers.BaseSampler):
    """The grid handed out in rounds of seeds: every cell (file order) with the first seed, then every cell with the
    second, and so on. A grid stopped part-way -- a CPU session's share of a GPU-sized study -- then holds whole
    rounds, n seeds in every cell including the dense arm, where Optuna's ``GridSampler`` (a shuffled order) leaves
    five seeds in some cells and none in others. Grid ids are positions in this order: trial ``k`` of a fresh grid
    takes cell ``k`` (no two workers pick the same cell); a re-queued trial keeps its id and takes no position, so
    trial ``k`` of a grid with re-queued trials takes the cell after the last one handed out; a trial whose position
    is taken or past the grid takes the first cell nobody started."""

    def __init__(self, space: dict[str, list], store: BaseStorage) -> None:
        axes = [a for a in space if a != SEED]
        self.grid = [{**dict(zip(axes, combo, strict=True)), SEED: seed}
                     for seed in space[SEED] for combo in itertools.product(*(space[a] for a in axes))]
        self.store = store

    def infer_relative_search_space(self, study, trial) -> dict:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict:
        return {}

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:  # a re-queued trial
            return
        unstarted = grid_state(study).unstarted
        position = _fresh_before(study, trial.number)
        grid_id = position if position in unstarted else min(unstarted, default=0)
        trial_id = self.store.get_trial_id_from_study_id_trial_number(
            self.store.get_study_id_from_name(study.study_name), trial.number)
        self.store.set_trial_system_attr(trial_id, "grid_id", grid_id)

    def sample_independent(self, study, trial: FrozenTrial, param_name: str, param_distribution):
        return self.grid[trial.system_attrs["grid_id"]][param_name]


def _fresh_before(study: optuna.Study, number: int) -> int:
    """How many trials numbered below ``number`` took a grid position: every one but the re-queued copies and
    duplicates, which repeat the grid id of a lower-numbered trial (a trial still choosing has no id yet: it counts).
    Each worker computes this from trials that all exist before its own, so two workers never get one position."""
    seen, fresh = set(), 0
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.number >= number:
            break
        grid_id = t.system_attrs.get("grid_id")
        if grid_id is None:
            fresh += "fixed_params" not in t.system_attrs  # still choosing (a user's enqueued trial takes none)
        elif grid_id not in seen:
            fresh += 1
            seen.add(grid_id)
    return fresh


#: ``grid_order`` of a study created since grids run in seed rounds (older studies keep Optuna's shuffled order:
#: their grid ids mean cells of that order)
SEED_ROUNDS = "seed rounds"


def _sampler(spec: StudySpec, order: str | None, store: BaseStorage) -> optuna.samplers.BaseSampler:
    return SeedRounds(spec.search_space(), store) if order == SEED_ROUNDS else _GridSampler(spec.search_space())


def create(spec: StudySpec, store: RDBStorage) -> optuna.Study:
    """Create (or open) the study of ``spec``; the grid is recorded so that ``status``/``report`` need no file."""
    optuna.logging.set_verbosity(logging.ERROR)
    sampler = _sampler(spec, SEED_ROUNDS, store)
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
        study.set_user_attr("grid_order", SEED_ROUNDS)
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
    study.sampler = _sampler(spec, study.user_attrs.get("grid_order"), store)
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


def snapshot(record: Path, to: Path) -> Path:
    """Copy a journal record that a running study may be appending to: whole lines only (a line being written
    is left for the next snapshot), so the copy always replays. For committing a live study's record."""
    data = Path(record).read_bytes()
    to.parent.mkdir(parents=True, exist_ok=True)
    to.write_bytes(data[: data.rfind(b"\n") + 1])
    return to


def journal_from(url: str, name: str, to: Path) -> Path:
    """Copy study ``name`` from any storage (a legacy SQLite file, PostgreSQL) into a journal record at ``to``
    (``optuna.copy_study``: attributes, every trial with its state, heartbeats left behind)."""
    if to.exists():
        raise UserError(f"{to} exists: a study record is never overwritten")
    optuna.logging.set_verbosity(logging.ERROR)
    optuna.copy_study(from_study_name=name, from_storage=storage(url), to_storage=JournalRecord(to))
    return to
