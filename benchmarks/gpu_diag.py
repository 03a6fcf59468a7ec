"""Diagnose CUDA-graph replay time vs kernel time (host wall clock vs CUDA events vs profiler)."""

from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lit_factor.latency import make_inputs
from lit_factor.models import load_model


def timed(run, reps=20):
    walls, gpus = [], []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        e0.record()
        run()
        e1.record()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
        gpus.append(e0.elapsed_time(e1))
    return f"wall {statistics.median(walls):.3f} ms, events {statistics.median(gpus):.3f} ms"


def capture(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def main():
    torch.manual_seed(0)
    # 1. per-node cost of graph replay: 400 tiny kernels
    x = torch.zeros(1024, device="cuda")

    def tiny():
        for _ in range(400):
            x.add_(1)
    g = capture(tiny)
    print("400 tiny kernels: eager", timed(tiny), "| graph", timed(g.replay), flush=True)
    # 2. BERT-base bf16 32x128: eager vs graph, whole model and encoder only
    model = load_model("random:bert-base").to("cuda", torch.bfloat16).eval()
    inputs = make_inputs(model, 32, 128, torch.device("cuda"))
    with torch.inference_mode():
        def whole():
            return model(**inputs)
        hidden = model.bert.embeddings(input_ids=inputs["input_ids"])

        def encoder():
            return model.bert.encoder(hidden)
        for name, fn in (("whole", whole), ("encoder", encoder)):
            for _ in range(3):
                fn()
            g = capture(fn)
            print(f"{name}: eager", timed(fn), "| graph", timed(g.replay), flush=True)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    g.replay()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=10,
                                            max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
