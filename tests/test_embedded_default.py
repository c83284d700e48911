"""The embedded default models (issue #10): they load offline from the package, generate at 64
and 256 px, and score above a floor on a small seeded shapes prompt set -- a quality check
that fails if the shipped weights or the sampling path break.

Two measures over 20 prompts x 1 seed (the fixed ``prompt_set``): exact shapes accuracy (the
scorer of docs/shapes.md) and "colour hits", the share of images in which every colour the
caption names is detected. Random weights score 0 on both; the floors sit well below what the
shipped weights measure (docs/model_card.md has the numbers), so they catch breakage, not noise.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest

import imagen_lite
from imagen_lite import api, presets
from imagen_lite.data.shapes import parse_caption, prompt_set
from imagen_lite.evaluation.shapes import detect_objects, score_image

# Floors per family: (exact accuracy, colour hits) on PROMPTS at 64 px with the shipped defaults'
# settings. First shipped 2026-11-27 (imagen base step 4000 + SR 1200; dalle2 decoder step 1100) they
# (exact, colour hits) floors. Measured on this set: first ship imagen 0.35 / 0.65, dalle2 0.05 / 0.60;
# second ship (base 7,400, decoder 2,800, DDPM 25 defaults): imagen 0.40 / 0.85, dalle2 0.25 / 0.80
# (with DDIM 25: 0.25 / 0.70 and 0.10 / 0.65); third ship (base 9,200, decoder 3,200, SR 1,500):
# imagen 0.50 / 0.85, dalle2 0.10 / 0.85. DALL-E 2 scores 13.3% on 600 images, i.e. 2-3 of these
# 20 prompts: its exact floor is one image (a broken sampling path scores 0), its colour-hit
# floor carries the margin. Raise them as the weights improve. Fourth session, Imagen base
# guidance 2: imagen 0.60 / 0.85 (exact floor 0.30 -> 0.40); fourth ship of DALL-E 2 (decoder
# 5,600, guidance 3): dalle2 0.35 / 0.85 (exact floor 0.05 -> 0.20); decoder 7,700: 0.40 / 0.90;
# sixth session, decoder 14,200: 0.50 / 0.90 (exact floor 0.20 -> 0.30).
# Seventh session, Imagen base 19,263 (53.7% on 600 images against 35.3%): imagen 0.60 / 0.90 here,
# the same exact share as base 9,200 on these 20 prompts, so the floors stay.
# Eighth session (Imagen SR strength 0.5): the same floors also hold at 256 px, where the same
# prompts and seeds score imagen 0.65 / 0.90 and dalle2 0.50 / 0.90 (64 px: 0.60 / 0.90, 0.50 / 0.90).
# Then DALL-E 2's guidance went (1, 3, 1) -> (2, 2, 1) (43.0% against 40.2% on 600 images):
# dalle2 0.45 / 0.85 at both sizes on these 20 (one image fewer), so the floors stay.
# Tenth session, DALL-E 2 decoder 18,800 (49.0% against 43.0% on 600 images): dalle2 0.50 / 0.90
# at 64 px, 0.65 / 0.95 at 256 px; the floors stay (a margin of four images at 64 px).
# Twelfth session, DALL-E 2 v2 (contrast-group CLIP, grafted decoder 21,800; 60.5% against 49.0%
# on 600 images): dalle2 0.55 / 0.95 at 64 px, 0.60 / 0.95 at 256 px (exact floor 0.30 -> 0.35,
# a margin of four images). Imagen base v2 (20,599, guidance 1.5; 59.3% against 53.7%): imagen
# 0.80 / 0.95 at 64 px, 0.75 / 0.95 at 256 px (exact floor 0.40 -> 0.55, four images under 256 px).
# Fourteenth session (this test's prompts, seeds and scoring, run outside pytest): DALL-E 2
# decoder 26,000 (69.5% on 600 images): dalle2 0.70 / 0.95 at 64 and 256 px (exact floor 0.35 -> 0.50,
# four images); imagen unchanged, 0.80 / 0.95 and 0.75 / 0.95. Both colour-hit floors 0.65 / 0.60 -> 0.80
# (three images under what both families score at both sizes).
# Sixteenth session, Imagen base v3 guided on its first 40% of steps: imagen 0.85 / 0.95 at both sizes.
# Seventeenth session, Imagen base v4 (24,366, guidance 4 on [0, 0.4); 80.7% on 600 images against
# 67.2%): imagen 0.90 / 1.00 at 64 px, 0.90 / 0.95 at 256 px (exact floor 0.55 -> 0.70, four images).
FLOORS = {"imagen": (0.70, 0.80), "dalle2": (0.50, 0.80)}
PROMPTS = 20


def installed(family: str) -> bool:
    preset = presets.DEFAULT_IMAGEN if family == "imagen" else presets.DEFAULT_DALLE2
    return (Path(preset.components["dir"]) / "model_index.json").is_file()


def flat_light_share(image) -> float:
    """The share of an image's pixels that are flat and light: channel range < 20 and channel mean
    >= 200 -- the white or light-grey field a super-resolution stage draws where the domain is white."""
    a = np.asarray(image.convert("RGB")).astype(int)
    mean, spread = a.mean(-1), a.max(-1) - a.min(-1)
    return float(((spread < 20) & (mean >= 200)).mean())


def colour_hit(image, caption: str) -> bool:
    wanted = {obj.color for obj in parse_caption(caption).objects}
    return wanted <= {obj.color for obj in detect_objects(image)}


@pytest.mark.parametrize("family", ["imagen", "dalle2"])
def test_missing_default_falls_back_to_random_tiny_with_a_warning(monkeypatch, tmp_path, family):
    name = "DEFAULT_IMAGEN" if family == "imagen" else "DEFAULT_DALLE2"
    preset = getattr(presets, name)
    monkeypatch.setattr(presets, name, dataclasses.replace(preset, components={"dir": str(tmp_path)}))
    monkeypatch.setattr(api, "_CACHE", {})
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        pipe = api.load_pipeline(family, device="cpu", dtype="float32")
    assert "random tiny" in pipe.imagen_lite_source


@pytest.mark.slow
@pytest.mark.parametrize("family", ["imagen", "dalle2"])
def test_shipped_default_loads_offline_generates_and_scores_above_its_floor(monkeypatch, family):
    if not installed(family):
        pytest.skip(f"no embedded {family} default is installed in imagen_lite/weights/ yet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "random tiny" fallback warning
        pipe = api.load_pipeline(family, device="cpu", dtype="float32")
    assert pipe.imagen_lite_source.startswith(f"embedded default {family}")
    sizes = list(pipe.stage_sizes)  # output side of each image stage

    prompts = [caption for caption, _kind in prompt_set(PROMPTS, seed=0)]
    images = [imagen_lite.generate(p, pipeline=family, size=64, seed=i, device="cpu", dtype="float32")[0]
              for i, p in enumerate(prompts)]  # fmt: skip
    assert all(im.size == (64, 64) for im in images)
    exact = np.mean([score_image(im, p) for im, p in zip(images, prompts)])
    hits = np.mean([colour_hit(im, p) for im, p in zip(images, prompts)])
    floor_exact, floor_hits = FLOORS[family]
    assert exact >= floor_exact and hits >= floor_hits, f"{family}: exact {exact:.2f}, colour hits {hits:.2f}"

    # the full cascade, through the SR stage: the same prompts and seeds (so the same base or
    # decoder images) at 256 px meet the same floors -- a broken SR path scores 0 here
    assert sizes == [64, 256]
    big = [imagen_lite.generate(p, pipeline=family, size=256, seed=i, device="cpu", dtype="float32")[0]
           for i, p in enumerate(prompts)]  # fmt: skip
    assert all(im.size == (256, 256) for im in big)
    exact_256 = np.mean([score_image(im, p) for im, p in zip(big, prompts)])
    hits_256 = np.mean([colour_hit(im, p) for im, p in zip(big, prompts)])
    assert exact_256 >= floor_exact and hits_256 >= floor_hits, f"{family} 256 px: exact {exact_256:.2f}, colour hits {hits_256:.2f}"
    # Since the twenty-sixth session both families' 256 px images come from Imagen's SR (DALL-E 2
    # borrows it: shared_sr), whose field is a flat light grey (median ~247, the model card's Known
    # gaps); the white field of the twenty-third session went with DALL-E 2's own SR. Checked here: a
    # flat near-white field (channel range < 20, mean >= 200) around the shapes, not the noisy, dark
    # or colour-cast one a broken SR path draws.
    background = np.median(np.stack([np.asarray(im) for im in big]))
    field = np.median([flat_light_share(im) for im in big])
    assert background >= 240 and field >= 0.5, f"{family} 256 px: median pixel {background}, flat light field {field:.2f}"


@pytest.mark.parametrize("family", ["imagen", "dalle2"])
def test_ddim_on_the_shipped_default_draws_shapes_at_its_guidance(family):
    """``scheduler="ddim"`` (swaps the base / decoder scheduler) on the shipped default, at its own
    guidance (Imagen 4, DALL-E 2 2), scores like its DDPM default on the floor prompts. Before the
    twenty-fourth session's fix (``sampling.scheduler_step_kwargs``: DDIM re-derives its noise from
    the clipped x0) the guided x0 pushed DDIM off: Imagen drew coloured noise (0 of 8 probe prompts
    right, median pixel 128) and DALL-E 2 0 of 4."""
    if not installed(family):
        pytest.skip(f"no embedded {family} default is installed in imagen_lite/weights/ yet")
    prompts = [caption for caption, _kind in prompt_set(PROMPTS, seed=0)][:8]
    images = imagen_lite.generate(prompts, pipeline=family, size=64, seed=0, device="cpu", dtype="float32", scheduler="ddim")
    exact = np.mean([score_image(im, p) for im, p in zip(images, prompts)])
    background = np.median(np.stack([np.asarray(im) for im in images]))
    assert exact >= 0.5 and background >= 240, f"{family} with DDIM: exact {exact:.2f}, median pixel {background}"


def test_the_shipped_weights_stay_within_the_package_budget():
    """Issue #10: "fp16 safetensors inside the package (total <= 40 MB)". Read as 40 MiB, the unit
    ship_default.py and the README report in (decision, docs/model_card.md, "Twentieth session");
    every weight file is float16 safetensors (but T5's feed-forward ``wo``, which transformers keeps
    in float32: ``T5PreTrainedModel._keep_in_fp32_modules``)."""
    import json

    from safetensors import safe_open

    root = Path(presets.DEFAULT_IMAGEN.components["dir"]).parent
    files = [f for f in root.rglob("*") if f.is_file()]
    if not any(f.suffix == ".safetensors" for f in files):
        pytest.skip("no embedded default is installed in imagen_lite/weights/ yet")
    total = sum(f.stat().st_size for f in files)
    assert total <= 40 * 2**20, f"the shipped weights are {total / 2**20:.2f} MiB, over 40 MiB"
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                wide = [k for k in st.keys() if str(st.get_slice(k).get_dtype()) != "F16"]
            assert all(k.endswith(".wo.weight") for k in wide), f"{f}: not float16: {wide}"
        elif f.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            raise AssertionError(f"{f}: a pickle weight file in the package")
    assert json.loads((root / "imagen" / "model_index.json").read_text())["_class_name"] == "ImagenPipeline"
