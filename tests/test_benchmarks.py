"""benchmarks/latency.py in every runtime (tiny models), its profile and Markdown output; the recorded results
are listed with their commands and the guide's (docs/guide.md) Deploy table is the one generated from its result
file."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from lit_factor.compress.surgery import apply_plan, build_plan
from lit_factor.compress.switchable import dense_equivalent
from lit_factor.deploy.latency import LatencyError, LatencySettings, compare_latency
from lit_factor.factorize import LowRankLinear
from lit_factor.models import load_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FAST = ["--model", "tiny-bert", "--batch-sizes", "2", "--seq-lens", "8", "--repeats", "2", "--warmup", "1",
        "--init", "random", "--threads", "1"]


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench():
    return load_benchmark("latency")


def assert_generated_table(doc: str, marker: str, module, capsys) -> None:
    """Every table between ``<!-- marker: FILE -->`` and ``<!-- /marker -->`` in ``doc`` is what ``module.main(
    ["--table", FILE])`` prints: generated, not copied by hand."""
    text = (ROOT / doc).read_text()
    matches = list(re.finditer(rf"<!-- {marker}: (\S+) -->\n(.*?)\n<!-- /{marker} -->", text, re.S))
    assert matches, f"{doc} has no generated {marker}"
    for match in matches:
        module.main(["--table", str(ROOT / match.group(1))])
        assert match.group(2).strip() == capsys.readouterr().out.strip(), match.group(1)


@pytest.mark.slow
def test_onnxruntime_rows_profile_and_markdown(tmp_path, capsys):
    out, profile = tmp_path / "rows.json", tmp_path / "profile.txt"
    code = bench().main([*FAST, "--variants", "lowrank@0.5", "monarch@none", "--runtime", "eager", "onnxruntime",
                         "--ort-fusions", "both", "--optimize", "--json", str(out), "--profile", str(profile)])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [(r["name"], r["runtime"], r.get("ort_fusions", False)) for r in rows] == [
        (name, runtime, fused) for runtime, fused in (("eager", False), ("onnxruntime", False), ("onnxruntime", True))
        for name in ("lowrank@0.5", "monarch@default")]
    for row in rows:
        assert row["optimized"] is True and row["dense_ms"] > 0 and row["threads"] == 1
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["factorized_ms"], rel=1e-2)
    text = profile.read_text()
    assert text.count("=== ") == 9 and "aten::" in text and "MatMul" in text  # torch ops, then ORT op types
    capsys.readouterr()
    assert bench().main(["--from-json", str(out)]) == 0
    table, goals = capsys.readouterr().out.strip().split("\n\n")
    table = table.splitlines()
    assert table[0] == ("| variant (kept) | batch x len | eager+rewrites | onnxruntime+rewrites "
                        "| onnxruntime+fusions+rewrites |")
    assert len(table) == 4 and table[2].startswith("| lowrank@0.5 (")
    goals = goals.splitlines()  # issue 13's goals, for the variants these rows have
    assert goals[0].startswith("| goal |") and [g.split(" | ")[0] for g in goals[2:]] == [
        "| low rank 50 %", "| Monarch 4 blocks (37.5 %)"]


def test_rank_padding_is_a_setting_of_the_measured_copies():
    torch.manual_seed(0)
    model = load_model("random:tiny-bert")
    apply_plan(model, build_plan(model, "lowrank", 0.5))
    default = LowRankLinear.pad_rank_to
    rows = compare_latency(dense_equivalent(model), {"lr": model},
                           LatencySettings(batch_sizes=[2], seq_lens=[8], repeats=1, warmup=0, pad_rank_to=0))
    assert rows[0].runtime == "eager" and rows[0].mode == "eager"
    assert LowRankLinear.pad_rank_to == default  # no global poke ...
    assert all(m.pad_rank_to == default for m in model.modules() if isinstance(m, LowRankLinear))  # ... nor here
    with pytest.raises(LatencyError, match="pad_rank_to=-1"):
        LatencySettings(pad_rank_to=-1).check()


def test_runtime_settings_are_checked():
    assert LatencySettings(mode="compile").runtime == "compile"  # the former name still works
    with pytest.raises(LatencyError, match="disagree"):
        LatencySettings(runtime="onnxruntime", mode="compile")
    with pytest.raises(LatencyError, match="runtime='onnxruntime' runs on the CPU"):
        LatencySettings(runtime="onnxruntime", device="cuda").check()


def test_every_recorded_result_is_listed_with_its_command():
    listing = (RESULTS / "README.md").read_text()
    for path in RESULTS.iterdir():
        if path.name != "README.md":
            assert f"`{path.name}`" in listing, f"{path.name} is not listed in benchmarks/results/README.md"
    for name in re.findall(r"`([\w.-]+\.(?:json|txt))`", listing):
        assert (RESULTS / name).exists(), f"benchmarks/results/README.md lists {name}, which does not exist"


def test_readme_deploy_table_is_the_generated_one(capsys):
    readme = (ROOT / "docs" / "guide.md").read_text()
    match = re.search(r"<!-- deploy-table: (.+?) -->\n(.*?)\n<!-- /deploy-table -->", readme, re.S)
    assert match, "docs/guide.md has no generated Deploy table"
    files = [str(ROOT / f) for f in match.group(1).split()]
    assert bench().main(["--from-json", *files]) == 0
    assert match.group(2).strip() == capsys.readouterr().out.strip()


def test_readme_projection_table_is_the_generated_one(capsys):
    """The guide's "right after projection" table is printed from its CSV, not copied by hand."""
    assert_generated_table("docs/guide.md", "projection-table", load_benchmark("projection_quality"), capsys)


