"""``python cli.py analyze``: how far the pretrained weights are from each structure, with no training.

Two questions of the seed paper, answered for any model lit-factor can load (hub name, local path, ``minilm``,
``random:<preset>``):

* **Are pretrained matrices close to full rank?** For chosen targeted matrices (default: the query projection
  of the first and last layer, the paper's figure 5) the relative error ||W - W_k||_F / ||W||_F of the best
  rank-k approximation for every k (from the singular values: Eckart-Young), beside a Gaussian random matrix of
  the same shape (a full-rank reference). ``spectrum.csv`` + ``spectrum.png``.
* **How much rank does each kind of matrix need?** For every targeted matrix, the rank fraction whose best
  approximation reaches a relative error of 50 / 25 / 10 %, grouped by kind (``layer.*.attention.self.query``,
  ``layer.*.intermediate.dense`` ...: the same matrix in every layer), beside a random matrix of each shape.
  ``rank_needed.csv``; the published summary's verdict on the paper's claim 3 rests on every matrix.
* **At equal parameters, which structure fits best?** For every targeted matrix and every budget, the relative
  error of projecting W onto each structure of :data:`lit_factor.factorize.METHODS` at that budget (each
  structure's own rule for the budget, its own projection). ``equal_params.csv`` + ``equal_params.png``.

``--publish docs/results.md`` writes a summary section into that page (see docs/studies/README.md).
"""

from __future__ import annotations

import argparse
import csv
import re
import shlex
import sys
from pathlib import Path

import torch

from lit_factor.errors import UserError, fail
from lit_factor.study.spectra import NEAR_FULL_RANK, rank_needed

DEFAULT_BUDGETS = (0.1, 0.25, 0.5, 0.75)
#: default matrices of the spectrum: query projections (BERT/RoBERTa ``query``, T5 and MPNet ``q``)
_QUERY = re.compile(r"(query|\.q)$")
#: the relative errors of the rank-needed table
ERROR_LEVELS = (0.5, 0.25, 0.1)


def error_curve(weight: torch.Tensor) -> list[float]:
    """Relative Frobenius error of the best rank-k approximation, k = 0 .. min(m, n) (Eckart-Young)."""
    s2 = torch.linalg.svdvals(weight.detach().double()) ** 2
    tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])  # tail[k] = sum_{i >= k} s_i^2
    total = s2.sum().clamp_min(1e-300)
    return [*(tail / total).sqrt().tolist(), 0.0]


def chosen_matrices(targets: dict[str, torch.nn.Linear], patterns: list[str] | None) -> list[str]:
    """``patterns`` (regexes) matched against the targeted paths; default: first and last query projection."""
    if patterns:
        found = [p for p in targets if any(re.search(pat, p) for pat in patterns)]
        if not found:
            raise UserError(f"--matrices {' '.join(patterns)} match no targeted matrix; e.g. {next(iter(targets))}")
        return found
    queries = [p for p in targets if _QUERY.search(p)] or list(targets)
    return list(dict.fromkeys([queries[0], queries[-1]]))


def spectrum_rows(targets: dict[str, torch.nn.Linear], names: list[str], seed: int = 0) -> list[dict]:
    """Rows (matrix, k, rank fraction, relative error) for each chosen matrix, then a Gaussian random matrix of
    each shape met (the full-rank reference)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = dict.fromkeys(tuple(targets[n].weight.shape) for n in names)
    matrices = [(n, targets[n].weight) for n in names]
    matrices += [(f"random {m}x{n} (reference)", torch.randn((m, n), generator=gen, dtype=torch.float64))
                 for m, n in shapes]
    rows = []
    for label, matrix in matrices:
        curve = error_curve(matrix)
        full = len(curve) - 1
        rows += [{"matrix": label, "k": k, "rank_fraction": k / full, "relative_error": e}
                 for k, e in enumerate(curve)]
    return rows


def matrix_kind(path: str) -> str:
    """The matrix's name with its layer numbers as ``*``: one kind per position in a block."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", path)


