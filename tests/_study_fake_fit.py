"""A stand-in for ``cli.py fit`` in study-runner tests: starts in milliseconds, writes a run directory like a real
fit (config.yaml, summary.json per docs/studies/README.md) and behaves as told by its arguments:

  --fake.exit N       exit with status N (3: a failed run, 2: bad settings, 1: a crash)
  --fake.sleep S      train for S seconds (so that a test can kill a worker mid-trial)
  --fake.checkpoint_step N   first save ``checkpoints/epoch=0-step=N.ckpt`` (a real torch.save checkpoint)
  --ckpt_path FILE    go on from a checkpoint (recorded, as fit would)
  --fake.exit_resumed N   exit with status N when going on from a checkpoint (one that no longer fits the model)
  --model.factorization.method / budget, --data.task, --seed_everything: recorded as a real fit would

Every start appends a line ``method budget seed version ckpt_path|-`` to ``<save_dir>/../invocations.txt`` so a test
can count how often a point ran, and from where.
"""

import json
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    opts: dict[str, str] = {}
    it = iter(argv)
    for word in it:
        if word.startswith("--") and "+=" not in word:
            opts[word[2:]] = next(it)
    save_dir, version = Path(opts["trainer.logger.init_args.save_dir"]), opts["trainer.logger.init_args.version"]
    run_dir = save_dir / version
    run_dir.mkdir(parents=True, exist_ok=True)
    method, budget = opts.get("model.factorization.method", "lowrank"), float(opts.get("model.factorization.budget", 1))
    seed, task = int(opts["seed_everything"]), opts.get("data.task", "sst2")
    with open(save_dir.parent / "invocations.txt", "a") as f:
        f.write(f"{method} {budget} {seed} {version} {opts.get('ckpt_path', '-')}\n")
    if "fake.checkpoint_step" in opts:
        import torch

        step = int(opts["fake.checkpoint_step"])
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        torch.save({"state_dict": {}, "global_step": step}, run_dir / "checkpoints" / f"epoch=0-step={step}.ckpt")
    time.sleep(float(opts.get("fake.sleep", 0)))
    code = int(opts.get("fake.exit_resumed" if "ckpt_path" in opts else "fake.exit", 0))
    if code in (1, 2):
        print("Traceback: something broke" if code == 1 else "error: bad setting")
        return code
    staged = "StagingCallback" in " ".join(argv)
    samples = opts.get("data.max_train_samples")
    config = {"data": {"task": task, "max_train_samples": int(samples) if samples else None},
              "model": {"factorization": {"method": method, "budget": budget}, "learning_rate": 1e-4},
              "trainer": {"callbacks": [{"class_path": "lit_factor.callbacks.StagingCallback",
                                         "init_args": {"spread": 0.5}}] if staged else []}}
    (run_dir / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    kept = 1.0 if method == "none" else budget
    value = round(0.5 + 0.3 * kept + 0.01 * seed, 6)  # a deterministic "dev accuracy"
    summary = {"status": "failed" if code == 3 else "succeeded", "task": task, "monitor": "val/accuracy",
               "best": {"value": value + 0.01, "epoch": 0, "step": 5, "metrics": {"val/accuracy": value + 0.01}},
               "final": {"value": value, "epoch": 1, "step": 10, "metrics": {"val/accuracy": value}},
               "best_checkpoint": None, "train_time_s": 1.5 + seed,
               "params": {"dense_model": 1000, "factorized_model": int(1000 - 500 * (1 - kept)),
                          "targeted_dense": 500, "targeted_factorized": int(500 * kept), "kept_fraction": kept,
                          "model_kept_fraction": (1000 - 500 * (1 - kept)) / 1000},
               "stability": None, "latency": None, "resumed_from": None,
               "projected": {"value": value - 0.2},  # a newer fit's extra number: becomes a CSV column
               "at_start": {"value": value - 0.1}}  # the dev metric before training: its own table column
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
