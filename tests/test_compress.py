"""Data-aware compression inside a fit: calibration, global allocation, per-stage calibration, distillation."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import quiet_trainer, synthetic_rows

from lit_factor.callbacks import StagingCallback
from lit_factor.errors import UserError
from lit_factor.train.module import Factorization, FactorizedClassifier


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _datamodule(n: int = 16):
    return L.LightningDataModule.from_datasets(train_dataset=_Rows(synthetic_rows(n)),
                                               val_dataset=_Rows(synthetic_rows(8, seed=1)), batch_size=4)


def _module(**factorization):
    f = {"method": "lowrank", "budget": 0.5, "calibration_samples": 8, **factorization}
    return FactorizedClassifier("random:tiny-bert", factorization=Factorization(**f), learning_rate=1e-3)


def _fit(module, steps=2, callbacks=(), **kwargs):
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=list(callbacks), **kwargs)
    trainer.fit(module, datamodule=_datamodule())
    return trainer


def test_allocation_plans_per_layer_ranks_and_checkpoints_round_trip(tmp_path):
    module = _module(init="whitened", allocation="energy", rank_multiple=2)
    uniform = module.plan.to_dict()
    trainer = _fit(module)
    plan = module.plan
    ranks = [e.structure["rank"] for e in plan.entries]
    assert all(r % 2 == 0 for r in ranks) and plan.to_dict() != uniform
    dense = sum(e.out_features * e.in_features for e in plan.entries)
    weights = sum(e.structure["rank"] * (e.out_features + e.in_features) for e in plan.entries)
    assert weights <= 0.5 * dense < weights + 2 * max(e.out_features + e.in_features for e in plan.entries)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = FactorizedClassifier.load_from_checkpoint(path, map_location="cpu")
    assert loaded.plan.to_dict() == plan.to_dict()
    batch = {k: torch.stack([r[k] for r in synthetic_rows(3)]) for k in ("input_ids", "attention_mask")}
    module.eval(), loaded.eval()
    torch.testing.assert_close(loaded(batch).logits, module(batch).logits)
    # Trainer with ckpt_path: this run allocates from other weights (a fresh random model); the checkpoint's
    # per-layer ranks and weights rule
    other = FactorizedClassifier("random:tiny-bert", factorization=Factorization(
        method="lowrank", budget=0.5, calibration_samples=4, init="whitened", allocation="energy", rank_multiple=2))
    quiet_trainer().validate(other, datamodule=_datamodule(), ckpt_path=path, verbose=False)
    assert other.plan.to_dict() == plan.to_dict()
    other.eval()
    torch.testing.assert_close(other(batch).logits, module(batch).logits)


@pytest.mark.parametrize("init, allocation", [("fisher", "uniform"), ("svd", "fisher"), ("whitened", "uniform")])
def test_data_aware_projection_runs_in_fit(init, allocation):
    module = _module(init=init, allocation=allocation)
    _fit(module, steps=1)
    assert module.plan.entries[0].init == init
    assert len(module.rel_errors) == len(module.plan.entries)


def test_each_stage_calibrates_the_model_as_it_is(monkeypatch):
    from lit_factor.compress.factorizer import Factorizer

    seen = []
    real = Factorizer.statistics

    def spy(self, paths, *args, **kw):
        seen.append((list(paths), self.model.bert.embeddings.word_embeddings.weight.sum().item()))
        return real(self, paths, *args, **kw)
    monkeypatch.setattr(Factorizer, "statistics", spy)
    module = _module(init="whitened")
    _fit(module, steps=4, callbacks=[StagingCallback(granularity="block", every_n_steps=1, offset=1)])
    assert [len(p) for p, _ in seen] == [6, 6]  # one calibration per stage, of that stage's layers
    assert seen[0][1] != seen[1][1]  # the second stage saw a model trained further


def test_without_a_datamodule_the_error_says_why():
    module = _module(init="whitened")
    with pytest.raises(UserError, match="calibrates on training data"):
        module.configure_model()
