"""GLUE as a LightningDataModule: the nine tasks, from a local GLUE TSV directory or from the Hugging Face hub.

Sources
* ``data_dir`` (or the environment variable ``GLUE_DIR``): a directory in the original GLUE layout,
  ``<data_dir>/<TASK>/{train,dev,test}.tsv`` (MNLI: ``dev_matched``/``dev_mismatched``, ``test_matched``/
  ``test_mismatched``), as written by ``download_glue_data.py``. Files are read with ``csv.QUOTE_NONE`` (rows
  contain unbalanced quotes), ``utf-8-sig`` (MRPC starts with a byte-order mark); CoLA's train/dev have no header.
* neither given: ``datasets.load_dataset("nyu-mll/glue", <task>)`` (needs internet once).

Splits: ``fit`` trains on train and validates on dev; ``validate`` and ``test`` both use the labelled dev set(s)
(GLUE's test labels are hidden); ``predict`` runs on the unlabelled test set (or dev, ``predict_split="dev"``).
MNLI always yields two evaluation dataloaders: matched, then mismatched.

A task directory without ``train.tsv`` (the offline QNLI: dev and test only) is refused unless asked for a split of its
dev set: ``split_dev_for_train: 0.8`` trains on a fixed, seeded 80 % of ``dev.tsv`` and evaluates on the other 20 %
(``split_seed``). That is not GLUE's protocol; runs say so (:meth:`GLUEDataModule.split_record`, in the run summary)
and studies name such a task ``<task>-dev-split`` (docs/mpnet.md).

Each split is tokenized once and cached on disk (``cache_dir``), keyed by source file, tokenizer and length.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler as StatefulRandomSampler

from lit_factor.errors import UserError

GLUE_DIR_ENV = "GLUE_DIR"
CACHE_ENV = "LIT_FACTOR_CACHE"


class GLUEDataError(UserError):
    """Bad data settings or a bad data file: unknown task, missing directory/file, malformed row, unknown label,
    a byte that is not UTF-8, a split without examples."""


@dataclass(frozen=True)
class GLUETask:
    """One GLUE task: where its fields are, what its labels are, how it is scored."""

    name: str  # canonical short name, as in the HF hub config ("sst2")
    dir_name: str  # directory in the GLUE TSV layout ("SST-2"), also the submission file name
    text_fields: tuple[str, ...]  # HF column names of the input text(s)
    tsv_columns: dict  # field ("label", "idx", or a text field) -> TSV header name
    labels: tuple[str, ...] | None  # label names as written in the TSVs; None: regression
    metrics: tuple[str, ...]  # torchmetrics to compute: accuracy, f1, matthews, pearson, spearman
    monitor: str  # main metric, for ModelCheckpoint (mode max)
    headerless: dict | None = None  # field -> column position for header-less train/dev files (CoLA)
    eval_splits: tuple[str, ...] = ("dev",)  # TSV file stems; several -> several dataloaders
    test_splits: tuple[str, ...] = ("test",)
    hf_eval_splits: tuple[str, ...] = ("validation",)
    hf_test_splits: tuple[str, ...] = ("test",)
    submission_names: tuple[str, ...] | None = None  # GLUE leaderboard file names of the test predictions

    @property
    def num_labels(self) -> int:
        """Outputs of the classifier head; 1 means regression."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def eval_suffixes(self) -> tuple[str, ...]:
        """Metric-name suffix of each evaluation dataloader ("" for single-dev tasks; MNLI: _m and _mm)."""
        return ("",) if len(self.eval_splits) == 1 else ("_m", "_mm")

    def submissions(self) -> tuple[str, ...]:
        return self.submission_names or (self.dir_name,)


def _idx_label(label_column: str = "label", index: str = "index") -> dict:
    return {"label": label_column, "idx": index}


_BINARY = ("0", "1")
_ENTAIL2 = ("entailment", "not_entailment")

