"""2-process CPU DDP (gloo) fit with LatencyCallback and RunSummary; launched by tests/test_latency.py.

Usage: python tests/_latency_ddp_worker.py OUT.json. Lightning's DDP launcher re-runs this script for rank 1.
Every rank writes what its callback measured to OUT.json.rank<r>.
"""

import json
import sys

from lit_factor.callbacks import LatencyCallback, RunSummary
from lit_factor.train.module import FactorizedClassifier
from tests.conftest import quiet_trainer, synthetic_loader


def main(out: str) -> None:
    module = FactorizedClassifier("random:tiny-bert", task="sst2",
                                  factorization={"method": "lowrank", "budget": 0.5})
    callback = LatencyCallback(batch_sizes=[2], seq_lens=[8], repeats=2, warmup=1)
    # RunSummary rides along: under DDP it must print once (rank 0) and take the latency row from rank 0
    trainer = quiet_trainer(devices=2, strategy="ddp", max_steps=2, callbacks=[callback, RunSummary()])
    trainer.fit(module, synthetic_loader(16))
    with open(f"{out}.rank{trainer.global_rank}", "w") as f:
        json.dump({"world_size": trainer.world_size, "rows": [r.to_dict() for r in callback.rows]}, f)


if __name__ == "__main__":
    main(sys.argv[1])
