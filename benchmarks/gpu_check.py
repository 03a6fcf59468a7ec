"""One-shot GPU latency check of a BERT-base-shaped encoder (random weights): everything in one process.

    PYTHONPATH=. python benchmarks/gpu_check.py --out $OUT/gpu_latency.json --time-budget 420

Measures, at bf16 and batch 32 x 128 (overridable), the dense model against
* low rank at 50 % and 25 % with ranks as the budget gives them (x1) and aligned to multiples of 8 and 64,
  each x1 variant with and without the runtime rank padding of ``LowRankLinear.pad_rank_to``;
* Monarch and block-wise low rank with 4 blocks at their default rank (37.5 % of the targeted weights), and the
  naive reference Monarch forward this project started from (reshape/permute copies, separate bias add);
in the execution modes eager, cudagraph, compile and compile-cudagraph. Every call of ``compare_latency`` times
the dense model in the same rounds, so each row has its own baseline. The rows are written to --out after every
step, so a run cut short still returns what it measured. Steps that do not fit --time-budget are skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import traceback

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_factor.factorize import LowRankLinear, MonarchLinear
from lit_factor.latency import LatencySettings, compare_latency, format_table
from lit_factor.models import load_model
from lit_factor.surgery import apply_plan, build_plan


class NaiveMonarch(MonarchLinear):
    """The first Monarch forward of this project, kept as the reference to beat (same math, more copies)."""

    def forward(self, x: Tensor) -> Tensor:
        b, p, r = self.nblocks, self.in_block, self.rank
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if b * p != self.in_features:
            x = F.pad(x, (0, b * p - self.in_features))
        n = x.shape[0]
        h = torch.bmm(x.reshape(n, b, p).transpose(0, 1), self.blocks_in.transpose(1, 2))
        h = h.reshape(b, n, b, r).permute(2, 1, 0, 3).reshape(b, n, b * r)
        y = torch.bmm(h, self.blocks_out.transpose(1, 2))
        y = self._order_output(y)[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class LoopMonarch(MonarchLinear):
    """Candidate: stage 1 as b batched GEMMs that write straight into the stage-2 layout (no middle copy)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or self.nblocks * self.in_block != self.in_features \
                or self.nblocks * self.out_block != self.out_features:
            return super().forward(x)
        b, p, q, r = self.nblocks, self.in_block, self.out_block, self.rank
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        n = x.shape[0]
        xv = x.view(n, b, p).transpose(0, 1)  # (b_j, N, p)
        w1 = self.blocks_in.view(b, b, r, p)  # (j, i, R, p)
        h = x.new_empty(b, n, b, r)  # (b_i, N, b_j, R)
        for i in range(b):
            torch.bmm(xv, w1[:, i].mT, out=h[i].transpose(0, 1))  # batch j -> h[i, :, j, :]
        y = torch.bmm(h.view(b, n, b * r), self.blocks_out.mT)  # (b_i, N, q)
        out = y.new_empty(n, b * q)
        torch.add(y, self._output_blocks(self.bias.view(1, -1)), out=self._output_blocks(out))
        return out.reshape(*lead, self.out_features)


