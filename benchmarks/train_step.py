"""What one training step costs, dense vs factorized, fp32 vs bf16 autocast: the number that sizes a CPU study.

    python benchmarks/train_step.py --model minilm --methods none lowrank monarch --budget 0.5 \
        --batch 32 --seq-len 96 --threads 1 --rounds 3 --json step.json
    python benchmarks/train_step.py --table step.json     # docs/speed.md's table of a recorded file

One process, one model per method (projected from the same weights), every (method, precision) timed once per
round in alternating order after one warm-up step each; medians over the rounds. A step is forward, backward and
an AdamW update on random token ids (a study's step, without the data loader). bf16 is ``torch.autocast`` over the
forward (weights and optimizer in fp32), what Lightning's ``precision="bf16-mixed"`` does. On a CPU without native
bf16 (``avx512_bf16``/AMX) bf16 autocast is emulated and slower.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from lit_factor.compress.surgery import apply_plan, build_plan
from lit_factor.hardware import cpu_description
from lit_factor.models import RANDOM_PREFIX, RANDOM_PRESETS, load_model

PRECISIONS = {"fp32": None, "bf16-autocast": torch.bfloat16}


def make_step(model: torch.nn.Module, batch: int, seq_len: int, dtype: torch.dtype | None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, seq_len), generator=generator)
    labels = torch.randint(0, 2, (batch,), generator=generator)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    return step


def table(path: str) -> str:
    """The Markdown table of a recorded file (docs/speed.md prints it; a test checks it is this one)."""
    with open(path) as f:
        recorded = json.load(f)
    lines = ["| method | precision | s / step (median) | speed vs the first row |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['precision']} | {r['median_s']:.2f} | {r['speedup']:.2f}x |"
              for r in recorded["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="minilm, a random preset name, or an HF name/path")
    parser.add_argument("--methods", nargs="+", default=["none", "lowrank", "monarch"])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--table", metavar="JSON", help="print the Markdown table of a recorded file and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return []
    torch.set_num_threads(args.threads)
    name = RANDOM_PREFIX + args.model if args.model in RANDOM_PRESETS else args.model
    torch.manual_seed(0)
    base = load_model(name, num_labels=2).train()
    steps, times = {}, {}
    for method in args.methods:
        model = copy.deepcopy(base)
        if method != "none":
            apply_plan(model, build_plan(model, method, args.budget))
        for precision in args.precisions:
            steps[method, precision] = make_step(model, args.batch, args.seq_len, PRECISIONS[precision])
            steps[method, precision]()  # warm-up: allocator, oneDNN kernels
            times[method, precision] = []
    for _ in range(args.rounds):  # alternating: a slow spell of the machine hits every variant alike
        for key, step in steps.items():
            times[key].append(step())
    reference = statistics.median(times[args.methods[0], args.precisions[0]])
    rows = [{"method": method, "precision": precision, "median_s": round(statistics.median(ts), 3),
             "speedup": round(reference / statistics.median(ts), 2), "rounds_s": [round(t, 3) for t in ts]}
            for (method, precision), ts in times.items()]
    machine = cpu_description()  # bf16's speed depends on it: native on AVX-512 BF16 / AMX, emulated elsewhere
    print(f"model {args.model}, budget {args.budget}, batch {args.batch} x {args.seq_len} tokens, "
          f"{args.threads} thread(s), {args.rounds} rounds; speedup vs {args.methods[0]} {args.precisions[0]}")
    print(f"  on {machine['cpu']} ({machine['vector']}, native bf16: {machine['native_bf16'] or 'no'})")
    for row in rows:
        print(f"  {row['method']:>8} {row['precision']:>14}: {row['median_s']:.3f} s/step  {row['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "machine": machine, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
