"""2-process CPU DDP (gloo) fit with LatencyCallback; launched by tests/test_latency.py.

Usage: python tests/_latency_ddp_worker.py OUT.json. Lightning's DDP launcher re-runs this script for rank 1.
Every rank writes what its callback measured to OUT.json.rank<r>.
"""

import json
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_factor.callbacks import LatencyCallback
from lit_factor.module import FactorizedClassifier


def data(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1000, 1100, (8,), generator=g),
             "attention_mask": torch.ones(8, dtype=torch.long), "labels": torch.tensor(i % 2)} for i in range(n)]


def main(out: str) -> None:
    module = FactorizedClassifier("random:tiny-bert", task="sst2",
                                  factorization={"method": "lowrank", "budget": 0.5})
    callback = LatencyCallback(batch_sizes=[2], seq_lens=[8], repeats=2, warmup=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data(16), batch_size=4))
    with open(f"{out}.rank{trainer.global_rank}", "w") as f:
        json.dump({"world_size": trainer.world_size, "rows": [r.to_dict() for r in callback.rows]}, f)


if __name__ == "__main__":
    main(sys.argv[1])