def variant(dense, method, budget, multiple=1, naive=False, cls=None):
    model = copy.deepcopy(dense)
    plan = build_plan(model, method, budget, rank_multiple=multiple, init="random")  # speed does not need SVDs
    apply_plan(model, plan)
    cls = NaiveMonarch if naive else cls
    if cls is not None:
        for module in model.modules():
            if type(module) is MonarchLinear:
                module.__class__ = cls
    ranks = sorted({e.structure["rank"] for e in plan.entries})
    suffix = "-naive" if naive else "-loop" if cls else ""
    meta = {"method": method + suffix, "budget": budget, "kept_fraction": plan.kept_fraction,
            "rank_multiple": multiple, "ranks": ranks}
    return model, meta


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="random:bert-base")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds; later steps are skipped")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--part", default="model", choices=["model", "encoder"])
    parser.add_argument("--steps", default=None, help="comma-separated step labels to run (default: all)")
    args = parser.parse_args()
    start = time.perf_counter()
    env = {"torch": torch.__version__, "device": args.device,
           "name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    print("environment:", env, flush=True)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 rows, if any, use TF32 like production inference
        torch.backends.cudnn.allow_tf32 = True

    dense = load_model(args.model)
    built = {
        "lr50_x1": variant(dense, "lowrank", 0.5), "lr50_x8": variant(dense, "lowrank", 0.5, 8),
        "lr50_x64": variant(dense, "lowrank", 0.5, 64),
        "lr25_x1": variant(dense, "lowrank", 0.25), "lr25_x8": variant(dense, "lowrank", 0.25, 8),
        "lr25_x64": variant(dense, "lowrank", 0.25, 64),
        "monarch4": variant(dense, "monarch", None), "blockwise4": variant(dense, "blockwise", None),
        "monarch4_naive": variant(dense, "monarch", None, naive=True),
        "monarch4_loop": variant(dense, "monarch", None, cls=LoopMonarch),
    }
    # Every candidate forward computes the reference math (checked on the device before timing).
    x = torch.randn(64, 768, device=args.device)
    for cls in (NaiveMonarch, LoopMonarch):
        layer = MonarchLinear(768, 3072, 4, device=args.device)
        layer.__class__ = cls
        with torch.inference_mode():
            err = (layer(x) - (x @ layer.to_dense().T + layer.bias)).abs().max().item()
        print(f"{cls.__name__}: max |forward - reference| = {err:.2e}", flush=True)
        assert err < 1e-3, cls
    print(f"built {len(built)} variants in {time.perf_counter() - start:.0f} s", flush=True)
    results = {"environment": env, "rows": [], "errors": [], "skipped": []}
    default_pad = LowRankLinear.pad_rank_to

    def step(label, names, mode, pad=64, dtype=args.dtype, estimate=5.0, batch_sizes=(args.batch_size,)):
        """One compare_latency call: dense + ``names`` in ``mode`` with LowRankLinear.pad_rank_to = pad."""
        if args.steps and label not in args.steps.split(","):
            return
        if time.perf_counter() - start + estimate > args.time_budget:
            results["skipped"].append(label)
            print(f"skipped {label} (time budget)", flush=True)
            return
        LowRankLinear.pad_rank_to = pad
        settings = LatencySettings(batch_sizes=list(batch_sizes), seq_lens=[args.seq_len], repeats=args.repeats,
                                   warmup=3, mode=mode, dtype=dtype, device=args.device, part=args.part)
        t0 = time.perf_counter()
        try:
            rows = compare_latency(dense, {n: built[n][0] for n in names}, settings,
                                   {n: {**built[n][1], "step": label, "pad_rank_to": pad} for n in names})
            print(format_table(rows, title=f"{label}: {mode}, pad_rank_to={pad}, {dtype}"), flush=True)
            results["rows"] += [r.to_dict() for r in rows]
        except Exception as err:  # record and go on: one failing mode must not lose the others
            traceback.print_exc()
            results["errors"].append({"step": label, "error": f"{type(err).__name__}: {err}"})
        finally:
            LowRankLinear.pad_rank_to = default_pad
            torch._dynamo.reset()  # drop compiled graphs of this step (inductor's on-disk cache stays warm)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(f"[{label}] {time.perf_counter() - t0:.0f} s, total {time.perf_counter() - start:.0f} s", flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    everything = list(built)
    unaligned = ["lr50_x1", "lr25_x1"]
    step("cudagraph", everything, "cudagraph")
    step("cudagraph-nopad", unaligned, "cudagraph", pad=0)
    step("cudagraph-pad8", unaligned, "cudagraph", pad=8)
    step("eager", everything, "eager")
    step("eager-nopad", unaligned, "eager", pad=0)
    if not args.skip_compile:
        # One factorized model per call, the most telling first; dense recompiles hit inductor's cache.
        for name in ("lr50_x8", "monarch4", "lr25_x8", "lr50_x64", "blockwise4"):
            step(f"compile-cudagraph-{name}", [name], "compile-cudagraph", estimate=60)
        for name in ("lr50_x8", "monarch4"):
            step(f"compile-{name}", [name], "compile", estimate=40)
    step("cudagraph-batches", ["lr50_x8", "lr50_x64", "lr25_x8", "monarch4"], "cudagraph", batch_sizes=(8, 128),
         estimate=15)
    step("cudagraph-fp32", ["lr50_x1", "lr50_x64", "lr25_x1", "monarch4"], "cudagraph", dtype="float32", estimate=15)
    print(f"done in {time.perf_counter() - start:.0f} s; {len(results['rows'])} rows, "
          f"{len(results['errors'])} errors, skipped {results['skipped']}", flush=True)


if __name__ == "__main__":
    main()
