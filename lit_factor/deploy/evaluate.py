"""``python -m lit_factor evaluate EXPORT_DIR``: the accuracy of what is deployed, with the metrics of ``test``.

    python -m lit_factor evaluate out/onnx --data.task sst2 --data.data_dir GLUE_DIR
    python -m lit_factor evaluate out/onnx --file model.int8.onnx --data.data_dir GLUE_DIR --data.max_seq_length 64

Runs an exported directory -- ``hf`` (``lit_factor.load_pretrained``), ``dense`` (``transformers`` alone),
``onnx`` (ONNX Runtime: ``model.onnx``, or ``--file model.int8.onnx``) -- over the task's labelled dev split(s),
tokenized and batched exactly as ``test`` does (``GLUEDataModule``: the checkpoint model's tokenizer, padding per
batch, ``--data.max_seq_length``), and computes the same metrics (``FactorizedClassifier``'s torchmetrics
collections, their names, and the combined score: their mean). An fp32 export of a checkpoint gives the metric
``test`` gives that checkpoint with the same data settings. Prints one line per metric; ``--json FILE`` writes them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lit_factor.errors import UserError, fail

MANIFEST = "lit_factor_export.json"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors as the project's one line, exit 2
        fail(f"evaluate: {message}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m lit_factor evaluate", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="a directory written by `export` (hf, dense or onnx)")
    p.add_argument("--file", default=None, help="onnx: the model file in EXPORT_DIR (default model.onnx)")
    p.add_argument("--data.task", dest="task", default=None, help="GLUE task (default: the export's)")
    p.add_argument("--data.data_dir", dest="data_dir", default=None, help="GLUE TSV root (default $GLUE_DIR)")
    p.add_argument("--data.max_seq_length", dest="max_seq_length", type=int, default=128,
                   help="truncate to this many tokens, as the checkpoint's `test` run did (128)")
    p.add_argument("--data.batch_size", dest="batch_size", type=int, default=32,
                   help="as `test`'s data.batch_size: evaluation batches are twice it (32)")
    p.add_argument("--data.max_eval_samples", dest="max_eval_samples", type=int, default=None,
                   help="only the first N dev examples")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch and ONNX Runtime)")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    return p


def read_export(directory: Path, file: str | None) -> tuple[str, dict, Path | None]:
    """(format, manifest, onnx file or None) of an export directory."""
    if not directory.is_dir():
        raise UserError(f"EXPORT_DIR {str(directory)!r} is not a directory")
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    fmt = manifest.get("format") or ("onnx" if (directory / "model.onnx").is_file() else
                                     "hf" if (directory / "config.json").is_file() else None)
    if fmt is None:
        raise UserError(f"EXPORT_DIR {str(directory)!r} holds no {MANIFEST}, model.onnx or config.json: not an export")
    if file is not None and fmt != "onnx":
        raise UserError(f"--file applies to onnx exports; {str(directory)!r} is a {fmt} export")
    onnx_file = None
    if fmt == "onnx":
        onnx_file = directory / (file or "model.onnx")
        if not onnx_file.is_file():
            present = ", ".join(sorted(p.name for p in directory.glob("*.onnx"))) or "none"
            raise UserError(f"--file {file or 'model.onnx'!r} is not in {str(directory)!r} (ONNX files: {present})")
    return fmt, manifest, onnx_file


def make_forward(fmt: str, directory: Path, onnx_file: Path | None, threads: int | None):
    """A function batch -> logits (float32 torch tensor) for the export, and its number of labels."""
    if fmt == "onnx":
        from lit_factor.deploy import ort

        session = ort.make_session(onnx_file, threads)
        names = [i.name for i in session.get_inputs()]
        config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}

        def forward(batch: dict) -> torch.Tensor:
            feed = {}
            for name in names:
                value = batch.get(name)
                if value is None and name == "token_type_ids":
                    value = torch.zeros_like(batch["input_ids"])
                if value is None:
                    raise UserError(f"the ONNX model wants an input {name!r} the data does not give")
                feed[name] = value.numpy().astype("int64")
            return torch.from_numpy(session.run(None, feed)[0]).float()

        return forward, len(config.get("id2label") or {}) or None
    from lit_factor.deploy.pretrained import load_pretrained

    model = load_pretrained(directory)  # hf (with a plan) and dense (plain) directories alike

    def forward(batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.inference_mode():
            return model(**inputs).logits.float()

    return forward, model.config.num_labels


def evaluate(args) -> dict:
    from lit_factor.train.data import GLUEDataModule, get_task
    from lit_factor.train.module import STAGE_PREFIX, _eval_metrics

    directory = Path(args.export_dir)
    fmt, manifest, onnx_file = read_export(directory, args.file)
    task_name = args.task or manifest.get("task")
    if not task_name:
        raise UserError(f"{str(directory)!r} does not say its task: give --data.task")
    task = get_task(task_name)
    if manifest.get("task") and get_task(manifest["task"]).name != task.name:
        raise UserError(f"--data.task {task_name!r} is not the export's task {manifest['task']!r}")
    for name in ("max_seq_length", "batch_size", "max_eval_samples", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} {value} must be a positive integer")
    if args.threads:
        torch.set_num_threads(args.threads)
    forward, num_labels = make_forward(fmt, directory, onnx_file, args.threads)
    if num_labels is not None and num_labels != task.num_labels:
        raise UserError(f"the export has {num_labels} labels, task {task.name!r} has {task.num_labels}")
    tokenizer_source = manifest.get("model_name_or_path") or str(directory)
    data = GLUEDataModule(task.name, data_dir=args.data_dir, model_name_or_path=tokenizer_source,
                          max_seq_length=args.max_seq_length, batch_size=args.batch_size,
                          max_eval_samples=args.max_eval_samples)
    data.check("test")
    loaders = data.test_dataloader()
    loaders = loaders if isinstance(loaders, list) else [loaders]
    collections = _eval_metrics(task, STAGE_PREFIX["test"])
    start, examples = time.perf_counter(), 0
    for loader, metrics in zip(loaders, collections, strict=True):
        for batch in loader:
            logits = forward(batch)
            metrics.update(logits.squeeze(-1) if task.is_regression else logits.argmax(-1), batch["labels"])
            examples += len(batch["labels"])
    results = {}
    for metrics in collections:
        results.update({k: float(v) for k, v in metrics.compute().items()})
    results[f"{STAGE_PREFIX['test']}/combined_score"] = sum(results.values()) / len(results)
    return {"export_dir": str(directory), "format": fmt, "file": onnx_file.name if onnx_file else None,
            "task": task.name, "examples": examples, "max_seq_length": args.max_seq_length,
            "seconds": round(time.perf_counter() - start, 2), "metrics": results,
            "checkpoint": manifest.get("checkpoint")}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        result = evaluate(args)
    except UserError as err:
        fail(err)
    what = result["format"] + (f" ({result['file']})" if result["file"] else "")
    print(f"evaluated {what} export {result['export_dir']} on {result['task']} dev ({result['examples']} examples, "
          f"{result['seconds']:.1f} s)")
    for name, value in result["metrics"].items():
        print(f"{name} = {value:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
