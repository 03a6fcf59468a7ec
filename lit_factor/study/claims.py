"""The claims of the seed paper -- Gupta et al. 2024, "An Empirical Investigation of Matrix Factorization Methods
for Pre-trained Transformers", arXiv 2406.11307 -- and the compression goal of this project, each a registered
check that turns trial rows into comparisons with an effect, a 95 % interval, a p-value and a verdict class
(lit_factor/study/stats.py; how a verdict is judged: docs/results.md, "How to read this page").

A check sees the rows of one study or of many (each row names its ``study``); every comparison is made within
one study and one setting (task, data, schedule, learning rate, recipe ...), never across studies, and Holm's
correction runs over the comparisons of the claim that are tests (not insufficient). Two gates come before any
test:

* **the task trained**: the dense arm of the same study and setting beats the majority-class score (the
  constant predictor of the most frequent dev label, ``MAJORITY``: docs/studies/majority.json) with a 95 %
  interval of the difference above zero, on the task's metric *and* on accuracy (classification tasks). A
  comparison on a task that did not train, or without a dense arm to show it, is *insufficient*;
* **a run succeeded** only when its fit said so *and* its dev accuracy beats the majority class (an MCC or F1
  above the baseline with majority-class accuracy is a constant predictor, not a trained classifier).

Registered checks (``CLAIMS``): claim 1 (low rank beats Monarch and block-wise low rank at equal parameters),
claim 2 (staged factorization is more reliable than all-at-once), claim 3 (pretrained weight matrices are close
to full rank: no trials, from ``analyze``), claim 4 (low rank runs faster than Monarch), and the compression goal
(a factorized model within 1 point of dense at 50 % kept, 2 points at 25 %).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lit_factor.study import stats as st

PAPER = ('Gupta et al. 2024, "An Empirical Investigation of Matrix Factorization Methods for Pre-trained '
         'Transformers", arXiv 2406.11307')

#: the settings that make two runs comparable (besides the arm being compared and the seed); ``section``: the
#: published study folder the row comes from (a report with ``report_with`` holds the trials of several studies
#: that its report checked comparable, e.g. compress-cpu-mrpc-ablation with compress-cpu-mrpc's dense arm)
SETTING = ("section", "task", "max_train_samples", "max_epochs", "max_steps", "learning_rate")
#: low data, in the paper's sense (claim 2)
LOW_DATA = 1000
#: the compression goal: the largest drop below dense, per kept fraction (at least this much kept)
GOAL = ((0.5, 0.01), (0.0, 0.02))
#: two parameter counts are "equal" within this relative difference
EQUAL_PARAMS = 0.01


# --- rows ----------------------------------------------------------------------------------------------------------
def _value(text: str):
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def read_trials(path: Path, study: str | None = None) -> list[dict]:
    """The rows of a committed trials.csv, typed (numbers, booleans, None for blanks); each names its study."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [{k: _value(v) for k, v in r.items()} for r in csv.DictReader(f)]
    for r in rows:
        r["section"] = study or path.parent.name
        if r.get("study") is None:
            r["study"] = r["section"]
    return rows


def read_majority(path: Path) -> dict[str, dict[str, float]]:
    """task -> {metric: majority-class score} (docs/studies/majority.json, written by :func:`majority_table`)."""
    return json.loads(path.read_text(encoding="utf-8"))["tasks"]


def majority_table(data_dir: str | Path, tasks: Iterable[str] = ("sst2", "mrpc", "cola", "rte", "stsb")) -> dict:
    """The majority-class score of every task's dev set, on its metric and on accuracy (StabilityMonitor's rule)."""
    from collections import Counter

    from lit_factor.train.callbacks.stability import majority_baseline
    from lit_factor.train.data import get_task, read_glue_tsv

    out = {}
    for name in tasks:
        task = get_task(name)
        labels = read_glue_tsv(Path(data_dir) / task.dir_name / "dev.tsv", task)["label"]
        if task.is_regression:
            out[name] = {m: 0.0 for m in task.metrics}
            continue
        counts = dict(Counter(labels))
        out[name] = {m: majority_baseline(m, counts) for m in (*task.metrics, "accuracy")}
    return {"source": "GLUE dev sets: the score of always predicting the most frequent dev label", "tasks": out}


