"""Inference latency of factorized models against their dense original, in one process on one device.

    python benchmarks/latency.py --model bert-base --method lowrank --budget 0.5 \\
        --device cpu --dtype float32 --batch-sizes 8 --seq-lens 128 --runtime eager onnxruntime --json out.json
    python benchmarks/latency.py --from-json out.json        # the results as a Markdown table (README, docs)

Every combination of --method x --budget x --rank-multiple is built from the same dense model and timed in
alternation with it (see lit_factor/latency.py for how), once per --runtime (eager PyTorch, torch.compile, CUDA
graphs, ONNX Runtime with or without its transformer fusions). Prints a table (rows where the factorized model is
slower say so) and writes the rows as a JSON list with --json; --profile FILE adds a per-operator breakdown of
every model's forward (first shape) in each runtime. Facts these numbers established: docs/speed.md.

--model: a name of a random-weight architecture preset (bert-base, roberta-base, t5-base, tiny-bert, tiny-roberta,
tiny-t5; also accepted as random:<preset>) -- these run offline; 'minilm' (the packaged pretrained MiniLM); or any
Hugging Face hub name or local path (bert-base-uncased, ./my-model). A preset name wins over a hub name.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time

from lit_factor.compress.surgery import apply_plan, build_plan
from lit_factor.deploy.latency import (
    DTYPES,
    FUSIONS,
    PRECISIONS,
    RUNTIMES,
    LatencyError,
    LatencyRow,
    LatencySettings,
    compare_latency,
    format_table,
    runtime_label,
)
from lit_factor.factorize import BudgetError
from lit_factor.models import RANDOM_PREFIX, RANDOM_PRESETS, load_model


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


def parse_variant(text: str) -> tuple[str, float | None]:
    method, _, budget = text.partition("@")
    if method not in ("lowrank", "monarch", "blockwise") or not budget:
        raise argparse.ArgumentTypeError(f"variant {text!r} is not METHOD@BUDGET with METHOD lowrank, monarch or "
                                         "blockwise and BUDGET in (0, 1] or 'none'")
    return method, parse_budget(budget)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bert-base", help="preset name, 'minilm', hub name or path (default bert-base)")
    p.add_argument("--method", nargs="+", default=["lowrank"], choices=["lowrank", "monarch", "blockwise"])
    p.add_argument("--budget", nargs="+", type=parse_budget, default=[0.5],
                   help="kept fraction(s) of the targeted linear weights, in (0, 1]; 'none' = the method's default "
                        "structure (Monarch/block-wise: rank min(m,n)/nblocks^2, 1.5/nblocks of a BERT block)")
    p.add_argument("--variants", nargs="+", type=parse_variant, default=None, metavar="METHOD@BUDGET",
                   help="exactly these variants instead of every --method x --budget, e.g. lowrank@0.5 "
                        "lowrank@0.25 monarch@none")
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
    p.add_argument("--runtime", "--mode", dest="runtime", nargs="+", default=["eager"], choices=RUNTIMES,
                   help="runtime(s), dense and factorized always in the same one: eager, compile (torch.compile), "
                        "cudagraph (CUDA graph replay, CUDA only), compile-cudagraph (both), onnxruntime (ONNX "
                        "Runtime CPU session, float32; --threads sets its intra-op threads). --mode: former name")
    p.add_argument("--fusions", nargs="+", default=["attention"], choices=FUSIONS,
                   help="with onnxruntime: graph fusions of both exports: attention (onnxscript's fusions, attention "
                        "fused for dense and factorized alike; default), ort (ONNX Runtime's transformer optimizer, "
                        "no attention fusion on these exports), none; several are measured one after another")
    p.add_argument("--ort-fusions", default=None, choices=["off", "on", "both"],
                   help="former switch: ONNX Runtime's transformer optimizer off (= --fusions none), on (ort) or both")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS,
                   help="fp32; bf16 (PyTorch runtimes, CPUs with AVX-512 BF16/AMX; skipped elsewhere, saying so); "
                        "int8 / int8-static (onnxruntime: dynamic / static quantization of both fused graphs). "
                        "Not fp32: the dense fp32 model is timed in the same rounds (speedup_vs_dense_fp32)")
    p.add_argument("--pad-rank-to", type=int, default=None,
                   help="pad low-rank ranks with zeros to this multiple at inference on CUDA (0 = off; default: "
                        "the layers' own, 64; see docs/speed.md)")
    p.add_argument("--optimize", action="store_true",
                   help="apply lit_factor.deploy.inference.optimize_for_inference to dense and factorized alike "
                        "(one GEMM "
                        "for the Q/K/V down-projections, Monarch FFN reorder absorbed)")
    p.add_argument("--part", default="model", choices=["model", "encoder"],
                   help="time the whole model forward, or only the encoder stack on precomputed embeddings "
                        "(use encoder with cudagraph: see lit_factor/latency.py)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per shape (median and p90 over them)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per model and shape first")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--export-cache", default=None, metavar="DIR",
                   help="keep the ONNX exports (fused, quantized) here, keyed by a fingerprint of the weights, and "
                        "reuse them in a later run of the same models (default: a temporary directory per run)")
    p.add_argument("--seed", type=int, default=0, help="torch seed before building the random-weight models (0)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="also write a per-operator time breakdown of every model (first shape, each runtime) here")
    p.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                   help="measure nothing: print the rows of these result files as a Markdown table")
    return p


def build_variants(dense, args) -> tuple[dict, dict]:
    """{name: factorized copy of ``dense``} for every method x budget x rank multiple, and their row metadata."""
    models, meta, problems = {}, {}, []
    pairs = args.variants or [(method, budget) for method in args.method for budget in args.budget]
    for method, budget in pairs:
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


def settings_list(args, skipped: list[str] | None = None) -> list[LatencySettings]:
    """One LatencySettings per runtime x precision (x fusions for onnxruntime); combinations that cannot be
    measured here (int8 outside onnxruntime, bf16 on a CPU without it...) are left out and said in ``skipped``."""
    fusions = ({"off": ["none"], "on": ["ort"], "both": ["none", "ort"]}[args.ort_fusions] if args.ort_fusions
               else list(dict.fromkeys(args.fusions)))
    base = LatencySettings(batch_sizes=args.batch_sizes, seq_lens=args.seq_lens, repeats=args.repeats,
                           warmup=args.warmup, dtype=args.dtype, device=args.device, threads=args.threads,
                           part=args.part, pad_rank_to=args.pad_rank_to,
                           export_cache=getattr(args, "export_cache", None))
    out = []
    for runtime in args.runtime:
        for precision in dict.fromkeys(args.precision):
            for fused in (fusions if runtime == "onnxruntime" else ["none"]):
                dtype = None if precision == "bf16" and args.dtype in ("float32", "fp32") else args.dtype
                settings = dataclasses.replace(base, runtime=runtime, mode=None, fusions=fused, ort_fusions=False,
                                               precision=precision, dtype=dtype)
                try:
                    settings.check()
                except LatencyError as err:
                    if len(args.runtime) * len(args.precision) == 1:
                        raise
                    if skipped is not None:
                        skipped.append(f"{runtime} {precision}: {err}")
                    continue
                out.append(settings)
    return out


def _ms(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def markdown_table(rows: list[dict]) -> str:
    """Variants down, runtimes across; each cell the speedup (of the medians) and the two medians."""
    labels = list(dict.fromkeys(runtime_label(r) for r in rows))
    shapes = sorted({(r["batch_size"], r["seq_len"]) for r in rows})
    lines = ["| variant (kept) | batch x len | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for name in dict.fromkeys(r["name"] for r in rows):
        for batch, seq in shapes:
            cells = {runtime_label(r): r for r in rows
                     if r["name"] == name and (r["batch_size"], r["seq_len"]) == (batch, seq)}
            if not cells:
                continue
            kept = next(iter(cells.values()))["kept_fraction"]
            text = [f"**{c['speedup']:.2f}x** ({_ms(c['dense_ms'])} / {_ms(c['factorized_ms'])} ms)" if c else "-"
                    for c in (cells.get(label) for label in labels)]
            lines.append(f"| {name} ({kept:.1%}) | {batch} x {seq} | " + " | ".join(text) + " |")
    return "\n".join(lines)


#: issue 13's goals (CPU, fp32, 2 threads, BERT-base-shaped encoder, batch 8 x 128): variant -> (label, target
#: speedup in the best runtime, FLOP limit of the linear layers)
GOALS = {"lowrank@0.5": ("low rank 50 %", 1.9, 2.0), "lowrank@0.25": ("low rank 25 %", 3.2, 4.0),
         "monarch@default": ("Monarch 4 blocks (37.5 %)", 2.1, 2.7)}


def markdown_goals(rows: list[dict]) -> str:
    """The goals next to the best runtime's and eager PyTorch's speedups of these rows."""
    lines = ["| goal | target (FLOP limit) | best runtime | eager | status |", "|---|---|---|---|---|"]
    for name, (label, target, limit) in GOALS.items():
        mine = [r for r in rows if r["name"] == name]
        if not mine:
            continue
        best = max(mine, key=lambda r: r["speedup"])
        eager = [f"{r['speedup']:.2f}x" for r in mine if runtime_label(r) == "eager"]
        loaded = " (loaded machine)" if any((r.get("load_avg_1min") or 0) > 2.5 for r in mine) else ""
        status = ("met" if best["speedup"] >= target else "**missed**") + loaded
        lines.append(f"| {label} | >= {target}x ({limit}x) | {best['speedup']:.2f}x ({runtime_label(best)}) | "
                     f"{', '.join(eager) or '-'} | {status} |")
    return "\n".join(lines)


def write_profile(path: str, dense, models: dict, settings: LatencySettings, mode: str) -> dict[str, dict]:
    """Append every model's op-time table to ``path``; return {model: {op: ms per forward}}."""
    from lit_factor.deploy.profiling import profile_ops

    profiles = profile_ops(dense, models, settings, calls=2)
    with open(path, "a") as f:
        for name, (table, _) in profiles.items():
            f.write(f"=== {name}: {mode}, batch {settings.batch_sizes[0]} x {settings.seq_lens[0]}, "
                    f"part {settings.part}, {settings.threads or 'default'} threads\n{table}\n\n")
    return {name: ops for name, (_, ops) in profiles.items()}


