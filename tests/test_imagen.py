"""The Imagen-style cascade: equivalence with diffusers' IF pipelines, generate() contract,
device/dtype policy, bad input, save/load, CLI."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import imagen_lite
from imagen_lite import api, runtime
from imagen_lite.cli import main
from imagen_lite.models.tiny import build_tiny_imagen
from imagen_lite.pipelines.imagen import ImagenPipeline, from_if_repos


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- equivalence with diffusers
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_base_matches_ifpipeline(tiny_if_dirs, guidance):
    from diffusers import IFPipeline

    d1, _ = tiny_if_dirs
    ref = _quiet(IFPipeline.from_pretrained(d1))
    ours = _quiet(from_if_repos(str(d1)))
    expected = ref(
        "a red circle", num_inference_steps=4, guidance_scale=guidance, generator=torch.Generator().manual_seed(0),
        output_type="pt", clean_caption=False,
    ).images  # fmt: skip
    got = ours("a red circle", num_inference_steps=4, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(0), output_type="pt").images  # fmt: skip
    assert got.shape == expected.shape == (1, 3, 16, 16)
    assert (got - expected).abs().max().item() < 1e-4


def test_cascade_matches_if_stage_1_then_2(tiny_if_dirs):
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    d1, d2 = tiny_if_dirs
    s1, s2 = _quiet(IFPipeline.from_pretrained(d1)), _quiet(IFSuperResolutionPipeline.from_pretrained(d2))
    ours = _quiet(from_if_repos(str(d1), [str(d2)]))
    prompts = ["a red circle", "two blue squares"]
    g = torch.Generator().manual_seed(3)
    pe, ne = s1.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt=["green", "yellow"])
    low = s1(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=3, guidance_scale=5.0, generator=g,
             output_type="pt").images  # fmt: skip
    high = s2(image=low, prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=3, guidance_scale=2.0,
              noise_level=100, generator=g, output_type="pt").images  # fmt: skip
    out = ours(prompts, negative_prompt=["green", "yellow"], num_inference_steps=3, guidance_scale=(5.0, 2.0),
               noise_level=100, generator=torch.Generator().manual_seed(3), output_type="pt",
               return_stage_outputs=True)  # fmt: skip
    assert (out.stage_images["base"] - low).abs().max().item() < 1e-4
    assert (out.images - high).abs().max().item() < 1e-4
    assert out.images.shape == (2, 3, 32, 32)
    assert set(out.stage_seconds) == {"text_encoder", "base", "sr_32"}


def test_unshuffled_base_produces_full_size_images():
    pipe = _quiet(build_tiny_imagen(with_sr=False, unshuffle_factor=2))
    out = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape == (1, 16, 16, 3)
    assert pipe.stage_sizes == [16]


def test_sr_stage_on_unshuffled_patches():
    from imagen_lite.models import components as C

    base = build_tiny_imagen(with_sr=False)
    sr = C.if_unet(sample_size=16, in_channels=24, out_channels=12, text_dim=32, size=C.TINY_SR, super_resolution=True)
    pipe = _quiet(ImagenPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, unet=base.unet, scheduler=base.scheduler,
        sr_unet=sr, sr_scheduler=C.ddpm_scheduler(), image_noising_scheduler=C.noising_scheduler(),
        sr_unshuffle_factor=2,
    ))  # fmt: skip
    assert pipe.stage_sizes == [16, 32] and pipe.stage_names == ["base", "sr_32"]
    out = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="pt")
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()


def test_encode_once_then_free_text_encoder():
    pipe = _quiet(build_tiny_imagen(with_sr=False))
    kw = dict(num_inference_steps=2, guidance_scale=3.0, output_type="pt")
    expected = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    embeds, negative = pipe.encode_prompt(["a red circle"]), pipe.encode_prompt([""])
    pipe.free_text_encoder()
    assert pipe.text_encoder is None
    got = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.allclose(got.images, expected, atol=1e-6)
    with pytest.raises(ValueError, match="text encoder was freed"):
        pipe("a red circle", **kw)


def _count_calls(module):
    """A forward pre-hook that records the timestep of every call of ``module``."""
    seen = []
    def record(m, args, kwargs):  # a timestep given as a scalar or one per row (the refiner's)
        seen.append(int(args[1].flatten()[0]) if torch.is_tensor(args[1]) else int(args[1]))

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    return seen, handle


def test_sr_strength_runs_the_tail_of_the_sr_schedule():
    """sr_strength < 1 (img2img, as diffusers' strength): the SR stage runs the last
    int(steps * strength) of its timesteps; 1 runs them all (IF's path)."""
    pipe = _quiet(build_tiny_imagen())
    pipe.sr_scheduler.set_timesteps(4)
    full = [int(t) for t in pipe.sr_scheduler.timesteps]
    kw = dict(num_inference_steps=(2, 4), guidance_scale=1.0, output_type="pt")
    seen, handle = _count_calls(pipe.sr_unet)
    try:
        pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw)
        assert seen == full
        seen.clear()
        pipe("a red circle", sr_strength=0.5, generator=torch.Generator().manual_seed(0), **kw)
        assert seen == full[2:]
    finally:
        handle.remove()


def test_low_sr_strength_keeps_the_upsampled_base_image():
    """Started at the last timestep, the SR output is the bilinear upsample of the base image
    (almost no noise is added and one step removes it); from pure noise it is not."""
    from imagen_lite import sampling

    pipe = _quiet(build_tiny_imagen())
    kw = dict(num_inference_steps=(2, 10), guidance_scale=1.0, output_type="pt", return_stage_outputs=True)
    low = pipe("a red circle", sr_strength=0.1, generator=torch.Generator().manual_seed(0), **kw)
    full = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw)
    base = low.stage_images["base"]
    assert torch.equal(base, full.stage_images["base"])
    up = sampling.upsample(base, low.images.shape[-1])  # "pt" outputs stay in [-1, 1]
    assert (low.images - up).abs().mean().item() < 0.02
    assert (full.images - up).abs().mean().item() > 0.1


