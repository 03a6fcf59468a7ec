"""benchmarks/deploy_report.py's judgements on hand-made rows: which runtime a goal is judged in, the deploy
choice, and the rank-alignment verdict."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("deploy_report", ROOT / "benchmarks" / "deploy_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(runtime, precision, dense_ms, fact_ms, name="lowrank@0.5", bound=None, **extra):
    return {"name": name, "runtime": runtime, "mode": runtime, "precision": precision, "dense_ms": dense_ms,
            "factorized_ms": fact_ms, "speedup": dense_ms / fact_ms, "amdahl_bound": bound,
            "of_bound": (dense_ms / fact_ms) / bound if bound else None, **extra}


def test_a_goal_is_judged_where_the_model_runs_fastest_not_where_its_ratio_is_largest(report):
    rows = [_row("eager", "fp32", 1400.0, 700.0, bound=1.9),          # 2.0x, but 700 ms
            _row("onnxruntime", "fp32", 660.0, 410.0, bound=1.65)]    # 1.61x at 410 ms: what a user ships
    table = report.goals_table(rows)
    line = next(ln for ln in table.splitlines() if ln.startswith("| lowrank@0.5 fp32"))
    assert "1.61x" in line and "**missed**" in line  # the 1.7x goal, judged in ONNX Runtime
    near = next(ln for ln in table.splitlines() if "within 95 %" in ln)
    assert "98%" in near and near.endswith("| met |")  # 1.61 of 1.65
    rows[1]["amdahl_bound"], rows[1]["of_bound"] = 1.7, 1.61 / 1.7  # 94.7 %: shown as 95 %, still missed
    assert report.goals_table(rows).splitlines()[-3].endswith("| **missed** |")


def _acc(model, precision, acc, speedup):
    return {"model": model, "precision": precision, "metrics": {"dev/accuracy": acc, "dev/combined_score": acc},
            "speedup_vs_dense_fp32": speedup}


def test_what_to_ship_is_the_fastest_export_within_one_point_of_dense_fp32(report):
    rows = [_acc("dense", "fp32", 0.870, 1.0), _acc("dense", "int8", 0.866, 2.2),
            _acc("low rank 50 %", "int8", 0.862, 2.8), _acc("low rank 25 %", "int8", 0.840, 3.2)]
    line = report.ship_line(rows)
    assert "**low rank 50 % int8**" in line and "2.80x" in line           # 0.862 >= 0.870 - 0.01
    assert "low rank 25 % int8 (3.20x), loses 0.0300" in line
    assert "no deploy choice" in report.ship_line(rows[1:])               # no dense fp32 reference


def test_rank_alignment_is_judged_per_multiply_add_and_noisy_rows_are_left_out(report, tmp_path):
    def rank(multiple, ms, macs, p90=None):
        return {**_row("eager", "fp32", 1000.0, ms), "method": "lowrank", "budget": 0.5, "rank_multiple": multiple,
                "kept_fraction": macs / 100, "macs_per_token_factorized": macs, "factorized_p90_ms": p90 or ms * 1.1}
    # x16 keeps fewer weights *and* runs each MAC 20 % cheaper; x32 looks faster only because it keeps less
    rows = [rank(1, 500.0, 50), rank(16, 400.0, 48), rank(32, 450.0, 45)]
    path = tmp_path / "rank.json"
    path.write_text(json.dumps(rows))
    text = "\n".join(report.rank_section(path))
    assert "best x16 at 1.20x per MAC of x1" in text
    rows[1]["factorized_p90_ms"] = 900.0  # a noisy x16 row no longer counts
    path.write_text(json.dumps(rows))
    assert "no multiple beats x1 by 5 % per MAC" in "\n".join(report.rank_section(path))
