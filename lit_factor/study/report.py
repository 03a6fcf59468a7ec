"""``study report``: every trial as CSV, a Markdown table per task (mean ± sd (n), success rate per cell), the
findings (lit_factor/study/findings.py), figures (PNG and TensorBoard) and the TensorBoard HParams view, and the
report's head as ``study.md``; ``--publish`` then regenerates the whole docs page from every study folder beside
this one (lit_factor/study/publish.py).

Everything is computed from the study database (the trials' stored results), so a report can be drawn on any
machine that reaches the storage. Statistics: mean and sample standard deviation (n - 1) over the seeds of a
cell whose run finished (succeeded or failed); errored trials are listed in the CSV but not averaged.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna

from lit_factor.errors import UserError
from lit_factor.study import status as stat
from lit_factor.study.findings import findings
from lit_factor.study.publish import STUDY_HEADER, build_page
from lit_factor.study.results import read_run
from lit_factor.study.spec import SEED
from lit_factor.study.tables import task_tables

RESULT_COLUMNS = ("monitor", "final", "best", "best_epoch", "kept_fraction", "model_kept_fraction",
                  "params_dense_model", "params_factorized_model", "params_targeted_dense",
                  "params_targeted_factorized", "train_time_s", "latency_speedup")
FACT_COLUMNS = ("task", "method", "budget", "staged", "schedule", "max_train_samples", "learning_rate",
                "max_epochs", "max_steps", "teacher")
TAIL_COLUMNS = ("machine", "wall_s", "exit_code", "run_dir")  # machine: per trial (blank before it was recorded)


def axis_column(axis: str) -> str:
    """The CSV column of a grid axis: its name, unless a settings/result column has it (an axis named ``task``
    whose options are ``sst2-low`` ..., beside the ``task`` the fit ran)."""
    return f"{axis} (axis)" if axis in FACT_COLUMNS + RESULT_COLUMNS + TAIL_COLUMNS + ("trial", "verdict") else axis


def axes_of(study: optuna.Study) -> list[str]:
    """The CSV columns of the grid axes (seed excluded)."""
    return [axis_column(a) for a in study.user_attrs["search_space"] if a != SEED]


def columns(study: optuna.Study, rows: list[dict]) -> list[str]:
    """Grid, settings, results, then every final dev metric any trial logged (``val/accuracy``, ``val/f1`` ...);
    rows of several studies (``report_with``) also say which study each came from."""
    metrics = sorted({k for r in rows for k in r.get("final_metrics") or {}})
    extras = sorted({k for r in rows for k in r.get("extra") or {}})
    joined = ["study"] if any("study" in r for r in rows) else []
    return [*joined, "trial", "verdict", *axes_of(study), SEED, *FACT_COLUMNS, *RESULT_COLUMNS, *metrics, *extras,
            *TAIL_COLUMNS]


def trial_rows(study: optuna.Study, reread: bool = False) -> list[dict[str, Any]]:
    """One row per grid point that has a finished trial (its latest complete one, else its latest error).
    ``reread``: results read again from the run directories found on this machine (after a reader update)."""
    rows = []
    # trials recorded before each said what it ran on: the study's machine, where it only ever ran on one
    machines = study.user_attrs.get("machines") or []
    fallback = machines[0] if len(machines) == 1 else None
    for trials in stat.grid_points(study).values():
        t = stat.final_trial(trials)
        if t is None or stat.point_state(trials) in ("running", "queued"):
            continue
        result = t.user_attrs.get("result") or {}
        run_dir = Path(t.user_attrs.get("run_dir", ""))
        if reread and result and run_dir.is_dir():
            result = read_run(run_dir)
        facts = result.get("config") or {}
        row = {"trial": t.number, "verdict": t.user_attrs.get("verdict", "error"),
               **{axis_column(a): v for a, v in t.params.items()}, **facts,
               **{k: result.get(k) for k in RESULT_COLUMNS}, **{k: t.user_attrs.get(k) for k in TAIL_COLUMNS}}
        row.setdefault("task", t.params.get("data.task"))
        row["machine"] = row["machine"] or fallback
        row["train_loss"] = result.get("train_loss")  # for the figures, not the CSV
        row["latency_setting"] = result.get("latency_setting")
        row["final_metrics"], row["extra"] = result.get("final_metrics") or {}, result.get("extra") or {}
        row.update({**row["final_metrics"], **row["extra"]})
        rows.append(row)
    return rows


# --- studies reported together (``report_with``) ----------------------------------------------------------------------
def check_joinable(study: optuna.Study, others: list[optuna.Study]) -> None:
    """Studies share a table only when their trials are comparable: the same axes and the same recorded settings
    (``StudySpec.settings``: base, args, stability rule, fit command ...) but for the grid itself, i.e. the axis
    values and the excluded cells."""
    grid = ("axes", "exclude")
    mine = study.user_attrs.get("settings") or {}
    for other in others:
        axes, theirs = sorted(study.user_attrs["search_space"]), sorted(other.user_attrs["search_space"])
        if axes != theirs:
            raise UserError(f"report_with {other.study_name!r}: its axes ({', '.join(theirs)}) are not those of "
                            f"{study.study_name!r} ({', '.join(axes)}); only studies over the same axes share a table")
        settings = other.user_attrs.get("settings") or {}
        changed = [k for k in dict.fromkeys([*mine, *settings]) if k not in grid and mine.get(k) != settings.get(k)]
        if changed:
            raise UserError(f"report_with {other.study_name!r}: its {', '.join(changed)} differ from "
                            f"{study.study_name!r}'s, so their trials are not comparable")


def joined_rows(studies: list[optuna.Study], reread: bool = False,
                order: dict[str, list] | None = None) -> list[dict[str, Any]]:
    """The rows of several studies as one grid: each row names its study, and rows are ordered by the joined
    grid: each axis's values in ``order`` (the study file's main grid), then as the studies list them."""
    rows = [{"study": s.study_name, **r} for s in studies for r in trial_rows(s, reread)]
    order = {axis: list(values) for axis, values in (order or {}).items()}
    for s in studies:
        for axis, values in s.user_attrs["search_space"].items():
            order.setdefault(axis, []).extend(v for v in values if v not in order[axis])
    return sorted(rows, key=lambda r: [order[a].index(r[axis_column(a)]) for a in order])


def write_csv(rows: list[dict], cols: list[str], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return path


def progress_text(study: optuna.Study) -> str:
    c: Counter = stat.counts(study)
    total = sum(c.values())
    finished = c["succeeded"] + c["failed"]
    # the fits' own verdicts; the tables' "succeeded" re-checks accuracy against the majority class (claims.py), which
    # fits recorded before the StabilityMonitor did so did not
    return (f"{finished} of {total} grid points finished (by their fits' own verdicts: {c['succeeded']} succeeded, "
            f"{c['failed']} failed); "
            f"{c['errored']} errored, {c['running']} running, {c['queued']} not run.")


# --- the whole report ------------------------------------------------------------------------------------------------
def write_tensorboard(rows: list[dict], figures: dict, log_dir: Path, hparam_keys: list[str]) -> Path:
    """Figures and one HParams run per trial (hyperparameters = grid + settings; metrics = results)."""
    from torch.utils.tensorboard import SummaryWriter

    for old in log_dir.rglob("events.out.tfevents.*"):  # a rerun replaces the report, not adds to it
        old.unlink()
    with SummaryWriter(str(log_dir)) as writer:
        for name, fig in figures.items():
            writer.add_figure(f"report/{name}", fig, close=False)
        for r in rows:
            hparams = {k: "none" if r.get(k) is None else r[k] for k in hparam_keys}
            results = {k: r.get(k) for k in ("final", "best", "kept_fraction", "train_time_s", "latency_speedup")}
            results.update(r.get("extra") or {})
            metrics = {f"hparam/{k}": float(v) for k, v in results.items() if isinstance(v, int | float)}
            metrics["hparam/succeeded"] = float(r["verdict"] == "succeeded")
            writer.add_hparams(hparams, metrics, run_name=f"trial_{r['trial']:04d}")
    return log_dir


def _grid(study: optuna.Study) -> str:
    return "; ".join(f"`{k}`: {', '.join(map(str, v))}" for k, v in study.user_attrs["search_space"].items())


def header(study: optuna.Study, command: str | None = None, joined: Sequence[optuna.Study] = ()) -> str:
    """The report's head (study file, grid, progress, machine, commands): written as ``study.md`` beside
    trials.csv, it is what docs/results.md needs of a study besides its rows (publish.py)."""
    everything = [*joined, study]
    commands = [c for s in everything for c in s.user_attrs.get("commands", [])] + ([command] if command else [])
    machines = "; ".join(dict.fromkeys(m for s in everything for m in s.user_attrs.get("machines", []))) \
        or "not recorded"
    lines = [f"## Study `{study.study_name}`", "",
             f"Study file: `{study.user_attrs.get('source')}`. Grid: {_grid(study)}.", ""]
    for other in joined:
        lines += [f"Reported with study `{other.study_name}` (same settings; its trials are in the tables). "
                  f"Grid: {_grid(other)}. Progress: {progress_text(other)}", ""]
    lines += [f"**Progress:** {progress_text(study)}", "", f"**Ran on:** {machines}.", "",
              "Commands (run from the repository root):", "", "```", *dict.fromkeys(commands), "```", ""]
    return "\n".join(lines) + "\n"


def markdown(study: optuna.Study, tables: str, figures: list[str], prefix: str = "", notes: str = "",
             command: str | None = None, joined: Sequence[optuna.Study] = ()) -> str:
    """The report's Markdown; ``joined``: the ``report_with`` studies whose trials share the tables."""
    lines = [header(study, command, joined), notes, tables, f"Every trial: [trials.csv]({prefix}trials.csv).", ""]
    lines += [f"![{name}]({prefix}{name}.png)" for name in figures]
    return "\n".join(lines) + "\n"


