"""Distillation: the mixed loss, the frozen teacher, teachers and students from checkpoints."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from lit_factor.compress.distillation import Distillation, DistillationError, Teacher, distillation_loss
from lit_factor.train.teachers import load_teacher


def _out(logits, hidden=None, loss=None):
    return SimpleNamespace(logits=logits, hidden_states=hidden, loss=loss)


def test_loss_is_zero_when_student_equals_teacher():
    g = torch.Generator().manual_seed(0)
    logits, hidden = torch.randn(4, 3, generator=g), tuple(torch.randn(4, 5, 8, generator=g) for _ in range(3))
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[0, 2:] = 0
    settings = Distillation(teacher="self", temperature=3.0, alpha=1.0, hidden_weight=0.5)
    loss, parts = distillation_loss(settings, _out(logits.clone(), hidden), _out(logits, hidden), mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert set(parts) == {"soft", "hidden"}
    # ... and positive, with a gradient for the student only, when they differ
    student = logits.clone().requires_grad_()
    teacher = (logits + torch.randn(4, 3, generator=g)).requires_grad_()
    loss, _ = distillation_loss(settings, _out(student, hidden), _out(teacher, hidden), mask)
    loss.backward()
    assert loss.item() > 0 and student.grad.abs().sum() > 0 and teacher.grad is None


def test_mix_with_task_loss_and_regression():
    logits = torch.randn(4, 2)
    task = torch.tensor(0.7)
    loss, parts = distillation_loss(Distillation("self", alpha=0.25), _out(logits, loss=task), _out(logits))
    assert loss.item() == pytest.approx(0.75 * 0.7, rel=1e-6) and "task" in parts
    reg = distillation_loss(Distillation("self", alpha=1.0), _out(torch.ones(4, 1)), _out(torch.zeros(4, 1)))[0]
    assert reg.item() == pytest.approx(1.0)


def test_padding_is_ignored_in_hidden_matching():
    s, t = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    t[1, 2] = 100.0  # differs only on a padded token
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, parts = distillation_loss(Distillation("self", alpha=1.0, hidden_weight=1.0), _out(torch.zeros(2, 2), (s,)),
                                    _out(torch.zeros(2, 2), (t,)), mask)
    assert parts["hidden"].item() == 0.0


def test_teacher_is_frozen_and_registers_nothing():
    holder = nn.Module()
    holder.student = nn.Linear(3, 3)
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    holder.teacher = Teacher(net)
    assert [n for n, _ in holder.named_parameters()] == ["student.weight", "student.bias"]
    assert all(not k.startswith("teacher") for k in holder.state_dict())
    net.train()
    x = torch.randn(8, 3, requires_grad=True)
    y1, y2 = holder.teacher(input=x), holder.teacher(input=x)
    assert torch.equal(y1, y2) and not y1.requires_grad  # eval mode (no dropout) and no graph


def test_bad_settings():
    for kwargs, match in [({"temperature": 0}, "temperature=0"), ({"alpha": 1.5}, "alpha=1.5"),
                          ({"hidden_weight": -1}, "hidden_weight=-1"), ({"teacher": " "}, "teacher is empty")]:
        with pytest.raises(DistillationError, match=match):
            Distillation(**kwargs)
    assert not Distillation().enabled
    with pytest.raises(DistillationError, match="nowhere"):
        load_teacher("/nowhere/model", num_labels=2)
    with pytest.raises(DistillationError, match="distillation.teacher: ckpt_path '/nowhere/model.ckpt': no such file"):
        load_teacher("/nowhere/model.ckpt", num_labels=2)


# --- in a fit ------------------------------------------------------------------------------------------------
class _TeacherProbe(L.Callback):
    """Copies the teacher's and the student's weights when training starts."""

    def on_train_start(self, trainer, pl_module):
        self.teacher = {n: p.detach().clone() for n, p in pl_module._teacher.model.named_parameters()}
        self.student = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def _fit_module(steps=2, callbacks=(), **kwargs):
    from conftest import quiet_trainer
    from test_compress import _datamodule

    from lit_factor.train.module import FactorizedClassifier

    module = FactorizedClassifier("random:tiny-bert", learning_rate=1e-2, **kwargs)
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=list(callbacks))
    trainer.fit(module, datamodule=_datamodule())
    return module, trainer


def test_teacher_is_frozen_outside_the_optimizer_and_checkpoint(tmp_path):
    from lit_factor.train.module import Factorization

    probe = _TeacherProbe()
    module, trainer = _fit_module(factorization=Factorization(method="lowrank", budget=0.5), callbacks=[probe],
                                  distillation=Distillation("self", temperature=2.0, alpha=0.7, hidden_weight=0.1))
    teacher = module._teacher
    assert all(torch.equal(p, probe.teacher[n]) for n, p in teacher.model.named_parameters())
    assert any(not torch.equal(p, probe.student[n]) for n, p in module.model.named_parameters())  # student trained
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert all(not p.requires_grad for p in teacher.parameters())
    path = tmp_path / "s.ckpt"
    trainer.save_checkpoint(path)
    keys = torch.load(path, map_location="cpu", weights_only=False)["state_dict"].keys()
    assert set(keys) == set(module.state_dict()) and not any("teacher" in k for k in keys)


def test_compress_after_fine_tuning(tmp_path):
    from lit_factor.train.module import Factorization

    dense, trainer = _fit_module(steps=3)
    path = tmp_path / "dense.ckpt"
    trainer.save_checkpoint(path)
    module, student_trainer = _fit_module(steps=1, init_checkpoint=str(path), distillation=Distillation("self"),
                                          factorization=Factorization(method="lowrank", budget=0.5, init="whitened",
                                                                      calibration_samples=8))
    # the teacher is the fine-tuned dense model, not the pretrained one
    teacher = dict(module._teacher.model.named_parameters())
    for name, p in dense.model.named_parameters():
        torch.testing.assert_close(teacher[name], p.detach())
    factorized = tmp_path / "factorized.ckpt"
    student_trainer.save_checkpoint(factorized)
    with pytest.raises(DistillationError, match="is factorized"):
        _fit_module(init_checkpoint=str(factorized))


class _StageProbe(L.Callback):
    """Before the StagingCallback (listed first): at every step, whether a teacher exists and, at ``at``, the dense
    model as it is right before that step's stage."""

    def __init__(self, at: int) -> None:
        self.at, self.had_teacher, self.before_stage, self.loaded = at, {}, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from lit_factor.compress.switchable import dense_copy

        self.had_teacher[trainer.global_step] = pl_module._teacher is not None
        if trainer.global_step == 0:
            self.loaded = {k: v.clone() for k, v in dense_copy(pl_module.model).state_dict().items()}
        if trainer.global_step == self.at:
            self.before_stage = {k: v.clone() for k, v in dense_copy(pl_module.model).state_dict().items()}


