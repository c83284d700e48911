"""Two-process data-parallel training on CPU (issue #5): ``torchrun --nproc_per_node 2`` runs
``imagen-lite train`` over gloo, and both ranks end with identical weights."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import imagen_lite
from imagen_lite.data.shapes import write_imagefolder

pytestmark = pytest.mark.slow


def test_two_process_ddp_on_cpu_ends_with_identical_weights_on_both_ranks(tmp_path):
    data = write_imagefolder(tmp_path / "data", 4, seed=0, size=64)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(imagen_lite.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "imagen_lite.cli", "-v", "train", "--family", "imagen", "--stage", "base", "--model", "tiny",
           "--data", str(data), "--out", str(out), "--max-steps", "3", "--batch-size", "1",
           "--checkpoint-every", "2", "--caption-dropout", "0.5"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    ranks = dict(re.findall(r"rank (\d)/2 step 3 weights sha256 ([0-9a-f]{64})", log))
    assert set(ranks) == {"0", "1"}, log[-3000:]
    assert ranks["0"] == ranks["1"]
    assert (out / "model_index.json").is_file() and (out / "checkpoints" / "step_000003").is_dir()