def metric_of(row: dict) -> str:
    """The task's metric name (``f1``, ``accuracy``, ``matthews``, ``pearson``) from the run's monitor."""
    return str(row.get("monitor") or "val/accuracy").removeprefix("val/")


def number(row: dict, key: str) -> float | None:
    v = row.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def finished(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r.get("verdict") in ("succeeded", "failed")]


def as_logged(score: float) -> float:
    """A score at the precision runs log it: float32. A model that predicts the majority class everywhere logs an
    accuracy ~1e-8 *above* the exact float64 score on CoLA (721/1043) and RTE (146/277), so against the float64
    score it would beat the majority class (and a dense arm stuck there would count as trained). Compared as logged,
    both sides agree; one more correct dev example is worth >= 1/1500, far above float32's resolution. A fit's own
    verdict compares so too (``lit_factor.train.callbacks.stability.as_logged``), but records of fits judged before
    it did say "succeeded" at exactly the majority class: this check is what keeps them honest."""
    return float(np.float32(score))


def majority_score(majority: dict, task: str | None, metric: str) -> float | None:
    """The majority-class score of ``task`` on ``metric``, as logged (:func:`as_logged`); None when unknown."""
    score = (majority.get(task) or {}).get(metric)
    return None if score is None else as_logged(score)


def succeeded(row: dict, majority: dict) -> bool:
    """The fit succeeded and (classification) its dev accuracy beats the majority class."""
    if row.get("verdict") != "succeeded":
        return False
    floor = majority_score(majority, row.get("task"), "accuracy")
    acc = number(row, "val/accuracy")
    return floor is None or (acc is not None and as_logged(acc) > floor)


def distilled(row: dict) -> bool:
    return row.get("teacher") is not None if "teacher" in row else "distill" in str(row.get("recipe"))


def key(row: dict, names: Iterable[str] = SETTING) -> tuple:
    return tuple(row.get(k) for k in names)


def group(rows: Iterable[dict], names: Iterable[str]) -> dict[tuple, list[dict]]:
    names = tuple(names)
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[key(r, names)].append(r)
    return out


def one_per_seed(rows: list[dict]) -> list[dict]:
    """A dense reference's runs, one per seed: recipes that only change the projection leave a dense model
    untouched, so one seed under two such recipes is the same run twice, not two samples."""
    return list({r.get("seed", id(r)): r for r in rows}.values())


# --- the gate: did the task train? ----------------------------------------------------------------------------------
@dataclass
class Trained:
    ok: bool
    reason: str  #: why not, or the evidence (dense - majority on each metric)
    #: metric -> dense minus the majority-class score (one-sample t), for each metric tested
    tests: dict[str, st.Test] = field(default_factory=dict)


def trained(rows: list[dict], setting: tuple, majority: dict) -> Trained:
    """Whether the dense arm of this study and setting clearly beats the majority class (see the module doc)."""
    dense = one_per_seed([r for r in finished(rows) if r.get("method") == "none" and not distilled(r)
                          and key(r) == setting])
    task = setting[SETTING.index("task")]
    if not dense:
        return Trained(False, "no dense arm in this study and setting to show the task trained")
    floors = majority.get(task)
    if floors is None:
        return Trained(False, f"no majority-class score for task {task!r}")
    metric = metric_of(dense[0])
    tests, evidence, why = {}, [], ""
    for m in dict.fromkeys([metric, "accuracy"]):
        if m not in floors:
            continue
        values = [as_logged(v) for r in dense
                  if (v := number(r, f"val/{m}") if m != metric else number(r, "final")) is not None]
        if len(values) < st.MIN_N:
            why = why or f"dense arm has {len(values)} run(s) on {m} (fewer than {st.MIN_N})"
            continue
        t = tests[m] = st.one_sample(values, majority_score(majority, task, m))
        evidence.append(f"{m} {t.effect:+.4f} [{t.low:+.4f}, {t.high:+.4f}] over the majority class")
        if not t.low > 0:
            why = why or f"task did not train: dense {', '.join(evidence)}"
    return Trained(False, why, tests) if why else Trained(True, "dense " + "; ".join(evidence), tests)


