"""Checkpoint averaging: one component's weights averaged over snapshots of one lineage.

Model soups (Wortsman et al. 2022), LAWA (Kaddour 2022) and EDM2's post-hoc EMA (Karras et al.
2024) all average the weights of checkpoints taken along one training run. For the embedded
default that costs no training hour: the snapshots in git history (the fp16 exports in
``wip/`` and in earlier versions of the package) are points of lineages whose hours are already
counted, so an average is a free, longer-window EMA of the same run.

The unit is a pipeline *component* in its diffusers/transformers layout (``unet/``,
``text_encoder/``, ``decoder/``...): a folder with ``config.json`` and one ``*.safetensors``.
Every snapshot's component must have the same config (architecture) and the same tensor names
and shapes; anything else is an error naming the file and the tensor, never a silent mix.
Averages are taken in float32 and written in each tensor's stored dtype (fp16 for the shipped
weights); integer tensors (position-id buffers) must be equal in every snapshot and are copied.
Components that are read together (Imagen's T5 and the base UNet it conditions) should be
averaged with the same weights, so that the pair stays a point of one run.

    python scripts/average_checkpoints.py --base imagen_lite/weights/imagen --components unet text_encoder \
        --snapshots SNAP_A SNAP_B --out /tmp/avg/imagen
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Config keys that record provenance, not architecture (diffusers writes these on save).
_PROVENANCE_KEYS = {"_diffusers_version", "transformers_version", "_name_or_path", "_commit_hash"}


def _weights_file(component_dir: Path) -> Path:
    files = sorted(component_dir.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(
            f"{component_dir}: expected exactly one *.safetensors file, found {len(files)} "
            f"({', '.join(f.name for f in files) or 'none'})"
        )
    return files[0]


def _architecture(component_dir: Path) -> dict:
    path = component_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{component_dir}: no config.json (a component folder in diffusers/transformers layout)")
    config = json.loads(path.read_text())
    return {k: v for k, v in config.items() if k not in _PROVENANCE_KEYS}


def normalise_weights(weights, n: int) -> list[float]:
    """``None`` -> uniform; otherwise n non-negative numbers, rescaled to sum to 1."""
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"weights: {len(weights)} given for {n} snapshots; give one per snapshot")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"weights: {weights} -- each must be a finite number >= 0")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"weights: {weights} -- at least one must be > 0")
    return [w / total for w in weights]


def average_component(component_dirs: list[Path], out_dir: Path, weights=None) -> dict:
    """Average one component over snapshots; write ``out_dir`` (config of the first, averaged weights).

    Returns ``{"tensors": n, "weights": [...]}``.
    """
    component_dirs = [Path(d) for d in component_dirs]
    if not component_dirs:
        raise ValueError("average_component: no snapshots given")
    weights = normalise_weights(weights, len(component_dirs))
    reference = _architecture(component_dirs[0])
    for d in component_dirs[1:]:
        other = _architecture(d)
        if other != reference:
            diff = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
            raise ValueError(
                f"{d}: config differs from {component_dirs[0]} in {diff}; only snapshots of one architecture can be averaged"
            )
    files = [_weights_file(d) for d in component_dirs]
    with safe_open(files[0], framework="pt") as f:
        names = sorted(f.keys())
        metadata = f.metadata()
        first = {k: f.get_tensor(k) for k in names}
    floats = [k for k in names if torch.is_floating_point(first[k])]
    total = {k: first[k].float() * weights[0] for k in floats}
    for path, w in zip(files[1:], weights[1:]):
        with safe_open(path, framework="pt") as f:
            other_names = sorted(f.keys())
            if other_names != names:
                missing = sorted(set(names) - set(other_names))[:3]
                extra = sorted(set(other_names) - set(names))[:3]
                raise ValueError(f"{path}: tensor names differ from {files[0]} (missing {missing}, extra {extra})")
            for k in names:
                t = f.get_tensor(k)
                if t.shape != first[k].shape:
                    raise ValueError(f"{path}: tensor {k} has shape {tuple(t.shape)}, {files[0]} has {tuple(first[k].shape)}")
                if k in total:
                    total[k] += t.float() * w
                elif not torch.equal(t, first[k]):  # integer buffers (position ids...) are copied, so they must agree
                    raise ValueError(f"{path}: integer tensor {k} differs from {files[0]}'s; it cannot be averaged")
    averaged = {k: (total[k].to(first[k].dtype) if k in total else first[k]).contiguous() for k in names}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(component_dirs[0] / "config.json", out_dir / "config.json")
    save_file(averaged, out_dir / files[0].name, metadata=metadata)
    return {"tensors": len(names), "weights": weights}


def average_pipeline(base: Path, snapshots: list[Path], components: list[str], out: Path, weights=None) -> dict:
    """Copy pipeline folder ``base`` to ``out`` with ``components`` averaged over ``snapshots``.

    Each snapshot is a folder holding (at least) those components. ``out`` is written into a
    temporary sibling and renamed into place, so a failure leaves no half-written pipeline; an
    existing ``out`` is an error (never overwritten). Returns a record per component, which is
    also written to ``out/averaging.json``.
    """
    base, out = Path(base), Path(out)
    if not (base / "model_index.json").is_file():
        raise ValueError(f"--base {base}: not a pipeline folder (no model_index.json)")
    if out.exists():
        raise ValueError(f"--out {out} exists; choose a new folder (averages never overwrite)")
    if not components:
        raise ValueError("components: none given")
    if not snapshots:
        raise ValueError("snapshots: none given")
    weights = normalise_weights(weights, len(snapshots))  # checked once, before anything is copied
    for name in components:
        if not (base / name).is_dir():
            have = sorted(p.name for p in base.iterdir() if (p / "config.json").is_file())
            raise ValueError(f"component {name!r} is not in {base}; it has {have}")
        for s in snapshots:
            if not (Path(s) / name).is_dir():
                raise ValueError(f"snapshot {s} has no {name}/ folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = tmp / out.name
        shutil.copytree(base, staged)
        record = {"snapshots": [str(s) for s in snapshots], "components": {}}
        for name in components:
            shutil.rmtree(staged / name)
            record["components"][name] = average_component([Path(s) / name for s in snapshots], staged / name, weights)
        (staged / "averaging.json").write_text(json.dumps(record, indent=2) + "\n")
        staged.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
