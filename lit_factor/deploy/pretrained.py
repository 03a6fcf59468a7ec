"""Factorized models as Hugging Face directories: saved as ``config.json`` (with the plan) + ``model.safetensors``,
loaded back with one call. Nothing is pickled.

    save_factorized(model, plan, "out/")            # what ``python cli.py export --format hf`` writes
    model = lit_factor.load_pretrained("out/")      # AutoConfig -> model from config -> plan -> factors

The plan rides in the config under the key ``lit_factor`` (``{"plan": ..., "format": 1}``): the model class is
built from the config (random weights, no download), the plan replaces the planned ``nn.Linear`` layers by empty
factorized shells (``apply_plan(project=False)``), and the safetensors file fills every parameter, strictly.
A directory without that key is a plain Hugging Face model and loads as one.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from lit_factor.compress.surgery import Plan, apply_plan
from lit_factor.errors import UserError

CONFIG_KEY = "lit_factor"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def save_factorized(model: nn.Module, plan: Plan | None, directory: str | os.PathLike, **info) -> Path:
    """Write ``model`` (a Hugging Face model whose planned layers are factorized) to ``directory``: its config
    with ``plan`` (and ``info``) under ``lit_factor``, and its tensors as safetensors."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    setattr(config, CONFIG_KEY, {"format": FORMAT_VERSION, "plan": plan.to_dict() if plan else None, **info})
    try:
        config.save_pretrained(directory)
    finally:
        delattr(config, CONFIG_KEY)  # the caller's model keeps its config as it was
    save_model(model, str(directory / WEIGHTS), metadata={"format": "pt"})  # shared tensors stored once
    return directory


def load_pretrained(directory: str | os.PathLike, **config_overrides) -> nn.Module:
    """The model saved in ``directory`` by ``export --format hf`` (or any Hugging Face sequence classifier
    directory), in eval mode, with its factorized layers rebuilt from the plan in its config."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"{str(directory)!r} holds no config.json: not a model directory")
    config = AutoConfig.from_pretrained(directory, **config_overrides)
    info = getattr(config, CONFIG_KEY, None)
    if not info:
        return AutoModelForSequenceClassification.from_pretrained(directory, config=config).eval()
    if info.get("format") != FORMAT_VERSION:
        raise UserError(f"{str(directory)!r} was written by an unknown lit-factor format {info.get('format')!r} "
                        f"(this version reads {FORMAT_VERSION})")
    model = AutoModelForSequenceClassification.from_config(config)
    if info.get("plan"):
        apply_plan(model, Plan.from_dict(info["plan"]), project=False)
    if not (directory / WEIGHTS).is_file():
        raise UserError(f"{str(directory)!r} holds no {WEIGHTS}")
    load_model(model, str(directory / WEIGHTS), strict=True)
    return model.eval()
