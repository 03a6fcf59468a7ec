"""``cli.py analyze``: rank-k error curves and equal-parameter projection errors, on tiny random models."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.image
import pytest
import torch

from lit_factor.compress.surgery import find_targets, relative_error
from lit_factor.factorize import METHODS
from lit_factor.models import load_model
from lit_factor.study import analyze


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze")
    page = out / "docs" / "results.md"
    assert analyze.main(["--model", "random:tiny-bert", "--out", str(out), "--budgets", "0.25", "0.5",
                         "--publish", str(page)]) == 0
    return out, page


def test_error_curve_is_exact_for_a_low_rank_matrix():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 9, generator=gen, dtype=torch.float64)
    curve = analyze.error_curve(w)
    assert len(curve) == 10 and curve[0] == pytest.approx(1.0)
    assert curve[2] > 1e-3 and max(curve[3:]) < 1e-7  # rank 3: exact from k = 3 on


def test_spectrum_non_increasing_and_zero_at_full_rank(analyzed):
    out, _ = analyzed
    rows = read_csv(out / "spectrum.csv")
    names = list(dict.fromkeys(r["matrix"] for r in rows))
    # default: the first and last layer's query, then a random reference per shape
    assert names[:2] == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]
    assert names[2].startswith("random 32x32")
    for name in names:
        errors = [float(r["relative_error"]) for r in rows if r["matrix"] == name]
        assert errors[0] == pytest.approx(1.0)
        assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:], strict=False))
        assert errors[-1] == pytest.approx(0.0, abs=1e-6) and errors[-2] > 1e-9


def test_equal_param_rows_match_the_projections(analyzed):
    out, page = analyzed
    rows = read_csv(out / "equal_params.csv")
    torch.manual_seed(0)  # analyze's default --seed: the same random weights
    targets = find_targets(load_model("random:tiny-bert"))
    assert {(r["matrix"], r["budget"], r["method"]) for r in rows} == {
        (p, b, m) for p in targets for b in ("0.25", "0.5") for m in METHODS}
    for r in rows[:: max(1, len(rows) // 12)]:  # a spread of rows, every method among them
        if not r["structure"]:
            continue
        linear = targets[r["matrix"]]
        structure = {k: int(v) for k, v in (kv.split("=") for kv in r["structure"].split())}
        cls = METHODS[r["method"]]
        assert structure == cls.structure_for_budget(linear.out_features, linear.in_features, float(r["budget"]))
        layer = cls.from_linear(linear, **structure)
        assert float(r["relative_error"]) == pytest.approx(relative_error(linear.weight, layer), rel=1e-6)
        assert float(r["kept_fraction"]) <= float(r["budget"])
    for name in ("spectrum", "equal_params"):
        assert matplotlib.image.imread(out / f"{name}.png").ndim == 3
    text = page.read_text()
    assert "<!-- begin analyze random:tiny-bert (generated) -->" in text and "python cli.py analyze" in text
    assert "**Claim 3, pretrained matrices are close to full rank:**" in text


def test_bad_model_or_matrix_is_one_line_exit_2(tmp_path, capsys):
    for argv in (["--model", "random:nope", "--out", str(tmp_path)],
                 ["--model", "random:tiny-bert", "--out", str(tmp_path), "--matrices", "nothing_matches"]):
        with pytest.raises(SystemExit) as exc:
            analyze.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err


@pytest.mark.parametrize("args, message", [
    (["--budgets", "1.5"], r"--budgets 1\.5: .*allowed: 0 < budget <= 1"),  # was: exit 0 with empty figures
    (["--budgets", "0.5", "0", "-1"], r"--budgets 0 -1: "),
    (["--nblocks", "0"], r"--nblocks 0: must be at least 1"),
    (["--model", "nonexistent"], r"--model 'nonexistent' cannot be loaded .*allowed: a local model folder"),
])
def test_bad_arguments_are_one_line_naming_the_value(args, message, tmp_path, capsys):
    import re

    with pytest.raises(SystemExit) as exc:
        analyze.main(["--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and re.search(message, err), err
    assert not (tmp_path / "out").exists()