def _needed(curve: list[float], error: float) -> float:
    """Smallest rank fraction of an error curve (k = 0 .. full) with relative error <= ``error``."""
    full = len(curve) - 1
    return min(k for k, e in enumerate(curve) if e <= error) / full


def rank_needed_rows(targets: dict[str, torch.nn.Linear], seed: int = 0) -> list[dict]:
    """For every targeted matrix (then a Gaussian random matrix of each shape met): its kind, shape and the rank
    fraction needed for each relative error of :data:`ERROR_LEVELS`."""
    gen = torch.Generator().manual_seed(seed + 1)  # not the spectrum's draw: its own reference matrices
    matrices = [(path, matrix_kind(path), linear.weight) for path, linear in targets.items()]
    shapes = dict.fromkeys(tuple(w.shape) for *_, w in matrices)
    matrices += [(f"random {m}x{n} (reference)", f"random {m}x{n} (reference)",
                  torch.randn((m, n), generator=gen, dtype=torch.float64)) for m, n in shapes]
    rows = []
    for path, kind, weight in matrices:
        curve = error_curve(weight)
        rows.append({"matrix": path, "kind": kind, "shape": "x".join(map(str, weight.shape)),
                     **{f"rank_fraction_{e:g}": _needed(curve, e) for e in ERROR_LEVELS}})
    return rows


def equal_param_rows(targets: dict[str, torch.nn.Linear], budgets, methods, nblocks: int = 4) -> list[dict]:
    """For every matrix x budget x structure: the structure the budget gives, its kept fraction and the relative
    error of projecting the weight onto it (the structure's ``from_linear``, as a fit would)."""
    from lit_factor.compress.surgery import relative_error
    from lit_factor.factorize import METHODS, BudgetError

    rows = []
    for path, linear in targets.items():
        m, n = linear.out_features, linear.in_features
        for budget in budgets:
            for method in methods:
                cls = METHODS[method]
                try:
                    structure = cls.planned_structure(m, n, budget, nblocks=nblocks)
                except BudgetError as err:
                    rows.append({"matrix": path, "budget": budget, "method": method, "note": str(err)})
                    continue
                layer = cls.from_linear(linear, **structure)
                rows.append({"matrix": path, "budget": budget, "method": method,
                             "structure": " ".join(f"{k}={v}" for k, v in structure.items()),
                             "kept_fraction": cls.param_count(m, n, **structure) / (m * n),
                             "relative_error": relative_error(linear.weight, layer)})
    return rows


def write_csv(rows: list[dict], path: Path) -> Path:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    return path