def test_train_step_benchmark_times_every_method_and_precision(tmp_path):
    out = tmp_path / "step.json"
    rows = load_benchmark("train_step").main(["--model", "tiny-bert", "--methods", "none", "lowrank", "--batch", "2",
                                              "--seq-len", "8", "--rounds", "2", "--json", str(out)])
    assert [(r["method"], r["precision"]) for r in rows] == [
        ("none", "fp32"), ("none", "bf16-autocast"), ("lowrank", "fp32"), ("lowrank", "bf16-autocast")]
    assert all(len(r["rounds_s"]) == 2 and r["median_s"] > 0 for r in rows) and rows[0]["speedup"] == 1.0
    recorded = json.loads(out.read_text())
    assert recorded["rows"] == rows
    assert set(recorded["machine"]) == {"cpu", "vector", "native_bf16"}  # bf16's speed depends on the CPU


def test_speed_train_step_table_is_the_generated_one(capsys):
    """docs/speed.md's training-step table is printed from its recorded file, not copied by hand."""
    assert_generated_table("docs/speed.md", "train-step-table", load_benchmark("train_step"), capsys)


def _trials(path: Path, cell: str, finals: list[float]) -> str:
    """A hand-made trials.csv of one cell's finished runs (accuracy = F1 - 0.06); its ``FILE:compression=CELL``."""
    lines = ["trial,verdict,compression,seed,final,val/accuracy"]
    lines += [f"{i},succeeded,{cell},{i + 1},{v},{v - 0.06}" for i, v in enumerate(finals)]
    lines.append(f"9,error,{cell},9,,")  # a crash is no run
    path.write_text("\n".join(lines) + "\n")
    return f"{path}:compression={cell}"


@pytest.mark.parametrize("bf16, verdict", [
    ([0.8705, 0.8695, 0.8700], "equivalent within ±0.01"),
    ([0.800, 0.805, 0.810], "different"),
    ([0.85, 0.87, 0.89], "indistinguishable, not shown equivalent within ±0.01"),
    ([0.8705, 0.8695], "insufficient"),
])
def test_precision_check_verdicts_on_hand_made_arms(tmp_path, capsys, bf16, verdict):
    fp32 = _trials(tmp_path / "fp32.csv", "dense", [0.870, 0.871, 0.869])
    rows = load_benchmark("precision_check").main(["--fp32", fp32, "--bf16", _trials(tmp_path / "bf16.csv",
                                                                                     "dense-bf16", bf16)])
    assert [r["verdict"] for r in rows] == [verdict, verdict]  # accuracy moves with F1 here
    assert rows[0]["difference"].effect == pytest.approx(sum(bf16) / len(bf16) - 0.870)
    assert f"| final | {rows[0]['bf16']} | " in capsys.readouterr().out


def test_precision_check_refuses_a_missing_file_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        load_benchmark("precision_check").main(["--fp32", f"{tmp_path}/none.csv:compression=dense", "--bf16", "x"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}/none.csv: no such trials.csv (write it with "
                                               "`study report ... --out DIR`)")
