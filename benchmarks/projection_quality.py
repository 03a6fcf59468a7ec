"""How much accuracy each projection keeps *before any training*: the dev metric right after factorizing a
fine-tuned dense model, for svd / whitened / fisher projections and uniform / energy / fisher rank allocations.

1. fine-tune the dense packaged MiniLM on an SST-2 subset (or reuse ``--dense-ckpt``);
2. for every method x budget x (init, allocation): load that checkpoint into a fresh module
   (``model.init_checkpoint``), factorize it (calibrating on training sentences where the projection needs it),
   and validate on the dev set -- what ``cli.py validate --model.init_checkpoint ...`` does, in one process.

    nice -n 10 python benchmarks/projection_quality.py --glue-dir ../shared/glue --train-samples 2000 \
        --out docs/studies/projection_quality.csv

Rows are appended as they finish (a cut run keeps what it measured). Timings on a shared machine are "loaded".
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import lightning as L
import torch

from lit_factor.train.data import GLUEDataModule
from lit_factor.train.module import Factorization, FactorizedClassifier

COMBOS = ("svd:uniform", "whitened:uniform", "fisher:uniform", "svd:energy", "whitened:energy", "fisher:fisher")
FIELDS = ("task", "method", "budget", "init", "allocation", "min_share", "calibration_samples", "kept_fraction",
          "metric", "value", "dense_value", "seconds", "train_samples", "max_seq_length", "machine")


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _datamodule(args) -> GLUEDataModule:
    return GLUEDataModule(args.task, data_dir=args.glue_dir, model_name_or_path="minilm",
                          max_seq_length=args.max_seq_length, batch_size=32, max_train_samples=args.train_samples,
                          max_eval_samples=args.eval_samples)


def dense_checkpoint(args) -> Path:
    """Fine-tune the dense model once (1 epoch) and save it, unless ``--dense-ckpt`` is given."""
    if args.dense_ckpt:
        return Path(args.dense_ckpt)
    path = Path(args.work_dir) / f"dense_{args.task}_{args.train_samples}.ckpt"
    if not path.is_file():
        L.seed_everything(42)
        trainer = _trainer(max_epochs=1, limit_val_batches=0)
        trainer.fit(FactorizedClassifier("minilm", args.task, learning_rate=1e-4), datamodule=_datamodule(args))
        path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(path)
    return path


def validate(args, ckpt: Path, factorization: Factorization | None) -> tuple[float, float, float]:
    """(dev metric, kept fraction, seconds) of the checkpoint factorized by ``factorization`` (None: dense)."""
    start = time.perf_counter()
    module = FactorizedClassifier("minilm", args.task, factorization=factorization, init_checkpoint=str(ckpt))
    metrics = _trainer().validate(module, datamodule=_datamodule(args), verbose=False)[0]
    kept = module.plan.kept_fraction if module.plan else 1.0
    return metrics[f"val/{module.task.metrics[0]}"], kept, time.perf_counter() - start


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--glue-dir", help="GLUE TSV root (required unless --table)")
    parser.add_argument("--table", metavar="CSV", help="print the README's Markdown table of a result CSV and exit")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--eval-samples", type=int, default=None)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["lowrank"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--combos", nargs="+", default=list(COMBOS), help="init:allocation pairs")
    parser.add_argument("--min-share", type=float, default=0.0, help="factorization.allocation_min_share")
    parser.add_argument("--dense-ckpt", default=None)
    parser.add_argument("--work-dir", default="logs/projection_quality")
    parser.add_argument("--machine", default="2-core shared CPU (loaded)")
    parser.add_argument("--out", default="docs/studies/projection_quality.csv")
    return parser


def table(path: str) -> str:
    """The README's table of a result CSV: one row per measurement, in file order."""
    lines = ["| structure | budget | init | allocation | dev accuracy | vs dense |", "|---|---|---|---|---|---|"]
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            floor = float(r["min_share"]) if r["min_share"] else 0.0
            allocation = r["allocation"] + (f", floor {floor:g}" if floor else "")
            value, dense = float(r["value"]), float(r["dense_value"])
            lines.append(f"| {r['method']} | {float(r['budget']):.0%} | {r['init']} | {allocation} | {value:.3f} | "
                         f"{value - dense:+.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    if not args.glue_dir:
        parser.error("--glue-dir is required (unless --table)")
    torch.set_num_threads(2)
    ckpt = dense_checkpoint(args)
    dense, _, _ = validate(args, ckpt, None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fresh = not out.is_file()
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if fresh:
            writer.writeheader()
        for method, budget, combo in ((m, b, c) for m in args.methods for b in args.budgets for c in args.combos):
            init, allocation = combo.split(":")
            fact = Factorization(method=method, budget=budget, init=init, allocation=allocation,
                                 allocation_min_share=args.min_share, calibration_samples=args.calibration_samples)
            value, kept, seconds = validate(args, ckpt, fact)
            writer.writerow(dict(task=args.task, method=method, budget=budget, init=init, allocation=allocation,
                                 min_share=args.min_share if allocation != "uniform" else "",
                                 calibration_samples=args.calibration_samples, kept_fraction=round(kept, 4),
                                 metric="dev accuracy right after projection", value=round(value, 4),
                                 dense_value=round(dense, 4), seconds=round(seconds, 1),
                                 train_samples=args.train_samples, max_seq_length=args.max_seq_length,
                                 machine=args.machine))
            f.flush()
            print(f"{method} {budget} {combo}: {value:.4f} (dense {dense:.4f}, kept {kept:.3f}, {seconds:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
