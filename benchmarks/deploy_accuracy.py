"""Accuracy (and speed) of what is deployed: fine-tuned checkpoints exported to ONNX (fp32, attention fused) and
int8, each evaluated on the GLUE dev set with `test`'s metrics and timed against the dense fp32 export.

    python benchmarks/deploy_accuracy.py --data-dir GLUE_DIR --task sst2 --max-seq-length 64 \\
        --checkpoint dense=logs/.../dense-best.ckpt --checkpoint "low rank 50 %=logs/.../best.ckpt" ... \\
        --json benchmarks/results/minilm_sst2_deploy_accuracy_loaded.json

Every checkpoint is exported once (``python -m lit_factor export --format onnx --quantize int8``, dynamic
int8), then ``python -m lit_factor evaluate`` runs model.onnx and model.int8.onnx over the dev split; the ONNX
files are timed in alternation with the first checkpoint's fp32 file (ONNX Runtime, ``--threads``, a batch of
``--batch`` dev-length random token ids). Rows record the load average and ``loaded``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                   help="a fit checkpoint and its row name; the first is the dense reference")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--task", default="sst2")
    p.add_argument("--max-seq-length", type=int, default=64)
    p.add_argument("--work", default=None, help="export directories go here (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--setup", default="", help="one sentence on how the checkpoints were trained (into the file)")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    import tempfile

    import numpy as np

    from lit_factor.deploy import ort
    from lit_factor.deploy.evaluate import main as evaluate_main
    from lit_factor.deploy.export import main as export_main

    work = Path(args.work or tempfile.mkdtemp(prefix="deploy_accuracy_"))
    rows, sessions = [], {}
    loads = [os.getloadavg()[0]]
    for item in args.checkpoint:
        name, _, path = item.partition("=")
        out = work / name.replace(" ", "_").replace("%", "pct")
        if not (out / "model.int8.onnx").is_file():
            code = export_main(["--ckpt_path", path, "--to", str(out), "--format", "onnx", "--quantize", "int8",
                                "--overwrite"])
            if code:
                return code
        for file, precision in (("model.onnx", "fp32"), ("model.int8.onnx", "int8")):
            result_file = out / f"eval_{precision}.json"
            if not result_file.is_file():
                evaluate_main([str(out), "--file", file, "--data.task", args.task, "--data.data_dir", args.data_dir,
                               "--data.max_seq_length", str(args.max_seq_length), "--threads", str(args.threads),
                               "--json", str(result_file)])
            result = json.loads(result_file.read_text())
            rows.append({"model": name, "export": f"onnx ({file})", "precision": precision,
                         "metrics": result["metrics"], "checkpoint": path})
            sessions[(name, precision)] = ort.make_session(out / file, args.threads)
        loads.append(os.getloadavg()[0])
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (args.batch, args.max_seq_length)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    times = {k: [] for k in sessions}
    for session in sessions.values():  # one warm-up call each
        names = {i.name for i in session.get_inputs()}
        session.run(None, {k: v for k, v in feed.items() if k in names})
    for _ in range(args.repeats):  # alternating, call after call
        for key, session in sessions.items():
            names = {i.name for i in session.get_inputs()}
            start = time.perf_counter()
            session.run(None, {k: v for k, v in feed.items() if k in names})
            times[key].append((time.perf_counter() - start) * 1e3)
    loads.append(os.getloadavg()[0])
    reference = statistics.median(times[next(iter(sessions))])
    for row in rows:
        ms = statistics.median(times[(row["model"], row["precision"])])
        row.update(latency_ms=round(ms, 2), speedup_vs_dense_fp32=round(reference / ms, 3))
    loaded = max(loads) > args.threads + 1
    setup = (f"{args.setup} Dev set of {args.task}, max_seq_length {args.max_seq_length}; latency: ONNX Runtime, "
             f"{args.threads} threads, batch {args.batch} x {args.max_seq_length}, median of {args.repeats} "
             f"alternating rounds; load average {min(loads):.0f}-{max(loads):.0f}"
             + (" (**loaded**: ratios compressed)" if loaded else ""))
    Path(args.json).write_text(json.dumps({"setup": setup.strip(), "loaded": loaded, "load_avg": loads,
                                           "rows": rows}, indent=1))
    for row in rows:
        print(f"{row['model']:>16} {row['precision']:>5} {row['metrics']} {row['latency_ms']:.1f} ms "
              f"{row['speedup_vs_dense_fp32']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
