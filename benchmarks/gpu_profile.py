"""Where the time of a BERT-base forward goes on a GPU: kernel-time breakdown of dense vs factorized models,
and a batch-size sweep in CUDA-graph mode. Complements gpu_check.py (numbers, not pass/fail).

    PYTHONPATH=. python benchmarks/gpu_profile.py --out $OUT/gpu_profile.json
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from torch.profiler import ProfilerActivity, profile

from lit_factor.latency import LatencySettings, compare_latency, format_table, make_inputs
from lit_factor.models import load_model
from lit_factor.surgery import apply_plan, build_plan


def variant(dense, method, budget, multiple=1):
    model = copy.deepcopy(dense)
    apply_plan(model, build_plan(model, method, budget, rank_multiple=multiple, init="random"))
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    dense = load_model("random:bert-base")
    models = {"lr50_x64": variant(dense, "lowrank", 0.5, 64), "lr25_x8": variant(dense, "lowrank", 0.25, 8),
              "monarch4": variant(dense, "monarch", None)}
    results = {"profiles": {}, "rows": []}
    dtype = getattr(torch, args.dtype)
    for name, model in {"dense": dense, **models}.items():
        m = copy.deepcopy(model).to("cuda", dtype).eval()
        inputs = make_inputs(m, 32, 128, torch.device("cuda"))
        with torch.inference_mode():
            for _ in range(3):
                m(**inputs)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    m(**inputs)
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=70)
        print(f"=== {name}: CUDA kernel time of 5 forwards, bf16, 32 x 128", table, sep="\n", flush=True)
        results["profiles"][name] = table
        del m
    for batch in (8, 128):
        settings = LatencySettings(batch_sizes=[batch], seq_lens=[128], repeats=20, warmup=3, mode="cudagraph",
                                   dtype=args.dtype, device="cuda")
        rows = compare_latency(dense, models, settings)
        print(format_table(rows, title=f"cudagraph, batch {batch}"), flush=True)
        results["rows"] += [r.to_dict() for r in rows]
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