# --- comparisons and answers ----------------------------------------------------------------------------------------
@dataclass
class Comparison:
    claim: str
    study: str
    task: str
    label: str  #: e.g. "50 %, low rank vs monarch"
    test: st.Test
    metric: str
    sign: int = 1  #: the claim says sign * effect > 0
    reason: str = ""  #: why insufficient ('' when informative)
    detail: str = ""  #: the arms' numbers (mean ± sd (n), or successes / runs)
    note: str = ""  #: e.g. unequal parameters
    verdict: str = ""
    #: comparisons with the same ``unit`` share an arm (low rank vs Monarch and vs block-wise; two staging
    #: schedules vs one all-at-once arm): not independent, so the pooled effect takes one test per unit, made by
    #: the claim's ``combine``
    unit: str = ""

    @property
    def row_label(self) -> str:
        return f"{self.task} {self.label} ({self.study})"

    @property
    def why(self) -> str:
        """Why an insufficient comparison cannot speak (the statistics leave ``reason`` empty when an arm simply has
        too few runs); '' for an informative one unless a reason was given."""
        if self.verdict != st.INSUFFICIENT:
            return self.reason
        return self.reason or f"fewer than {st.MIN_N} runs in an arm"


@dataclass(frozen=True)
class Claim:
    key: str
    title: str
    statement: str  #: what the paper (or this project) says, in one sentence
    measure: str  #: what a comparison measures, for the reader
    check: Callable[[list[dict], dict], list[Comparison]]
    sign_word: tuple[str, str] = ("ahead", "behind")
    margin: float = 0.0  #: a line on the forest plot (the compression goal's margins are per comparison)
    #: one test for the comparisons that share an arm (signed: the claim's direction positive), from the informative
    #: ones of the unit and all of them (see :func:`weakest`, :func:`staged_together`); never the one that looked best
    combine: Callable[[list[Comparison], list[Comparison]], st.Test] | None = None
    see_also: str = ""  #: where the project explains more (a Markdown sentence with links relative to docs/)
    #: Markdown the claim's section shows before its figure, made from the same rows and majority table (claim 2:
    #: where all at once fails, :func:`all_at_once_markdown`)
    context: Callable[[list[dict], dict], str] | None = None


@dataclass
class Answer:
    claim: Claim
    comparisons: list[Comparison]
    pooled: st.Test | None = None
    verdict: str = st.INSUFFICIENT
    counts: dict[str, int] = field(default_factory=dict)
    text: str = ""  #: a claim without trials (claim 3) states its answer directly

    @property
    def informative(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.verdict != st.INSUFFICIENT]


CLAIMS: dict[str, Claim] = {}


def register(claim: Claim) -> Claim:
    if claim.key in CLAIMS:
        raise ValueError(f"claim {claim.key!r} registered twice")
    CLAIMS[claim.key] = claim
    return claim


def judge(claim: Claim, rows: list[dict], majority: dict) -> Answer:
    """Run a claim's check, correct its p-values (Holm over its judgeable comparisons), classify each, and pool."""
    comparisons = claim.check(rows, majority)
    st.holm([c.test for c in comparisons if st.judgeable(c.test, c.reason)])
    for c in comparisons:
        c.verdict = st.classify(c.test, c.sign, c.reason)
    informative = [c for c in comparisons if c.verdict != st.INSUFFICIENT]
    pooled = st.pooled(per_unit(claim, informative, comparisons))
    counts = {v: sum(c.verdict == v for c in comparisons) for v in st.VERDICTS}
    verdict = st.classify(pooled, 1, min_n=0) if pooled is not None and informative else (
        _unanimous(informative) if informative else st.INSUFFICIENT)
    return Answer(claim, comparisons, pooled, verdict, counts)


