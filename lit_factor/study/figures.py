"""The report's figures (matplotlib, Agg backend: no display needed), drawn from the trial rows of a study.

* dev metric vs kept fraction of the targeted weights, one line per method, a panel per task (dense: dashed);
* success rate of staged vs all-at-once runs, per method and budget, low-data (<= 1000 examples) vs more data;
* training-loss curves of dense vs factorized runs at the budget closest to 25 %, a panel per task.

Each function returns the figure, or None when the study holds nothing to draw (e.g. no staged runs).
"""

from __future__ import annotations

import statistics
import textwrap
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

#: at most this many training examples counts as low-data (the paper's setting)
LOW_DATA = 1000


def _finished(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["verdict"] in ("succeeded", "failed") and isinstance(r.get("final"), int | float)]


def _panels(n: int, width: float = 4.2, height: float = 3.4):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def _line_label(r: dict) -> str:
    return r["method"] + (" (staged)" if r.get("staged") else "")


def metric_vs_kept(rows: list[dict]):
    rows = [r for r in _finished(rows) if r.get("method")]
    tasks = sorted({r["task"] for r in rows})
    if not rows or not any(r["method"] != "none" for r in rows):
        return None
    fig, axes = _panels(len(tasks))
    for ax, task in zip(axes, tasks, strict=True):
        lines: dict[str, dict] = defaultdict(lambda: defaultdict(list))
        for r in (r for r in rows if r["task"] == task):
            lines[_line_label(r)][r.get("budget")].append(r)
        for label, by_budget in sorted(lines.items()):
            pts = sorted((statistics.fmean(x["kept_fraction"] or 1.0 for x in rs),
                          statistics.fmean(x["final"] for x in rs),
                          statistics.stdev([x["final"] for x in rs]) if len(rs) > 1 else 0.0)
                         for rs in by_budget.values())
            if label.startswith("none"):
                ax.axhline(pts[0][1], color="black", linestyle="--", label="dense")
                continue
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        label=label)
        monitor = next(r["monitor"] for r in rows if r["task"] == task)
        ax.set(title=task, xlabel="kept fraction of targeted weights", ylabel=f"final {monitor}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def regime(r: dict) -> str:
    n = r.get("max_train_samples")
    return f"<= {LOW_DATA} examples" if isinstance(n, int) and n <= LOW_DATA else "more data"


def success_rates(rows: list[dict]):
    rows = [r for r in rows if r["verdict"] in ("succeeded", "failed") and r.get("method") not in (None, "none")]
    if not {True, False} <= {bool(r.get("staged")) for r in rows}:
        return None
    varied = [k for k in ("task", "learning_rate") if len({r.get(k) for r in rows}) > 1]
    panels: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        panels[" ".join([f"{r['method']} {r.get('budget')}", *(f"{k}={r.get(k)}" for k in varied)])].append(r)
    fig, axes = _panels(len(panels))
    for ax, (title, rs) in zip(axes, sorted(panels.items()), strict=True):
        regimes = sorted({regime(r) for r in rs})
        kinds = sorted({r.get("schedule") if r.get("staged") else "all-at-once" for r in rs}, key=str)
        width = 0.8 / len(kinds)
        for k, kind in enumerate(kinds):
            rates = []
            for data in regimes:
                sel = [r for r in rs if regime(r) == data
                       and (r.get("schedule") if r.get("staged") else "all-at-once") == kind]
                rates.append(sum(r["verdict"] == "succeeded" for r in sel) / len(sel) if sel else 0.0)
            label = kind if kind == "all-at-once" else f"staged ({kind})"
            ax.bar([i + k * width for i in range(len(regimes))], rates, width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(regimes))], regimes)
        ax.set(title=title, ylabel="success rate", ylim=(0, 1.05))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


#: what else may tell two factorized arms of one figure apart (shown in the legend when it differs), and its name
_ARM_FACTS = {"schedule": "", "learning_rate": "lr", "max_train_samples": "examples", "max_epochs": "epochs"}


