"""The study runner: study files, the Optuna queue with workers, resume after SIGKILL, verdicts, the report.

Fast tests drive the runner with tests/_study_fake_fit.py (a stand-in for ``cli.py fit`` that starts in
milliseconds); the slow ones run real tiny fits (random:tiny-bert on a tiny GLUE directory).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from lit_factor.errors import UserError
from lit_factor.hardware import describe_machine
from lit_factor.study import cli as study_cli
from lit_factor.study import storage as st
from lit_factor.study.spec import load_spec
from lit_factor.study.worker import Worker

REPO = Path(__file__).resolve().parent.parent
FAKE = [sys.executable, str(REPO / "tests" / "_study_fake_fit.py")]


def write_study(path: Path, **study) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture
def base_yaml(tmp_path) -> Path:
    return write_study(tmp_path / "base.yaml", data={"task": "sst2"})


def open_study(root: Path, name: str):
    return st.load(name, st.storage(st.default_storage(name, root)))


def real_trials(study) -> list:
    """Trials less duplicates (two workers that asked for the last free grid point at once: one steps back)."""
    return [t for t in study.get_trials() if "duplicate_of" not in t.user_attrs]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lit_factor.study.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)  # a cap: a loaded machine is slow


# --- study files ---------------------------------------------------------------------------------------------------
def test_fit_args_configs_first_then_keys_then_callbacks(tmp_path, base_yaml):
    overlay = write_study(tmp_path / "overlay.yaml", trainer={"max_epochs": 1})
    spec = load_spec(write_study(
        tmp_path / "s.yaml", base=str(base_yaml), args={"trainer.max_steps": 5}, stability={"factor": 4.0},
        axes={"model.factorization.budget": [0.5, None],
              "staging": {"off": {}, "on": {"config": str(overlay), "callbacks": [
                  {"class_path": "lit_factor.callbacks.StagingCallback", "init_args": {"spread": 0.5}}]}}},
        seeds=[7, 8]))
    assert spec.name == "s" and spec.size() == 8 and len(spec.cells()) == 4
    assert spec.search_space() == {"model.factorization.budget": [0.5, None], "staging": ["off", "on"], "seed": [7, 8]}
    params = {"model.factorization.budget": None, "staging": "on", "seed": 8}
    args = spec.fit_args(params, spec.task_of(params))
    assert args[:4] == ["--config", str(base_yaml), "--config", str(overlay)]
    assert args[4:8] == ["--trainer.max_steps", "5", "--model.factorization.budget", "null"]
    callbacks = [json.loads(a.split("+=", 1)[1]) for a in args if a.startswith("--trainer.callbacks+=")]
    assert callbacks[0]["init_args"] == {"spread": 0.5}
    assert callbacks[1]["init_args"] == {"monitor": "val/accuracy", "factor": 4.0}  # the task's metric, from base
    assert args[-2:] == ["--seed_everything", "8"]


def test_variant_updates_args_and_replaces_seeds(tmp_path, base_yaml):
    path = write_study(tmp_path / "c.yaml", base=str(base_yaml), args={"a.b": 1, "c.d": 2}, axes={"x.y": [1]},
                       seeds=[1], variants={"full": {"args": {"c.d": 3}, "seeds": [1, 2, 3]}})
    spec = load_spec(path, "full")
    assert spec.name == "c-full" and spec.args == {"a.b": 1, "c.d": 3} and spec.seeds == [1, 2, 3]


def test_a_variant_selects_options_of_a_named_axis_by_name(tmp_path, base_yaml):
    options = {"mrpc": {"data.task": "mrpc", "trainer.max_epochs": 2}, "rte": {"data.task": "rte"}}
    path = write_study(tmp_path / "t.yaml", base=str(base_yaml), axes={"task": options, "x.y": [1, 2]}, seeds=[1],
                       variants={"mrpc": {"axes": {"task": ["mrpc"], "x.y": [2]}}, "bad": {"axes": {"task": ["qnli"]}}})
    spec = load_spec(path, "mrpc")
    assert spec.axes == {"task": {"mrpc": options["mrpc"]}, "x.y": [2]}  # a plain axis's list still replaces
    assert spec.overrides({"task": "mrpc", "x.y": 2, "seed": 1})["trainer.max_epochs"] == 2
    with pytest.raises(UserError, match=r"variants.bad: axes.task: option\(s\) 'qnli' not in the study's axis; "
                                        r"allowed: mrpc, rte"):
        load_spec(path, "bad")
    # the study's exclude rules follow: a rule about options left out no longer applies, a typo still fails
    write_study(path, base=str(base_yaml), axes={"task": options, "x.y": [1, 2]}, seeds=[1],
                exclude=[{"task": "mrpc"}, {"task": ["rte", "mrpc"], "x.y": 2}],
                variants={"rte": {"axes": {"task": ["rte"]}}, "typo": {"axes": {"task": ["rte"]}}})
    assert load_spec(path).size() == 1 and load_spec(path, "rte").exclude == [{"task": ["rte"], "x.y": [2]}]
    assert load_spec(path, "rte").cells() == [{"task": "rte", "x.y": 1}]
    write_study(path, base=str(base_yaml), axes={"task": options, "x.y": [1, 2]}, seeds=[1],
                exclude=[{"task": "mrcp"}], variants={"rte": {"axes": {"task": ["rte"]}}})
    with pytest.raises(UserError, match="task='mrcp' is not a value of that axis"):
        load_spec(path, "rte")


@pytest.mark.parametrize("study, message", [
    ({"axes": {"x.y": [1]}, "seeds": [1], "bogus": 1}, "unknown key(s) bogus"),
    ({"axes": {"seed": [1]}, "seeds": [1]}, "'seed' is reserved"),
    ({"axes": {"x.y": []}, "seeds": [1]}, "axes.x.y: expected a non-empty list"),
    ({"axes": {"x.y": [1, 1]}, "seeds": [1]}, "values repeat"),
    ({"axes": {"x.y": [1]}, "seeds": [1, 1]}, "seeds: expected a list of distinct integers"),
    ({"axes": {"x.y": [1]}, "seeds": [1], "base": "nowhere.yaml"}, "nowhere.yaml: no such file"),
    ({"axes": {"x": {"a": {"callbacks": [{"init_args": {}}]}}}, "seeds": [1]}, "class_path"),
    ({"axes": {"x.y": [1, 2]}, "seeds": [1], "exclude": [{"z": 1}]}, "exclude[0]: axis='z' is not in the grid"),
    ({"axes": {"x.y": [1, 2]}, "seeds": [1], "exclude": [{"x.y": [2, 3]}]}, "exclude[0]: x.y=3 is not a value"),
    ({"axes": {"x.y": [1, 2]}, "seeds": [1], "exclude": [{"x.y": [1, 2]}]}, "exclude leaves no grid cell"),
    ({"axes": {"x.y": [1]}, "seeds": [1], "report_with": [3]}, "report_with: expected a study name"),
])
def test_bad_study_file_is_one_clear_error(tmp_path, base_yaml, study, message):
    path = write_study(tmp_path / "bad.yaml", **{"base": str(base_yaml), **study})
    with pytest.raises(UserError, match=re.escape(message)):
        load_spec(path)


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        study_cli.main(["status", "nothing-here", "--root", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no study record") and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        study_cli.main(["run", str(tmp_path / "missing.yaml")])
    assert exc.value.code == 2 and "missing.yaml: no such file" in capsys.readouterr().err


def test_recorded_command_masks_the_storage_and_names_no_machine_path(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    typed = ["run", "studies/x.yaml", "--storage", "postgresql://me:secret@db/x", "--data-dir", str(tmp_path / "glue")]
    assert study_cli._command(typed) == ("python cli.py study run studies/x.yaml --storage URL "
                                         "--data-dir ../glue")
    assert study_cli._command(["run", "x.yaml", "--data-dir", "../glue"]).endswith("--data-dir ../glue")


def test_bf16_cells_on_a_cpu_without_native_bf16_are_named_at_the_start(tmp_path, base_yaml, monkeypatch):
    """A bf16 study on a CPU that emulates bf16 runs ~10x slower than in fp32 (docs/speed.md): ``study run`` says
    so where it is seen, not only in each fit's log. A GPU, or native bf16, is no reason to warn."""
    from lit_factor.study import runner

    spec = load_spec(write_study(tmp_path / "p.yaml", base=str(base_yaml), axes={"precision": {
        "fp32": {"trainer.precision": "32-true"}, "bf16": {"trainer.precision": "bf16-mixed"}}}, seeds=[1]))
    monkeypatch.setattr(runner, "emulates_bf16", lambda: True)
    assert runner.emulated_bf16(spec, gpus=[]) == ["precision=bf16"]
    assert runner.emulated_bf16(spec, gpus=["0"]) == []
    monkeypatch.setattr(runner, "emulates_bf16", lambda: False)
    assert runner.emulated_bf16(spec, gpus=[]) == []