def per_unit(claim: Claim, informative: list[Comparison], comparisons: list[Comparison]) -> list[st.Test]:
    """One signed test per unit of shared arms that has an informative comparison, in first-seen order."""
    units: dict = defaultdict(list)
    for c in informative:
        units[c.unit or id(c)].append(c)
    combine = claim.combine or weakest
    every = {unit: [c for c in comparisons if c.unit == unit] if isinstance(unit, str) else cs
             for unit, cs in units.items()}
    return [_signed(cs[0]) if len(every[unit]) == 1 else combine(cs, every[unit]) for unit, cs in units.items()]


def weakest(informative: list[Comparison], _all: list[Comparison]) -> st.Test:
    """The unit's least favourable comparison (smallest signed z): for a claim that says one arm beats *each* of
    the others (low rank beats Monarch *and* block-wise), a unit supports it only as much as its weakest comparison
    does -- the intersection-union reading. Taking the first (or the best) would pick by name (or by luck)."""
    def z(t: st.Test) -> float:
        se = st.standard_error(t)
        return t.effect / se if se > 0 else math.copysign(math.inf, t.effect)
    return min((_signed(c) for c in informative), key=z)


def staged_together(informative: list[Comparison], every: list[Comparison]) -> st.Test:
    """Claim 2's unit: the staging schedules are versions of one treatment against one all-at-once arm, so their
    runs pool into "staged (as tested) vs all at once" -- Fisher's exact on the summed successes of every schedule
    of the unit (those both at 0 % or 100 % included, so a schedule is never dropped for failing)."""
    counted = [c for c in every if "successes" in c.test.extra]
    sa, na = (sum(c.test.extra["successes"][i] for c in counted) for i in (0, 1))
    sb, nb = counted[0].test.extra["successes"][2:]
    t = st.rates(sa, na, sb, nb)
    return st.Test(t.effect, t.low, t.high, t.p, f"{t.method}, {len(counted)} schedules together", t.n)


def _signed(c: Comparison) -> st.Test:
    """The comparison's test with the claim's direction positive (for pooling)."""
    t = c.test
    lo, hi = sorted((c.sign * t.low, c.sign * t.high))
    return st.Test(c.sign * t.effect, lo, hi, t.p, t.method, t.n, t.p_adj)


def _unanimous(comparisons: list[Comparison]) -> str:
    """Without a poolable variance (every arm constant): the comparisons' common verdict, else indistinguishable."""
    verdicts = {c.verdict for c in comparisons}
    return verdicts.pop() if len(verdicts) == 1 else st.INDISTINGUISHABLE


def answers(rows: list[dict], majority: dict, extra: dict[str, str] | None = None) -> list[Answer]:
    """Every registered claim judged on ``rows``; ``extra``: answers of claims that need no trials (claim 3)."""
    out = []
    for claim in CLAIMS.values():
        answer = judge_any(claim, rows, majority)
        if extra and claim.key in extra:
            answer.text = extra[claim.key]
        out.append(answer)
    return out


# --- helpers of the checks -----------------------------------------------------------------------------------------
def _arms(rows: list[dict], metric: str = "final") -> list[float]:
    return [v for r in rows if (v := number(r, metric)) is not None]


def _pct(budget) -> str:
    return f"{budget:.0%}" if isinstance(budget, int | float) else str(budget)


def _params_note(a: list[dict], b: list[dict], names: tuple[str, str]) -> str:
    """'' when the two arms keep the same targeted weights within 1 %, else the difference, said."""
    ka, kb = _arms(a, "kept_fraction"), _arms(b, "kept_fraction")
    if not ka or not kb:
        return "kept fractions not recorded"
    ma, mb = statistics.fmean(ka), statistics.fmean(kb)
    rel = ma / mb - 1 if mb else math.inf
    if abs(rel) <= EQUAL_PARAMS:
        return ""
    return f"unequal parameters: {names[0]} keeps {ma:.3f}, {names[1]} {mb:.3f} of the targeted weights ({rel:+.1%})"