def test_generate_takes_sr_strength_from_the_model_dir(tiny_dir, tmp_path):
    import json
    import shutil

    from imagen_lite import presets

    model = tmp_path / "with_defaults"
    shutil.copytree(tiny_dir, model)
    (model / presets.DEFAULTS_FILE).write_text(json.dumps({"num_inference_steps": [2, 4], "sr_strength": 0.5}))
    pipe = imagen_lite.load_pipeline(model=str(model), device="cpu")
    assert pipe.imagen_lite_preset.sr_strength == 0.5
    seen, handle = _count_calls(pipe.sr_unet)
    try:
        imagen_lite.generate("a red circle", model=str(model), device="cpu", seed=0)
        assert len(seen) == 2
        seen.clear()
        imagen_lite.generate("a red circle", model=str(model), device="cpu", seed=0, sr_strength=1.0)
        assert len(seen) == 4
    finally:
        handle.remove()


def test_denoising_end_returns_the_base_x0_prediction_after_that_share_of_its_steps():
    """denoising_end < 1 (diffusers' name): the base runs the first round(steps * end) of its
    timesteps, and its output is the scheduler's x0 prediction at the last of them; 1 runs all."""
    from diffusers import DDPMScheduler

    pipe = _quiet(build_tiny_imagen())
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.set_timesteps(4)
    full = [int(t) for t in pipe.scheduler.timesteps]
    kw = dict(num_inference_steps=(4,), guidance_scale=1.0, output_type="pt", num_stages=1)
    seen, handle = _count_calls(pipe.unet)
    x0 = []
    original = pipe.scheduler.step

    def step(model_output, timestep, sample, generator=None, return_dict=True):  # records each step's x0 prediction
        out = original(model_output, timestep, sample, generator=generator, return_dict=True)
        x0.append(out.pred_original_sample)
        return out if return_dict else (out.prev_sample,)

    pipe.scheduler.step = step
    try:
        whole = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
        assert seen == full
        seen.clear(), x0.clear()
        half = pipe("a red circle", denoising_end=0.5, generator=torch.Generator().manual_seed(0), **kw).images
        assert seen == full[:2]
        r = pipe.config.unshuffle_factor
        assert torch.allclose(half, imagen_lite.sampling.pixel_shuffle(x0[-1], r).clamp(-1, 1), atol=1e-6)
        assert not torch.allclose(half, whole)
        seen.clear()
        same = pipe("a red circle", denoising_end=1.0, generator=torch.Generator().manual_seed(0), **kw).images
        assert torch.equal(same, whole) and seen == full
    finally:
        handle.remove()
    for bad in (0, 1.5, -0.2, True, "0.5"):
        with pytest.raises(ValueError, match="denoising_end=.* must be a number in \\(0, 1\\]"):
            pipe("a red circle", denoising_end=bad, **kw)


def test_denoising_end_needs_a_scheduler_that_predicts_x0():
    from diffusers import DPMSolverMultistepScheduler

    pipe = _quiet(build_tiny_imagen())
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="denoising_end=0.5 needs a scheduler whose step returns its x0 prediction"):
        pipe("a red circle", num_inference_steps=(4,), guidance_scale=1.0, num_stages=1, denoising_end=0.5)


def test_generate_takes_denoising_end_from_the_model_dir_and_the_cli(tiny_dir, tmp_path, monkeypatch):
    import json
    import shutil

    from imagen_lite import presets

    model = tmp_path / "with_end"
    shutil.copytree(tiny_dir, model)
    (model / presets.DEFAULTS_FILE).write_text(json.dumps({"num_inference_steps": [4, 2], "denoising_end": 0.5}))
    pipe = imagen_lite.load_pipeline(model=str(model), device="cpu")
    seen, handle = _count_calls(pipe.unet)
    try:
        imagen_lite.generate("a red circle", model=str(model), device="cpu", seed=0, size=16)
        assert len(seen) == 2
        seen.clear()
        imagen_lite.generate("a red circle", model=str(model), device="cpu", seed=0, size=16, denoising_end=1.0)
        assert len(seen) == 4
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="denoising_end=0.5 applies to pipeline='imagen' only"):
        imagen_lite.generate("a red circle", pipeline="dalle2", denoising_end=0.5)
    got = {}
    monkeypatch.setattr(imagen_lite.api, "generate", lambda *a, **k: got.update(k) or [Image.new("RGB", (8, 8))])
    main(["generate", "a red circle", "--model", str(model), "--denoising-end", "0.75", "--out", str(tmp_path / "o.png")])
    assert got.get("denoising_end") == 0.75