def write_report(study: optuna.Study, out: Path, publish: Path | None = None, tensorboard: Path | None = None,
                 command: str | None = None, reread: bool = False,
                 joined: Sequence[optuna.Study] = (), order: dict[str, list] | None = None) -> dict[str, Path]:
    """Write trials.csv, report.md, the figures and the TensorBoard view; return what was written. ``joined``:
    studies (``report_with``) whose trials are reported in the same tables, findings and figures, their rows in
    the axis-value ``order`` given (the study file's grid)."""
    import matplotlib.pyplot as plt

    from lit_factor.study.figures import FIGURES

    check_joinable(study, list(joined))
    out.mkdir(parents=True, exist_ok=True)
    rows = joined_rows([*joined, study], reread, order) if joined else trial_rows(study, reread)
    written = {"csv": write_csv(rows, columns(study, rows), out / "trials.csv")}
    figures = {name: fig for name, draw in FIGURES.items() if (fig := draw(rows)) is not None}
    for name, fig in figures.items():
        written[name] = out / f"{name}.png"
        fig.savefig(written[name], dpi=110)
    written["tensorboard"] = write_tensorboard(rows, figures, tensorboard or out / "tensorboard",
                                               [*axes_of(study), SEED, *FACT_COLUMNS])
    for fig in figures.values():
        plt.close(fig)
    for r in rows:  # the findings compare within this report (joined studies were checked comparable above)
        r["section"] = study.study_name
    tables, notes = task_tables(rows, axes_of(study)), findings(rows)
    written["markdown"] = out / "report.md"
    text = markdown(study, tables, list(figures), notes=notes, command=command, joined=joined)
    written["markdown"].write_text(text, encoding="utf-8")
    written["header"] = out / STUDY_HEADER
    written["header"].write_text(header(study, command, joined), encoding="utf-8")
    if publish is not None:  # the whole page again, from every study folder beside this one
        written["page"] = build_page(out.parent, publish)
    return written
