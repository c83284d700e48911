"""The examples the README points users to run end to end (tiny step counts)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_example_goes_from_a_folder_to_samples(tmp_path):
    example = load_example("finetune_custom_captions")
    written = example.main(["--out", str(tmp_path), "--steps", "2", "--batch-size", "2", "--samples", "2",
                            "--sample-steps", "2", "--sr"])  # fmt: skip
    assert [p.name for p in written] == ["00.png", "01.png"]
    assert (tmp_path / "base" / "checkpoints" / "step_000002").is_dir()
    assert (tmp_path / "sr" / "model_index.json").is_file()
    image = np.asarray(Image.open(written[0]))
    assert image.shape == (32, 32, 3)  # the tiny cascade's last (SR) stage, not the 16px base
