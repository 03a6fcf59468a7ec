"""``python cli.py export``: ship a trained run as a Hugging Face directory or an ONNX model.

    python cli.py export --run logs/quickstart_minilm_sst2/version_0 --to out/hf --format hf
    python cli.py export --run logs/quickstart_minilm_sst2/version_0 --to out/dense --format dense
    python cli.py export --run logs/quickstart_minilm_sst2/version_0 --to out/onnx --format onnx [--ort-fusions]
    python cli.py export --ckpt_path logs/.../version_0/checkpoints/epoch=1-step=500.ckpt --to out/hf --format hf

``--run`` takes the run's best checkpoint (the one its summary.json names; ``--ckpt_path last`` for the last).

Formats (nothing pickled: JSON and safetensors / ONNX only; the tokenizer's files are saved beside the model):

* ``hf``: ``config.json`` carrying the factorization plan + ``model.safetensors`` holding the factors. Load with
  ``lit_factor.load_pretrained(DIR)``: the small, fast model.
* ``dense``: the factors multiplied back out into a plain Hugging Face model that ``transformers`` alone loads
  (``AutoModelForSequenceClassification.from_pretrained(DIR)``). For compatibility only: it has the dense model's
  size and speed.
* ``onnx``: ``model.onnx`` (inputs ``input_ids``, ``attention_mask`` [, ``token_type_ids``]; output ``logits``;
  dynamic batch and sequence axes) + ``config.json``, with attention fused into one ONNX Runtime op (onnxscript's
  fusions, dense and factorized alike; ``--fusions none`` keeps the plain export). ``--ort-fusions`` adds
  ``model.fused.onnx`` with ONNX Runtime's own transformer optimizer; ``--optimize`` exports after the exact
  inference rewrites of ``lit_factor/deploy/inference.py``; ``--quantize int8`` adds ``model.int8.onnx`` (ONNX
  Runtime dynamic quantization, or static with ``--quantize-mode static --calibration-data GLUE_DIR``: ranges
  calibrated on the checkpoint task's training sentences). Each file is run in ONNX Runtime and checked against
  PyTorch's logits (int8: within ``--int8-tolerance`` and the same predicted labels); the fused ops of each file
  are counted from its graph into ``lit_factor_export.json``.

Every export is checked before it is written (reloaded and compared with the checkpoint's logits on inputs of a
shape the export did not see) and listed in ``lit_factor_export.json``. Every format's ``config.json`` names the
task's labels (``id2label``: negative/positive for SST-2) and the classifier class (``architectures``), and the
tokenizer files carry the length the model was trained with (``model_max_length``). A checkpoint saved between
stages of a staged fit is exported as it is: switched layers factorized, the others dense, and the command says so.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lit_factor.compress.surgery import Plan
from lit_factor.errors import UserError, fail
from lit_factor.train.checkpoints import read_checkpoint, run_checkpoint

FORMATS = ("hf", "dense", "onnx")
MANIFEST = "lit_factor_export.json"
EXIT_CHECK_FAILED = 1


class ExportCheckError(RuntimeError):
    """The exported model does not reproduce the checkpoint's logits (a bug, not a user error: exit 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors as the project's one line, exit 2
        fail(f"export: {message}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cli.py export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", metavar="RUN_DIR", help="a fit's run directory (<save_dir>/<name>/version_<N>): its best "
                   "checkpoint, or --ckpt_path last")
    p.add_argument("--ckpt_path", help="a checkpoint file written by `cli.py fit`; with --run: best or last")
    p.add_argument("--to", required=True, metavar="DIR", help="output directory (must be empty or new)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty DIR (same-named files replaced)")
    p.add_argument("--ort-fusions", action="store_true", help="onnx: also write model.fused.onnx (ORT fusions)")
    p.add_argument("--optimize", action="store_true", help="onnx: export after the exact inference rewrites")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest |logit difference| accepted (1e-4)")
    # issue 24: fused attention and int8 (the onnx format only)
    p.add_argument("--fusions", default="attention", choices=["attention", "none"],
                   help="onnx: fuse attention, LayerNorm and GELU for ONNX Runtime (onnxscript; default) or not")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="onnx: also write model.int8.onnx (ONNX Runtime quantization)")
    p.add_argument("--quantize-mode", default="dynamic", choices=["dynamic", "static"],
                   help="int8: dynamic (no data) or static (activation ranges calibrated on training sentences)")
    p.add_argument("--calibration-data", default=None, metavar="GLUE_DIR",
                   help="static int8: GLUE directory whose training split of the checkpoint's task calibrates")
    p.add_argument("--calibration-samples", type=int, default=256, help="static int8: training sentences (256)")
    # The check batch is random token ids: a fine-tuned model's logits there are small and unsure, and dynamic int8
    # moves them by about half a logit (dense MiniLM fine-tuned on SST-2: 0.45). The check is there for a broken
    # int8 graph; what int8 costs in accuracy is measured on real data: `lit_factor evaluate EXPORT --file
    # model.int8.onnx` (docs/deploy.md).
    p.add_argument("--int8-tolerance", type=float, default=1.0,
                   help="int8: largest |logit difference| from the checkpoint on the random check batch (1.0); "
                        "labels must agree")
    return p