def _metric_test(a: list[dict], b: list[dict]) -> tuple[st.Test, str]:
    va, vb = _arms(a), _arms(b)
    return st.welch(va, vb), f"{st.fmt_stat(va)} vs {st.fmt_stat(vb)}"


def _gate(rows: list[dict], setting: tuple, majority: dict, cache: dict) -> Trained:
    if setting not in cache:
        cache[setting] = trained(rows, setting, majority)
    return cache[setting]


NAMES = {"lowrank": "low rank", "monarch": "Monarch", "blockwise": "block-wise", "none": "dense"}


# --- claim 1 ----------------------------------------------------------------------------------------------------------
def check_claim1(rows: list[dict], majority: dict) -> list[Comparison]:
    """Per study, setting, budget (and recipe): low rank against each other structure, final dev metric of every
    finished run (failed runs count: a structure that fails more often is worse, not absent); all at once only."""
    out, gates = [], {}
    flat = [r for r in finished(rows) if not r.get("staged")]
    for (setting, budget, recipe), cell in sorted(_by_setting(flat, ("budget", "recipe")).items(), key=str):
        by_method = group(cell, ("method",))
        if ("lowrank",) not in by_method:
            continue
        gate = _gate(rows, setting, majority, gates)
        for other in ("monarch", "blockwise"):
            if (other,) not in by_method:
                continue
            a, b = by_method[("lowrank",)], by_method[(other,)]
            test, detail = _metric_test(a, b)
            task = setting[SETTING.index("task")]
            label = f"{_pct(budget)}, low rank vs {NAMES[other]}" + (f", recipe {recipe}" if recipe else "")
            out.append(Comparison("1", setting[0], task, label, test, metric_of(a[0]), 1,
                                  "" if gate.ok else gate.reason, detail,
                                  _params_note(a, b, ("low rank", NAMES[other])), unit=str((setting, budget, recipe))))
    return out


def _by_setting(rows: list[dict], extra: tuple[str, ...]) -> dict[tuple, list[dict]]:
    """(setting, *extra values) -> rows."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[(key(r), *key(r, extra))].append(r)
    return out


# --- claim 2 ----------------------------------------------------------------------------------------------------------
def check_claim2(rows: list[dict], majority: dict) -> list[Comparison]:
    """Per study, setting, structure and budget: each staging schedule against all at once, by success rate
    (Fisher's exact; a success beats the majority class on accuracy too). Distilled runs are left out (they
    differ in more than staging)."""
    out, gates = [], {}
    fact = [r for r in finished(rows) if r.get("method") not in (None, "none") and not distilled(r)]
    for (setting, method, budget), cell in sorted(_by_setting(fact, ("method", "budget")).items(), key=str):
        flat = [r for r in cell if not r.get("staged")]
        if not flat:
            continue
        gate = _gate(rows, setting, majority, gates)
        for (schedule,), staged in sorted(group([r for r in cell if r.get("staged")], ("schedule",)).items(), key=str):
            sa, sb = sum(succeeded(r, majority) for r in staged), sum(succeeded(r, majority) for r in flat)
            test = st.rates(sa, len(staged), sb, len(flat))
            if gate.ok:  # what staged_together sums over the schedules of the cell
                test.extra["successes"] = (sa, len(staged), sb, len(flat))
            reason = "" if gate.ok else gate.reason
            if not reason and sa + sb in (0, len(staged) + len(flat)):
                reason = f"both arms at {'0' if sa + sb == 0 else '100'} % success: uninformative"
            task = setting[SETTING.index("task")]
            n = setting[SETTING.index("max_train_samples")]
            regime = f"<= {LOW_DATA} examples" if isinstance(n, int) and n <= LOW_DATA else "more data"
            label = (f"{NAMES[method]} {_pct(budget)}, {regime}, lr {setting[SETTING.index('learning_rate')]}, "
                     f"staged ({_schedule(schedule)}) vs all at once")
            va, vb = _arms(staged), _arms(flat)
            detail = (f"succeeded {sa}/{len(staged)} vs {sb}/{len(flat)}; final {st.fmt_stat(va)} vs "
                      f"{st.fmt_stat(vb)}")
            out.append(Comparison("2", setting[0], task, label, test, "success rate", 1, reason, detail,
                                  unit=str((setting, method, budget))))
    return out


@dataclass
class AllAtOnce:
    """All-at-once runs of one study, task and kept fraction, over the study's settings whose dense arm trained."""
    study: str
    task: str
    budget: float
    #: structure -> (runs that succeeded, runs)
    per_method: dict[str, tuple[int, int]]

    @property
    def succeeded(self) -> int:
        return sum(s for s, _ in self.per_method.values())

    @property
    def runs(self) -> int:
        return sum(n for _, n in self.per_method.values())


