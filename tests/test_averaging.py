"""Checkpoint averaging (imagen_lite.training.averaging, scripts/average_checkpoints.py) on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file

from imagen_lite.training.averaging import average_component, average_pipeline, normalise_weights

ROOT = Path(__file__).resolve().parents[1]


def tiny_unet(seed: int, channels=(8, 16)) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D",) * len(channels), up_block_types=("UpBlock2D",) * len(channels),
    )  # fmt: skip


def snapshot(root: Path, seed: int, dtype=torch.float16, channels=(8, 16)) -> Path:
    """A pipeline-like folder: model_index.json, a unet/ and an untouched scheduler/."""
    tiny_unet(seed, channels).to(dtype).save_pretrained(root / "unet")
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"seed": seed}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["diffusers", "UNet2DModel"]}))
    return root


def weights_of(folder: Path) -> dict:
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_weights_are_the_weighted_mean_in_the_stored_dtype(tmp_path):
    a, b, c = (snapshot(tmp_path / n, s) for n, s in (("a", 0), ("b", 1), ("c", 2)))
    average_pipeline(a, [a, b, c], ["unet"], tmp_path / "out", weights=[2, 1, 1])
    wa, wb, wc, out = weights_of(a), weights_of(b), weights_of(c), weights_of(tmp_path / "out")
    assert set(out) == set(wa)
    for k in wa:
        expected = (0.5 * wa[k].float() + 0.25 * wb[k].float() + 0.25 * wc[k].float()).half()
        assert out[k].dtype == torch.float16
        assert torch.equal(out[k], expected), k
    # the averaged folder loads with the diffusers class, and everything else is the base's copy
    model = UNet2DModel.from_pretrained(tmp_path / "out" / "unet")
    assert list(model.config.block_out_channels) == [8, 16]
    assert json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text()) == {"seed": 0}
    record = json.loads((tmp_path / "out" / "averaging.json").read_text())
    assert record["components"]["unet"]["weights"] == [0.5, 0.25, 0.25]


def test_equal_weights_by_default_and_one_snapshot_is_a_copy(tmp_path):
    a, b = snapshot(tmp_path / "a", 0, torch.float32), snapshot(tmp_path / "b", 1, torch.float32)
    average_component([a / "unet", b / "unet"], tmp_path / "avg")
    out = load_file(tmp_path / "avg" / "diffusion_pytorch_model.safetensors")
    wa, wb = weights_of(a), weights_of(b)
    k = next(iter(wa))
    assert torch.allclose(out[k], (wa[k] + wb[k]) / 2)
    average_component([a / "unet"], tmp_path / "same")
    assert torch.equal(load_file(tmp_path / "same" / "diffusion_pytorch_model.safetensors")[k], wa[k])


def test_different_architectures_are_refused_by_name(tmp_path):
    a = snapshot(tmp_path / "a", 0)
    b = snapshot(tmp_path / "b", 1, channels=(8, 8))
    with pytest.raises(ValueError, match=r"config differs .*block_out_channels"):
        average_pipeline(a, [a, b], ["unet"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_arguments_name_the_value(tmp_path):
    a, b = snapshot(tmp_path / "a", 0), snapshot(tmp_path / "b", 1)
    with pytest.raises(ValueError, match=r"3 given for 2 snapshots"):
        average_pipeline(a, [a, b], ["unet"], tmp_path / "out", weights=[1, 1, 1])
    with pytest.raises(ValueError, match=r"\[-1.0, 2.0\].*>= 0"):
        normalise_weights([-1, 2], 2)
    with pytest.raises(ValueError, match=r"component 'vae' is not in .*\['unet'\]"):
        average_pipeline(a, [a, b], ["vae"], tmp_path / "out")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match=r"taken exists"):
        average_pipeline(a, [a, b], ["unet"], tmp_path / "taken")
    assert not (tmp_path / "out").exists()


def test_tensor_shape_mismatch_leaves_nothing_behind(tmp_path):
    a, b = snapshot(tmp_path / "a", 0), snapshot(tmp_path / "b", 1)
    # same config, but one tensor of b replaced by another shape: a corrupt or foreign snapshot
    wb = weights_of(b)
    k = sorted(wb)[0]
    wb[k] = torch.zeros(3, dtype=torch.float16)
    save_file(wb, b / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=rf"tensor {k} has shape \(3,\)"):
        average_pipeline(a, [a, b], ["unet"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_integer_tensors_are_copied_when_equal_and_refused_when_not(tmp_path):
    a, b = snapshot(tmp_path / "a", 0), snapshot(tmp_path / "b", 1)
    for folder in (a, b):
        w = weights_of(folder)
        w["position_ids"] = torch.arange(4)
        save_file(w, folder / "unet" / "diffusion_pytorch_model.safetensors")
    average_pipeline(a, [a, b], ["unet"], tmp_path / "out")
    assert torch.equal(weights_of(tmp_path / "out")["position_ids"], torch.arange(4))
    w = weights_of(b)
    w["position_ids"] = torch.arange(4).flip(0)
    save_file(w, b / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"integer tensor position_ids differs"):
        average_pipeline(a, [a, b], ["unet"], tmp_path / "out2")


def test_script_reports_bad_input_without_a_traceback(tmp_path):
    a = snapshot(tmp_path / "a", 0)
    cmd = [sys.executable, str(ROOT / "scripts" / "average_checkpoints.py"), "--base", str(a), "--components", "unet",
           "--snapshots", str(a), str(tmp_path / "missing"), "--out", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2
    assert "missing has no unet/ folder" in result.stderr
    assert "Traceback" not in result.stderr