def check_onnx_options(args) -> None:
    """The ONNX-only options make sense with --format onnx only; static int8 needs calibration data."""
    if args.format != "onnx":
        given = [f"--{n}" for n, default in (("quantize", "none"), ("fusions", "attention"))
                 if getattr(args, n) != default]
        if given:
            raise UserError(f"{' and '.join(given)} apply to --format onnx only, got --format {args.format}")
    if args.quantize == "int8" and args.quantize_mode == "static" and not args.calibration_data:
        raise UserError("--quantize-mode static needs --calibration-data GLUE_DIR (the training sentences that "
                        "calibrate the activation ranges); or use --quantize-mode dynamic")
    if args.calibration_samples < 1:
        raise UserError(f"--calibration-samples {args.calibration_samples} must be a positive integer")


@dataclass
class Loaded:
    """A checkpoint's model as it would be deployed now, and what it is."""

    model: nn.Module
    plan: Plan | None  # entries of the layers that are factorized in ``model``
    source: dict
    notes: list[str] = field(default_factory=list)
    max_length: int | None = None  # the training's max_seq_length (the tokenizer's model_max_length)


# --- reading the checkpoint ------------------------------------------------------------------------------------
def load_checkpoint_model(path: str) -> Loaded:
    """The checkpoint's Hugging Face model (eval mode, switchable layers resolved to their live path)."""
    checkpoint = read_checkpoint(path)
    hp = checkpoint.get("hyper_parameters") or {}
    if "factorization" not in checkpoint or not {"model_name_or_path", "task"} <= set(hp):
        raise UserError(f"ckpt_path {path!r} is not a lit-factor checkpoint (no factorization record or no "
                        "model_name_or_path/task hyperparameters); export reads checkpoints written by `cli.py fit`")
    from lit_factor.compress.switchable import finalize
    from lit_factor.models import ModelSourceError, weights_from_checkpoint
    from lit_factor.train.module import FactorizedClassifier

    try:
        with weights_from_checkpoint():  # the checkpoint's weights replace the pretrained ones: no head report
            module = FactorizedClassifier(hp["model_name_or_path"], hp["task"])
    except (ModelSourceError, OSError) as err:
        raise UserError(f"cannot build the checkpoint's model {hp['model_name_or_path']!r}: {err}") from None
    module.adopt_checkpoint_architecture(checkpoint)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"ckpt_path {path!r} does not match the architecture its own plan describes ({first}): "
                        "corrupted, or written by another version") from None
    model, plan = module.factorized_model.eval(), module.plan
    source = {"checkpoint": str(path), "model_name_or_path": hp["model_name_or_path"], "task": hp["task"]}
    describe_model(model, module.task)
    loaded = Loaded(model, plan, source)
    loaded.max_length = (checkpoint.get("datamodule_hyper_parameters") or {}).get("max_seq_length")
    if module.staged:
        live = finalize(model, strict=False)
        kept = [e for e in plan.entries if live.get(e.path) == "factorized"]
        loaded.plan = Plan(plan.method, plan.budget, kept) if kept else None
        source["mid_staging"] = len(kept) < len(plan.entries)
        if source["mid_staging"]:
            loaded.notes.append(f"mid-staging checkpoint: {len(kept)} of {len(plan.entries)} planned layers are "
                                "factorized; the others are exported dense, as they are in the checkpoint")
    source["factorized_layers"] = len(loaded.plan.entries) if loaded.plan else 0
    return loaded