def all_at_once(rows: list[dict], majority: dict) -> list[AllAtOnce]:
    """Where all-at-once factorization fails: claim 2 can only show that staging helps where it does (the paper's
    setting), so the page says, per study, task and kept fraction, how many all-at-once runs succeeded (beat the
    majority class on accuracy too) where the dense model trained. Distilled runs are left out, as in claim 2."""
    gates: dict = {}
    cells: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in finished(rows):
        if r.get("staged") or distilled(r) or r.get("method") in (None, "none") or r.get("budget") is None:
            continue
        if _gate(rows, key(r), majority, gates).ok:
            cells[(str(r.get("task")), str(r.get("study")), r.get("budget"))][r.get("method")].append(r)
    return [AllAtOnce(study, task, budget,
                      {m: (sum(succeeded(r, majority) for r in rs), len(rs)) for m, rs in sorted(by_method.items())})
            for (task, study, budget), by_method in sorted(cells.items(), key=lambda kv: (*kv[0][:2], -kv[0][2]))]


def all_at_once_markdown(cells: list[AllAtOnce]) -> str:
    """Claim 2's context: a table of all-at-once success per study, task and kept fraction ('' when none)."""
    if not cells:
        return ""
    methods = [m for m in NAMES if m != "none"]
    out = ["**Where all at once fails** (staging can only show it helps there): all-at-once runs, not distilled, "
           "wherever the dense model trained; a success beats the majority class on accuracy too.", "",
           "| task | study | kept | all at once succeeded | " + " | ".join(NAMES[m] for m in methods) + " |",
           "|---|---|---|---|" + "---|" * len(methods)]
    for c in cells:
        per = [f"{s}/{n}" if n else "–" for s, n in (c.per_method.get(m, (0, 0)) for m in methods)]
        out.append(f"| {c.task} | `{c.study}` | {_pct(c.budget)} | {c.succeeded}/{c.runs} | " + " | ".join(per) + " |")
    return "\n".join(out)


def _schedule(text) -> str:
    parts = dict(p.split("=", 1) for p in str(text or "").split(", ") if "=" in p)
    return f"spread {parts['spread']}" if "spread" in parts else (str(text) if text else "default")


# --- claim 4 ----------------------------------------------------------------------------------------------------------
def check_claim4(rows: list[dict], majority: dict) -> list[Comparison]:
    """Per study, setting, budget and machine: the inference speedup over dense measured at the end of each fit,
    low rank against each other structure. Speed does not depend on whether the task trained: no training gate.
    A speedup is an in-process ratio, but its size depends on the machine (a GPU's is not a CPU's, and two CPUs
    differ): seeds of one grid that ran on different machines are compared per machine, where each trial recorded
    its own (rows from before that have none, and stay together)."""
    out = []
    flat = [r for r in finished(rows) if number(r, "latency_speedup") is not None]
    machines: dict[str, set] = defaultdict(set)  # study -> the machines its rows name
    for r in flat:
        machines[r.get("section")].add(r.get("machine"))
    cells = _by_setting(flat, ("budget", "recipe", "machine"))
    for (setting, budget, recipe, machine), cell in sorted(cells.items(), key=str):
        by_method = group(cell, ("method",))
        if ("lowrank",) not in by_method:
            continue
        for other in ("monarch", "blockwise"):
            if (other,) not in by_method:
                continue
            a, b = by_method[("lowrank",)], by_method[(other,)]
            va, vb = _arms(a, "latency_speedup"), _arms(b, "latency_speedup")
            label = f"{_pct(budget)}, low rank vs {NAMES[other]}" + (f", recipe {recipe}" if recipe else "")
            if len(machines[setting[0]]) > 1:
                label += f", on {machine or 'a machine not recorded'}"
            out.append(Comparison("4", setting[0], setting[SETTING.index("task")], label, st.welch(va, vb),
                                  "speedup over dense", 1, "", f"{st.fmt_stat(va, 2)} vs {st.fmt_stat(vb, 2)}",
                                  _params_note(a, b, ("low rank", NAMES[other])),
                                  unit=str((setting, budget, recipe, machine))))
    return out


