"""Every shipped recipe in configs/ parses against the CLI (types, class paths, links) without downloading."""

from __future__ import annotations

import pytest
import yaml

from lit_factor import cli
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_recipes_shipped():
    names = {c.name for c in CONFIGS}
    assert {"roberta_sst2.yaml", "quickstart_minilm_sst2.yaml", "bert_base_mrpc.yaml", "t5_base_rte.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code == 0, capsys.readouterr().err
    parsed = yaml.safe_load(capsys.readouterr().out)
    raw = yaml.safe_load(config.read_text())
    assert parsed["model"]["model_name_or_path"] == raw["model"]["model_name_or_path"]
    assert parsed["model"]["factorization"]["method"] in ("none", "lowrank", "monarch", "blockwise")
    assert parsed["data"]["task"] == raw["data"]["task"]


def test_roberta_recipe_is_staged_lowrank_half():
    raw = yaml.safe_load((REPO / "configs" / "roberta_sst2.yaml").read_text())
    assert raw["model"]["model_name_or_path"] == "roberta-base" and raw["data"]["task"] == "sst2"
    assert raw["model"]["factorization"]["method"] == "lowrank" and raw["model"]["factorization"]["budget"] == 0.5
    assert any(c["class_path"].endswith("StagingCallback") for c in raw["trainer"]["callbacks"])
