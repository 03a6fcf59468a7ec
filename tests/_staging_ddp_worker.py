"""2-process CPU DDP (gloo) staged fit on a tiny random BERT; launched by tests/test_staging_ddp.py.

Usage: python tests/_staging_ddp_worker.py OUT.json. Lightning's DDP launcher re-runs this script for rank 1.
After every stage and every optimizer step, all parameters and buffers are gathered from both ranks and compared
bit for bit; rank 0 writes the records to OUT.json.
"""

import json
import sys

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from lit_factor.callbacks import StabilityMonitor, StagingCallback
from lit_factor.compress.switchable import find_switchable
from lit_factor.train.module import Factorization, FactorizedClassifier
from tests.conftest import quiet_trainer, synthetic_loader


def _factors(switch) -> list[torch.Tensor]:
    return [p for name, p in switch.factorized.named_parameters() if name != "bias"]


class RankCheck(Callback):
    def __init__(self, staging: StagingCallback):
        self.staging, self.records, self.seen_stages, self.frozen = staging, [], 0, {}

    def _identical(self, pl_module) -> bool:
        vec = torch.cat([t.detach().double().flatten() for t in (*pl_module.parameters(), *pl_module.buffers())])
        gathered = [torch.empty_like(vec) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, vec)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # StagingCallback ran its hook first: check right after each stage
        if self.staging.done != self.seen_stages:
            self.seen_stages = self.staging.done
            for path, s in find_switchable(pl_module.factorized_model).items():
                if s.is_switched and path not in self.frozen:
                    self.frozen[path] = (s.dense.weight.detach().clone(),
                                         [p.detach().clone() for p in _factors(s)])
            self.records.append({"when": "stage", "step": trainer.global_step, "stages": self.staging.done,
                                 "identical": self._identical(pl_module)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.records.append({"when": "step", "step": trainer.global_step, "stages": self.staging.done,
                             "identical": self._identical(pl_module)})

    def on_train_end(self, trainer, pl_module):
        switches = find_switchable(pl_module.factorized_model)
        dense_frozen = all(torch.equal(switches[p].dense.weight, w) for p, (w, _) in self.frozen.items())
        # every factor (not the shared bias) trained after its stage
        factors_moved = all(not torch.equal(a, b) for p, (_, f) in self.frozen.items()
                            for a, b in zip(_factors(switches[p]), f, strict=True))
        result = {"records": self.records, "world_size": dist.get_world_size(), "dense_frozen": dense_frozen,
                  "factors_moved": factors_moved, "switched": sum(s.is_switched for s in switches.values()),
                  "layers": len(switches), "global_step": trainer.global_step}
        self.result = result


def main(out: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = FactorizedClassifier("random:tiny-bert", task="sst2", learning_rate=1e-3, warmup_ratio=0.0,
                                  factorization=Factorization(method="lowrank", budget=0.5))
    staging = StagingCallback(granularity="matrix", every_n_steps=1, offset=1)
    check, stability = RankCheck(staging), StabilityMonitor(warmup_steps=2)
    trainer = quiet_trainer(devices=2, strategy="ddp_find_unused_parameters_true", max_steps=14,
                            callbacks=[staging, check, stability], limit_val_batches=0)
    trainer.fit(module, synthetic_loader(32))
    if trainer.global_rank == 0:
        check.result["stability"] = stability.summary
        with open(out, "w") as f:
            json.dump(check.result, f)


if __name__ == "__main__":
    main(sys.argv[1])