#: The task table. Label order follows the HF hub's ``glue`` configs, so both sources give the same ids.
TASKS: dict[str, GLUETask] = {t.name: t for t in (
    GLUETask("cola", "CoLA", ("sentence",), {**_idx_label(), "sentence": "sentence"}, _BINARY,
             ("matthews", "accuracy"), "val/matthews", headerless={"label": 1, "sentence": 3}),
    GLUETask("sst2", "SST-2", ("sentence",), {**_idx_label(), "sentence": "sentence"}, _BINARY,
             ("accuracy",), "val/accuracy"),
    GLUETask("mrpc", "MRPC", ("sentence1", "sentence2"),
             {**_idx_label("Quality"), "sentence1": "#1 String", "sentence2": "#2 String"}, _BINARY,
             ("f1", "accuracy"), "val/f1"),
    GLUETask("stsb", "STS-B", ("sentence1", "sentence2"),
             {**_idx_label("score"), "sentence1": "sentence1", "sentence2": "sentence2"}, None,
             ("pearson", "spearman"), "val/pearson"),
    GLUETask("qqp", "QQP", ("question1", "question2"),
             {**_idx_label("is_duplicate", "id"), "question1": "question1", "question2": "question2"}, _BINARY,
             ("f1", "accuracy"), "val/f1"),
    GLUETask("mnli", "MNLI", ("premise", "hypothesis"),
             {**_idx_label("gold_label"), "premise": "sentence1", "hypothesis": "sentence2"},
             ("entailment", "neutral", "contradiction"), ("accuracy",), "val/accuracy_m",
             eval_splits=("dev_matched", "dev_mismatched"), test_splits=("test_matched", "test_mismatched"),
             hf_eval_splits=("validation_matched", "validation_mismatched"),
             hf_test_splits=("test_matched", "test_mismatched"), submission_names=("MNLI-m", "MNLI-mm")),
    GLUETask("qnli", "QNLI", ("question", "sentence"),
             {**_idx_label(), "question": "question", "sentence": "sentence"}, _ENTAIL2, ("accuracy",),
             "val/accuracy"),
    GLUETask("rte", "RTE", ("sentence1", "sentence2"),
             {**_idx_label(), "sentence1": "sentence1", "sentence2": "sentence2"}, _ENTAIL2, ("accuracy",),
             "val/accuracy"),
    GLUETask("wnli", "WNLI", ("sentence1", "sentence2"),
             {**_idx_label(), "sentence1": "sentence1", "sentence2": "sentence2"}, _BINARY, ("accuracy",),
             "val/accuracy"),
)}


