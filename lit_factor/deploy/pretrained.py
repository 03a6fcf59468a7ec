"""Factorized models as Hugging Face directories: saved as ``config.json`` (with the plan) + ``model.safetensors``,
loaded back with one call. Nothing is pickled.

    save_factorized(model, plan, "out/")            # what ``python cli.py export --format hf`` writes
    model = lit_factor.load_pretrained("out/")      # config -> model from config -> plan -> factors

The plan rides in the config under the key ``lit_factor`` (``{"plan": ..., "format": 2, "model_type": "bert"}``):
the model class is built from the config (random weights, no download), the plan replaces the planned ``nn.Linear``
layers by empty factorized shells (``apply_plan(project=False)``), and the safetensors file fills every parameter,
strictly. A directory without that key is a plain Hugging Face model and loads as one.

A directory with factorized layers says ``"model_type": "lit_factor ..."`` (:data:`MODEL_TYPE`; the real one is
under ``lit_factor.model_type``): plain ``transformers`` (``AutoModelForSequenceClassification.from_pretrained``)
then refuses it with an error that names :data:`MODEL_TYPE`, instead of "loading" it into the dense architecture
with a table of missing and unexpected weights and a random encoder underneath. A README.md beside it says how
to load it. Format 1 directories (the real model type at the top) still load here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from lit_factor.compress.surgery import Plan, apply_plan
from lit_factor.errors import UserError

CONFIG_KEY = "lit_factor"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 2
#: formats this version reads (1: the real model_type at the top of config.json)
READABLE_FORMATS = (1, 2)
#: the model_type of a factorized directory: what plain transformers' refusal quotes
MODEL_TYPE = "lit_factor (factorized layers: load with lit_factor.load_pretrained(DIR))"
README = """# A factorized model written by lit-factor

Some linear layers of this {architecture} are factorized ({method}); `config.json` holds the plan under `lit_factor`.
Plain `transformers` cannot build these layers, so `model_type` says so and `from_pretrained` refuses the directory.

    import lit_factor
    model = lit_factor.load_pretrained("{directory}")   # eval mode; tokenizer: transformers.AutoTokenizer

For a plain Hugging Face model (dense size and speed) export with `--format dense`.
"""


def save_factorized(model: nn.Module, plan: Plan | None, directory: str | os.PathLike, **info) -> Path:
    """Write ``model`` (a Hugging Face model whose planned layers are factorized) to ``directory``: its config
    with ``plan`` (and ``info``) under ``lit_factor``, and its tensors as safetensors. With a plan the config's
    ``model_type`` is :data:`MODEL_TYPE` (plain transformers refuses it) and a README.md says how to load it."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    setattr(config, CONFIG_KEY, {"format": FORMAT_VERSION, "plan": plan.to_dict() if plan else None,
                                 "model_type": config.model_type, **info})
    try:
        config.save_pretrained(directory)
    finally:
        delattr(config, CONFIG_KEY)  # the caller's model keeps its config as it was
    if plan is not None:
        path = directory / "config.json"
        data = json.loads(path.read_text())
        data["model_type"] = MODEL_TYPE
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        (directory / "README.md").write_text(README.format(
            architecture=(data.get("architectures") or [type(model).__name__])[0], method=plan.method,
            directory=directory.name))
    save_model(model, str(directory / WEIGHTS), metadata={"format": "pt"})  # shared tensors stored once
    return directory


def load_pretrained(directory: str | os.PathLike, **config_overrides) -> nn.Module:
    """The model saved in ``directory`` by ``export --format hf`` (or any Hugging Face sequence classifier
    directory), in eval mode, with its factorized layers rebuilt from the plan in its config."""
    from safetensors.torch import load_model
    from transformers import CONFIG_MAPPING, AutoModelForSequenceClassification

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"{str(directory)!r} holds no config.json: not a model directory")
    data = json.loads((directory / "config.json").read_text())
    info = data.get(CONFIG_KEY)
    if not info:
        return AutoModelForSequenceClassification.from_pretrained(directory, **config_overrides).eval()
    if info.get("format") not in READABLE_FORMATS:
        raise UserError(f"{str(directory)!r} was written by an unknown lit-factor format {info.get('format')!r} "
                        f"(this version reads {', '.join(map(str, READABLE_FORMATS))})")
    data["model_type"] = info.get("model_type", data["model_type"])  # format 2 keeps the real one here
    if data["model_type"] not in CONFIG_MAPPING:
        raise UserError(f"{str(directory)!r}: model type {data['model_type']!r} is unknown to this transformers")
    config = CONFIG_MAPPING[data["model_type"]].from_dict(data, **config_overrides)
    model = AutoModelForSequenceClassification.from_config(config)
    if info.get("plan"):
        apply_plan(model, Plan.from_dict(info["plan"]), project=False)
    if not (directory / WEIGHTS).is_file():
        raise UserError(f"{str(directory)!r} holds no {WEIGHTS}")
    load_model(model, str(directory / WEIGHTS), strict=True)
    return model.eval()
