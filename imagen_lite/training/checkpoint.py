"""Checkpoints that never lose work.

A checkpoint is a directory ``step_000123/`` holding:
- ``model.safetensors``  the trained modules (float32), written with ``safetensors.torch.save_model``
  (handles T5's tied embeddings)
- ``ema.safetensors``    the EMA of the same modules (when EMA is on): a module's weights, or
  the shadow parameters of a diffusers ``EMAModel`` (its counters go to ``state.pt``)
- ``optimizer.pt`` / ``state.pt``  optimizer + LR scheduler state, step, data position and RNG
  states; read back with ``torch.load(weights_only=True)``, so nothing in a checkpoint can
  execute code
- ``config.json``        the run config it was made with

It is written into a temporary sibling directory and renamed into place, so a process killed
at any moment leaves either the previous checkpoints or a complete new one, never a half one
under a ``step_*`` name. Only the newest ``keep`` checkpoints are kept; an old one is renamed
out of the ``step_*`` namespace before it is deleted, so a kill mid-delete leaves no partial
``step_*`` directory either.

``trainable_only=True`` (LoRA runs) stores only the parameters that require grad: the frozen
base weights are rebuilt from the start model on resume.
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
from safetensors.torch import load_file, load_model, save_file, save_model

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


def _trainable(model) -> dict:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _is_ema_model(ema) -> bool:
    """A diffusers ``EMAModel`` (shadow parameters + counters) rather than a module."""
    return not isinstance(ema, torch.nn.Module) and hasattr(ema, "shadow_params")


def save_checkpoint(root, step: int, model, optimizer, lr_scheduler=None, ema=None, extra: dict | None = None,
                    config: dict | None = None, keep: int = 3, trainable_only: bool = False) -> Path:
    """Write ``root/step_{step:06d}`` atomically; prune to the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        if trainable_only:
            save_file(_trainable(model), str(tmp / "model.safetensors"))
        else:
            save_model(model, str(tmp / "model.safetensors"))
        ema_counters = None
        if _is_ema_model(ema):
            shadow = {f"{i:06d}": p.detach().contiguous() for i, p in enumerate(ema.shadow_params)}
            save_file(shadow, str(tmp / "ema.safetensors"))
            ema_counters = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        elif ema is not None:
            save_model(ema, str(tmp / "ema.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler else None},
            tmp / "optimizer.pt",
        )
        state = {"step": step, "rng": rng_state(), "extra": extra or {}}
        if ema_counters is not None:
            state["ema"] = ema_counters
        torch.save(state, tmp / "state.pt")
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
        doomed = root / f".tmp-old-{old.name}"
        os.rename(old, doomed)  # out of the step_* namespace first: a kill mid-delete leaves no half step_*
        shutil.rmtree(doomed, ignore_errors=True)
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


def raw_weights(path, prefix: str) -> dict:
    """The raw (non-EMA) weights of one module in checkpoint ``path``: the entries of its
    ``model.safetensors`` under ``prefix`` (e.g. ``"unet."``), with the prefix removed -- a
    ``load_state_dict`` for that module (the probes compare them with the EMA)."""
    weights = load_file(str(Path(path) / "model.safetensors"))
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def verify_checkpoint(path) -> None:
    """Raise ``ValueError`` naming ``path`` when a checkpoint is incomplete, truncated or not
    made by :func:`save_checkpoint` -- cheaply (headers and the small files), before a run
    builds anything."""
    from safetensors import safe_open

    path = Path(path)
    try:
        for name in ("state.pt", "optimizer.pt", "model.safetensors", "config.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{name} is missing")
        torch.load(path / "state.pt", weights_only=True)
        torch.load(path / "optimizer.pt", weights_only=True)
        json.loads((path / "config.json").read_text())
        for name in ("model.safetensors", "ema.safetensors"):
            if (path / name).is_file():
                with safe_open(str(path / name), framework="pt") as f:
                    f.keys()
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or truncated ({type(err).__name__}: {err})") from None


def load_checkpoint(path, model, optimizer=None, lr_scheduler=None, ema=None, trainable_only: bool = False) -> dict:
    """Load a checkpoint into the given objects; returns ``{"step", "extra"}``.

    A truncated or corrupt file raises ``ValueError`` naming it, before any state changes.
    """
    path = Path(path)
    try:
        state = torch.load(path / "state.pt", weights_only=True)
        opt = torch.load(path / "optimizer.pt", weights_only=True)
        if trainable_only:
            weights = load_file(str(path / "model.safetensors"))
            missing = sorted(set(_trainable(model)) - set(weights))
            if missing or set(weights) - set(_trainable(model)):
                raise ValueError(f"its weights do not match the trained parameters (missing e.g. {missing[:3]})")
        else:
            load_model(model, str(path / "model.safetensors"))
        if _is_ema_model(ema) and (path / "ema.safetensors").is_file():
            shadow = load_file(str(path / "ema.safetensors"))
            if len(shadow) != len(ema.shadow_params):
                raise ValueError(f"ema.safetensors has {len(shadow)} tensors, the model {len(ema.shadow_params)}")
            ema_state = {**state["ema"], "shadow_params": [shadow[k] for k in sorted(shadow)]}
        elif ema is not None and (path / "ema.safetensors").is_file():
            load_model(ema, str(path / "ema.safetensors"))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or truncated ({type(err).__name__}: {err})") from None
    if trainable_only:
        model.load_state_dict(weights, strict=False)
    if _is_ema_model(ema) and (path / "ema.safetensors").is_file():
        ema.load_state_dict(ema_state)
    if optimizer is not None:
        optimizer.load_state_dict(opt["optimizer"])
    if lr_scheduler is not None and opt.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(opt["lr_scheduler"])
    set_rng_state(state["rng"])
    return {"step": int(state["step"]), "extra": state.get("extra", {})}