# --- the compression goal -------------------------------------------------------------------------------------------
def allowed_drop(budget: float) -> float:
    return next(drop for kept, drop in GOAL if budget >= kept)


def check_goal(rows: list[dict], majority: dict) -> list[Comparison]:
    """Per study, task, structure and budget (studies with a ``recipe`` axis): is some recipe within the goal's
    margin of the dense model trained alike -- on the task's metric *and* on accuracy (MRPC: F1 and accuracy)?

    No recipe is picked on the numbers it is scored on: every recipe of the cell is tested (one-sided Welch,
    H0: recipe - dense <= -margin; on two metrics the larger p, an intersection-union test), and Holm's
    correction runs over every recipe of every cell, so "some recipe meets the goal" keeps its 5 % error rate.
    The comparison shown is the recipe with the smallest corrected p-value; the teacher (the dense model before
    this training, ``at_start``) is the second reference, in the detail."""
    out, gates = [], {}
    recipes = [r for r in finished(rows) if r.get("recipe") is not None]
    for (setting, method, budget), cell in sorted(_by_setting(recipes, ("method", "budget")).items(), key=str):
        if method in (None, "none") or budget is None:
            continue
        dense = one_per_seed([r for r in recipes if key(r) == setting and r.get("method") == "none"
                              and not distilled(r)])
        if not dense:
            continue
        gate = _gate(rows, setting, majority, gates)
        margin = allowed_drop(budget)
        metric = metric_of(cell[0])
        metrics = list(dict.fromkeys([metric, *(["accuracy"] if "accuracy" in majority.get(cell[0]["task"], {})
                                                 else [])]))
        for (recipe,), rs in sorted(group(cell, ("recipe",)).items(), key=str):
            tests = [st.welch(_metric_values(rs, m, metric), _metric_values(dense, m, metric), margin, "greater")
                     for m in metrics]
            main = tests[0]
            test = st.Test(main.effect, main.low, main.high, max(t.p for t in tests), main.method, main.n)
            teacher = _arms(dense, "at_start")
            ref = (f"; teacher {statistics.fmean(teacher):.4f}, recipe - teacher "
                   f"{statistics.fmean(_arms(rs)) - statistics.fmean(teacher):+.4f}") if teacher and _arms(rs) else ""
            extra = "; ".join(f"{m} {t.effect:+.4f} [{t.low:+.4f}, {t.high:+.4f}]" for m, t in
                              zip(metrics[1:], tests[1:], strict=True))
            detail = (f"{recipe} {st.fmt_stat(_arms(rs))} vs dense trained alike {st.fmt_stat(_arms(dense))}"
                      f"{'; ' + extra if extra else ''}{ref}")
            out.append(Comparison("goal", setting[0], setting[SETTING.index("task")],
                                  f"{NAMES[method]} {_pct(budget)}, recipe {recipe} vs dense (margin "
                                  f"{100 * margin:.0f} point{'s' if margin != 0.01 else ''})",
                                  test, " and ".join(metrics), 1, "" if gate.ok else gate.reason, detail))
            out[-1].test.extra["margin"] = margin
    return out


def _metric_values(rows: list[dict], m: str, primary: str) -> list[float]:
    return _arms(rows, "final" if m == primary else f"val/{m}")


