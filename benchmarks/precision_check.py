"""Does a model train alike in bf16 autocast as in fp32? Two arms of committed study trials, compared on every dev
metric they share: the difference (bf16 minus fp32) with its 95 % interval, Welch's t-test of a difference, and an
equivalence test (two one-sided Welch tests, TOST) against a margin.

    python benchmarks/precision_check.py \
        --fp32 docs/studies/claim2_mrpc-lowrank/trials.csv:compression=dense \
        --bf16 docs/studies/claim2_mrpc-bf16/trials.csv:compression=dense-bf16 --margin 0.01

Why it matters: bf16 autocast makes a CPU training step 2-3x cheaper on a CPU with native bf16 (docs/speed.md), but
a study's arms must share one precision. Only if dense runs are *shown* equivalent within the margin -- not merely
"not significantly different", which three runs a side say of almost anything -- do the CPU grids not yet run
switch to bf16. Verdicts: insufficient (fewer than 3 finished runs in an arm), different (two-sided p < 0.05),
equivalent within the margin (TOST p < 0.05), else indistinguishable but not shown equivalent.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lit_factor.errors import fail
from lit_factor.study import stats as st
from lit_factor.study.claims import finished, read_trials

METRICS = ("final", "val/accuracy")  #: the monitored dev metric (MRPC: F1), and accuracy


def arm(spec: str) -> list[dict]:
    """``FILE:axis=value[,axis=value]``: the finished runs of one cell of a trials.csv."""
    path, _, where = spec.partition(":")
    if not Path(path).is_file():
        fail(f"{path}: no such trials.csv (write it with `study report ... --out DIR`)")
    wanted = dict(pair.split("=", 1) for pair in where.split(",") if pair)
    return [r for r in finished(read_trials(Path(path)))
            if all(str(r.get(k)) == v for k, v in wanted.items())]


def compare(bf16: list[dict], fp32: list[dict], metric: str, margin: float) -> dict:
    a = [r[metric] for r in bf16 if isinstance(r.get(metric), float | int)]
    b = [r[metric] for r in fp32 if isinstance(r.get(metric), float | int)]
    diff = st.welch(a, b)
    # TOST: bf16 - fp32 > -margin and fp32 - bf16 > -margin, both at 0.05; its p is the larger one
    tost = max(st.welch(a, b, margin, "greater").p, st.welch(b, a, margin, "greater").p)
    if min(len(a), len(b)) < st.MIN_N:
        verdict = "insufficient"
    elif diff.p < st.ALPHA:
        verdict = "different"
    elif tost < st.ALPHA:
        verdict = f"equivalent within ±{margin:g}"
    else:
        verdict = f"indistinguishable, not shown equivalent within ±{margin:g}"
    return {"metric": metric, "bf16": st.fmt_stat(a), "fp32": st.fmt_stat(b), "difference": diff,
            "tost_p": tost, "verdict": verdict}


def table(rows: list[dict]) -> str:
    lines = ["| dev metric | bf16 autocast | fp32 | bf16 - fp32 [95 % CI] | Welch p | TOST p | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["difference"]
        ci = f"{d.effect:+.4f} [{d.low:+.4f}, {d.high:+.4f}]" if not math.isnan(d.low) else f"{d.effect:+.4f}"
        lines.append(f"| {r['metric']} | {r['bf16']} | {r['fp32']} | {ci} | {st.fmt_p(d.p)} | "
                     f"{st.fmt_p(r['tost_p'])} | {r['verdict']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", required=True, metavar="CSV:AXIS=VALUE")
    parser.add_argument("--bf16", required=True, metavar="CSV:AXIS=VALUE")
    parser.add_argument("--margin", type=float, default=0.01, help="equivalence margin in metric units")
    args = parser.parse_args(argv)
    fp32, bf16 = arm(args.fp32), arm(args.bf16)
    rows = [compare(bf16, fp32, metric, args.margin) for metric in METRICS]
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
