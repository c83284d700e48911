"""Checkpoints that never lose work.

A checkpoint is a directory ``step_000123/`` holding:
- ``model.safetensors``  the trained modules (float32), written with ``safetensors.torch.save_model``
  (handles T5's tied embeddings)
- ``ema.safetensors``    the EMA of the same modules (when EMA is on)
- ``optimizer.pt`` / ``state.pt``  optimizer + LR scheduler state, step, data position and RNG
  states; read back with ``torch.load(weights_only=True)``, so nothing in a checkpoint can
  execute code
- ``config.json``        the run config it was made with

It is written into a temporary sibling directory and renamed into place, so a process killed
at any moment leaves either the previous checkpoints or a complete new one, never a half one
under a ``step_*`` name. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

STEP_RE = re.compile(r"^step_(\d+)$")


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": torch.tensor(np.frombuffer(json.dumps(_np_state()).encode(), dtype=np.uint8).copy()),
        "python": torch.tensor(np.frombuffer(json.dumps(_py_state()).encode(), dtype=np.uint8).copy()),
    }


def _np_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _py_state():
    v, state, gauss = random.getstate()
    return [v, list(state), gauss]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = json.loads(bytes(state["numpy"].tolist()).decode())
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    v, pstate, gauss = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((v, tuple(pstate), gauss))


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_checkpoint(root, step: int, model, optimizer, lr_scheduler=None, ema=None, extra: dict | None = None,
                    config: dict | None = None, keep: int = 3) -> Path:
    """Write ``root/step_{step:06d}`` atomically; prune to the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        if ema is not None:
            save_model(ema, str(tmp / "ema.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler else None},
            tmp / "optimizer.pt",
        )
        torch.save({"step": step, "rng": rng_state(), "extra": extra or {}}, tmp / "state.pt")
        (tmp / "config.json").write_text(json.dumps(config or {}, indent=2, default=str))
        for f in tmp.iterdir():  # make the bytes durable before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        final = root / f"step_{step:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-write
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def resolve_resume(root, resume: str | None) -> Path | None:
    """``None`` -> None; ``"latest"`` -> newest checkpoint under ``root`` (None if none);
    a path -> that checkpoint (must exist)."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"resume={resume!r} is not a checkpoint directory (no state.pt); use 'latest' or a step_* dir")
    return path


def load_checkpoint(path, model, optimizer=None, lr_scheduler=None, ema=None) -> dict:
    """Load a checkpoint into the given objects; returns ``{"step", "extra"}``.

    A truncated or corrupt file raises ``ValueError`` naming it, before any state changes.
    """
    path = Path(path)
    try:
        state = torch.load(path / "state.pt", weights_only=True)
        opt = torch.load(path / "optimizer.pt", weights_only=True)
        load_model(model, str(path / "model.safetensors"))
        if ema is not None and (path / "ema.safetensors").is_file():
            load_model(ema, str(path / "ema.safetensors"))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or truncated ({type(err).__name__}: {err})") from None
    if optimizer is not None:
        optimizer.load_state_dict(opt["optimizer"])
    if lr_scheduler is not None and opt.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(opt["lr_scheduler"])
    set_rng_state(state["rng"])
    return {"step": int(state["step"]), "extra": state.get("extra", {})}
