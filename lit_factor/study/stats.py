"""The statistics behind every verdict (scipy.stats; nothing hand-rolled but Holm's step-down and Newcombe's
combination of two Wilson intervals, both a few lines of arithmetic on scipy's outputs).

* a difference of means: Welch's t-test and its 95 % confidence interval (``scipy.stats.ttest_ind(equal_var=False)``);
  where both arms are constant (a floor or a ceiling: every seed at the majority class, say) Welch's statistic is
  undefined, so the p-value is the exact permutation test's (``scipy.stats.permutation_test``) and the interval
  is the observed difference;
* a difference of success rates: Fisher's exact test (``scipy.stats.fisher_exact``) and Newcombe's hybrid score
  interval (method 10 of Newcombe 1998) built from the two Wilson intervals of ``scipy.stats.binomtest``;
* a margin (``shift``): the compression goal asks "no worse than dense minus 1 point": a one-sided Welch test of
  mean(a) - mean(b) > -margin;
* Holm's step-down correction over the comparisons of one claim;
* a verdict class per comparison (docs/results.md): *supported* (the claimed direction, significant at 0.05 after
  Holm), *contradicted* (significant, opposite), *same direction, not significant*, *indistinguishable* (not
  significant and not even leaning the claimed way: ties included, so a tie is never a loss), *insufficient*
  (fewer than 3 runs in an arm, a task that did not train, or success rates both at 0 % or both at 100 %).
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

ALPHA = 0.05
MIN_N = 3  #: fewer runs than this in an arm: insufficient

SUPPORTED, SAME, INDISTINGUISHABLE, CONTRADICTED, INSUFFICIENT = (
    "supported", "same direction, not significant", "indistinguishable", "contradicted", "insufficient")
VERDICTS = (SUPPORTED, SAME, INDISTINGUISHABLE, CONTRADICTED, INSUFFICIENT)


@dataclass
class Test:
    """One comparison's effect (a minus b, in the claimed direction's sign convention of the caller), its 95 %
    interval, the raw p-value of the test and (after :func:`holm`) the adjusted one."""

    effect: float
    low: float
    high: float
    p: float
    method: str
    n: tuple[int, int]
    p_adj: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def clean(values) -> list[float]:
    """Finite floats only (a blank CSV cell or a NaN metric is no measurement)."""
    out = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def _constant(x: list[float]) -> bool:
    return max(x) - min(x) <= 1e-12 * max(1.0, abs(x[0]))


def welch(a, b, margin: float = 0.0, alternative: str = "two-sided") -> Test:
    """mean(a) - mean(b): Welch's t-test of ``mean(a) - mean(b) > -margin`` (``alternative='greater'``) or of a
    zero difference (two-sided, ``margin`` 0), and the two-sided 95 % interval of the difference."""
    a, b = clean(a), clean(b)
    n = (len(a), len(b))
    if min(n) < 2:
        d = statistics.fmean(a) - statistics.fmean(b) if min(n) else math.nan
        return Test(d, math.nan, math.nan, math.nan, "none (an arm has fewer than 2 runs)", n)
    d = statistics.fmean(a) - statistics.fmean(b)
    if _constant(a) and _constant(b):  # floor / ceiling: Welch undefined, the exact permutation test is not
        shifted = [x + margin for x in a]
        if abs(d + margin) <= 1e-12:
            p = 1.0 if alternative == "two-sided" else 0.5
        else:
            res = stats.permutation_test((shifted, b), lambda x, y: np.mean(x) - np.mean(y),
                                         permutation_type="independent", alternative=alternative,
                                         n_resamples=math.inf)
            p = float(res.pvalue)
        return Test(d, d, d, p, "exact permutation test (both arms constant)", n)
    with warnings.catch_warnings():  # nearly constant arms: scipy warns of precision loss, the numbers stand
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind([x + margin for x in a], b, equal_var=False, alternative=alternative)
        ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return Test(d, float(ci.low), float(ci.high), float(res.pvalue), "Welch's t", n)


def one_sample(a, reference: float, margin: float = 0.0, alternative: str = "two-sided") -> Test:
    """mean(a) - reference (a constant: the majority-class score, the teacher's dev metric): one-sample t-test and
    95 % interval; a constant ``a`` is its own interval (p 0 when it lies beyond the bound, else 1)."""
    a = clean(a)
    n = (len(a), 0)
    if len(a) < 2:
        d = statistics.fmean(a) - reference if a else math.nan
        return Test(d, math.nan, math.nan, math.nan, "none (fewer than 2 runs)", n)
    d = statistics.fmean(a) - reference
    if _constant(a):
        beyond = d + margin > 0 if alternative == "greater" else d + margin != 0
        return Test(d, d, d, 0.0 if beyond else 1.0, "constant runs", n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_1samp(a, reference - margin, alternative=alternative)
        ci = stats.ttest_1samp(a, reference).confidence_interval(0.95)
    return Test(d, float(ci.low) - reference, float(ci.high) - reference, float(res.pvalue), "one-sample t", n)


def rates(success_a: int, n_a: int, success_b: int, n_b: int) -> Test:
    """Success rate of a minus that of b: Fisher's exact test (two-sided) and Newcombe's hybrid score interval."""
    pa, pb = success_a / n_a, success_b / n_b
    _, p = stats.fisher_exact([[success_a, n_a - success_a], [success_b, n_b - success_b]])
    la, ua = stats.binomtest(success_a, n_a).proportion_ci(0.95, method="wilson")
    lb, ub = stats.binomtest(success_b, n_b).proportion_ci(0.95, method="wilson")
    d = pa - pb
    low = d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2)
    high = d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)
    return Test(d, low, high, float(p), "Fisher's exact", (n_a, n_b))


def holm(tests: list[Test]) -> None:
    """Holm's step-down adjustment over ``tests`` (in place, ``p_adj``); tests without a p-value are skipped. Pass
    only the :func:`judgeable` ones: the family is the tests performed."""
    valid = sorted((t for t in tests if not math.isnan(t.p)), key=lambda t: t.p)
    m, running = len(valid), 0.0
    for i, t in enumerate(valid):
        running = max(running, min(1.0, (m - i) * t.p))
        t.p_adj = running


def judgeable(t: Test, insufficient: str = "", min_n: int = MIN_N) -> bool:
    """Whether a comparison is a test at all: no stated reason against it, ``min_n`` runs in each arm, a p-value.
    Only these enter Holm's family -- a comparison with two runs in an arm is not performed, so it must not raise the
    others' adjusted p-values (it did: claim 2's Holm p went from 0.41 to 0.83 when the Monarch arm had two runs)."""
    return not insufficient and min(t.n[0], t.n[1] if t.n[1] else min_n) >= min_n and not math.isnan(t.p)


def classify(t: Test, sign: int = 1, insufficient: str = "", min_n: int = MIN_N) -> str:
    """The verdict class of a comparison whose claim says ``sign * effect > 0`` (``min_n`` 0 for a pooled effect,
    whose n counts comparisons, not runs)."""
    if not judgeable(t, insufficient, min_n):
        return INSUFFICIENT
    p = t.p if t.p_adj is None else t.p_adj
    leaning = sign * t.effect
    if p < ALPHA and leaning > 0:
        return SUPPORTED
    if p < ALPHA and leaning < 0:
        return CONTRADICTED
    return SAME if leaning > 0 else INDISTINGUISHABLE


def standard_error(t: Test) -> float:
    """A comparison's standard error for pooling: the larger of its 95 % interval's (normal approximation) and its
    test's (the ``|effect|`` whose normal two-sided p-value is the test's own, Altman & Bland 2011). The interval
    alone understates it where the test is exact and the samples tiny: 4/5 vs 1/5 has a Newcombe interval of
    [-0.0003, +0.83] (SE 0.21, a normal p of 0.005) but Fisher's p is 0.21 -- pooled, the comparison must not be
    surer than its own test. A test of p 1 (or no effect) says nothing of the spread: its interval's SE stands."""
    z = stats.norm.ppf(0.975)
    from_interval = (t.high - t.low) / (2 * z) if not math.isnan(t.low) else 0.0
    from_test = abs(t.effect) / stats.norm.isf(t.p / 2) if 0 < t.p < 1 and t.effect else 0.0
    return max(from_interval, from_test)