def test_staged_self_teacher_is_the_dense_model_fine_tuned_until_the_first_stage_and_resumes(tmp_path):
    from lit_factor.callbacks import StagingCallback
    from lit_factor.train.module import TEACHER_KEY, Factorization

    def staged_fit(steps, probe=None, ckpt_path=None):
        from conftest import quiet_trainer
        from test_compress import _datamodule

        from lit_factor.train.module import FactorizedClassifier

        module = FactorizedClassifier("random:tiny-bert", learning_rate=1e-2, distillation=Distillation("self"),
                                      factorization=Factorization(method="lowrank", budget=0.5))
        staging = StagingCallback(granularity="block", every_n_steps=1, offset=2)  # 2 dense steps, then stages
        trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=[c for c in (probe, staging) if c])
        trainer.fit(module, datamodule=_datamodule(), ckpt_path=ckpt_path)
        return module, trainer

    probe = _StageProbe(at=2)
    module, trainer = staged_fit(4, probe)
    assert probe.had_teacher == {0: False, 1: False, 2: False, 3: True}  # no teacher while the model is dense
    teacher = module._teacher.model.state_dict()
    assert teacher.keys() == probe.before_stage.keys()  # plain nn.Linear layers, no switchable ones
    assert all(torch.equal(teacher[k], v) for k, v in probe.before_stage.items())  # frozen at the first stage
    assert any(not torch.equal(teacher[k], v) for k, v in probe.loaded.items())  # fine-tuned, not as loaded
    path = tmp_path / "staged.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert all(torch.equal(saved[TEACHER_KEY][k], v) for k, v in teacher.items())
    resumed, _ = staged_fit(5, ckpt_path=str(path))  # the teacher comes back from the checkpoint, not from step 2
    assert all(torch.equal(resumed._teacher.model.state_dict()[k].cpu(), v) for k, v in teacher.items())