def test_exclude_leaves_out_the_matching_cells(tmp_path, base_yaml):
    spec = load_spec(write_study(
        tmp_path / "x.yaml", base=str(base_yaml), seeds=[1, 2],
        axes={"compression": {"dense": {}, "lowrank": {}}, "recipe": {"svd": {}, "whitened": {}, "kd": {}}},
        exclude=[{"compression": "dense", "recipe": ["whitened"]}]))
    assert [tuple(c.values()) for c in spec.cells()] == [
        ("dense", "svd"), ("dense", "kd"), ("lowrank", "svd"), ("lowrank", "whitened"), ("lowrank", "kd")]
    assert spec.size() == 10 and spec.settings()["exclude"] == [{"compression": ["dense"], "recipe": ["whitened"]}]


# --- the runner with the stand-in fit ------------------------------------------------------------------------------
def test_excluded_cells_are_never_run_counted_or_reported(tmp_path, base_yaml):
    path = fake_study(tmp_path, base_yaml, "ex")
    study_file = yaml.safe_load(path.read_text())
    study_file["exclude"] = [{"model.factorization.method": "monarch", "model.factorization.budget": 0.25}]
    write_study(path, **study_file)
    proc = run_cli("run", str(path), "--workers", "1", "--root", "logs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "6 trials (3 cells x 2 seeds)" in proc.stdout and "6/6 finished" in proc.stdout
    study = open_study(tmp_path / "logs", "ex")
    ran = [t for t in real_trials(study) if "excluded" not in t.user_attrs]
    assert len(ran) == 6 and not any(t.params["model.factorization.method"] == "monarch"
                                     and t.params["model.factorization.budget"] == 0.25 for t in ran)
    status = run_cli("status", "ex", "--root", "logs", cwd=tmp_path)
    assert "monarch model.factorization.budget=0.25" not in status.stdout
    assert [ln.split()[1:] for ln in status.stdout.splitlines() if ln.startswith("total")] == [
        ["6", "0", "0", "0", "0"]]


def fake_study(tmp_path, base_yaml, name="fk", **axes) -> Path:
    axes = axes or {"model.factorization.method": ["lowrank", "monarch"], "model.factorization.budget": [0.5, 0.25]}
    return write_study(tmp_path / f"{name}.yaml", base=str(base_yaml), command=FAKE, axes=axes, seeds=[1, 2])


def test_run_ends_when_its_workers_do_not_at_its_next_progress_poll(tmp_path, base_yaml, monkeypatch, capsys):
    """The runner prints progress every ``poll`` seconds; it ended only at such a tick (5 s after the workers, every
    ``study run``). Here a tick is 2 minutes away: the run must end as soon as its worker does."""
    from lit_factor.study.runner import RunOptions, run

    path = fake_study(tmp_path, base_yaml, "prompt", **{"model.factorization.method": ["lowrank"]})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the worker: python -m lit_factor.study.worker
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # run() sets its own
    start = time.time()
    try:
        assert run(str(path), [(load_spec(path), None)], RunOptions(root=tmp_path / "logs", poll=120.0)) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert time.time() - start < 60  # ~3 s; a wide margin for a loaded machine (the old loop: 120 s at least)
    assert "2/2 finished" in capsys.readouterr().out


@pytest.mark.slow
def test_verdicts_failed_is_a_result_error_is_retried_once_invalid_is_not(tmp_path, base_yaml):
    path = fake_study(tmp_path, base_yaml, "verdicts", **{"fake.exit": [0, 3, 2, 1]})
    proc = run_cli("run", str(path), "--workers", "2", "--heartbeat", "1", "--grace", "10", "--root", "logs",
                   cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr  # some grid points errored
    study = open_study(tmp_path / "logs", "verdicts")
    by_exit: dict[int, list] = {}
    for t in real_trials(study):
        by_exit.setdefault(t.params["fake.exit"], []).append((t.state.name, t.user_attrs["verdict"]))
    assert sorted(by_exit[0]) == [("COMPLETE", "succeeded")] * 2
    assert sorted(by_exit[3]) == [("COMPLETE", "failed")] * 2  # a failed run is a result: never retried
    assert sorted(by_exit[2]) == [("FAIL", "invalid")] * 2  # bad settings: not retried
    assert sorted(by_exit[1]) == [("FAIL", "error")] * 4  # a crash: retried once
    crashed = [t for t in real_trials(study) if t.params["fake.exit"] == 1]
    assert all("Traceback: something broke" in t.user_attrs["log_tail"] for t in crashed)
    status = run_cli("status", "verdicts", "--root", "logs", cwd=tmp_path)
    assert status.returncode == 0
    assert [ln.split()[1:] for ln in status.stdout.splitlines() if ln.startswith("total")] == [
        ["2", "2", "4", "0", "0"]]
    # --retry-errors (after a fix) gives exactly the crashed points a new round; invalid and finished ones stay.
    again = run_cli("run", str(path), "--workers", "1", "--retry-errors", "--root", "logs", cwd=tmp_path)
    assert "re-queued 2 errored grid point(s)" in again.stdout
    study = open_study(tmp_path / "logs", "verdicts")
    assert sorted(t.params["fake.exit"] for t in real_trials(study)).count(1) == 8  # 4 + a new round (try + retry) each
    assert sorted(t.params["fake.exit"] for t in real_trials(study)).count(0) == 2


def _wait_for(predicate, timeout: float = 120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_sigkill_mid_study_then_rerun_completes_without_rerunning_finished(tmp_path, base_yaml):
    path = write_study(tmp_path / "kill.yaml", base=str(base_yaml), command=FAKE,
                       axes={"model.factorization.method": ["lowrank", "monarch"],
                             "model.factorization.budget": [0.5, 0.25], "fake.sleep": [2.0]}, seeds=[1, 2])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["run", str(path), "--workers", "2", "--heartbeat", "1", "--grace", "3", "--root", "logs"]
    parent = subprocess.Popen([sys.executable, "-m", "lit_factor.study.cli", *args], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = st.record_path("kill", tmp_path / "logs")  # the journal record (docs/studies/ for the default root)
    study = None

    def running_after_two_done():
        nonlocal study
        assert parent.poll() is None, "the study ended before it could be killed"
        if study is None:
            try:
                study = open_study(tmp_path / "logs", "kill") if db.is_file() else None
            except UserError:  # the run is still creating the database
                return None
        trials = study.get_trials() if study else []
        done = [t for t in trials if t.state.name == "COMPLETE"]
        running = [t for t in trials if t.state.name == "RUNNING" and "pid" in t.user_attrs]
        return (done, running) if len(done) >= 2 and running else None

    done, running = _wait_for(running_after_two_done)
    os.kill(running[0].user_attrs["worker_pid"], signal.SIGKILL)  # a worker dies mid-trial (its fit with it) ...
    parent.send_signal(signal.SIGKILL)  # ... then the whole run (the other worker and its fit go with it)
    parent.wait()
    time.sleep(0.5)
    finished_before = {t.number: Path(t.user_attrs["run_dir"]).name
                       for t in open_study(tmp_path / "logs", "kill").get_trials() if t.state.name == "COMPLETE"}
    assert len(finished_before) >= 2

    rerun = run_cli(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    trials = real_trials(open_study(tmp_path / "logs", "kill"))
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    points = {(t.params["model.factorization.method"], t.params["model.factorization.budget"], t.params["seed"])
              for t in complete}
    assert len(points) == 8 and len(complete) == 8  # every grid point exactly once
    assert set(finished_before) <= {t.number for t in complete}
    runs = [ln.split()[3] for ln in (tmp_path / "logs" / "invocations.txt").read_text().splitlines()]
    assert all(runs.count(run) == 1 for run in finished_before.values())  # a finished trial never ran again
    killed = [t for t in trials if t.state.name == "FAIL"]
    assert running[0].number in {t.number for t in killed}
    retried = {t.system_attrs.get("failed_trial") for t in complete}
    assert all(t.number in retried for t in killed)  # every killed trial was re-queued and finished


# --- the report ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_report_table_equals_hand_computation_and_figures_decode(tmp_path, base_yaml):
    staging = {"class_path": "lit_factor.callbacks.StagingCallback", "init_args": {"spread": 0.5}}
    path = fake_study(tmp_path, base_yaml, "rep", **{
        "model.factorization.method": ["none", "lowrank"], "model.factorization.budget": [0.25],
        "staging": {"off": {}, "on": {"callbacks": [staging]}}, "data.max_train_samples": [500, 5000]})
    proc = run_cli("run", str(path), "--workers", "2", "--heartbeat", "1", "--grace", "10", "--root", "logs",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out, page = tmp_path / "out", tmp_path / "docs" / "results.md"
    proc = run_cli("report", "rep", "--root", "logs", "--out", str(out), "--publish", str(page), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 * 2
    cell = [r for r in rows if r["model.factorization.method"] == "lowrank" and r["model.factorization.budget"]
            == "0.25" and r["staging"] == "on" and r["data.max_train_samples"] == "500"]
    values = [float(r["final"]) for r in cell]
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    label = "model.factorization.method=lowrank model.factorization.budget=0.25 staging=on data.max_train_samples=500"
    line = next(ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith(f"| {label} |"))
    starts = [float(r["at_start"]) for r in cell]
    start_mean = sum(starts) / len(starts)
    start_sd = (sum((v - start_mean) ** 2 for v in starts) / (len(starts) - 1)) ** 0.5
    assert line.split(" | ")[1] == f"{start_mean:.4f} ± {start_sd:.4f} ({len(starts)})"  # before training
    assert line.split(" | ")[2] == f"{mean:.4f} ± {sd:.4f} ({len(values)})"
    assert line.split(" | ")[4] == f"{sum(r['verdict'] == 'succeeded' for r in cell)}/{len(cell)}"
    assert all(float(r["projected"]) == pytest.approx(float(r["final"]) - 0.2) for r in rows)
    for name in ("metric_vs_kept", "success_rate"):
        image = matplotlib.image.imread(out / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100
    text = page.read_text()
    assert "<!-- begin study rep (generated) -->" in text and "](../out/metric_vs_kept.png)" in text
    assert "python cli.py study run" in text and "python cli.py study report rep" in text
    assert re.search(r"\*\*Ran on:\*\* (CPU only \(.+\)|\d+ x .+), \d+ CPU cores\.", text)  # recorded by run
    # rerunning the report replaces its section rather than adding one; re-reading the run dirs changes nothing
    table = (out / "trials.csv").read_text()
    assert run_cli("report", "rep", "--root", "logs", "--out", str(out), "--publish", str(page), "--reread",
                   cwd=tmp_path).returncode == 0
    assert page.read_text().count("<!-- begin study rep") == 1 and (out / "trials.csv").read_text() == table
    assert_hparams(out / "tensorboard", expected_runs=len(rows))


def test_report_with_joins_a_study_that_adds_cells_and_refuses_an_incomparable_one(tmp_path, base_yaml):
    """A study that adds cells to another (``report_with``): one table, CSV, findings; rows say their study."""
    budget = {"model.factorization.budget": [0.5]}
    first = fake_study(tmp_path, base_yaml, "first", **{"model.factorization.method": ["none", "lowrank"], **budget})
    # the file's grid has every method (in the order its report follows); variant `added` runs only the new one
    more = fake_study(tmp_path, base_yaml, "more", **{"model.factorization.method": ["lowrank", "monarch", "none"],
                                                      **budget})
    added = {"axes": {"model.factorization.method": ["monarch"]}, "report_with": ["first"]}
    write_study(more, **{**yaml.safe_load(more.read_text()), "variants": {"added": added}})
    other = write_study(tmp_path / "other.yaml", **{**yaml.safe_load(more.read_text()), "args": {"x.y": 1}})
    for path, variant in ((first, []), (more, ["--variant", "added"]), (other, ["--variant", "added"])):
        assert run_cli("run", str(path), *variant, "--root", "logs", cwd=tmp_path).returncode == 0
    out, page = tmp_path / "out", tmp_path / "results.md"
    proc = run_cli("report", str(more), "--variant", "added", "--root", "logs", "--out", str(out), "--publish",
                   str(page), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    # ordered by the file's grid (lowrank, monarch, none), seeds within a cell; each row names its study
    assert [(r["study"], r["model.factorization.method"], r["seed"]) for r in rows] == [
        ("first", "lowrank", "1"), ("first", "lowrank", "2"), ("more-added", "monarch", "1"),
        ("more-added", "monarch", "2"), ("first", "none", "1"), ("first", "none", "2")]
    text = (out / "report.md").read_text()
    assert "Reported with study `first`" in text and "**Progress:** 2 of 2 grid points finished" in text
    cells = [ln.split(" | ")[0] for ln in text.splitlines() if ln.startswith("| model.factorization.method=")]
    assert cells == [f"| model.factorization.method={m} model.factorization.budget=0.5" for m in
                     ("lowrank", "monarch", "none")]
    assert "low rank vs Monarch" in text  # the findings see both studies' rows (low rank vs Monarch)
    assert page.read_text().count("<!-- begin study more-added (generated) -->") == 1
    # a study with other fixed args is not comparable: one clear error, and nothing written over the report
    before = (out / "trials.csv").read_text()
    proc = run_cli("report", "other", "--variant", "added", "--with", "first", "--root", "logs", "--out", str(out),
                   cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "error: report_with 'first': its args differ from 'other-added'" in proc.stderr
    assert (out / "trials.csv").read_text() == before


def assert_hparams(log_dir: Path, expected_runs: int) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [d for d in log_dir.iterdir() if d.is_dir()]
    assert len(runs) == expected_runs
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    assert content, "no HParams summary"
    assert any(k.startswith("hparam/") for k in acc.Tags()["scalars"])


# --- real tiny fits ------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_base(tmp_path, glue_writer) -> Path:
    glue_writer("SST-2", n_train=16, n_dev=8)
    return write_study(tmp_path / "tiny.yaml", seed_everything=1, trainer={
        "max_steps": 3, "max_epochs": 1, "log_every_n_steps": 1, "enable_progress_bar": False,
        "enable_model_summary": False},
        model={"model_name_or_path": "random:tiny-bert"}, data={"task": "sst2", "batch_size": 8,
                                                               "max_seq_length": 16})


@pytest.mark.slow
def test_real_2x2_grid_2_workers_csv_and_report(tmp_path, tiny_base):
    # one seed: 4 real fits (~40 s each on the 2-core box); seeds as trials are checked with the fake fit
    path = write_study(tmp_path / "grid.yaml", base=str(tiny_base), stability={},
                       axes={"model.factorization.method": ["none", "lowrank"],
                             "model.factorization.budget": [0.5, 0.25]}, seeds=[1])
    # --heartbeat 1: the worker that runs out of grid points first looks every heartbeat whether the other's last
    # trial has ended (the default, 30 s, was idle time here); --grace 120 keeps the default's 4 x 30 s before a
    # silent trial counts as dead, so a loaded machine cannot make a live trial look dead
    proc = run_cli("run", str(path), "--workers", "2", "--threads", "1", "--heartbeat", "1", "--grace", "120",
                   "--root", "logs", "--data-dir", str(tmp_path / "glue"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("[worker ") == 4 and "4/4 finished" in proc.stdout
    out = tmp_path / "out"
    assert run_cli("report", str(path), "--root", "logs", "--out", str(out), cwd=tmp_path).returncode == 0
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert list(rows[0])[:5] == ["trial", "verdict", "model.factorization.method", "model.factorization.budget",
                                 "seed"]
    assert {r["verdict"] for r in rows} <= {"succeeded", "failed"}
    assert {(r["method"], r["budget"] or "-") for r in rows} == {("none", "-"), ("lowrank", "0.5"),
                                                                 ("lowrank", "0.25")}
    for r in rows:  # results read back from the run directories
        assert r["task"] == "sst2" and r["monitor"] == "val/accuracy" and 0 <= float(r["final"]) <= 1
        assert (float(r["kept_fraction"]) < 0.6) == (r["method"] == "lowrank")
        assert (tmp_path / r["run_dir"] / "fit.log").is_file()
        assert r["machine"].startswith("CPU only (")  # each trial says what it ran on (claim 4 compares within one)
    for name in ("metric_vs_kept", "loss_curves"):
        assert matplotlib.image.imread(out / f"{name}.png").ndim == 3
    assert_hparams(out / "tensorboard", expected_runs=4)


@pytest.mark.slow
def test_real_diverging_trial_is_failed_not_errored_not_retried(tmp_path, tiny_base, capsys):
    # a worker in this process (the study CLI around it is tested above): one real fit, the one that diverges
    path = write_study(tmp_path / "div.yaml", base=str(tiny_base), args={"trainer.max_steps": 6},
                       stability={"factor": 2.0, "warmup_steps": 1},
                       axes={"model.learning_rate": [1000.0]}, seeds=[1], retries=1)
    spec = load_spec(path)
    store = st.storage(st.default_storage(spec.name, tmp_path / "logs"), heartbeat=3600)
    worker = Worker(spec, st.create(spec, store), store, tmp_path / "logs", data_dir=str(tmp_path / "glue"),
                    sleep=lambda s: pytest.fail("nothing to wait for"))
    assert worker.loop() == 1  # one fit: a failed run is a result, not retried
    trials = open_study(tmp_path / "logs", "div").get_trials()
    assert len(trials) == 1 and trials[0].state.name == "COMPLETE"
    assert trials[0].user_attrs["verdict"] == "failed" and trials[0].user_attrs["exit_code"] == 3
    assert trials[0].user_attrs["machine"] == describe_machine([])
    stability = trials[0].user_attrs["result"]["stability"]
    assert stability["succeeded"] is False and stability["diverged"] is True
    assert "trial 0 failed" in capsys.readouterr().out


# --- the committed study files -------------------------------------------------------------------------------------
STUDY_FILES = sorted((REPO / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.stem)
def test_committed_study_files_parse_with_every_variant(path, monkeypatch):
    monkeypatch.chdir(REPO)  # their base recipes are relative to the repository root
    variants = (yaml.safe_load(path.read_text()).get("variants") or {})
    for variant in [None, *variants]:
        spec = load_spec(path, variant)
        assert spec.size() >= len(spec.seeds)
        for cell in spec.cells()[:3]:
            params = {**cell, "seed": spec.seeds[0]}
            assert spec.fit_args(params, spec.task_of(params))[-2:] == ["--seed_everything", str(spec.seeds[0])]


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.stem)
def test_committed_study_cell_is_accepted_by_fit(path, monkeypatch, capsys):
    """fit's own parser, in this process: a fresh interpreter per study file cost ~10 s of imports each (the grid
    check in its own subprocess, as ``study run`` does it: test_study_run_refuses_a_grid_fit_would_refuse_...)."""
    from lit_factor import cli

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["cli.py"])  # else LightningCLI warns that pytest's arguments are ignored
    spec = load_spec(path)
    params = {**spec.cells()[-1], "seed": spec.seeds[0]}
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", *spec.fit_args(params, spec.task_of(params)), "--print_config"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err[-2000:]
    # a study with a stability section judges every fit; one without (compress: pure measurements) adds nothing
    assert ("lit_factor.callbacks.StabilityMonitor" in out) == (spec.stability is not None)


# the findings (the registered claims and their statistics) are tested in tests/test_claims.py


def test_config_facts_read_the_settings_a_report_groups_by():
    from lit_factor.study.results import config_facts

    staging = {"class_path": "lit_factor.callbacks.StagingCallback", "init_args": {"granularity": "block",
                                                                                   "spread": 0.5}}
    config = {"model": {"model_name_or_path": "minilm", "learning_rate": 5e-5,
                        "factorization": {"method": "lowrank", "budget": 0.25},
                        "distillation": {"teacher": "self", "temperature": 2.0}},
              "data": {"task": "sst2", "max_train_samples": 1000}, "trainer": {"callbacks": [staging]}}
    facts = config_facts(config)
    assert facts["method"] == "lowrank" and facts["budget"] == 0.25 and facts["teacher"] == "self"
    assert facts["staged"] and facts["schedule"] == "granularity=block, spread=0.5"
    config["model"].update(factorization={"method": "none", "budget": 0.25}, distillation={"teacher": None})
    facts = config_facts(config)
    assert facts["budget"] is None and facts["teacher"] is None  # dense: no budget; no teacher: no distillation


def test_workers_share_cores_and_take_one_gpu_each(monkeypatch):
    from lit_factor.study.runner import RunOptions, worker_commands
    from lit_factor.study.trial import trial_env

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    cmds = worker_commands("s.yaml", [(None, "sqlite:///x.db")], RunOptions(workers=3, gpus=["0", "1"]))
    assert [c[c.index("--gpu") + 1] for c in cmds] == ["0", "1", "0"]
    assert {c[c.index("--threads") + 1] for c in cmds} == {"5"}
    assert all("--gpu" not in c for c in worker_commands("s.yaml", [(None, "u")], RunOptions(workers=2, gpus=[])))
    assert all("--machine" not in c for c in cmds)
    described = worker_commands("s.yaml", [(None, "u")], RunOptions(workers=2, gpus=[]), "CPU only (x), 2 CPU cores")
    assert all(c[c.index("--machine") + 1] == "CPU only (x), 2 CPU cores" for c in described)  # one description
    queue = worker_commands("s.yaml", [("a", "u1"), ("b", "u2")], RunOptions(workers=1, gpus=[]))[0]
    assert queue[queue.index("--variant"):queue.index("--variant") + 8] == \
        ["--variant", "a", "--storage", "u1", "--variant", "b", "--storage", "u2"]
    env = trial_env(5, "1")
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["OMP_NUM_THREADS"] == "5"


def test_unusable_storage_url_is_one_clear_error():
    with pytest.raises(UserError, match="--storage 'nosuchdriver://x': cannot open"):
        st.storage("nosuchdriver://x")


def test_rerun_with_changed_settings_is_refused(tmp_path, base_yaml):
    path = write_study(tmp_path / "ch.yaml", base=str(base_yaml), command=FAKE, args={"a.b": 1},
                       axes={"x.y": [1]}, seeds=[1])
    store = st.storage(st.default_storage("ch", tmp_path))
    st.create(load_spec(path), store)
    st.create(load_spec(path), store)  # same file: resumes
    write_study(path, base=str(base_yaml), command=FAKE, args={"a.b": 2}, axes={"x.y": [1]}, seeds=[1])
    with pytest.raises(UserError, match=r"study 'ch' ran with other settings \(args changed"):
        st.create(load_spec(path), store)
    write_study(path, base=str(base_yaml), command=FAKE, args={"a.b": 1}, axes={"x.y": [1, 2]}, seeds=[1])
    with pytest.raises(UserError, match="has another grid"):
        st.create(load_spec(path), store)


# --- bad options: one line, exit 2, nothing left behind (issue 23) ---------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["run", "S", "--threads", "-1"], "--threads -1: must be at least 1"),
    (["run", "S", "--threads", "0"], "--threads 0: must be at least 1"),  # was: silently the default
    (["run", "S", "--heartbeat", "0"], "--heartbeat 0: must be at least 1 (seconds)"),  # was: "--storage ..."
    (["run", "S", "--grace", "0"], "--grace 0: must be at least 1 (seconds)"),
    (["run", "S", "--workers", "0"], "--workers 0: must be at least 1"),
    (["status", "unknown"], "no study record docs/studies/unknown/journal.log"),
    (["report", "unknown", "--out", "out"], "no study record docs/studies/unknown/journal.log"),
])
def test_bad_study_options_leave_nothing_behind(args, message, tmp_path, base_yaml, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = fake_study(tmp_path, base_yaml, "opts")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        study_cli.main([str(path) if a == "S" else a for a in args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert message in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no logs/studies/, no database


# --- the grid is checked before anything is stored (issue 23) --------------------------------------------------------
def _refuse(bad_values: set[str]):
    """A stand-in for fit's parser: refuses any argument list holding one of ``bad_values``; records its calls."""
    calls = []

    def checker(arg_lists):
        calls.append(arg_lists)
        return [next((f"refused {v}" for v in args if v in bad_values), None) for args in arg_lists]

    return checker, calls


def test_check_grid_parses_each_cell_once_and_names_the_first_bad_one(tmp_path, base_yaml):
    from lit_factor.study import trial as tr

    spec = load_spec(write_study(tmp_path / "g.yaml", base=str(base_yaml), stability={},
                                 axes={"model.factorization.method": ["lowrank", "svdx", "blockwise"],
                                       "model.factorization.budget": [0.5, 0.25]}, seeds=[1, 2, 3]))
    checker, calls = _refuse({"svdx"})
    with pytest.raises(UserError, match=r"grid cell model\.factorization\.method=svdx "
                                        r"model\.factorization\.budget=0\.5 is refused by fit: refused svdx "
                                        r"\(and 1 more of the 6 cells\); nothing"):
        tr.check_grid(spec, "/glue", checker=checker)
    assert len(calls) == 1 and len(calls[0]) == 6  # one parse per cell (seeds parse alike), one subprocess
    assert all(args[-2:] == ["--data.data_dir", "/glue"] and "--seed_everything" in args for args in calls[0])
    checker, calls = _refuse(set())
    tr.check_grid(spec, None, checker=checker)  # a good grid passes
    custom = load_spec(write_study(tmp_path / "c.yaml", base=str(base_yaml), command=FAKE, axes={"fake.x": [1]},
                                   seeds=[1]))
    tr.check_grid(custom, None, checker=lambda arg_lists: pytest.fail("a custom command's parser is unknown"))


def test_bad_grid_stores_nothing_and_the_corrected_file_then_runs(tmp_path, base_yaml, monkeypatch):
    from lit_factor.study import trial as tr
    from lit_factor.study.runner import RunOptions, run

    checker, calls = _refuse({"svdx"})
    monkeypatch.setattr(tr, "check_fit_args", checker)
    path = write_study(tmp_path / "fix.yaml", base=str(base_yaml), axes={"model.factorization.method":
                                                                        ["lowrank", "svdx"]}, seeds=[1])
    with pytest.raises(UserError, match="svdx"):
        run(str(path), [(load_spec(path), None)], RunOptions(root=tmp_path / "logs"))
    assert not (tmp_path / "logs").exists()  # no database: the corrected file is not "another grid"
    write_study(path, base=str(base_yaml), command=FAKE, axes={"model.factorization.method": ["lowrank", "monarch"]},
                seeds=[1])
    spec = load_spec(path)
    study = st.create(spec, st.storage(st.default_storage(spec.name, tmp_path / "logs")))
    assert study.user_attrs["search_space"]["model.factorization.method"] == ["lowrank", "monarch"]


@pytest.mark.slow  # fit's real parser in a fresh interpreter (~15 s on a loaded 2-core machine)
def test_study_run_refuses_a_grid_fit_would_refuse_before_anything_is_stored(tmp_path, base_yaml):
    path = write_study(tmp_path / "bad.yaml", base=str(base_yaml),
                       axes={"model.factorization.method": ["lowrank", "svdx"],
                             "model.factorization.bogus_key": [1]}, seeds=[1, 2])
    proc = run_cli("run", str(path), "--root", "logs", cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "grid cell model.factorization.method=lowrank model.factorization.bogus_key=1 is refused by fit" in lines[0]
    assert "bogus_key" in lines[0].split("refused by fit:")[1] and "(and 1 more of the 2 cells)" in lines[0]
    assert not (tmp_path / "logs").exists() and "[worker" not in proc.stdout


# --- heartbeats and re-queues, driven by explicit events instead of a clock (issue 23) -------------------------------
def _worker(tmp_path, base_yaml, name: str, **kw):
    path = write_study(tmp_path / f"{name}.yaml", base=str(base_yaml), command=FAKE,
                       axes={"model.factorization.method": ["lowrank", "monarch"]}, seeds=[1])
    spec = load_spec(path)
    # a heartbeat of an hour: nothing goes stale by the clock while the test runs; the test says when
    store = st.storage(st.default_storage(name, tmp_path / "logs"), heartbeat=3600)
    study = st.create(spec, store)
    return Worker(spec, study, store, tmp_path / "logs", **kw), study, store


def _declare_dead(study, store, number: int) -> None:
    """What fail_stale_trials does to a trial whose heartbeat is stale: FAIL it, then the stale-trial callback
    (RetryHeartbeatStaleTrialCallback: a WAITING copy with the same grid point)."""
    from optuna.trial import TrialState

    trial_id = store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name(study.study_name), number)
    store.set_trial_state_values(trial_id, state=TrialState.FAIL)
    store.get_heartbeat_stale_trial_callback()(study, store.get_trial(trial_id))


def _points(study) -> list[tuple]:
    return sorted((t.params["model.factorization.method"], t.params["seed"]) for t in real_trials(study)
                  if t.state.name == "COMPLETE")


def test_dead_workers_trial_is_requeued_and_run_once_when_its_heartbeat_is_stale(tmp_path, base_yaml):
    events = {"waited": 0, "stale": False}

    def wait(seconds):  # the only running trial is the dead one: the worker waits a heartbeat ...
        events["waited"] += 1
        events["stale"] = True  # ... after which its heartbeat is stale (the event a clock would bring)

    def reap(study):
        if events["stale"] and dead.number not in [t.number for t in study.get_trials() if t.state.name == "FAIL"]:
            _declare_dead(study, store, dead.number)

    worker, study, store = _worker(tmp_path, base_yaml, "dead", sleep=wait)
    worker.reap = reap
    dead = study.ask()  # a worker that took a grid point and died: RUNNING for ever, no heartbeat
    for axis, values in study.user_attrs["search_space"].items():
        dead.suggest_categorical(axis, values)
    assert worker.loop() == 2  # the free point, then the dead one's, re-queued
    assert events["waited"] == 1
    assert _points(study) == [("lowrank", 1), ("monarch", 1)]  # every grid point exactly once
    retried = next(t for t in real_trials(study) if t.system_attrs.get("failed_trial") == dead.number)
    assert retried.state.name == "COMPLETE" and retried.params == dead.params


def test_a_queue_worker_goes_on_when_nothing_is_left_to_start_instead_of_waiting(tmp_path, base_yaml):
    """In a queue (--variant a,b) a worker leaves a study whose last trial runs on another worker: waiting for it
    left a core idle for most of a fit at the end of every study. The study's last worker still waits."""
    worker, study, _ = _worker(tmp_path, base_yaml, "queued", sleep=lambda s: pytest.fail("a queue does not wait"))
    elsewhere = study.ask()  # another worker's trial, running
    for axis, values in study.user_attrs["search_space"].items():
        elsewhere.suggest_categorical(axis, values)
    worker.reap = lambda study: None  # that worker is alive
    assert worker.loop(wait=False) == 1  # the free grid point, then on
    assert len(_points(study)) == 1 and study.get_trials()[elsewhere.number].state.name == "RUNNING"
    waited = []
    worker.sleep = lambda s: (waited.append(s), study.tell(elsewhere, 0.0))  # the other trial ends meanwhile
    assert worker.loop() == 0 and len(waited) == 1  # the last study of a queue waits, as a single study does


@pytest.mark.slow  # two studies of fake fits through the real CLI and worker processes (~20 s loaded)
def test_study_run_runs_variants_as_one_queue(tmp_path, base_yaml):
    path = write_study(tmp_path / "q.yaml", base=str(base_yaml), command=FAKE, axes={"fake.x": [1, 2]}, seeds=[1],
                       variants={"a": {"seeds": [1, 2]}, "b": {"axes": {"fake.x": [3]}}})
    proc = run_cli("run", str(path), "--variant", "a,b", "--workers", "2", "--root", "logs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "q-a: [" in proc.stdout and "q-b: [" in proc.stdout
    for name, n in (("q-a", 4), ("q-b", 1)):
        study = open_study(tmp_path / "logs", name)
        assert sum(t.state.name == "COMPLETE" for t in real_trials(study)) == n
        assert study.user_attrs["commands"] == ["python cli.py study " + shlex.join(
            ["run", str(path), "--variant", "a,b", "--workers", "2", "--root", "logs"])]
    proc = run_cli("run", str(path), "--variant", "a,a", "--root", "logs", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --variant a,a: a variant is named twice")


def test_trial_declared_dead_while_running_is_left_to_its_requeued_copy(tmp_path, base_yaml, monkeypatch, capsys):
    from lit_factor.study import trial as tr

    worker, study, store = _worker(tmp_path, base_yaml, "slow", sleep=lambda s: pytest.fail("nothing to wait for"))
    real_execute, calls = tr.execute, []

    def execute(cmd, env, log_file, on_start=None):
        calls.append(cmd)
        if len(calls) == 1:  # another machine declares this run dead while it runs (its heartbeats were late)
            running = next(t for t in study.get_trials() if t.state.name == "RUNNING")
            _declare_dead(study, store, running.number)
        return real_execute(cmd, env, log_file, on_start)

    monkeypatch.setattr(tr, "execute", execute)
    worker.loop()
    assert "was re-queued by another worker (no heartbeat); left to it" in capsys.readouterr().err
    assert _points(study) == [("lowrank", 1), ("monarch", 1)] and len(calls) == 3


# --- storage: creation by many processes at once, Optuna conventions relied upon (issue 23) ---------------------------
def test_storage_open_retries_when_another_process_creates_the_tables(monkeypatch, tmp_path):
    import sqlalchemy.exc

    real, attempts = st.RDBStorage, []

    def racing(*args, **kwargs):  # what PostgreSQL answers the loser of two concurrent CREATE TYPE/TABLE
        attempts.append(1)
        if len(attempts) == 1:
            raise sqlalchemy.exc.IntegrityError("CREATE TYPE studydirection", {}, Exception("duplicate key value"))
        return real(*args, **kwargs)

    monkeypatch.setattr(st, "RDBStorage", racing)
    assert isinstance(st.storage(f"sqlite:///{tmp_path / 'r.db'}"), real) and len(attempts) == 2


def test_create_loads_a_study_another_process_created_at_the_same_instant(monkeypatch, tmp_path, base_yaml):
    import optuna
    from optuna.exceptions import DuplicatedStudyError

    spec = load_spec(fake_study(tmp_path, base_yaml, "twin"))
    store = st.storage(st.default_storage("twin", tmp_path))
    st.create(spec, store)  # the other process won

    def lost(**kwargs):
        raise DuplicatedStudyError("twin")

    monkeypatch.setattr(optuna, "create_study", lost)
    assert st.create(spec, store).study_name == "twin"


def test_optuna_grid_sampler_keeps_the_grid_id_where_the_queue_reads_it():
    """storage.grid_state / holder_of and status read GridSampler's ``grid_id`` system attribute (no public
    accessor): an Optuna upgrade that renames it must fail here, not silently run grid points twice."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"x": [1, 2]}))
    trial = study.ask()
    trial.suggest_categorical("x", [1, 2])
    frozen = study.get_trials()[0]
    assert frozen.system_attrs.get("grid_id") in (0, 1) and frozen.system_attrs.get("search_space") == {"x": [1, 2]}


@pytest.mark.parametrize("machines,expect", [(["CPU A"], ["CPU A", "GPU B"]), (["CPU A", "GPU B"], [None, "GPU B"])])
def test_a_trial_without_its_own_machine_takes_the_studys_only_one(machines, expect):
    """Trials recorded before each named its machine: on a study that only ever ran on one, that one; on a study
    that ran on several, unknown (claim 4 then keeps them together rather than guess)."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    from lit_factor.study.report import trial_rows

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study()
    study.set_user_attr("search_space", {"x": [1, 2], "seed": [1]})
    study.set_user_attr("machines", machines)
    space = {"x": CategoricalDistribution([1, 2]), "seed": CategoricalDistribution([1])}
    for x, attrs in ((1, {}), (2, {"machine": "GPU B"})):
        study.add_trial(optuna.trial.create_trial(params={"x": x, "seed": 1}, distributions=space, value=0.5,
                                                  user_attrs={"verdict": "succeeded", "result": {"final": 0.5},
                                                              **attrs}))
    assert [r["machine"] for r in sorted(trial_rows(study), key=lambda r: r["x"])] == expect


def test_loss_curves_need_no_dense_arm_and_name_what_tells_the_arms_apart():
    """A study without a dense arm (claim2-collapse) still gets its loss curves; two Monarch arms that differ in
    schedule, rate and data are told apart in the legend, and a dense arm, when there is one, is 'dense'."""
    from lit_factor.study import figures

    def row(**kw):
        return {"task": "sst2", "method": "monarch", "budget": 0.1, "staged": False, "schedule": None,
                "learning_rate": 1e-4, "max_train_samples": 4000, "max_epochs": 1,
                "train_loss": [[0, 0.69], [10, 0.6]], **kw}
    rows = [row(staged=True, schedule="order=['.*'], spread=0.25"), row(learning_rate=7.5e-5, max_train_samples=3008)]
    labels = [t.get_text() for t in figures.loss_curves(rows).axes[0].get_legend().get_texts()]
    assert len(labels) == 2 and "spread=0.25" in labels[0] and "lr 7.5e-05, examples 3008" in labels[1]
    assert "schedule" not in labels[1]
    fig = figures.loss_curves([row(method="none", budget=None), row()])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["dense", "monarch"]
    assert figures.loss_curves([row(method="none", budget=None)]) is None
