"""Inference latency of factorized models against their dense original, in one process on one device.

    python benchmarks/latency.py --model bert-base --method lowrank --budget 0.5 \\
        --device cpu --dtype float32 --batch-sizes 8 --seq-lens 128 --json out.json

Every combination of --method x --budget x --rank-multiple is built from the same dense model and timed in
alternation with it (see lit_factor/latency.py for how), once per --mode. Prints a table (rows where the
factorized model is slower say so) and writes the rows as a JSON list with --json.

--model: a name of a random-weight architecture preset (bert-base, roberta-base, t5-base, tiny-bert, tiny-roberta,
tiny-t5; also accepted as random:<preset>) -- these run offline; 'minilm' (the packaged pretrained MiniLM); or any
Hugging Face hub name or local path (bert-base-uncased, ./my-model). A preset name wins over a hub name.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

from lit_factor.factorize import BudgetError
from lit_factor.latency import DTYPES, MODES, LatencyError, LatencySettings, compare_latency, format_table
from lit_factor.models import RANDOM_PREFIX, RANDOM_PRESETS, load_model
from lit_factor.surgery import apply_plan, build_plan


def model_source(name: str) -> str:
    """Preset names (``bert-base``) map to their random-weight preset; everything else is passed on."""
    return RANDOM_PREFIX + name if name in RANDOM_PRESETS else name


def parse_budget(text: str) -> float | None:
    if text.lower() in ("none", "default"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget {text!r} is not a number in (0, 1] or 'none'") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"budget {text!r} is outside (0, 1]: it is the kept fraction")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bert-base", help="preset name, 'minilm', hub name or path (default bert-base)")
    p.add_argument("--method", nargs="+", default=["lowrank"], choices=["lowrank", "monarch", "blockwise"])
    p.add_argument("--budget", nargs="+", type=parse_budget, default=[0.5],
                   help="kept fraction(s) of the targeted linear weights, in (0, 1]; 'none' = the method's default "
                        "structure (Monarch/block-wise: rank min(m,n)/nblocks^2, 1.5/nblocks of a BERT block)")
    p.add_argument("--rank-multiple", nargs="+", type=int, default=[1],
                   help="round ranks down to this multiple (8 or 64 suit GPUs); several values compare them")
    p.add_argument("--nblocks", type=int, default=4, help="blocks for monarch / blockwise (default 4)")
    p.add_argument("--targets", default=None, help="target preset or regex (default: the model type's preset)")
    p.add_argument("--init", default="svd", choices=["svd", "random"],
                   help="svd projects the dense weights (real, slower to build); random skips the SVDs "
                        "(same speed, meaningless outputs)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[8])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[128])
    p.add_argument("--mode", nargs="+", default=["eager"], choices=MODES,
                   help="execution mode(s): eager, compile (torch.compile), cudagraph (CUDA graph replay, CUDA only), "
                        "compile-cudagraph (both)")
    p.add_argument("--part", default="model", choices=["model", "encoder"],
                   help="time the whole model forward, or only the encoder stack on precomputed embeddings "
                        "(use encoder with cudagraph: see lit_factor/latency.py)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per shape (median and p90 over them)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per model and shape first")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    return p


def build_variants(dense, args) -> tuple[dict, dict]:
    """{name: factorized copy of ``dense``} for every method x budget x rank multiple, and their row metadata."""
    models, meta, problems = {}, {}, []
    for method in args.method:
        for budget in args.budget:
            for multiple in args.rank_multiple:
                name = f"{method}@{'default' if budget is None else budget}"
                name += f"/x{multiple}" if len(args.rank_multiple) > 1 or multiple > 1 else ""
                if budget is None and (multiple > 1 or method == "lowrank"):
                    print(f"skipping {name}: budget 'none' means the default structure of monarch/blockwise; "
                          "it takes no --rank-multiple", file=sys.stderr)
                    continue
                model = copy.deepcopy(dense)
                try:
                    plan = build_plan(model, method, budget, targets=args.targets, nblocks=args.nblocks,
                                      rank_multiple=multiple, init=args.init)
                except BudgetError as err:  # one impossible combination of a sweep does not stop the others
                    print(f"skipping {name}: {err}", file=sys.stderr)
                    problems.append(f"{name}: {err}")
                    continue
                apply_plan(model, plan)
                models[name] = model
                meta[name] = {"method": method, "budget": budget, "kept_fraction": plan.kept_fraction,
                              "rank_multiple": multiple, "nblocks": args.nblocks if method != "lowrank" else None,
                              "targeted_layers": len(plan.entries)}
    if not models:
        raise LatencyError("no variant to measure: " + ("; ".join(problems) if problems else
                                                        "budget 'none' needs --method monarch or blockwise"))
    return models, meta


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        start = time.perf_counter()
        dense = load_model(model_source(args.model)).to(args.device)
        models, meta = build_variants(dense, args)
        print(f"built {len(models)} factorized variant(s) of {args.model} in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        rows = []
        for mode in args.mode:
            settings = LatencySettings(batch_sizes=args.batch_sizes, seq_lens=args.seq_lens, repeats=args.repeats,
                                       warmup=args.warmup, mode=mode, dtype=args.dtype, device=args.device,
                                       threads=args.threads, part=args.part)
            mode_rows = compare_latency(dense, models, settings, meta)
            print(format_table(mode_rows, title=f"model {args.model}, mode {mode}"), flush=True)
            rows += mode_rows
    except (LatencyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in rows], f, indent=1)
    if any(r.speedup < 1 for r in rows):
        print("note: rows marked SLOWER ran slower factorized than dense", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