def classify_goal(c: Comparison) -> str:
    """The goal's verdict: the one-sided test says "within the margin" (supported), the two-sided interval lies
    wholly beyond the margin (contradicted), else the point estimate decides between 'same direction' (within the
    margin) and 'indistinguishable'."""
    margin = c.test.extra.get("margin", 0.0)
    if not st.judgeable(c.test, c.reason):
        return st.INSUFFICIENT
    p = c.test.p if c.test.p_adj is None else c.test.p_adj
    if p < st.ALPHA:
        return st.SUPPORTED
    if c.test.high < -margin:
        return st.CONTRADICTED
    return st.SAME if c.test.effect >= -margin else st.INDISTINGUISHABLE


def judge_goal(claim: Claim, rows: list[dict], majority: dict) -> Answer:
    comparisons = claim.check(rows, majority)
    st.holm([c.test for c in comparisons if st.judgeable(c.test, c.reason)])
    for c in comparisons:
        c.verdict = classify_goal(c)
    # one comparison per cell: the recipe with the smallest corrected p (the others stay in the per-study text)
    best: dict[tuple, Comparison] = {}
    for c in comparisons:
        cell = (c.study, c.task, c.label.split(", recipe")[0])
        rank = (c.verdict == st.INSUFFICIENT, c.test.p_adj if c.test.p_adj is not None else 2.0, -c.test.effect)
        if cell not in best or rank < best[cell][0]:
            best[cell] = (rank, c)
    chosen = [c for _, c in best.values()]
    counts = {v: sum(c.verdict == v for c in chosen) for v in st.VERDICTS}
    informative = [c for c in chosen if c.verdict != st.INSUFFICIENT]
    verdict = (st.SUPPORTED if counts[st.SUPPORTED] else _unanimous(informative)) if informative else st.INSUFFICIENT
    answer = Answer(claim, chosen, None, verdict, counts)
    answer.all_recipes = comparisons  # type: ignore[attr-defined]
    return answer


register(Claim("1", "Low rank beats Monarch and block-wise low rank at equal parameters",
               "At an equal parameter budget, low-rank factorization preserves accuracy better than Monarch (and "
               "block-wise low rank) when fine-tuning a pretrained transformer.",
               "difference of the final dev metric (low rank minus the other structure; Welch's t)", check_claim1))
register(Claim("2", "Staged factorization makes compression reliable",
               "Factorizing a pretrained model stage by stage during fine-tuning avoids the instability of naive "
               "all-at-once projection, above all with little data.",
               "difference of success rates (staged minus all at once; Fisher's exact)", check_claim2,
               combine=staged_together,
               see_also="Why staged Monarch at 10 % ends at the majority class where all at once trains (too little "
                        "training left after the last stage, not the switch): [the guide](guide.md), \"When staging "
                        "collapses\", and the studies `claim2-collapse` and "
                        "`claim2-collapse-control` below.",
               context=lambda rows, majority: all_at_once_markdown(all_at_once(rows, majority))))
register(Claim("3", "Pretrained weight matrices are close to full rank",
               "The weight matrices of pretrained transformers are close to full rank, so a low-rank "
               "approximation alone loses much of them.", "rank fraction for a 10 % error (analyze)",
               lambda rows, majority: []))
register(Claim("4", "Low rank runs faster than Monarch",
               "At equal parameters, low-rank layers run faster than Monarch layers.",
               "difference of the inference speedup over dense (low rank minus the other structure; Welch's t), "
               "on one machine: a grid whose trials ran on several is compared per machine",
               check_claim4))
register(Claim("goal", "Compression goal: within 1 point of dense at 50 % kept, 2 points at 25 %",
               "This project's goal: a factorized model within 1 point of the dense model trained alike at 50 % "
               "of the targeted weights, 2 points at 25 % (on the task's metric and on accuracy).",
               "best recipe minus dense trained alike (one-sided Welch against the margin, Holm over every recipe)",
               check_goal))


def judge_any(claim: Claim, rows: list[dict], majority: dict) -> Answer:
    return judge_goal(claim, rows, majority) if claim.key == "goal" else judge(claim, rows, majority)
