"""StagingCallback on a tiny random BERT (CPU, a few seconds per fit); StabilityMonitor: tests/test_stability.py."""

import types
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.nn.parallel import DistributedDataParallel

from lit_factor.compress.surgery import apply_plan
from lit_factor.compress.switchable import SwitchableLinear, finalize, find_switchable
from lit_factor.errors import UserError
from lit_factor.models import load_model
from lit_factor.train.callbacks.staging import StagingCallback, StagingError, block_of, plan_stages
from lit_factor.train.module import Factorization, FactorizedClassifier
from tests.conftest import quiet_trainer, synthetic_loader

BATCH = 4




def _module(method: str = "lowrank", lr: float = 1e-3, **kw) -> FactorizedClassifier:
    torch.manual_seed(0)
    module = FactorizedClassifier("random:tiny-bert", task="sst2", learning_rate=lr, warmup_ratio=0.0,
                                  factorization=Factorization(method=method, budget=0.5), **kw)
    for m in module.modules():  # deterministic: dropout draws from an RNG a resumed run does not restore
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return module


def _trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    return quiet_trainer(callbacks=callbacks, **{"deterministic": True, "limit_val_batches": 0,
                                                 "default_root_dir": tmp_path, **kw})


class Probe(Callback):
    """After every optimizer step: live parameters moved, replaced/not-yet-live ones did not, optimizer clean."""

    def __init__(self):
        self.checked_steps = 0
        self.after_stage = 0  # steps checked with at least one layer switched

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # Runs after StagingCallback's hook (callbacks run in list order): any due stage has happened.
        self.before = {id(p): p.detach().clone() for p in pl_module.parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        in_optim = [p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]
        assert {id(p) for p in in_optim} == {id(p) for p in pl_module.parameters()}  # no stale, none missing
        state = trainer.optimizers[0].state
        for path, s in find_switchable(pl_module.model).items():
            live = {id(p) for p in s.live_parameters()}
            for name, p in s.named_parameters():
                moved = not torch.equal(p, self.before[id(p)])
                assert moved == (id(p) in live), f"{path}.{name}: moved={moved}, switched={s.is_switched}"
                if id(p) not in live:
                    assert p.grad is None and p not in state, f"{path}.{name} has a gradient or optimizer state"
        self.checked_steps += 1
        self.after_stage += any(s.is_switched for s in find_switchable(pl_module.model).values())


@pytest.mark.parametrize("method", ["lowrank", "monarch", "blockwise"])
def test_staged_fit_trains_exactly_the_live_parameters(tmp_path, method):
    module, staging, probe = _module(method), StagingCallback(granularity="block", every_n_steps=2, offset=1), Probe()
    logger = CSVLogger(tmp_path)
    trainer = _trainer(tmp_path, [staging, probe], max_steps=6, logger=logger, log_every_n_steps=1)
    trainer.fit(module, synthetic_loader(24))
    assert all(isinstance(module.model.get_submodule(p), SwitchableLinear) for p in module.plan.paths)
    assert staging.done == 2 and [h["step"] for h in staging.history] == [0, 1, 3]
    assert staging.stages == [[p for p in module.plan.paths if f"layer.{i}." in p] for i in (0, 1)]
    assert probe.checked_steps == 6 and probe.after_stage == 5
    assert all(h["rel_error"] > 0 for h in staging.history[1:])
    assert staging.history[-1]["params"] == module.factorized_params
    # the history holds each layer's error (the BoardCallback draws it); no scalar charts of a point per stage
    assert [sorted(h["rel_errors"]) for h in staging.history[1:]] == [sorted(s) for s in staging.stages]
    assert all(h["loss"] for h in staging.history[1:])
    import csv
    rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    assert rows and not any(key.startswith("staging/") for r in rows for key in r if r[key])
    # the final model is what the plan says
    finalize(module.model)
    shells = load_model("random:tiny-bert", num_labels=2)
    apply_plan(shells, module.plan, project=False)
    assert {k: v.shape for k, v in module.model.state_dict().items()} == {
        k: v.shape for k, v in shells.state_dict().items()}
    assert sum(p.numel() for p in module.model.parameters()) == module.factorized_params


def test_matrix_granularity_top_down_spread(tmp_path):
    module, staging = _module(), StagingCallback(granularity="matrix", order="top_down", spread=0.5)
    trainer = _trainer(tmp_path, [staging], max_steps=24)
    trainer.fit(module, synthetic_loader(24))  # 6 steps per epoch, 4 epochs
    paths = module.plan.paths
    assert staging.stages == [[p] for p in reversed(paths)]
    assert staging.stage_steps == list(range(1, 13))  # 12 matrices spread over the first half
    assert staging.done == 12 and all(s.is_switched for s in find_switchable(module.model).values())


def test_epoch_schedule_and_explicit_order(tmp_path):
    order = [r"layer\.1\.", r"layer\.0\.attention", r"layer\.0\.(intermediate|output)"]
    module, staging = _module(), StagingCallback(order=order, every_n_epochs=1, offset=1)
    trainer = _trainer(tmp_path, [staging], max_epochs=3)
    trainer.fit(module, synthetic_loader(8))  # 2 steps per epoch
    assert [len(s) for s in staging.stages] == [6, 4, 2]
    assert [h["epoch"] for h in staging.history] == [0, 1, 2]
    assert staging.done == 2  # the third stage would be due at epoch 3
    switched = {p for p, s in find_switchable(module.model).items() if s.is_switched}
    assert switched == set(staging.stages[0] + staging.stages[1])


def test_plan_stages_and_settings_are_validated():
    paths = [f"bert.encoder.layer.{i}.{n}" for i in range(2) for n in ("a", "b")]
    assert block_of(paths[2]) == "bert.encoder.layer.1" and block_of("pooler.dense") == "pooler.dense"
    assert plan_stages(paths, "block", "top_down") == [paths[2:], paths[:2]]
    with pytest.raises(ValueError, match="leaves 2 planned layers out"):
        plan_stages(paths, order=[r"layer\.0\."])
    with pytest.raises(ValueError, match="matches both"):
        plan_stages(paths, order=[r"layer\.0\.", r"\.a$", r"layer\.1"])
    with pytest.raises(ValueError, match="matches no planned layer"):
        plan_stages(paths, order=[r"layer\.7"])
    with pytest.raises(ValueError, match="one schedule"):
        StagingCallback(every_n_steps=2, spread=0.5)
    with pytest.raises(ValueError, match="granularity='layer'"):
        StagingCallback(granularity="layer")
    with pytest.raises(ValueError, match="spread=1.5"):
        StagingCallback(spread=1.5)
    with pytest.raises(StagingError, match="order=\\[\\] is empty"):
        StagingCallback(order=[])
    with pytest.raises(StagingError, match="not a valid regular expression"):
        StagingCallback(order=["layer.(0"])  # refused when the callback is built, not at the first fit
    # plain DDP would crash in the reducer on the unused parameters: refuse it before the first step, in one line,
    # reading the public attributes of torch's DDP wrapper (no Lightning private)
    module = _module()
    StagingCallback().setup(types.SimpleNamespace(strategy=DDPStrategy()), module, "fit")
    assert module.staged is True  # asked through the module interface, before configure_model
    for unused, static, refused in ((False, False, True), (True, True, True), (True, False, False)):
        wrapper = DistributedDataParallel.__new__(DistributedDataParallel)  # no process group needed to read flags
        wrapper.find_unused_parameters, wrapper.static_graph = unused, static
        trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(model=wrapper))
        check = partial(StagingCallback._check_ddp, trainer)
        if refused:
            with pytest.raises(MisconfigurationException, match="ddp_find_unused_parameters_true"):
                check()
        else:
            check()
    with pytest.raises(AttributeError):
        module.staged = False  # read-only: only enable_staging() changes it