def _arm_label(r: dict, detail: list[str]) -> str:
    parts = [_line_label(r)] + [f"{_ARM_FACTS[k]} {r.get(k)}".strip() for k in detail
                                if r.get(k) is not None and (k != "schedule" or r.get("staged"))]
    return textwrap.fill(", ".join(parts), 38)


def loss_curves(rows: list[dict], target: float = 0.25):
    """Training loss per step of every run at the budget nearest ``target``, with the dense runs when the study has
    them (a study without a dense arm -- e.g. claim2-collapse -- still shows when its runs stop learning)."""
    rows = [r for r in rows if r.get("train_loss") and r.get("method")]
    budgets = {r["budget"] for r in rows if r["method"] != "none" and r.get("budget") is not None}
    if not budgets:
        return None
    budget = min(budgets, key=lambda b: abs(b - target))
    rows = [r for r in rows if r["method"] == "none" or r.get("budget") == budget]
    factorized = [r for r in rows if r["method"] != "none"]
    detail = [k for k in _ARM_FACTS if len({str(r.get(k)) for r in factorized}) > 1]
    tasks = sorted({r["task"] for r in rows})
    fig, axes = _panels(len(tasks))
    colors: dict[str, str] = {}
    for ax, task in zip(axes, tasks, strict=True):
        for r in (r for r in rows if r["task"] == task):
            label = "dense" if r["method"] == "none" else _arm_label(r, detail)
            color = colors.setdefault(label, f"C{len(colors)}")
            steps, losses = zip(*r["train_loss"], strict=True)
            ax.plot(steps, losses, color=color, alpha=0.7, linewidth=1, label=label)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        versus = "dense vs factorized" if len(factorized) < len(rows) else "factorized"
        ax.set(title=f"{task}: {versus} at {budget:g}", xlabel="step", ylabel="training loss")
    fig.tight_layout()
    return fig


FIGURES = {"metric_vs_kept": metric_vs_kept, "success_rate": success_rates, "loss_curves": loss_curves}


#: marker colour of each verdict class in a forest plot
VERDICT_COLORS = {"supported": "tab:green", "same direction, not significant": "tab:olive",
                  "indistinguishable": "tab:gray", "contradicted": "tab:red", "insufficient": "lightgray"}


def forest(answer, margin_lines: tuple[float, ...] = ()):
    """A claim's forest plot: one row per comparison (task x budget x study ...), the effect with its 95 % interval,
    coloured by verdict (insufficient ones hollow), the pooled effect at the bottom; None without comparisons."""
    comps = answer.comparisons
    if not comps:
        return None
    rows = list(reversed(comps))
    fig, ax = plt.subplots(figsize=(13, 1.4 + 0.24 * (len(rows) + 1)))
    for y, c in enumerate(rows, start=1):
        t, color = c.test, VERDICT_COLORS.get(c.verdict, "black")
        hollow = c.verdict == "insufficient"
        if t.low == t.low:  # not NaN
            ax.plot([c.sign * t.low, c.sign * t.high], [y, y], color=color, linewidth=1.5)
        ax.plot([c.sign * t.effect], [y], marker="o", markersize=5, color=color,
                markerfacecolor="white" if hollow else color)
    labels = [c.row_label for c in rows]
    if answer.pooled is not None:
        p = answer.pooled
        ax.plot([p.low, p.high], [0, 0], color="black", linewidth=3)
        ax.plot([p.effect], [0], marker="D", color="black")
        labels = ["pooled (random effects)", *labels]
        ticks = range(0, len(rows) + 1)
    else:
        ticks = range(1, len(rows) + 1)
    ax.axvline(0, color="black", linewidth=0.8)
    for m in margin_lines:
        ax.axvline(m, color="tab:blue", linestyle=":", linewidth=0.8)
    ax.set_yticks(list(ticks), labels, fontsize=7)
    ax.set_ylim(-0.8, len(rows) + 0.8)
    ax.set_xlabel("effect in the claimed direction:\n" + answer.claim.measure, fontsize=8)
    ax.set_title(f"Claim {answer.claim.key}: {answer.claim.title}" if answer.claim.key != "goal"
                 else answer.claim.title, fontsize=9)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=v) for v, c in VERDICT_COLORS.items()]
    ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig
