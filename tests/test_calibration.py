"""Calibration: input second moments and Fisher row weights gathered with hooks in one pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_factor.compress.calibration import calibrate, calibration_loader


class _Out:
    def __init__(self, loss):
        self.loss = loss


class _TwoLayer(nn.Module):
    """x (B, L, 4) -> a -> relu -> b; loss = mean squared output (something with a gradient)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, batch):
        h = torch.relu(self.a(batch["x"]))
        return _Out(self.b(h).pow(2).mean())


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(2, 5, dtype=torch.long)
        mask[1, 3:] = 0  # padding
        out.append({"x": torch.randn(2, 5, 4, generator=g), "attention_mask": mask})
    return out


def test_second_moment_over_real_tokens_only():
    torch.manual_seed(0)
    model = _TwoLayer().train()
    batches = _batches()
    stats = calibrate(model, ["a", "b"], batches, forward=model)
    rows = torch.cat([b["x"][b["attention_mask"].bool()] for b in batches]).double()
    torch.testing.assert_close(stats["a"].input_cov, rows.T @ rows / len(rows))
    hidden = torch.relu(model.a(rows.float())).double().detach()
    torch.testing.assert_close(stats["b"].input_cov, hidden.T @ hidden / len(rows), rtol=1e-5, atol=1e-6)
    assert stats["a"].row_weights is None
    assert model.training  # mode restored


def test_fisher_row_weights_match_squared_gradients():
    torch.manual_seed(1)
    model = _TwoLayer()
    batches = _batches()
    stats = calibrate(model, ["a", "b"], batches, forward=model, fisher=True)
    assert all(p.grad is None for p in model.parameters())  # training gradients untouched
    expected = torch.zeros(6, dtype=torch.float64)
    for batch in batches:
        model.zero_grad()
        model(batch).loss.backward()
        expected += model.a.weight.grad.double().pow(2).sum(-1)
    torch.testing.assert_close(stats["a"].row_weights, expected / len(batches))
    assert stats["b"].row_weights.shape == (3,)


def test_unused_layer_is_named():
    model = _TwoLayer()
    model.c = nn.Linear(3, 3)
    with pytest.raises(RuntimeError, match="'c' never ran"):
        calibrate(model, ["a", "c"], _batches(1), forward=model)


def test_calibration_loader_leaves_global_rng_alone(glue_writer):
    from lit_factor.train.data import GLUEDataModule

    dm = GLUEDataModule("sst2", data_dir=str(glue_writer("SST-2", n_train=20)), model_name_or_path="random:tiny-bert",
                        batch_size=4, cache_dir=str(glue_writer("SST-2").parent / "cache"))
    dm.setup("validate")  # no train split loaded yet: the loader must fetch it
    state = torch.get_rng_state()
    loader = calibration_loader(dm, samples=10)
    assert torch.equal(state, torch.get_rng_state())
    batches = list(loader)
    assert sum(len(b["labels"]) for b in batches) == 10
    again = list(calibration_loader(dm, samples=10))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, again, strict=True))
    with torch.device("meta"):  # configure_model on a GPU runs under such a default device (here: one CPU lacks)
        under_default = calibration_loader(dm, samples=10)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, under_default, strict=True))
    with pytest.raises(ValueError, match="calibration_samples=0"):
        calibration_loader(dm, samples=0)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_ranks_gather_identical_statistics_of_all_samples(tmp_path):
    """Each rank calibrates on its half of the examples; after the all-reduce both hold the statistics of all of
    them (the same second moments as one process over every example), identically."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("_calibration_ddp_worker.py")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parent.parent)}
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(port), str(tmp_path / f"{r}.pt")], env=env,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1, -1)]  # -1: one process, no DDP
    for p in procs:
        assert p.wait(timeout=900) == 0, p.stderr.read()[-2000:]
    r0, r1, single = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1, -1))
    assert (r0["share"], r1["share"], single["share"]) == (5, 5, 10)  # disjoint halves, not the same examples twice
    for path in ("a", "b"):
        assert torch.equal(r0[path][0], r1[path][0]) and torch.equal(r0[path][1], r1[path][1])
        torch.testing.assert_close(r0[path][0], single[path][0])