def add_amdahl(rows: list[LatencyRow], dense_ops: dict[str, float], label: str) -> None:
    """Each row's Amdahl bound from the dense model's own profile in that runtime (lit_factor.deploy.profiling)."""
    from lit_factor.deploy.profiling import amdahl_bound

    for row in rows:
        bound = amdahl_bound(dense_ops, label, row.macs_per_token_factorized / row.macs_per_token_dense)
        row.extra.update(amdahl_bound=round(bound["bound"], 3), dense_gemm_share=round(bound["gemm_share"], 3),
                         of_bound=round(row.speedup / bound["bound"], 3))


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def is_loaded(loads: list[float | None], threads: int | None) -> bool:
    """Other work on the machine: the 1-minute load average went above this measurement's own threads + 1 at
    some point (a loaded machine compresses ratios towards 1: docs/speed.md)."""
    known = [x for x in loads if x is not None]
    return bool(known) and max(known) > (threads or os.cpu_count() or 1) + 1


def measure(args) -> list[LatencyRow]:
    start = time.perf_counter()
    import torch

    torch.manual_seed(args.seed)  # the same random weights (and so the same cached exports) on every run
    dense = load_model(model_source(args.model)).to(args.device)
    models, meta = build_variants(dense, args)
    if args.optimize:
        from lit_factor.deploy.inference import optimize_for_inference

        dense = optimize_for_inference(copy.deepcopy(dense))
        models = {k: optimize_for_inference(m) for k, m in models.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for m in meta.values():
        m.update(load_avg_1min=load, optimized=args.optimize)
    print(f"built {len(models)} factorized variant(s) of {args.model} in {time.perf_counter() - start:.0f} s "
          f"(load average {load})", file=sys.stderr)
    if args.profile:
        open(args.profile, "w").close()
    rows, skipped, profiles = [], [], {}
    cache = None if args.export_cache else tempfile.TemporaryDirectory(prefix="lit_factor_exports_")
    args.export_cache = args.export_cache or cache.name  # each model exported once per run (or kept in the given dir)
    for settings in settings_list(args, skipped):
        before = load_average()
        runtime_rows = compare_latency(dense, models, settings, meta)
        loads = [before, load_average()]
        label = runtime_label(runtime_rows[0])
        if args.profile:
            profiles[label] = write_profile(args.profile, dense, models, settings, label)
            add_amdahl(runtime_rows, profiles[label]["dense"], label)
        for row in runtime_rows:
            row.extra.update(load_avg_1min=max(x for x in loads if x is not None) if any(loads) else None,
                             loaded=is_loaded(loads, settings.threads))
        print(format_table(runtime_rows, title=f"model {args.model}, runtime {label}"), flush=True)
        rows += runtime_rows
        if args.json:  # after every runtime: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump([r.to_dict() for r in rows], f, indent=1)
        if args.profile:
            with open(os.path.splitext(args.profile)[0] + "_ops.json", "w") as f:
                json.dump(profiles, f, indent=1)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.from_json:
        rows = [row for path in args.from_json for row in json.load(open(path))]
        print(markdown_table(rows))
        if any(r["name"] in GOALS for r in rows):
            print("\n" + markdown_goals(rows))
        return 0
    try:
        rows = measure(args)
    except (LatencyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if any(r.speedup < 1 for r in rows):
        print("note: rows marked SLOWER ran slower factorized than dense", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
