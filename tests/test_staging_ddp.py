"""Staged factorization under DDP: 2 CPU processes (gloo), ranks bit-identical after every stage and step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_staging_ddp_worker.py")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_process_staged_fit_keeps_ranks_identical(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent.parent)}
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    stages = [r for r in result["records"] if r["when"] == "stage"]
    steps = [r for r in result["records"] if r["when"] == "step"]
    # 12 matrices, one per optimizer step from step 1 on: checked right after each stage and after every step
    assert [r["stages"] for r in stages] == list(range(1, 13))
    assert len(steps) == result["global_step"] == 14
    bad = [r for r in result["records"] if not r["identical"]]
    assert not bad, f"ranks differ: {bad[:3]}"
    assert result["switched"] == result["layers"] == 12
    assert result["dense_frozen"], "a replaced dense weight changed after its stage under DDP"
    assert result["factors_moved"], "a factor did not train after its stage under DDP"
    assert result["stability"]["succeeded"] is True
    assert "RUN SUCCEEDED" in proc.stdout + proc.stderr