def get_task(name: str) -> GLUETask:
    """Look a task up by short name or GLUE directory name, case-insensitively (``sst2``, ``SST-2``)."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise GLUEDataError(f"task={name!r} is not a GLUE task; allowed: {', '.join(TASKS)}")
    return TASKS[key]


def read_glue_tsv(path: str | Path, task: GLUETask, labelled: bool = True) -> dict[str, list]:
    """Read one GLUE TSV file into columns: the task's text fields, ``idx`` and (if ``labelled``) ``label`` ids.

    A header is recognised by its column names; a file without one (CoLA train/dev) is read by position.
    Rows must have as many fields as the header; labels must be in the task's label set (or floats for STS-B).
    """
    path = Path(path)
    fields = [*task.text_fields, *(["label"] if labelled else [])]
    text = _read_text(path, task)
    rows = [(n, r) for n, r in enumerate(csv.reader(io.StringIO(text, newline=""), delimiter="\t",
                                                     quoting=csv.QUOTE_NONE), 1) if r]
    if not rows:
        raise GLUEDataError(f"{path}: empty file (a GLUE TSV has a header line, then one example per line)")
    first = rows[0][1]
    names = {task.tsv_columns[k] for k in fields}
    if names <= set(first):
        columns = {k: first.index(task.tsv_columns[k]) for k in fields}
        if task.tsv_columns["idx"] in first:
            columns["idx"] = first.index(task.tsv_columns["idx"])
        width, rows = len(first), rows[1:]
    elif task.headerless is not None and task.headerless.keys() >= set(fields):
        columns = {k: task.headerless[k] for k in fields}
        width = max(columns.values()) + 1
    else:
        missing = sorted(names - set(first))
        raise GLUEDataError(f"{path}: header {first} lacks the {task.dir_name} column(s) {missing}")
    if not rows:
        raise GLUEDataError(f"{path}: no examples, only a header line (a GLUE TSV needs at least one example row)")
    out: dict[str, list] = {k: [] for k in [*fields, "idx"]}
    for i, (line, row) in enumerate(rows):
        # Header-less files (CoLA) may have more trailing fields; files with a header must match it exactly.
        if len(row) != width and not (task.headerless and "idx" not in columns and len(row) >= width):
            raise GLUEDataError(f"{path}:{line}: malformed row: expected {width} tab-separated fields, "
                                f"found {len(row)}")
        for k in task.text_fields:
            out[k].append(row[columns[k]])
        out["idx"].append(int(row[columns["idx"]]) if "idx" in columns else i)
        if labelled:
            value = row[columns["label"]].strip()
            if task.is_regression:
                try:
                    out["label"].append(float(value))
                except ValueError:
                    raise GLUEDataError(f"{path}:{line}: label {value!r} is not a number "
                                        f"({task.dir_name} is a regression task)") from None
            elif value in task.labels:
                out["label"].append(task.labels.index(value))
            else:
                raise GLUEDataError(f"{path}:{line}: label {value!r} is not in the {task.dir_name} label set "
                                    f"{list(task.labels)}")
    return out


def _read_text(path: Path, task: GLUETask) -> str:
    """The file's text; a missing/unreadable file or a byte that is not UTF-8 is named with its line."""
    if not path.is_file():
        raise GLUEDataError(f"missing file {path} (expected the GLUE TSV layout <data_dir>/{task.dir_name}/"
                            f"{path.name})")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise GLUEDataError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        return data.decode("utf-8-sig")  # utf-8-sig: MRPC starts with a byte-order mark
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise GLUEDataError(f"{path}:{line}: byte 0x{data[err.start]:02x} is not valid UTF-8 (GLUE TSVs are UTF-8 "
                            "text: re-save the file as UTF-8)") from None