#: what each GLUE task's label ids mean, as the HF hub's ``glue`` dataset names them (the TSVs write 0/1 for the
#: binary tasks); tasks whose TSV labels are names already (MNLI, QNLI, RTE) use those
LABEL_NAMES = {"cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
               "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
               "wnli": ("not_entailment", "entailment")}


def describe_model(model: nn.Module, task) -> None:
    """The exported config names the task's labels (id2label/label2id) and the class it is (``architectures``: a
    pretrained encoder's config says ``BertModel``, which is not what was trained)."""
    config = model.config
    config.architectures = [type(model).__name__]
    if task.labels is not None:
        names = LABEL_NAMES.get(task.name, task.labels)
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}


# --- check inputs ----------------------------------------------------------------------------------------------
def model_inputs(model: nn.Module, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    """Random token ids with a padded row, and every other input the model's forward takes by name."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, seq - seq // 3:] = 0  # padding: the mask must reach the attention in every format
    eos = getattr(model.config, "eos_token_id", None)
    if getattr(model.config, "is_encoder_decoder", False) and isinstance(eos, int):
        ids[:, -1] = eos
        mask[0, -1] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in inspect.signature(model.forward).parameters:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def logits_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits.float()


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: float) -> float:
    diff = (got - want).abs().max().item()
    if not diff <= tolerance:
        raise ExportCheckError(f"{name}: logits differ from the checkpoint's by {diff:.3g} (> {tolerance})")
    return diff


# --- the three formats: each writes into ``out`` and returns {file or check: result} ---------------------------
def save_tokenizer(loaded: Loaded, out: Path) -> None:
    from lit_factor.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(loaded.source["model_name_or_path"])
        for key in ("local_files_only", "is_local"):  # how it was loaded here, not a property of the model
            tokenizer.init_kwargs.pop(key, None)
        if loaded.max_length:
            tokenizer.model_max_length = tokenizer.init_kwargs["model_max_length"] = int(loaded.max_length)
        tokenizer.save_pretrained(out)
    except Exception as err:  # no tokenizer (offline hub name, missing package): the model still ships
        loaded.notes.append(f"no tokenizer files saved ({type(err).__name__}: {' '.join(str(err).split())[:120]})")


def export_hf(loaded: Loaded, out: Path, args) -> dict:
    from lit_factor.deploy.pretrained import load_pretrained, save_factorized

    save_factorized(loaded.model, loaded.plan, out, source=loaded.source)
    inputs = model_inputs(loaded.model, 3, 11, seed=1)
    diff = check_close("hf", logits_of(load_pretrained(out), inputs), logits_of(loaded.model, inputs), args.tolerance)
    return {"load_with": "lit_factor.load_pretrained(DIR)", "max_abs_logit_diff": diff}


def export_dense(loaded: Loaded, out: Path, args) -> dict:
    from transformers import AutoModelForSequenceClassification

    from lit_factor.compress.switchable import dense_equivalent

    dense_equivalent(loaded.model).save_pretrained(out)  # safetensors; a plain config without the plan
    inputs = model_inputs(loaded.model, 3, 11, seed=1)
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    diff = check_close("dense", logits_of(reloaded, inputs), logits_of(loaded.model, inputs), args.tolerance)
    loaded.notes.append("the dense format multiplies the factors out: the dense model's size and speed (no speed "
                        "gain); export hf or onnx to deploy the factorized model")
    return {"load_with": "transformers.AutoModelForSequenceClassification.from_pretrained(DIR)",
            "max_abs_logit_diff": diff}


def calibration_feeds(loaded: Loaded, data_dir: str, samples: int, input_names: list[str],
                      batch_size: int = 8) -> list[dict]:
    """The first ``samples`` training sentences of the checkpoint's task, tokenized as fit tokenizes them
    (``GLUEDataModule``), padded per batch: the feeds that calibrate static int8 activation ranges."""
    from transformers import DataCollatorWithPadding

    from lit_factor.train.data import GLUEDataModule

    data = GLUEDataModule(loaded.source["task"], data_dir=data_dir, model_name_or_path=loaded.source[
        "model_name_or_path"], max_train_samples=samples)
    rows = data._load_tokenized("train")
    collate = DataCollatorWithPadding(data.tokenizer)
    feeds = []
    for start in range(0, len(rows), batch_size):
        batch = collate([{k: rows[i][k] for k in input_names if k in rows.column_names}
                         for i in range(start, min(start + batch_size, len(rows)))])
        feed = {k: batch[k].numpy() for k in input_names if k in batch}
        if "token_type_ids" in input_names and "token_type_ids" not in feed:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        feeds.append(feed)
    return feeds


def export_onnx_files(loaded: Loaded, out: Path, args) -> dict:
    from lit_factor.deploy import ort
    from lit_factor.deploy.inference import optimize_for_inference

    model = optimize_for_inference(copy.deepcopy(loaded.model)) if args.optimize else loaded.model
    loaded.model.config.save_pretrained(out)  # labels and sizes for the serving side
    export_inputs = model_inputs(loaded.model, 2, 16, seed=0)
    if args.fusions == "attention":
        ort.export_onnx(model, export_inputs, out / "model.unfused.onnx", output_name="logits")
        ort.fuse_attention(out / "model.unfused.onnx", out / "model.onnx")
        (out / "model.unfused.onnx").unlink()
    else:
        ort.export_onnx(model, export_inputs, out / "model.onnx", output_name="logits")
    files = {"model.onnx": out / "model.onnx"}
    if args.ort_fusions:
        files["model.fused.onnx"] = ort.optimize_transformer(out / "model.onnx", out / "model.fused.onnx",
                                                             loaded.model.config)
    inputs = model_inputs(loaded.model, 3, 11, seed=1)  # another shape than the export's: dynamic axes
    want = logits_of(loaded.model, inputs)
    result = {"inputs": list(inputs), "rewrites": getattr(model, "inference_rewrites", None),
              "fusions": {name: ort.graph_fusions(path) for name, path in files.items()}}
    for name, path in files.items():
        got = torch.from_numpy(ort.make_session(path, threads=1).run(None, ort.numpy_inputs(inputs))[0])
        result[f"max_abs_logit_diff[{name}]"] = check_close(name, got, want, args.tolerance)
    if args.quantize == "int8":
        from lit_factor.deploy.quantize import quantize_int8

        feeds = (calibration_feeds(loaded, args.calibration_data, args.calibration_samples, list(inputs))
                 if args.quantize_mode == "static" else None)
        path = quantize_int8(out / "model.onnx", out / "model.int8.onnx", mode=args.quantize_mode, calibration=feeds)
        got = torch.from_numpy(ort.make_session(path, threads=1).run(None, ort.numpy_inputs(inputs))[0])
        result["int8"] = {"mode": args.quantize_mode, "weights": "int8 (QInt8)",
                          "calibration_samples": args.calibration_samples if feeds else None,
                          "fused_ops": ort.graph_fusions(path)}
        result["max_abs_logit_diff[model.int8.onnx]"] = check_close("model.int8.onnx", got, want,
                                                                    args.int8_tolerance)
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item() if want.shape[-1] > 1 else 1.0
        result["int8"]["label_agreement"] = agree
        if agree < 1.0:
            raise ExportCheckError(f"model.int8.onnx: predicted labels differ from the checkpoint's on "
                                   f"{1 - agree:.0%} of the check batch")
    return result


EXPORTERS = {"hf": export_hf, "dense": export_dense, "onnx": export_onnx_files}


# --- the command -----------------------------------------------------------------------------------------------
def check_target(to: str, overwrite: bool) -> Path:
    target = Path(to)
    if target.exists() and not target.is_dir():
        raise UserError(f"--to {to!r} is a file; give a directory (new or empty)")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"--to {to!r} exists and is not empty; give a new directory or pass --overwrite")
    return target


def checkpoint_path(args) -> str:
    """``--ckpt_path FILE``, or the ``best``/``last`` checkpoint of ``--run RUN_DIR``."""
    if args.run is None:
        if args.ckpt_path is None:
            raise UserError("export needs --run RUN_DIR (its best checkpoint) or --ckpt_path FILE")
        if args.ckpt_path in ("best", "last"):
            raise UserError(f"--ckpt_path {args.ckpt_path} needs the run it belongs to: add --run "
                            "<save_dir>/<name>/version_<N>")
        return args.ckpt_path
    if args.ckpt_path not in (None, "best", "last"):
        return args.ckpt_path
    return str(run_checkpoint(args.run, args.ckpt_path or "best"))


def export(args) -> tuple[Loaded, dict, list[str]]:
    """Export into a scratch directory beside the target, check, then move the files in: a failed export leaves
    the target as it was."""
    target = check_target(args.to, args.overwrite)
    check_onnx_options(args)
    loaded = load_checkpoint_model(checkpoint_path(args))
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        result = EXPORTERS[args.format](loaded, scratch, args)
        save_tokenizer(loaded, scratch)
        manifest = {"format": args.format, **loaded.source, "plan_method": loaded.plan.method if loaded.plan else
                    None, "check": result, "notes": loaded.notes}
        (scratch / MANIFEST).write_text(json.dumps(manifest, indent=1))
        target.mkdir(exist_ok=True)
        files = sorted(p.name for p in scratch.iterdir())
        for name in files:
            dest = target / name
            if dest.is_dir():
                shutil.rmtree(dest)
            (scratch / name).replace(dest)
        return loaded, result, files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _not_about_torchvision(record: logging.LogRecord) -> bool:
    return "torchvision is not installed" not in record.getMessage()


def quiet_onnx_registry() -> None:
    """torch.onnx's exporter warns once per torchvision operator it cannot register ("torchvision is not
    installed. Skipping ...", four lines): text models use none of them. Idempotent."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    if _not_about_torchvision not in registry.filters:
        registry.addFilter(_not_about_torchvision)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # saving / reloading a small model: no progress bars on stderr
    quiet_onnx_registry()
    try:
        loaded, result, files = export(args)
    except UserError as err:
        fail(err)
    except ExportCheckError as err:
        print(f"error: export check failed, nothing written: {err}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    print(f"exported {args.format} to {args.to}: {', '.join(files)}")
    diffs = {k: v for k, v in result.items() if k.startswith("max_abs_logit_diff")}
    print("checked against the checkpoint's logits: " + ", ".join(f"{k} = {v:.2e}" for k, v in diffs.items()))
    for name, ops in (result.get("fusions") or {}).items():
        print(f"fused ops in {name} (counted from the graph): " + (", ".join(f"{op} x{n}" for op, n in ops.items())
                                                                 or "none"))
    if "int8" in result:
        print(f"model.int8.onnx: {result['int8']['mode']} int8, predicted labels agree with the checkpoint's on "
              f"{result['int8']['label_agreement']:.0%} of the check batch")
    for note in loaded.notes:
        print(f"note: {note}")
    return 0