def pooled(tests: list[Test]) -> Test | None:
    """Random-effects pooling (DerSimonian-Laird) of the comparisons' effects, each weighted by its
    :func:`standard_error`: the comparisons differ in task, schedule and machine, so their true effects differ
    too, and the between-comparison variance tau^2 widens the pooled interval accordingly. One comparison is its own
    answer (its test, its interval, its p, Holm-adjusted as in its row). Comparisons without a variance (both arms
    constant and equal) are left out. None when nothing can be pooled."""
    usable = [(t, standard_error(t)) for t in tests if not math.isnan(t.effect) and not math.isnan(t.p)]
    usable = [(t, se) for t, se in usable if se > 1e-12]
    if not usable:
        return None
    if len(usable) == 1:
        t = usable[0][0]
        return Test(t.effect, t.low, t.high, t.p, f"one comparison: its own test ({t.method})", (1, 0), t.p_adj,
                    extra={"tau2": 0.0, "k": 1, "test": t.method})
    d = np.array([t.effect for t, _ in usable])
    v = np.array([se ** 2 for _, se in usable])
    w = 1 / v
    fixed = float((w * d).sum() / w.sum())
    q = float((w * (d - fixed) ** 2).sum())
    tau2 = max(0.0, (q - (len(d) - 1)) / float(w.sum() - (w ** 2).sum() / w.sum()))
    w = 1 / (v + tau2)
    est = float((w * d).sum() / w.sum())
    se = 1 / math.sqrt(float(w.sum()))
    z = stats.norm.ppf(0.975)
    p = float(2 * stats.norm.sf(abs(est / se)))
    return Test(est, est - z * se, est + z * se, p, "random-effects pooling (DerSimonian-Laird)", (len(usable), 0),
                extra={"tau2": tau2, "k": len(usable)})


def fmt_p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "–"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def fmt_test(t: Test, digits: int = 4, scale: float = 1.0, unit: str = "") -> str:
    """``+0.0123 [−0.0050, +0.0296], p = 0.120 (Holm 0.360)``."""
    if math.isnan(t.effect):
        return "–"
    interval = "" if math.isnan(t.low) else f" [{scale * t.low:+.{digits}f}, {scale * t.high:+.{digits}f}]"
    adj = "" if t.p_adj is None or t.p_adj == t.p else f" (Holm {fmt_p(t.p_adj)})"
    return f"{scale * t.effect:+.{digits}f}{unit}{interval}, {fmt_p(t.p)}{adj}"


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt_stat(values: list[float], digits: int = 4) -> str:
    """``mean ± sd (n)``."""
    if not values:
        return "–"
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f} ({len(values)})" if sd is not None else \
        f"{mean:.{digits}f} ({len(values)})"