def write_submission(path: str | Path, task: GLUETask, idx: list[int], predictions: list) -> Path:
    """Write predictions in GLUE submission format (``index<TAB>prediction``, labels by name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("index\tprediction\n")
        for i, p in sorted(zip(idx, predictions, strict=True)):
            value = f"{min(max(float(p), 0.0), 5.0):.3f}" if task.is_regression else task.labels[int(p)]
            f.write(f"{i}\t{value}\n")
    return path


class ResumableRandomSampler(StatefulRandomSampler, torch.utils.data.RandomSampler):
    """torchdata's RandomSampler (its generator and position go into the loader's state), declared a torch
    ``RandomSampler`` as well so Lightning sees a shuffling loader (under DDP: ``DistributedSampler(shuffle=True)``)."""


def _check_sizes(**sizes: int | None) -> None:
    """Counts must be positive (``null`` means "all" / "the default"); zero samples is a settings error."""
    for name, value in sizes.items():
        low = 0 if name == "num_workers" else 1
        if value is not None and value < low:
            allowed = ">= 0" if low == 0 else ">= 1" + (" (or null: all examples)" if "samples" in name else "")
            raise GLUEDataError(f"data.{name}={value} must be {allowed}")


class GLUEDataModule(L.LightningDataModule):
    """GLUE task data, tokenized once with the model's tokenizer and padded per batch."""

    def __init__(
        self,
        task: str = "sst2",
        data_dir: str | None = None,
        model_name_or_path: str = "minilm",
        max_seq_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        num_workers: int = 0,
        predict_split: Literal["test", "dev"] = "test",
        cache_dir: str | None = None,
        split_dev_for_train: float | None = None,
        split_seed: int = 0,
    ) -> None:
        """
        Args:
            task: GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli (or its directory name, SST-2 ...).
            data_dir: directory in the GLUE TSV layout (``<data_dir>/SST-2/train.tsv`` ...); defaults to the
                environment variable GLUE_DIR; if neither is set, the task is downloaded from the HF hub.
            model_name_or_path: whose tokenizer to use (linked from ``model.model_name_or_path`` by the CLI).
            max_seq_length: truncate inputs to this many tokens (batches are padded to their longest input).
            batch_size: training batch size per device.
            eval_batch_size: evaluation/prediction batch size (default: ``2 * batch_size``).
            max_train_samples: use only the first N training examples (quick runs).
            max_eval_samples: use only the first N examples of each evaluation/prediction set.
            num_workers: DataLoader worker processes.
            predict_split: what ``predict`` labels: the unlabelled ``test`` set (GLUE submission) or ``dev``.
            cache_dir: where tokenized splits are cached (default: $LIT_FACTOR_CACHE or ~/.cache/lit_factor).
            split_dev_for_train: for a task directory without ``train.tsv`` only (QNLI offline): train on this
                fraction of the labelled dev set, drawn once with ``split_seed``, and evaluate on the rest -- a fixed
                partition, not GLUE's protocol. ``null`` (default): a missing ``train.tsv`` is an error.
            split_seed: the seed of that partition (the same seed, the same partition, whatever the run's seed).
        """
        super().__init__()
        self.task = get_task(task)
        data_dir = self._local_dir(data_dir or os.environ.get(GLUE_DIR_ENV) or None)
        _check_sizes(max_seq_length=max_seq_length, batch_size=batch_size, eval_batch_size=eval_batch_size,
                     max_train_samples=max_train_samples, max_eval_samples=max_eval_samples, num_workers=num_workers)
        if split_dev_for_train is not None:
            self._check_dev_split(data_dir, split_dev_for_train)
        self.split_dev_for_train = split_dev_for_train
        self.split_seed = split_seed
        self.data_dir = data_dir
        self.model_name_or_path = model_name_or_path
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.num_workers = num_workers
        self.predict_split = predict_split
        self.cache_dir = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lit_factor")
        self.save_hyperparameters()
        self._tokenizer = None
        self.datasets: dict[str, object] = {}

    def _local_dir(self, data_dir: str | None) -> str | None:
        """``data_dir`` when it holds this task's directory in the GLUE TSV layout; None: the HF hub."""
        if data_dir is not None:
            if not Path(data_dir).is_dir():
                raise GLUEDataError(f"data_dir {data_dir!r} is not a directory (expected the GLUE TSV layout "
                                    f"<data_dir>/{self.task.dir_name}/train.tsv; omit it to use the HF hub)")
            if not (Path(data_dir) / self.task.dir_name).is_dir():
                raise GLUEDataError(f"data_dir {data_dir!r} has no {self.task.dir_name}/ directory for task "
                                    f"{self.task.name!r}")
        return data_dir

    def _check_dev_split(self, data_dir: str | None, fraction: float) -> None:
        """``split_dev_for_train`` only where it is needed and meaningful: a local task directory without
        ``train.tsv``, one labelled dev set, a fraction that leaves examples on both sides."""
        t = self.task
        if not (isinstance(fraction, int | float) and 0 < fraction < 1):
            raise GLUEDataError(f"data.split_dev_for_train={fraction!r} must be a fraction 0 < f < 1 of the dev set "
                                "(e.g. 0.8: 80 % to train on, 20 % to evaluate on), or null")
        if data_dir is None:
            raise GLUEDataError("data.split_dev_for_train is for a local GLUE directory without train.tsv; the HF hub "
                                f"has {t.name}'s train split: set data.data_dir, or leave split_dev_for_train null")
        if len(t.eval_splits) != 1:
            raise GLUEDataError(f"data.split_dev_for_train: {t.dir_name} has {len(t.eval_splits)} dev sets; the "
                                "split is defined for tasks with one")
        train = Path(data_dir) / t.dir_name / "train.tsv"
        if train.exists():
            raise GLUEDataError(f"data.split_dev_for_train={fraction}: {train} exists; the dev split is only for a "
                                "task without a training split (leave split_dev_for_train null to use train.tsv)")

    def split_record(self) -> dict | None:
        """How the training data were drawn, when not from the official train split (None otherwise): for the
        run's summary and reports, so that no number from a dev split passes for the GLUE protocol."""
        if self.split_dev_for_train is None:
            return None
        f = self.split_dev_for_train
        return {"split": "dev-split", "split_dev_for_train": f, "split_seed": self.split_seed,
                "note": f"{self.task.dir_name}: trained on a seeded {f:.0%} of dev.tsv (seed {self.split_seed}), "
                        f"evaluated on the other {1 - f:.0%}; not the official GLUE protocol"}

    def _dev_partition(self, n: int) -> tuple[list[int], list[int]]:
        """Row indices of the dev set for (train, eval): a seeded permutation cut at ``split_dev_for_train``, each
        side in file order. Depends only on n, the fraction and the seed."""
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        cut = round(n * self.split_dev_for_train)
        if not 0 < cut < n:
            raise GLUEDataError(f"data.split_dev_for_train={self.split_dev_for_train}: {n} dev examples leave none "
                                f"on one side ({cut} to train on)")
        return sorted(perm[:cut]), sorted(perm[cut:])

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from lit_factor.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_name_or_path)
        return self._tokenizer

    # --- which splits each stage needs ---------------------------------------------------------------------
    def _splits(self, stage: str | None) -> list[str]:
        evals = list(self.task.eval_splits)
        if stage == "fit":
            return ["train", *evals]
        if stage in ("validate", "test"):
            return evals
        if stage == "predict":
            return list(self.task.test_splits) if self.predict_split == "test" else evals
        return ["train", *evals]

    def _hf_split(self, split: str) -> str:
        t = self.task
        mapping = {"train": "train", **dict(zip(t.eval_splits, t.hf_eval_splits, strict=True)),
                   **dict(zip(t.test_splits, t.hf_test_splits, strict=True))}
        return mapping[split]

    def _limit(self, split: str) -> int | None:
        return self.max_train_samples if split == "train" else self.max_eval_samples

    def prepare_data(self) -> None:
        # Download once (rank 0 of each node); setup() then reads the datasets library's cache.
        if self.data_dir is None:
            import datasets

            datasets.load_dataset("nyu-mll/glue", self.task.name)

    def check(self, stage: str | None = None) -> None:
        """Read, validate and tokenize what ``stage`` needs now, before a Trainer creates any run directory.

        Bad files stop here with a :class:`GLUEDataError`; the later ``setup`` finds the splits already loaded.
        """
        self.prepare_data()
        self.setup(stage)

    def setup(self, stage: str | None = None) -> None:
        for split in self._splits(stage):
            if split not in self.datasets:
                self.datasets[split] = self._load_tokenized(split)

    # --- reading, tokenizing, caching ----------------------------------------------------------------------
    def _raw(self, split: str) -> dict[str, list]:
        labelled = split not in self.task.test_splits
        if self.split_dev_for_train is not None and split in ("train", *self.task.eval_splits):
            (dev,) = self.task.eval_splits
            cols = read_glue_tsv(Path(self.data_dir) / self.task.dir_name / f"{dev}.tsv", self.task, labelled)
            rows = self._dev_partition(len(cols["idx"]))[0 if split == "train" else 1]
            cols = {k: [v[i] for i in rows] for k, v in cols.items()}
        elif self.data_dir is not None:
            path = Path(self.data_dir) / self.task.dir_name / f"{split}.tsv"
            if split == "train" and not path.is_file() and (path.parent / f"{self.task.eval_splits[0]}.tsv").is_file():
                raise GLUEDataError(f"missing file {path}: {self.task.dir_name} has no training split here; to train "
                                    "on a seeded part of its dev set instead (not the GLUE protocol), set "
                                    "data.split_dev_for_train (e.g. 0.8) and data.split_seed")
            cols = read_glue_tsv(path, self.task, labelled)
        else:
            import datasets

            ds = datasets.load_dataset("nyu-mll/glue", self.task.name, split=self._hf_split(split))
            cols = ds.select_columns([*self.task.text_fields, "idx", *(["label"] if labelled else [])]).to_dict()
        limit = self._limit(split)
        cols = {k: v[:limit] for k, v in cols.items()} if limit is not None else cols
        if not cols["idx"]:
            raise GLUEDataError(f"task {self.task.name!r} split {split!r} has no examples")
        return cols

    def _cache_key(self, split: str) -> str:
        if self.data_dir is not None:
            split_part = self.split_dev_for_train is not None and split in ("train", *self.task.eval_splits)
            stem = self.task.eval_splits[0] if split_part else split
            f = Path(self.data_dir).resolve() / self.task.dir_name / f"{stem}.tsv"
            stat = f.stat() if f.exists() else None
            source = [str(f), stat.st_size if stat else None, stat.st_mtime_ns if stat else None]
            if split_part:
                source += ["dev-split", self.split_dev_for_train, self.split_seed]
        else:
            source = ["hub", self.task.name]
        tok = self.tokenizer
        key = json.dumps([source, split, self._limit(split), self.max_seq_length, tok.name_or_path,
                          type(tok).__name__, len(tok), 1])
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def _load_tokenized(self, split: str):
        import datasets

        path = self.cache_dir / "glue" / f"{self.task.name}-{split}-{self._cache_key(split)}"
        if path.is_dir():
            return datasets.load_from_disk(str(path))
        cols = self._raw(split)
        if "label" in cols:
            cols["labels"] = cols.pop("label")
        texts = [cols.pop(k) for k in self.task.text_fields]
        # A line before the silent part (tens of seconds for a large split); the next run reads the cache.
        rank_zero_info(f"tokenizing {self.task.dir_name} {split}: {len(texts[0]):,} examples, max length "
                       f"{self.max_seq_length} (cached in {path.parent})")
        encoded = self.tokenizer(*texts, truncation=True, max_length=self.max_seq_length)
        ds = datasets.Dataset.from_dict({**cols, **encoded})
        # Write to a private temporary directory and rename: several DDP ranks may build the same split at once.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=path.parent, prefix=".tmp-")
        bars = datasets.is_progress_bar_enabled()  # a "Saving the dataset" bar per split is noise on stderr
        datasets.disable_progress_bars()
        try:
            ds.save_to_disk(tmp)
        finally:
            if bars:
                datasets.enable_progress_bars()
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race; use its copy
            shutil.rmtree(tmp, ignore_errors=True)
        return datasets.load_from_disk(str(path))

    # --- dataloaders ---------------------------------------------------------------------------------------
    def _collate(self):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    def _loader(self, split: str, train: bool = False) -> StatefulDataLoader:
        if split not in self.datasets:
            self.datasets[split] = self._load_tokenized(split)
        # Resumable mid-epoch: Lightning saves a StatefulDataLoader's position and its sampler's generator in fit
        # checkpoints. Generators seeded once from the global seed keep the shuffle and the worker seeds off the
        # global RNG, which then drives only the model (dropout): a resumed run draws the same dropout masks as an
        # uninterrupted one (lit_factor.train.callbacks.resume). The sampler gets a generator of its own: shared with
        # the loader's worker-seed draw, the saved state would miss that draw and the epoch after a resume reshuffle.
        dataset, seed = self.datasets[split], int(torch.randint(2**62, (), dtype=torch.int64))
        sampler = ResumableRandomSampler(dataset, generator=torch.Generator().manual_seed(seed)) if train else None
        with warnings.catch_warnings():  # torchdata 0.11 calls a torch API that torch >= 2.9 deprecates
            warnings.filterwarnings("ignore", message=".*set_vital.*", category=UserWarning)
            return StatefulDataLoader(dataset, sampler=sampler, generator=torch.Generator().manual_seed(seed + 1),
                                      batch_size=self.batch_size if train else self.eval_batch_size,
                                      collate_fn=self._collate(), num_workers=self.num_workers,
                                      persistent_workers=self.num_workers > 0)

    def _eval_loaders(self, splits) -> StatefulDataLoader | list[StatefulDataLoader]:
        loaders = [self._loader(s) for s in splits]
        return loaders[0] if len(loaders) == 1 else loaders

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._eval_loaders(self.task.eval_splits)

    def test_dataloader(self):
        return self._eval_loaders(self.task.eval_splits)

    def predict_dataloader(self):
        return self._eval_loaders(self._splits("predict"))

    def predict_file_names(self) -> tuple[str, ...]:
        """File name (without .tsv) of each predict dataloader's output: GLUE submission names for test."""
        names = self.task.submissions()
        return names if self.predict_split == "test" else tuple(f"{n}.dev" for n in names)