# ---------------------------------------------------------------- the low-noise refiner
@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_x0_and_model_outputs_convert_both_ways(kind):
    from imagen_lite import sampling

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    a = 0.7
    xt = a**0.5 * x0 + (1 - a) ** 0.5 * noise
    v = a**0.5 * noise - (1 - a) ** 0.5 * x0
    output = {"epsilon": noise, "sample": x0, "v_prediction": v}[kind]  # what a perfect model of each kind says
    assert torch.allclose(sampling.x0_from_prediction(output, xt, a, kind), x0, atol=1e-5)
    assert torch.allclose(sampling.prediction_from_x0(x0, xt, a, kind), output, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type='flow' is not one of"):
        sampling.x0_from_prediction(output, xt, a, "flow")


def test_the_refiner_runs_the_base_steps_below_refiner_start_and_converts_its_v_to_the_base_output():
    """refiner_start=T: the base UNet runs the steps at t >= T, the refiner (an unconditional
    UNet2DModel predicting v) those below; its x0 estimate enters the base's scheduler as the base
    UNet's own kind of output. 0 (the default) leaves the base alone, as a pipeline without one."""
    from imagen_lite import sampling

    pipe = _quiet(build_tiny_imagen(unshuffle_factor=2, with_refiner=True))
    plain = _quiet(build_tiny_imagen(unshuffle_factor=2))
    kw = dict(num_inference_steps=(10,), guidance_scale=(3.0,), output_type="pt", num_stages=1)
    pipe.scheduler.set_timesteps(10)
    full = [int(t) for t in pipe.scheduler.timesteps]
    base_seen, h1 = _count_calls(pipe.unet)
    refiner_seen, h2 = _count_calls(pipe.refiner)
    try:
        off = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
        assert base_seen == full and refiner_seen == []
        assert torch.equal(off, plain("a red circle", generator=torch.Generator().manual_seed(0), **kw).images)
        base_seen.clear()
        on = pipe("a red circle", refiner_start=300, generator=torch.Generator().manual_seed(0), **kw).images
        assert base_seen == [t for t in full if t >= 300] and refiner_seen == [t for t in full if t < 300]
        assert not torch.allclose(on, off)
    finally:
        h1.remove(), h2.remove()
    # the conversion: what _refine hands the base's scheduler is the v model's x0, as epsilon
    x = torch.randn(2, 12, 8, 8, generator=torch.Generator().manual_seed(1))
    a = pipe.scheduler.alphas_cumprod[100].item()
    v = pipe.refiner(sampling.pixel_shuffle(x, 2), torch.tensor([100, 100])).sample
    x0 = a**0.5 * sampling.pixel_shuffle(x, 2) - (1 - a) ** 0.5 * v
    eps = pipe._refine(x, torch.tensor(100))
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert torch.allclose(sampling.pixel_shuffle((x - a**0.5 * sampling.pixel_unshuffle(x0, 2)) / (1 - a) ** 0.5, 2),
                          sampling.pixel_shuffle(eps, 2), atol=1e-4)  # fmt: skip


def test_the_refiner_runs_the_sr_steps_below_that_stages_refiner_start():
    """refiner_start per stage: (0, T) leaves the base alone and hands the SR stage its steps below
    T, at the SR's resolution; one value applies to every stage."""
    pipe = _quiet(build_tiny_imagen(unshuffle_factor=2, with_refiner=True))
    kw = dict(num_inference_steps=(4, 10), guidance_scale=1.0, output_type="pt")
    pipe.sr_scheduler.set_timesteps(10)
    sr_full = [int(t) for t in pipe.sr_scheduler.timesteps]
    refiner_seen, h1 = _count_calls(pipe.refiner)
    sr_seen, h2 = _count_calls(pipe.sr_unet)
    sizes, h3 = _record_sides(pipe.refiner)
    try:
        off = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
        on = pipe("a red circle", refiner_start=(0, 300), generator=torch.Generator().manual_seed(0), **kw).images
        assert refiner_seen == [t for t in sr_full if t < 300] and set(sizes) == {32}
        assert sr_seen == sr_full + [t for t in sr_full if t >= 300]
        assert not torch.allclose(on, off)
        refiner_seen.clear(), sizes.clear()
        pipe("a red circle", refiner_start=300, generator=torch.Generator().manual_seed(0), **kw)
        assert set(sizes) == {16, 32}  # one value: the base (16 px) and the SR (32 px)
    finally:
        h1.remove(), h2.remove(), h3.remove()


def _record_sides(module):
    """A forward pre-hook that records the spatial side of every input of ``module``."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[-1]), with_kwargs=True)
    return seen, handle


def test_bad_refiner_start_and_refiner_parts_are_named():
    from diffusers import DDPMScheduler

    from imagen_lite.models import components as C

    pipe = _quiet(build_tiny_imagen(unshuffle_factor=2, with_refiner=True))
    kw = dict(num_inference_steps=(4,), guidance_scale=1.0, num_stages=1)
    for bad in (-1, 1.5, True, "80"):
        with pytest.raises(ValueError, match="refiner_start for stage 'base' is .*; it must be a timestep, an integer >= 0"):
            pipe("a red circle", refiner_start=bad, **kw)
    with pytest.raises(ValueError, match="refiner_start for stage 'base' is 301, above the timesteps this refiner was "
                                         "trained on: use 0 to 300"):  # fmt: skip
        pipe("a red circle", refiner_start=301, **kw)
    with pytest.raises(ValueError, match="refiner_start for stage 'sr_32' is 400, above"):
        pipe("a red circle", refiner_start=(80, 400), num_inference_steps=(4, 2), guidance_scale=1.0)
    with pytest.raises(ValueError, match="refiner_start=\(80, 80, 80\) gives 3 values but this model has 2 stage"):
        pipe("a red circle", refiner_start=(80, 80, 80), num_inference_steps=(4, 2), guidance_scale=1.0)
    with pytest.raises(ValueError, match="refiner_start=80 needs a pipeline with a refiner; this one has none"):
        _quiet(build_tiny_imagen())("a red circle", refiner_start=80, **kw)
    learned_sr = _quiet(build_tiny_imagen(unshuffle_factor=2))  # its SR learns its variance
    learned_sr = ImagenPipeline(**{**learned_sr.components, "refiner": C.refiner_unet(16),
                                   "refiner_scheduler": C.refiner_scheduler()}, unshuffle_factor=2, refiner_max_timestep=300)  # fmt: skip
    with pytest.raises(ValueError, match="a refiner needs a sr_32 scheduler with fixed variance"):
        learned_sr("a red circle", refiner_start=(80, 80), num_inference_steps=(4, 2), guidance_scale=1.0)
    learned_sr.set_progress_bar_config(disable=True)
    assert learned_sr("a red circle", refiner_start=(80, 0), num_inference_steps=(4, 2), guidance_scale=1.0).images
    parts = {k: v for k, v in pipe.components.items()}
    with pytest.raises(ValueError, match="refiner needs refiner_scheduler"):
        ImagenPipeline(**{**parts, "refiner_scheduler": None}, refiner_max_timestep=300)
    linear = DDPMScheduler.from_config({**parts["refiner_scheduler"].config, "beta_schedule": "linear"})
    with pytest.raises(ValueError, match="must have the base scheduler's noise schedule"):
        ImagenPipeline(**{**parts, "refiner_scheduler": linear}, refiner_max_timestep=300)
    with pytest.raises(ValueError, match="refiner_max_timestep=0: the timesteps the refiner was trained on"):
        ImagenPipeline(**parts, refiner_max_timestep=0)
    learned = build_tiny_imagen()  # its base learns its variance
    with pytest.raises(ValueError, match="a refiner needs a base scheduler with fixed variance"):
        ImagenPipeline(**{**learned.components, "refiner": C.refiner_unet(16), "refiner_scheduler": C.refiner_scheduler()},
                       refiner_max_timestep=300)  # fmt: skip


def test_a_pipeline_with_a_refiner_saves_and_loads_with_diffusers_classes(tmp_path):
    from diffusers import UNet2DModel

    pipe = _quiet(build_tiny_imagen(unshuffle_factor=2, with_refiner=True))
    pipe.save_pretrained(tmp_path / "p", safe_serialization=True)
    assert isinstance(UNet2DModel.from_pretrained(tmp_path / "p" / "refiner"), UNet2DModel)
    back = _quiet(ImagenPipeline.from_pretrained(tmp_path / "p"))
    assert back.config.refiner_max_timestep == 300 and back.refiner_scheduler.config.prediction_type == "v_prediction"
    kw = dict(num_inference_steps=(6,), guidance_scale=1.0, output_type="pt", num_stages=1, refiner_start=200)
    a = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    b = back("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.allclose(a, b, atol=1e-5)


def test_generate_takes_refiner_start_from_the_model_dir_and_the_cli(tmp_path, monkeypatch):
    import json

    from imagen_lite import presets

    model = tmp_path / "with_refiner"
    build_tiny_imagen(unshuffle_factor=2, with_refiner=True).save_pretrained(model, safe_serialization=True)
    (model / presets.DEFAULTS_FILE).write_text(json.dumps({"num_inference_steps": [4, 2], "refiner_start": 300}))
    pipe = imagen_lite.load_pipeline(model=str(model), device="cpu")
    seen, h1 = _count_calls(pipe.refiner)
    base_seen, h2 = _count_calls(pipe.unet)
    try:
        imagen_lite.generate("a red circle", model=str(model), device="cpu", seed=0, size=16)
        assert seen and all(t < 300 for t in seen) and all(t >= 300 for t in base_seen) and len(seen + base_seen) == 4
        seen.clear()
        imagen_lite.generate("a red circle", model=str(model), device="cpu", seed=0, size=16, refiner_start=0)
        assert seen == []
    finally:
        h1.remove(), h2.remove()
    got = {}
    monkeypatch.setattr(imagen_lite.api, "generate", lambda *a, **k: got.update(k) or [Image.new("RGB", (8, 8))])
    main(["generate", "a red circle", "--model", str(model), "--refiner-start", "120", "--out", str(tmp_path / "o.png")])
    assert got.get("refiner_start") == 120
    main(["generate", "a red circle", "--model", str(model), "--refiner-start", "80,120", "--out", str(tmp_path / "o.png")])
    assert got.get("refiner_start") == (80, 120)
    with pytest.raises(SystemExit):
        main(["generate", "a red circle", "--model", str(model), "--refiner-start", "soon", "--out", str(tmp_path / "o.png")])


def _record_batches(module):
    """A forward pre-hook that records the batch size of every call of ``module``."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[0]), with_kwargs=True)
    return seen, handle


def test_guidance_interval_guides_only_its_steps():
    """guidance_interval=(start, stop): steps int(start*n) <= i < int(stop*n) run both CFG halves,
    the others the conditional half alone (one forward); (0, 1) is the default and guides all."""
    pipe = _quiet(build_tiny_imagen())
    kw = dict(num_inference_steps=4, guidance_scale=3.0, num_stages=1, output_type="pt")
    seen, handle = _record_batches(pipe.unet)
    try:
        full = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
        assert seen == [2, 2, 2, 2]
        seen.clear()
        same = pipe("a red circle", guidance_interval=(0, 1), generator=torch.Generator().manual_seed(0), **kw).images
        assert torch.equal(full, same)
        seen.clear()
        early = pipe("a red circle", guidance_interval=(0.0, 0.5), generator=torch.Generator().manual_seed(0), **kw).images
        assert seen == [2, 2, 1, 1]
        seen.clear()
        pipe("a red circle", guidance_interval=[(0.25, 0.75)], generator=torch.Generator().manual_seed(0), **kw)
        assert seen == [1, 2, 2, 1]
    finally:
        handle.remove()
    unguided = pipe("a red circle", generator=torch.Generator().manual_seed(0), **{**kw, "guidance_scale": 1.0}).images
    assert not torch.allclose(early, full) and not torch.allclose(early, unguided)


def test_denoise_outside_the_interval_is_the_conditional_branch():
    """sampling.denoise with an interval equals a loop that guides inside it and, outside it,
    takes the conditional prediction alone (what guidance 1 gives)."""
    from diffusers import DDIMScheduler

    from imagen_lite import sampling

    context = torch.randn(4, 3)  # [uncond, cond] rows for a batch of 2

    def model_fn(x, t, i):
        c = sampling.conditional_rows(context, x)
        return 0.1 * x + c[:, :, None, None] * (1 + int(t) / 1000)

    def run(interval):
        scheduler = DDIMScheduler(num_train_timesteps=1000)
        scheduler.set_timesteps(5)
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        return sampling.denoise(model_fn, scheduler, x, scheduler.timesteps, guidance_scale=4.0,
                                do_classifier_free_guidance=True, guidance_interval=interval)  # fmt: skip

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(5)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(scheduler.timesteps):
        if i < 2:  # int(0.4 * 5) = 2 guided steps
            u, c = model_fn(torch.cat([x, x]), t, i).chunk(2)
            out = u + 4.0 * (c - u)
        else:
            out = model_fn(x, t, i)
        x = scheduler.step(out, t, x, return_dict=False)[0]
    assert torch.allclose(run((0.0, 0.4)), x, atol=1e-6)
    assert not torch.allclose(run((0.0, 1.0)), x, atol=1e-3)
    assert sampling.guided_steps(10, (0.2, 0.6)) == [False] * 2 + [True] * 4 + [False] * 4


def test_generate_takes_the_guidance_interval_from_the_model_dir(tiny_dir, tmp_path):
    import json
    import shutil

    from imagen_lite import presets

    model = tmp_path / "with_interval"
    shutil.copytree(tiny_dir, model)
    (model / presets.DEFAULTS_FILE).write_text(json.dumps({"guidance_scale": [3.0, 1.0], "guidance_interval": [0, 0.5]}))
    pipe = imagen_lite.load_pipeline(model=str(model), device="cpu")
    assert pipe.imagen_lite_preset.guidance_interval == (0, 0.5)
    seen, handle = _record_batches(pipe.unet)
    try:
        imagen_lite.generate("a red circle", model=str(model), device="cpu", seed=0, size=16, num_inference_steps=4)
        assert seen == [2, 2, 1, 1]
        seen.clear()
        imagen_lite.generate("a red circle", model=str(model), device="cpu", seed=0, size=16, num_inference_steps=4,
                             guidance_interval=(0, 1))  # fmt: skip
        assert seen == [2, 2, 2, 2]
    finally:
        handle.remove()


# ---------------------------------------------------------------- generate() contract
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_imagen") / "pipe"
    build_tiny_imagen().save_pretrained(path, safe_serialization=True)
    return str(path)


def _arr(images):
    return np.stack([np.asarray(im) for im in images])


def test_same_seed_same_image_and_different_seed_differs(tiny_dir):
    kw = dict(model=tiny_dir, device="cpu", num_inference_steps=2)
    a = _arr(imagen_lite.generate("a red circle", seed=1, **kw))
    b = _arr(imagen_lite.generate("a red circle", seed=1, **kw))
    c = _arr(imagen_lite.generate("a red circle", seed=2, **kw))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_batch_equals_single(tiny_dir):
    kw = dict(model=tiny_dir, device="cpu", num_inference_steps=2, size=16, guidance_scale=2.0)
    pipe = imagen_lite.load_pipeline(model=tiny_dir, device="cpu")
    emb = pipe.encode_prompt(["a red circle", "a blue square"])
    single = pipe.encode_prompt(["a blue square"])
    assert torch.allclose(emb[1:], single, atol=1e-5)  # text encoding does not depend on batch neighbours
    images = imagen_lite.generate(["a red circle", "a blue square"], seed=0, **kw)
    assert len(images) == 2 and images[0].size == (16, 16)


@pytest.mark.parametrize("size,expected", [(16, (16, 16)), (32, (32, 32)), (None, (32, 32))])
def test_size_selects_stages(tiny_dir, size, expected):
    images = imagen_lite.generate("a red circle", model=tiny_dir, size=size, device="cpu", seed=0, num_inference_steps=2)
    assert images[0].size == expected and images[0].mode == "RGB"


@pytest.mark.parametrize("kind", ["clip_sample", "thresholding"])
def test_ddim_carries_the_noise_of_the_x0_it_clips_to(kind):
    """A DDIM step of an x0-predicting stage treats an out-of-range x0 as the x0 its scheduler clips
    (or thresholds) it to, as DDPM's posterior does: a guided x0 far outside [-1, 1] otherwise
    carried a wrong noise into every step (twenty-fourth session: ``scheduler="ddim"`` drew
    coloured noise with the embedded Imagen default at its guidance 4)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from imagen_lite import sampling

    config = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=True)
    if kind == "thresholding":
        config.update(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5)
    clip = (lambda v: v.clamp(-1, 1)) if kind == "clip_sample" else (lambda v: sampling.dynamic_threshold(v, 0.95, 1.5))

    def run(model_fn):
        scheduler = DDIMScheduler(**config)
        scheduler.set_timesteps(6)
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        return sampling.denoise(model_fn, scheduler, x, scheduler.timesteps,
                                step_kwargs=sampling.scheduler_step_kwargs(scheduler))  # fmt: skip

    def raw(x, t, i):  # an x0 prediction up to 4x out of range, that depends on x_t
        return 4.0 * torch.tanh(x + 0.5)

    assert raw(torch.zeros(1), 0, 0).abs().max() > 1.5
    assert torch.allclose(run(raw), run(lambda x, t, i: clip(raw(x, t, i))), atol=1e-5)
    assert sampling.scheduler_step_kwargs(DDIMScheduler(**config))["use_clipped_model_output"] is True
    assert "use_clipped_model_output" not in sampling.scheduler_step_kwargs(DDIMScheduler(clip_sample=False))
    assert "use_clipped_model_output" not in sampling.scheduler_step_kwargs(DDPMScheduler(**config))


def test_num_images_per_prompt(tiny_dir):
    images = imagen_lite.generate(["a red circle", "a blue square"], model=tiny_dir, size=16, num_images_per_prompt=3,
                                  device="cpu", seed=0, num_inference_steps=2)  # fmt: skip
    assert len(images) == 6


@pytest.mark.parametrize("name", ["ddim", "dpm++", "unipc", "euler"])
def test_schedulers_swap_by_name(tiny_dir, name):
    kw = dict(model=tiny_dir, device="cpu", seed=0, num_inference_steps=3, size=16, scheduler=name)
    pipe = imagen_lite.load_pipeline(model=tiny_dir, device="cpu", scheduler=name)
    assert type(pipe.scheduler).__name__ == api.SCHEDULERS[name][0]
    assert np.array_equal(_arr(imagen_lite.generate("a red circle", **kw)), _arr(imagen_lite.generate("a red circle", **kw)))


def test_if_layout_dirs_load_through_generate(tiny_if_dirs):
    d1, d2 = tiny_if_dirs
    low = imagen_lite.generate("a red circle", model=str(d1), device="cpu", seed=0, num_inference_steps=2)
    both = imagen_lite.generate("a red circle", model={"base": str(d1), "sr": [str(d2)]}, device="cpu", seed=0,
                                num_inference_steps=2)  # fmt: skip
    assert low[0].size == (16, 16) and both[0].size == (32, 32)


def test_direct_call_rejects_per_stage_tuples_longer_than_the_model(tiny_dir):
    """A tuple may be longer than the stages a call runs (num_stages=1), never than the model has:
    the pipeline says so instead of silently dropping the extra values."""
    pipe = _quiet(ImagenPipeline.from_pretrained(tiny_dir))
    kw = dict(output_type="pt", generator=torch.Generator().manual_seed(0))
    assert pipe("a red circle", num_inference_steps=(2, 2), guidance_scale=(1.0, 1.0), num_stages=1, **kw).images.shape[-1] == 16
    for bad, match in (
        (dict(num_inference_steps=(2, 2, 2)), r"num_inference_steps=\(2, 2, 2\) gives 3 values but this model has 2 stage\(s\) \('base', 'sr_32'\)"),
        (dict(num_inference_steps=2, guidance_scale=(1.0, 1.0, 1.0), num_stages=1), r"guidance_scale=\(1.0, 1.0, 1.0\) gives 3 values"),
        (dict(num_inference_steps=2, guidance_interval=[(0, 1)] * 3), r"guidance_interval=.* gives 3 pairs but this model has 2 stage"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            pipe("a red circle", **bad, **kw)


def test_save_load_round_trip(tmp_path):
    pipe = _quiet(build_tiny_imagen(seed=5))
    pipe.save_pretrained(tmp_path / "p", safe_serialization=True)
    assert list((tmp_path / "p" / "unet").glob("*.safetensors"))
    again = _quiet(ImagenPipeline.from_pretrained(tmp_path / "p"))
    kw = dict(num_inference_steps=2, guidance_scale=(2.0, 1.0), output_type="pt")
    a = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    b = again("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    assert (a - b).abs().max().item() < 1e-5


def test_long_prompt_is_truncated_with_a_warning(tiny_dir, caplog):
    with caplog.at_level("WARNING", logger="imagen_lite"):
        imagen_lite.generate(" ".join(["red"] * 40), model=tiny_dir, size=16, device="cpu", num_inference_steps=2)
    assert any("truncated" in r.message for r in caplog.records)


# ---------------------------------------------------------------- device / dtype policy
def test_device_and_dtype_resolution(monkeypatch):
    monkeypatch.setattr(runtime, "cuda_available", lambda: False)
    monkeypatch.setattr(runtime, "mps_available", lambda: False)
    assert runtime.resolve_device("auto").type == "cpu"
    assert runtime.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="device='cuda'.*not available"):
        runtime.resolve_device("cuda")
    with pytest.raises(ValueError, match="device='tpu'"):
        runtime.resolve_device("tpu")
    with pytest.raises(ValueError, match="dtype='float8'"):
        runtime.resolve_dtype("float8", torch.device("cpu"))
    monkeypatch.setattr(runtime, "cuda_available", lambda: True)
    assert runtime.resolve_device("auto").type == "cuda"
    assert runtime.resolve_dtype("auto", torch.device("cuda")) == torch.float16


def test_cuda_oom_falls_back_to_offload_then_cpu(tiny_dir, monkeypatch):
    monkeypatch.setattr(runtime, "cuda_available", lambda: True)
    real = api._load_placed
    tried = []

    def fake(pipeline, model, device, dtype, offload, *a):
        tried.append((device.type, offload))
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(pipeline, model, device, dtype, offload, *a)

    monkeypatch.setattr(api, "_load_placed", fake)
    with pytest.warns(RuntimeWarning, match="falling back to") as record:
        images = imagen_lite.generate("a red circle", model=tiny_dir, size=16, seed=0, num_inference_steps=2)
    assert tried == [("cuda", False), ("cuda", True), ("cpu", False)]
    assert len([w for w in record if "falling back" in str(w.message)]) == 2
    assert images[0].size == (16, 16)


def test_oom_with_explicit_device_is_not_hidden(monkeypatch):
    def boom(dev, dt, off):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        runtime.run_with_fallback(boom, torch.device("cuda"), torch.float16, auto=False)


def test_half_precision_nan_reruns_stage_in_float32():
    pipe = _quiet(build_tiny_imagen(with_sr=False)).to(torch.bfloat16)

    def poison(module, args, output):  # a UNet that overflows in half precision
        if module.dtype != torch.float32:
            return (output[0] * float("nan"),)
        return output

    pipe.unet.register_forward_hook(poison)
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        out = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.isfinite(out.images).all()
    assert pipe.unet.dtype == torch.float32


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(prompt=""), ValueError, "prompt='' is empty"),
        (dict(prompt=[]), ValueError, r"prompt=\[\] is not valid"),
        (dict(prompt=42), ValueError, "prompt=42 is not valid"),
        (dict(prompt=["ok", 3]), ValueError, "only strings"),
        (dict(pipeline="dalle3"), ValueError, "pipeline='dalle3' is not known.*imagen"),
        (dict(model="no-such-preset"), ValueError, "model='no-such-preset' is neither a known preset"),
        (dict(size=48), ValueError, r"size=48 cannot be produced.*\[16, 32\]"),
        (dict(size=0), ValueError, "size=0 must be a positive integer"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps.*is 0; it must be a positive integer"),
        (dict(num_inference_steps=(2, -1)), ValueError, "is -1; it must be a positive integer"),
        (dict(guidance_scale=-1.0), ValueError, "guidance_scale.*is -1.0; it must be a number >= 0"),
        (dict(num_inference_steps=(2,), size=32), ValueError, "gives 1 value.*runs 2 stage"),
        (dict(num_inference_steps=(2, 2, 2)), ValueError, r"num_inference_steps=\(2, 2, 2\) gives 3 values but this model has 2 stage\(s\) \('base', 'sr_32'\)"),
        (dict(guidance_scale=[1, 1, 1], size=16), ValueError, r"guidance_scale=.*gives 3 values.*2 stage\(s\)"),
        (dict(seed="1"), ValueError, "seed='1' must be an integer"),
        (dict(seed=2**64), ValueError, r"seed=18446744073709551616 is out of range.*\[-9223372036854775808, 18446744073709551615\]"),
        (dict(seed=-(2**63) - 1), ValueError, "seed=-9223372036854775809 is out of range"),
        (dict(scheduler="magic"), ValueError, "scheduler='magic' is not known"),
        (dict(sr_strength=0), ValueError, r"sr_strength=0 must be a number in \(0, 1\]"),
        (dict(sr_strength=1.5), ValueError, r"sr_strength=1.5 must be a number in \(0, 1\]"),
        (dict(sr_strength="0.5"), ValueError, "sr_strength='0.5' must be a number"),
        (dict(sr_strength=0.2), ValueError, r"sr_strength=0.2 leaves no step of the 2 sr_32 steps.*>= 0.5"),
        (dict(pipeline="dalle2", sr_strength=0.5), ValueError, "sr_strength=0.5 applies to pipeline='imagen' only"),
        (dict(guidance_interval=(0.5, 0.2)), ValueError, r"guidance_interval is \(0.5, 0.2\); it must be a pair \(start, stop\) with 0 <= start < stop <= 1"),
        (dict(guidance_interval=(0, 1.5)), ValueError, "must be a pair .* <= 1"),
        (dict(guidance_interval="0,0.4"), ValueError, "guidance_interval='0,0.4' must be a pair"),
        (dict(guidance_interval=[(0, 0.4), (0.3, 0.3)]), ValueError, r"guidance_interval for stage 'stage 1' is \(0.3, 0.3\); it must"),
        (dict(guidance_interval=[(0, 0.4)], size=32), ValueError, r"gives 1 pair\(s\) but this call runs 2 stage"),
        (dict(foo=1), ValueError, r"foo=1 is not a keyword of generate\(\) nor of the 'imagen' pipeline.*'sr_strength'"),
        (dict(pipeline="dalle2", prior_steps=5), ValueError, r"prior_steps=5 is not a keyword.*'dalle2'.*'image_embeds'"),
    ],
)
def test_bad_input_is_named(tiny_dir, kwargs, exc, match):
    call = dict(prompt="a red circle", model=tiny_dir, device="cpu", num_inference_steps=2)
    call.update(kwargs)
    with pytest.raises(exc, match=match):
        imagen_lite.generate(call.pop("prompt"), **call)


def test_bad_model_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        imagen_lite.generate("a red circle", model=str(tmp_path / "missing"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no model_index.json"):
        imagen_lite.generate("a red circle", model=str(tmp_path / "empty"), device="cpu")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        imagen_lite.generate("a red circle", model=str(tmp_path / "file.txt"), device="cpu")


# ---------------------------------------------------------------- CLI
def test_cli_generate_writes_png(tiny_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    code = main(["generate", "a red circle", "--model", tiny_dir, "--device", "cpu", "--steps", "2,2", "--seed", "0",
                 "--size", "32", "--out", str(out)])  # fmt: skip
    assert code == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (32, 32)


def test_cli_bad_input_exits_nonzero_without_traceback(tiny_dir, capsys):
    code = main(["generate", "a red circle", "--model", tiny_dir, "--device", "cpu", "--size", "48"])
    err = capsys.readouterr().err
    assert code == 2
    assert "size=48 cannot be produced" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:  # argparse: a bad pair never reaches generate()
        main(["generate", "a red circle", "--model", tiny_dir, "--guidance-interval", "0.5"])
    assert exit_info.value.code == 2 and "--guidance-interval is (0.5,); it must be a pair" in capsys.readouterr().err


def test_cli_passes_the_guidance_interval(tiny_dir, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(api, "generate", lambda *a, **kw: seen.update(kw) or [Image.new("RGB", (16, 16))])
    assert main(["generate", "a red circle", "--model", tiny_dir, "--guidance-interval", "0,0.4", "--out", str(tmp_path / "a.png")]) == 0
    assert seen["guidance_interval"] == (0.0, 0.4) and "sr_strength" not in seen
    seen.clear()
    assert main(["generate", "a red circle", "--model", tiny_dir, "--out", str(tmp_path / "b.png")]) == 0
    assert "guidance_interval" not in seen  # not given: the model's default
    assert main(["generate", "a red circle", "--model", tiny_dir, "--guidance-interval", "0,0.4", "0.2,1", "--out", str(tmp_path / "c.png")]) == 0
    assert seen["guidance_interval"] == ((0.0, 0.4), (0.2, 1.0))  # one pair per stage


def test_cli_checks_out_before_generating(tiny_dir, tmp_path, capsys, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("generate() ran before --out was checked")

    monkeypatch.setattr(imagen_lite.api, "generate", must_not_run)
    for out, message in ((tmp_path / "img.txt", "'.txt' is not an image format Pillow can write"),
                         (tmp_path, "is a directory")):  # fmt: skip
        code = main(["generate", "a red circle", "--model", tiny_dir, "--device", "cpu", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "img.txt").exists()


def test_cli_out_without_extension_writes_png(tiny_dir, tmp_path, capsys):
    code = main(["generate", "a red circle", "--model", tiny_dir, "--device", "cpu", "--steps", "2,2", "--seed", "0",
                 "--size", "16", "--n", "2", "--out", str(tmp_path / "img")])  # fmt: skip
    assert code == 0
    for i in range(2):
        with Image.open(tmp_path / f"img_{i}.png") as im:
            assert im.format == "PNG" and im.size == (16, 16)
    code = main(["generate", "a red circle", "--model", tiny_dir, "--device", "cpu", "--steps", "2,2", "--seed", "0",
                 "--size", "16", "--out", str(tmp_path / "one.jpg")])  # fmt: skip
    with Image.open(tmp_path / "one.jpg") as im:
        assert code == 0 and im.format == "JPEG"


def test_loading_a_saved_pipeline_raises_no_dtype_deprecation(tiny_dir):
    imagen_lite.api.clear_cache()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype.*", category=FutureWarning)
        imagen_lite.generate("a red circle", model=tiny_dir, device="cpu", num_inference_steps=2, size=16)
    key = runtime.dtype_kwargs(torch.float16)
    assert list(key.values()) == [torch.float16] and set(key) <= {"dtype", "torch_dtype"}
    with pytest.raises(ValueError, match="library='jax' is not known"):
        runtime.dtype_kwargs(torch.float16, "jax")


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "generate" in capsys.readouterr().out


def test_import_touches_no_network_or_gpu():
    import subprocess
    import sys

    code = (
        "import sys, imagen_lite; "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
