"""Where a distillation teacher and the dense starting weights come from (the files a run points at).

* :func:`load_teacher`: ``model.distillation.teacher`` -- ``self`` (the dense model as loaded), a ``.ckpt`` of this
  project (its plan rebuilt), or a Hugging Face hub name / local directory / ``minilm``;
* :func:`load_dense_weights`: ``model.init_checkpoint`` -- a *dense* checkpoint of this project to start from
  (compress after fine-tuning).

The loss and the frozen :class:`~lit_factor.compress.distillation.Teacher` wrapper are compression concerns and
live in :mod:`lit_factor.compress.distillation`; reading checkpoints needs the LightningModule, so this is train's.
"""

from __future__ import annotations

import copy
from functools import partial

from torch import nn

from lit_factor.compress.distillation import SELF, DistillationError, Teacher
from lit_factor.compress.surgery import Plan, apply_plan
from lit_factor.compress.switchable import make_switchable
from lit_factor.models import load_model
from lit_factor.train.checkpoints import CheckpointError, read_checkpoint
from lit_factor.train.data import get_task


def _read(path: str, setting: str) -> dict:
    """The checkpoint, or one line naming the setting and what is wrong with the file."""
    try:
        return read_checkpoint(path)
    except CheckpointError as err:
        raise DistillationError(f"{setting}: {err}") from None


def checkpoint_model(path: str) -> nn.Module:
    """The Hugging Face model inside a checkpoint of this project: the model its hyperparameters name, its plan's
    architecture rebuilt (switchable layers for a staged run), then its weights."""
    ckpt = _read(path, "distillation.teacher")
    hparams = ckpt.get("hyper_parameters") or {}
    model = load_model(hparams.get("model_name_or_path", "minilm"), num_labels=get_task(hparams["task"]).num_labels)
    plan = hparams.get("plan")
    if plan:
        staged = bool((ckpt.get("factorization") or {}).get("staged", False))
        (make_switchable if staged else partial(apply_plan, project=False))(model, Plan.from_dict(plan))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model


def load_teacher(spec: str, *, num_labels: int, as_loaded: nn.Module | None = None) -> Teacher:
    """The teacher named by ``spec`` (see the module docstring); ``as_loaded`` is the dense model for ``self``."""
    if spec == SELF:
        if as_loaded is None:
            raise DistillationError("distillation.teacher=self needs the dense model as loaded")
        return Teacher(copy.deepcopy(as_loaded))
    if spec.endswith(".ckpt"):
        model = checkpoint_model(spec)
    else:
        try:
            model = load_model(spec, num_labels=num_labels)
        except (OSError, ValueError) as err:  # missing local dir / unknown hub name (HFValidationError)
            raise DistillationError(f"distillation.teacher={spec!r} is not self, a .ckpt file, nor a loadable model "
                                    f"({str(err).splitlines()[0]})") from None
    got = model.config.num_labels
    if got != num_labels:
        raise DistillationError(f"distillation.teacher={spec!r} has {got} outputs; the task needs {num_labels}")
    return Teacher(model)


def load_dense_weights(model: nn.Module, path: str) -> None:
    """Load a *dense* checkpoint of this project into ``model`` (``model.init_checkpoint``): the starting point of
    compress-after-fine-tuning. A factorized checkpoint is refused: its weights have other shapes."""
    ckpt = _read(path, "model.init_checkpoint")
    info = ckpt.get("factorization") or {}
    plan = info.get("plan") if isinstance(info, dict) else None
    if plan or (ckpt.get("hyper_parameters") or {}).get("plan"):
        raise DistillationError(f"model.init_checkpoint={path!r} is factorized; give a dense (method none) checkpoint")
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise DistillationError(f"model.init_checkpoint={path!r} does not fit model_name_or_path's architecture "
                                f"({str(err).splitlines()[0]})") from None
