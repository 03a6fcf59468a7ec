"""Distillation from a dense teacher: recover what projection lost (the last step of compress-after-fine-tuning).

The student (the factorized model) is trained on

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * task_loss
           + hidden_weight * mean over layers of the masked MSE between hidden states

(Hinton et al. 2015; the T^2 keeps the soft-target gradients on the task loss's scale). For regression
(one output) the soft term is the MSE between the two predictions. Hidden-state matching needs the teacher to
have the student's architecture (true for ``self`` and for checkpoints of this project with the same model).

Teachers (``model.distillation.teacher``):

* ``self``: the dense model as it is when factorization begins. All at once: the model as loaded -- with
  ``model.init_checkpoint`` set to a dense fine-tuned checkpoint, the fine-tuned dense model (FWSVD's workflow:
  fine-tune dense, factorize, distil, as two commands). Staged: the model as fine-tuned until the first stage,
  so that one run fine-tunes dense (the StagingCallback's ``offset`` steps), freezes that model as the teacher,
  then factorizes stage by stage against it; before the first stage the loss is the task loss alone. Such a
  teacher is saved in the checkpoint (``distillation_teacher``), since no file holds it;
* a ``.ckpt`` file of this project (dense or factorized: its plan is rebuilt);
* any other string: a Hugging Face hub name or local directory, or ``minilm`` (must have the task's labels).

Loading a teacher (from ``self``, a checkpoint or a model name) is a training concern:
:mod:`lit_factor.train.teachers`. The teacher is held outside the module's submodules: it is not in
``parameters()`` (so not in the optimizer, nor
wrapped by DDP), not in the checkpoint's state_dict, runs in eval mode without gradients, and is moved to the
module's device at the start of fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_factor.errors import UserError

SELF = "self"


class DistillationError(UserError):
    """A distillation setting that cannot work."""


@dataclass
class Distillation:
    """The ``model.distillation`` section of a config.

    Args:
        teacher: ``null`` (no distillation), ``self``, a ``.ckpt`` of this project, or a hub name / local dir.
        temperature: softmax temperature T of the soft targets (> 0).
        alpha: weight of the soft-target term, in [0, 1]; 1 - alpha weighs the task loss.
        hidden_weight: weight of the per-layer hidden-state MSE (0: off).
    """

    teacher: str | None = None
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise DistillationError(f"distillation.temperature={self.temperature} must be > 0")
        if not 0 <= self.alpha <= 1:
            raise DistillationError(f"distillation.alpha={self.alpha} must be in [0, 1]")
        if self.hidden_weight < 0:
            raise DistillationError(f"distillation.hidden_weight={self.hidden_weight} must be >= 0")
        if self.teacher is not None and not str(self.teacher).strip():
            raise DistillationError("distillation.teacher is empty: use null (no distillation), self, a .ckpt path "
                                    "or a model name")

    @property
    def enabled(self) -> bool:
        return self.teacher is not None


def soft_target_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 KL(teacher || student) at temperature T, batch-mean; MSE for one output (regression)."""
    if student.shape[-1] == 1:
        return F.mse_loss(student.float(), teacher.float())
    t = temperature
    return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def hidden_state_loss(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], mask: Tensor | None) -> Tensor:
    """Mean over layers of the MSE between hidden states, over real tokens (``mask``) only."""
    if len(student) != len(teacher):
        raise DistillationError(f"hidden-state matching needs the same number of layers: student {len(student)}, "
                                f"teacher {len(teacher)}")
    losses = []
    for s, t in zip(student, teacher, strict=True):
        if s.shape != t.shape:
            raise DistillationError(f"hidden-state matching needs equal shapes: student {tuple(s.shape)}, teacher "
                                    f"{tuple(t.shape)}")
        sq = (s.float() - t.float()).pow(2).mean(-1)
        losses.append(sq[mask.bool()].mean() if mask is not None and mask.shape == sq.shape else sq.mean())
    return torch.stack(losses).mean()


def distillation_loss(settings: Distillation, student_out, teacher_out, mask: Tensor | None = None
                      ) -> tuple[Tensor, dict[str, Tensor]]:
    """The mixed loss (see the module docstring) and its parts, for logging. Outputs are HF model outputs
    (``.logits``, ``.loss`` when labels were given, ``.hidden_states`` when asked for)."""
    soft = soft_target_loss(student_out.logits, teacher_out.logits.detach(), settings.temperature)
    parts = {"soft": soft}
    loss = settings.alpha * soft
    if settings.alpha < 1:
        parts["task"] = student_out.loss
        loss = loss + (1 - settings.alpha) * student_out.loss
    if settings.hidden_weight > 0:
        teacher_hidden = tuple(h.detach() for h in teacher_out.hidden_states)
        parts["hidden"] = hidden_state_loss(student_out.hidden_states, teacher_hidden, mask)
        loss = loss + settings.hidden_weight * parts["hidden"]
    return loss, parts


class Teacher:
    """A frozen model called without gradients; deliberately not an ``nn.Module`` so that assigning it to a
    LightningModule attribute registers nothing (no optimizer state, no state_dict entries, no DDP wrapping)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    def to(self, device) -> Teacher:
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, **inputs):
        self.model.eval()  # whatever a caller did to it: dropout off
        return self.model(**inputs)

    def parameters(self):
        return self.model.parameters()
