"""Crash safety (issue #5): ``imagen-lite train`` killed with SIGKILL at random moments, and once
in the middle of a checkpoint write, resumes each time from a valid checkpoint with
``--resume latest`` and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import imagen_lite
from imagen_lite.data.shapes import write_imagefolder
from imagen_lite.training.checkpoint import resolve_resume, verify_checkpoint
from imagen_lite.training.config import TrainConfig
from imagen_lite.training.loop import latest_step, train

pytestmark = pytest.mark.slow

MAX_STEPS = 12
# Runs the CLI with os.fsync wrapped to SIGKILL the process at its N-th call: each checkpoint
# fsyncs its files one by one before the rename, so this dies in the middle of writing one.
KILL_AT_FSYNC = """
import os, signal, sys
n, calls, real = int(sys.argv[1]), [0], os.fsync
def fsync(fd):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(fd)
os.fsync = fsync
from imagen_lite.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one intra-op thread: bitwise-reproducible steps
    root = str(Path(imagen_lite.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_sigkill_at_random_moments_then_resume_latest_equals_an_uninterrupted_run(tmp_path):
    data = write_imagefolder(tmp_path / "data", 4, seed=0, size=64)
    run = dict(family="imagen", stage="base", model="tiny", data=str(data), max_steps=MAX_STEPS, batch_size=2,
               checkpoint_every=1, keep_checkpoints=2, ema_decay=0.9, lr=1e-3, warmup_steps=2, caption_dropout=0.2)  # fmt: skip
    reference = train(TrainConfig(out=str(tmp_path / "reference"), **run))

    out = tmp_path / "killed"
    args = ["train", "--out", str(out), "--resume", "latest"]
    for key, value in run.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    ckpts = out / "checkpoints"

    # 1. killed in the middle of a checkpoint write (the 3rd checkpoint: 5 files each)
    proc = subprocess.run([sys.executable, "-c", KILL_AT_FSYNC, "13", *args], env=_env(), capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert any(p.name.startswith(".tmp-") for p in ckpts.iterdir()), "the kill did not land inside a checkpoint write"
    assert latest_step(out) == 2
    verify_checkpoint(resolve_resume(ckpts, "latest"))

    # 2. killed at random moments once each run has made progress
    rng = random.Random(0)
    for _ in range(2):
        before = latest_step(out) or 0
        proc = subprocess.Popen([sys.executable, "-m", "imagen_lite.cli", *args], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 180
        while (latest_step(out) or 0) <= before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = resolve_resume(ckpts, "latest")
        verify_checkpoint(latest)  # always a complete checkpoint to resume from
        assert latest_step(out) > before

    # 3. run to the end
    done = subprocess.run([sys.executable, "-m", "imagen_lite.cli", *args], env=_env(), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert latest_step(out) == MAX_STEPS
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(str(reference / "checkpoints" / f"step_{MAX_STEPS:06d}" / name))
        b = load_file(str(ckpts / f"step_{MAX_STEPS:06d}" / name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{name} {k}")
    ua = load_file(str(reference / "unet" / "diffusion_pytorch_model.safetensors"))
    ub = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    for k in ua:
        torch.testing.assert_close(ua[k], ub[k], rtol=0, atol=1e-6)
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())  # stale temp dirs were cleaned up