def test_staging_cannot_be_enabled_after_the_plan_was_applied():
    module = _module()
    module.configure_model()
    with pytest.raises(UserError, match="staging was asked for after the model was factorized"):
        StagingCallback().setup(types.SimpleNamespace(strategy=None), module, "fit")


class Killed(Exception):
    pass


class KillAt(Callback):
    """Crash the run (as a kill would: nothing saved on the way out) once ``step`` optimizer steps are done."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed


def _resume_run(tmp_path, name, extra=(), ckpt_path=None):
    """10 steps (5 epochs of 2), block stages at steps 3 and 6, a checkpoint at the end of every epoch."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / name, every_n_epochs=1, save_top_k=-1, filename="{step}")
    module, staging = _module("lowrank"), StagingCallback(every_n_steps=3, offset=3)
    trainer = _trainer(tmp_path, [staging, ckpt, *extra], max_epochs=5, enable_checkpointing=True)
    trainer.fit(module, synthetic_loader(8), ckpt_path=ckpt_path)
    return module, staging, trainer


def test_resume_is_exact(tmp_path):
    full, full_staging, _ = _resume_run(tmp_path, "full")
    expected = {k: v.clone() for k, v in full.state_dict().items()}
    assert full_staging.done == 2 and [h["step"] for h in full_staging.history] == [0, 3, 6]

    # a real interruption mid-stage (step 5: stage 1 done at 3, stage 2 due at 6); last checkpoint at step 4
    with pytest.raises(Killed):
        _resume_run(tmp_path, "stopped", extra=[KillAt(5)])
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == ["step=2.ckpt", "step=4.ckpt"]
    resumed = {"mid-stage (killed)": tmp_path / "stopped" / "step=4.ckpt"}
    # checkpoints written before the first stage, exactly at a stage boundary (stage 2 due at this very step, not
    # yet applied), and after the last stage
    for label, step in (("before first", 2), ("boundary", 6), ("after last", 8)):
        resumed[label] = tmp_path / "full" / f"step={step}.ckpt"
    for label, path in resumed.items():
        module, staging, _ = _resume_run(tmp_path, "r" + str(len(label)), ckpt_path=path)
        assert staging.done == 2 and [h["step"] for h in staging.history] == [0, 3, 6], label
        got = module.state_dict()
        assert got.keys() == expected.keys()
        bad = [k for k in expected if not torch.equal(got[k], expected[k])]
        assert not bad, f"resumed from {label}: {len(bad)} tensors differ, e.g. {bad[0]}"