# --- figures and the published summary ----------------------------------------------------------------------------
def spectrum_figure(rows: list[dict], model: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["matrix"] for r in rows):
        pts = [r for r in rows if r["matrix"] == name]
        style = "--" if name.startswith("random") else "-"
        ax.plot([r["rank_fraction"] for r in pts], [r["relative_error"] for r in pts], style, label=name)
    ax.set(xlabel="kept singular values (fraction of full rank)", ylabel="relative error ||W - W_k|| / ||W||",
           title=f"{model}: error of the best rank-k approximation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def equal_params_figure(rows: list[dict], model: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, pts in _by_method(rows).items():
        budgets = sorted(pts)
        mean = [sum(pts[b]) / len(pts[b]) for b in budgets]
        ax.plot(budgets, mean, marker="o", label=method)
        ax.fill_between(budgets, [min(pts[b]) for b in budgets], [max(pts[b]) for b in budgets], alpha=0.15)
    ax.set(xlabel="budget (kept fraction of each matrix's weights)", ylabel="relative projection error",
           title=f"{model}: every targeted matrix, mean and range")
    ax.legend()
    fig.tight_layout()
    return fig


def _by_method(rows: list[dict]) -> dict[str, dict[float, list[float]]]:
    out: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        if "relative_error" in r:
            out.setdefault(r["method"], {}).setdefault(r["budget"], []).append(r["relative_error"])
    return out


def claim3(needed: list[dict]) -> str:
    """The generated verdict on "pretrained matrices are close to full rank" over every targeted matrix
    (criterion: NEAR_FULL_RANK of full rank for a 10 % error)."""
    pretrained = [r["rank_fraction_0.1"] for r in needed if not r["kind"].startswith("random ")]
    near = [v for v in pretrained if v >= NEAR_FULL_RANK]
    verdict = "reproduced" if len(near) == len(pretrained) else "not reproduced" if not near else "mixed"
    reference = ", ".join(f"{r['rank_fraction_0.1']:.2f}" for r in needed if r["kind"].startswith("random "))
    mean = sum(pretrained) / len(pretrained)
    return (f"**Claim 3, pretrained matrices are close to full rank:** a 10 % error needs "
            f"{min(pretrained):.2f} to {max(pretrained):.2f} of full rank (mean {mean:.2f}) "
            f"over all {len(pretrained)} targeted pretrained matrices, {len(near)} of them at least "
            f"{NEAR_FULL_RANK:.0%} (a Gaussian random matrix: {reference}); criterion: every matrix at least "
            f"{NEAR_FULL_RANK:.0%}; **{verdict}**.")


def kind_table(needed: list[dict]) -> list[str]:
    """Markdown rows: per kind, the mean rank fraction needed at each error level and its range over layers."""
    kinds = list(dict.fromkeys(r["kind"] for r in needed))
    lines = ["| matrix kind | shape | matrices | " + " | ".join(f"{e:.0%}".replace("%", " %") for e in ERROR_LEVELS)
             + " |", "|---|---|---|" + "---|" * len(ERROR_LEVELS)]
    for kind in kinds:
        rows = [r for r in needed if r["kind"] == kind]
        cells = []
        for e in ERROR_LEVELS:
            values = [r[f"rank_fraction_{e:g}"] for r in rows]
            mean = sum(values) / len(values)
            cells.append(f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({min(values):.2f}–{max(values):.2f})")
        lines.append(f"| {kind} | {rows[0]['shape']} | {len(rows)} | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(model: str, spectrum: list[dict], equal: list[dict], command: str, prefix: str,
                     needed: list[dict]) -> str:
    names = list(dict.fromkeys(r["matrix"] for r in spectrum))
    lines = [f"## Analyze `{model}` (no training)", "", "```", command, "```", "",
             "Rank fraction needed for a relative error of at most 50 % / 25 % / 10 % (best rank-k approximation), "
             "every targeted matrix by kind: mean over the layers (range):", "", *kind_table(needed), "",
             "The spectrum's matrices:", "", "| matrix | 50 % | 25 % | 10 % |", "|---|---|---|---|"]
    lines += [f"| {n} | " + " | ".join(f"{rank_needed(spectrum, n, e):.2f}" for e in ERROR_LEVELS) + " |"
              for n in names]
    lines += ["", claim3(needed)]
    by_method = _by_method(equal)
    budgets = sorted({b for pts in by_method.values() for b in pts})
    lines += ["", "Relative projection error at equal parameters, mean over every targeted matrix:", "",
              "| method | " + " | ".join(f"budget {b:g}" for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    lines += [f"| {m} | " + " | ".join(f"{sum(p[b]) / len(p[b]):.4f}" if b in p else "–" for b in budgets) + " |"
              for m, p in by_method.items()]
    lines += ["", f"![spectrum]({prefix}spectrum.png) ![equal parameters]({prefix}equal_params.png)", "",
              f"Data: [spectrum.csv]({prefix}spectrum.csv), [rank_needed.csv]({prefix}rank_needed.csv), "
              f"[equal_params.csv]({prefix}equal_params.csv)."]
    return "\n".join(lines) + "\n"


# --- command line -------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (the project's convention)
        fail(f"{message} (see: {self.prog} --help)")


def parser() -> argparse.ArgumentParser:
    from lit_factor.factorize import METHODS

    p = _Parser(prog="cli.py analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="hub name, local path, minilm, mpnet or random:<preset>")
    p.add_argument("--out", required=True, help="folder for the CSV files and figures")
    p.add_argument("--targets", help="which linears (a preset or regex, as model.factorization.targets)")
    p.add_argument("--matrices", nargs="+", help="regexes of the matrices whose spectrum to draw "
                                                 "(default: the first and last query projection)")
    p.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS), help="kept fractions")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--nblocks", type=int, default=4, help="blocks of Monarch / block-wise low rank (default 4)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: many small SVDs gain nothing from more, and a busy machine "
                        "makes extra threads spin: measured 100x slower with 2 threads under load)")
    p.add_argument("--seed", type=int, default=0, help="seed of random: presets and of the reference matrices")
    p.add_argument("--publish", help="also write a summary section into this Markdown page (docs/results.md)")
    return p


def check_arguments(args) -> None:
    """The numbers, before a model is loaded or anything written (a budget outside (0, 1] drew empty figures)."""
    bad = [b for b in args.budgets if not 0 < b <= 1]
    if bad:
        raise UserError(f"--budgets {' '.join(f'{b:g}' for b in bad)}: a budget is the kept fraction of each matrix's "
                        "parameters; allowed: 0 < budget <= 1")
    for option, value in (("--nblocks", args.nblocks), ("--threads", args.threads)):
        if value < 1:
            raise UserError(f"{option} {value}: must be at least 1")


def run(args) -> dict[str, Path]:
    import os

    from lit_factor.compress.surgery import PlanError, find_targets
    from lit_factor.models import ModelSourceError, load_model
    from lit_factor.study.publish import publish_section

    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)  # random: presets are drawn, so the same command gives the same numbers
    try:
        model = load_model(args.model)
        targets = find_targets(model, args.targets)
    except (ModelSourceError, PlanError) as err:
        raise UserError(str(err)) from None
    except OSError as err:  # transformers: no such folder or hub model, or the hub unreachable (a paragraph)
        reason = " ".join(str(err).split()).split(". ")[0].rstrip(".")
        raise UserError(f"--model {args.model!r} cannot be loaded ({reason}); allowed: a local model folder, minilm, "
                        "random:<preset>, or a Hugging Face hub name (downloaded once, needs the network)") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spectrum = spectrum_rows(targets, chosen_matrices(targets, args.matrices), args.seed)
    needed = rank_needed_rows(targets, args.seed)
    equal = equal_param_rows(targets, args.budgets, args.methods, args.nblocks)
    written = {"spectrum": write_csv(spectrum, out / "spectrum.csv"),
               "rank_needed": write_csv(needed, out / "rank_needed.csv"),
               "equal_params": write_csv(equal, out / "equal_params.csv")}
    for name, fig in (("spectrum", spectrum_figure(spectrum, args.model)),
                      ("equal_params", equal_params_figure(equal, args.model))):
        written[f"{name} figure"] = out / f"{name}.png"
        fig.savefig(written[f"{name} figure"], dpi=110)
    if args.publish:
        page = Path(args.publish)
        prefix = os.path.relpath(out, page.parent).replace(os.sep, "/") + "/"
        command = "python cli.py analyze " + shlex.join(args.argv)
        written["page"] = publish_section(page, f"analyze {args.model}",
                                          summary_markdown(args.model, spectrum, equal, command, prefix, needed))
    return written


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    try:
        check_arguments(args)
        with torch.no_grad():
            written = run(args)
    except UserError as err:
        fail(err)
    for what, path in written.items():
        print(f"wrote {what}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
