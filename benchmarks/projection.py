"""How long projecting a whole model takes: every targeted matrix of a BERT-base-sized random model.

    python benchmarks/projection.py --model bert-base --methods lowrank monarch --budget 0.5 --json proj.json

Prints, per method, the wall time of ``apply_plan`` (all projections included); ``--reference`` adds the time
of a plain full float64 SVD of the same matrices -- the naive way -- measured in the same process.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from lit_factor.compress.surgery import apply_plan, build_plan, find_targets
from lit_factor.models import RANDOM_PREFIX, RANDOM_PRESETS, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bert-base", help="random preset name, 'minilm', or an HF name/path")
    parser.add_argument("--methods", nargs="+", default=["lowrank", "monarch", "blockwise"])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference", action="store_true",
                        help="also time a plain full float64 SVD of every matrix (the naive way; slow)")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = RANDOM_PREFIX + args.model if args.model in RANDOM_PRESETS else args.model
    torch.manual_seed(0)
    model = load_model(name, num_labels=2).eval()
    targets = find_targets(model)  # the default preset: attention Q/K/V/O and FFN of every block

    rows = []
    if args.reference:
        start = time.perf_counter()
        for linear in targets.values():
            torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        naive = time.perf_counter() - start
        rows.append({"method": "full float64 SVD (reference)", "matrices": len(targets), "seconds": round(naive, 2)})
    for method in args.methods:
        work = copy.deepcopy(model)
        plan = build_plan(work, method, args.budget)
        start = time.perf_counter()
        errors = apply_plan(work, plan)
        seconds = time.perf_counter() - start
        rows.append({"method": method, "matrices": len(plan.entries), "seconds": round(seconds, 2),
                     "kept_fraction": round(plan.kept_fraction, 4),
                     "mean_rel_error": round(sum(errors.values()) / len(errors), 4)})
    print(f"model {args.model}, budget {args.budget}, {args.threads} threads")
    for row in rows:
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
