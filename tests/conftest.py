"""Shared test helpers: tiny GLUE-format task directories written per test, the real GLUE directory if present,
a synthetic learnable dataset and a quiet CPU Trainer (also used by the DDP worker scripts); one thread everywhere."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# The suite never needs the network (models are random presets or packaged, hub datasets are stubbed). Without one,
# a hub lookup (a name that is no folder or preset) retries for ~25 s before it fails; offline mode fails at once.
# Set before anything imports huggingface_hub (it reads the variable on import); subprocesses inherit it.
os.environ["HF_HUB_OFFLINE"] = "1"
if "huggingface_hub.constants" in sys.modules:  # imported early (a plugin): the variable was read already
    sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True

# Tokenized splits and other cached files go to one folder of this session, never the user's ~/.cache/lit_factor
# (study and CLI tests that give no --data.cache_dir would write there); subprocesses inherit it.
_CACHE = tempfile.mkdtemp(prefix="lit_factor_test_cache_")
os.environ["LIT_FACTOR_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# One intra-op thread for the session and every subprocess it starts. The suite's models are tiny: a second thread
# wins nothing on a quiet 2-core machine and, on a loaded one, makes each op wait for a descheduled thread (measured
# 3-6x slower per forward). Thread-count behaviour is tested with explicit settings (tests/test_latency.py).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent

# Per task: header (None = header-less like CoLA) and a row builder (i, label) -> fields, for train/dev files;
# then the test-file header and row builder. Labels are written as the GLUE files write them.
_POS, _NEG = "a truly wonderful and moving film", "a dull , tedious mess"


def _text(i: int, label) -> str:
    return f"{_POS if str(label) in ('1', 'entailment') else _NEG} {i}"


_LAYOUT = {
    "CoLA": (None, lambda i, y: ["gj04", y, "" if y == "1" else "*", _text(i, y)], ("0", "1"),
             ["index", "sentence"], lambda i: [str(i), _text(i, "1")]),
    "SST-2": (["sentence", "label"], lambda i, y: [_text(i, y) + " ", y], ("0", "1"),
              ["index", "sentence"], lambda i: [str(i), _text(i, "1")]),
    "MRPC": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             lambda i, y: [y, str(1000 + i), str(2000 + i), _text(i, y), f'he said "yes {i}'], ("0", "1"),
             ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             lambda i: [str(i), "1", "2", _text(i, "1"), "other"]),
    "STS-B": (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score"],
              lambda i, y: [str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", _text(i, "1"),
                            _text(i, "1" if float(y) > 2.5 else "0"), y], ("0.000", "1.250", "3.800", "5.000"),
              ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"],
              lambda i: [str(i), "g", "f", "y", "o", "none", "none", "a", "b"]),
    "QQP": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            lambda i, y: [str(i), str(2 * i), str(2 * i + 1), _text(i, y), "why ?", y], ("0", "1"),
            ["id", "question1", "question2"], lambda i: [str(i), "what ?", "why ?"]),
    "MNLI": (["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
             lambda i, y: [str(i), "1", f"{i}e", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)",
                           _text(i, y), "the hypothesis", y, y], ("entailment", "neutral", "contradiction"),
             ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"],
             lambda i: [str(i), "1", "p", "g", "(a)", "(b)", "(a)", "(b)", "premise", "hypothesis"]),
    "QNLI": (["index", "question", "sentence", "label"], lambda i, y: [str(i), "what ?", _text(i, y), y],
             ("entailment", "not_entailment"), ["index", "question", "sentence"],
             lambda i: [str(i), "what ?", "that"]),
    "RTE": (["index", "sentence1", "sentence2", "label"], lambda i, y: [str(i), _text(i, y), "so it is", y],
            ("entailment", "not_entailment"), ["index", "sentence1", "sentence2"], lambda i: [str(i), "a", "b"]),
    "WNLI": (["index", "sentence1", "sentence2", "label"], lambda i, y: [str(i), _text(i, y), "it is", y],
             ("0", "1"), ["index", "sentence1", "sentence2"], lambda i: [str(i), "a", "b"]),
}
TASK_DIRS = tuple(_LAYOUT)


def write_tsv(path: Path, header: list[str] | None, rows: list[list[str]], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_glue_task(root: Path, task_dir: str, n_train: int = 16, n_dev: int = 8, n_test: int = 5) -> Path:
    """Write ``root/<task_dir>/`` in the GLUE TSV layout (MRPC with a BOM, CoLA without header, MNLI m/mm)."""
    header, row, labels, test_header, test_row = _LAYOUT[task_dir]
    bom = task_dir == "MRPC"
    mnli = task_dir == "MNLI"
    write_tsv(root / task_dir / "train.tsv", header, [row(i, labels[i % len(labels)]) for i in range(n_train)], bom)
    for dev in (("dev_matched", "dev_mismatched") if mnli else ("dev",)):
        write_tsv(root / task_dir / f"{dev}.tsv", header, [row(i, labels[i % len(labels)]) for i in range(n_dev)],
                  bom)
    for test in (("test_matched", "test_mismatched") if mnli else ("test",)):
        write_tsv(root / task_dir / f"{test}.tsv", test_header, [test_row(100 + i) for i in range(n_test)])
    return root


@pytest.fixture
def glue_writer(tmp_path):
    """``glue_writer(task_dir, **sizes)`` writes a tiny task under ``tmp_path/glue`` and returns that root."""
    def write(task_dir: str = "SST-2", **sizes) -> Path:
        return write_glue_task(tmp_path / "glue", task_dir, **sizes)
    return write


@pytest.fixture
def glue_dir() -> Path:
    """The real GLUE TSV directory: $GLUE_DIR, else ../shared/glue beside the checkout; skips when absent."""
    path = Path(os.environ.get("GLUE_DIR") or REPO.parent / "shared" / "glue")
    if not (path / "SST-2" / "dev.tsv").is_file():
        pytest.skip(f"no GLUE data at {path} (set GLUE_DIR)")
    return path


# --- synthetic token data and a quiet Trainer (no GLUE files, no tokenizer) ---------------------------------------
SEQ_LEN = 12


def synthetic_rows(n: int, seed: int = 0, seq_len: int = SEQ_LEN) -> list[dict]:
    """Learnable examples for a BERT-shaped classifier: the label says whether token 7 occurs in the sequence."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1000, 1100, (seq_len,), generator=g)
        label = int(torch.rand((), generator=g) < 0.5)
        if label:
            ids[torch.randint(1, seq_len, (1,), generator=g)] = 7
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq_len, dtype=torch.long),
                     "token_type_ids": torch.zeros(seq_len, dtype=torch.long), "labels": torch.tensor(label)})
    return rows


def synthetic_loader(n: int, seed: int = 0, batch_size: int = 4):
    from torch.utils.data import DataLoader

    return DataLoader(synthetic_rows(n, seed), batch_size=batch_size, shuffle=False)


def quiet_trainer(**kwargs):
    """A CPU Trainer that writes and prints nothing unless asked (logger, checkpoints, bar, model summary off)."""
    import lightning as L

    defaults = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                "enable_progress_bar": False, "enable_model_summary": False}
    return L.Trainer(**{**defaults, **kwargs})
