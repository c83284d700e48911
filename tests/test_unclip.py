"""The DALL-E 2-style (unCLIP) family: equivalence with diffusers' UnCLIPPipeline on a tiny
Karlo-layout repo written by diffusers itself, seeding, the image-embedding path, input errors,
save/load, and the rule that imagen_lite never imports diffusers' deprecated pipelines."""

from __future__ import annotations

import ast
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagen_lite.models import unclip_components as U
from imagen_lite.models.text_proj import UnCLIPTextProjection
from imagen_lite.pipelines.output import ImageLiteOutput
from imagen_lite.pipelines.unclip import (
    UnCLIPLitePipeline,
    build_tiny_unclip,
    encode_images,
    from_karlo_repo,
    upsample_bicubic,
)

PACKAGE = Path(__file__).resolve().parents[1] / "imagen_lite"
KARLO_NAMES = (
    "prior", "decoder", "text_encoder", "tokenizer", "text_proj", "super_res_first", "super_res_last",
    "prior_scheduler", "decoder_scheduler", "super_res_scheduler",
)  # fmt: skip
TOL = 1e-4


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and with the 2 cores shared with a
    training job two threads ran these calls ~30x slower (0.2 s vs 7.6 s for the full chain)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def karlo_dir(tmp_path_factory):
    """A tiny Karlo-layout repo saved by diffusers' own (deprecated) UnCLIPPipeline."""
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline, UnCLIPTextProjModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        parts = U.build_components(U.TINY_UNCLIP)
        with torch.no_grad():  # non-trivial values where init leaves zeros/ones
            parts["prior"].clip_mean.normal_()
            parts["prior"].clip_std.uniform_(0.5, 1.5)
            parts["text_proj"].learned_classifier_free_guidance_embeddings.normal_()
    parts.pop("unshuffle_factor")
    text_proj = UnCLIPTextProjModel(**dict(parts["text_proj"].config))
    text_proj.load_state_dict(parts["text_proj"].state_dict())
    parts["text_proj"] = text_proj
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = UnCLIPPipeline(**parts)
    path = tmp_path_factory.mktemp("karlo") / "karlo-tiny"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def lite(karlo_dir):
    return _quiet(from_karlo_repo(str(karlo_dir)))


@pytest.fixture(scope="module")
def ref(karlo_dir):
    """diffusers' UnCLIPPipeline assembled from the saved components, loaded separately."""
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline, UnCLIPTextProjModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    d = str(karlo_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = UnCLIPPipeline(
            prior=PriorTransformer.from_pretrained(d, subfolder="prior"),
            decoder=UNet2DConditionModel.from_pretrained(d, subfolder="decoder"),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(d, subfolder="text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(d, subfolder="tokenizer"),
            text_proj=UnCLIPTextProjModel.from_pretrained(d, subfolder="text_proj"),
            super_res_first=UNet2DModel.from_pretrained(d, subfolder="super_res_first"),
            super_res_last=UNet2DModel.from_pretrained(d, subfolder="super_res_last"),
            prior_scheduler=UnCLIPScheduler.from_pretrained(d, subfolder="prior_scheduler"),
            decoder_scheduler=UnCLIPScheduler.from_pretrained(d, subfolder="decoder_scheduler"),
            super_res_scheduler=UnCLIPScheduler.from_pretrained(d, subfolder="super_res_scheduler"),
        )
    return _quiet(pipe)


# ---------------------------------------------------------------------- layout and loading
def test_karlo_layout_loads_component_by_component(karlo_dir, lite):
    index = json.loads((karlo_dir / "model_index.json").read_text())
    assert index["_class_name"] == "UnCLIPPipeline"
    assert index["text_proj"] == ["diffusers", "UnCLIPTextProjModel"]  # not importable from diffusers 0.42
    assert set(KARLO_NAMES) <= set(index)
    assert isinstance(lite.text_proj, UnCLIPTextProjection)
    assert lite.stage_names == ["prior", "decoder", "sr_32"]
    assert lite.stage_sizes == [16, 32]
    assert [lite.num_stages_for_size(s) for s in (None, 16, 32)] == [3, 2, 3]


def test_text_projection_matches_diffusers(karlo_dir):
    from diffusers.pipelines.deprecated.unclip import UnCLIPTextProjModel

    ours = UnCLIPTextProjection.from_pretrained(karlo_dir, subfolder="text_proj")
    theirs = UnCLIPTextProjModel.from_pretrained(karlo_dir, subfolder="text_proj")
    assert dict(ours.config) | {"_class_name": None} == dict(theirs.config) | {"_class_name": None}
    d = ours.config.clip_embeddings_dim
    args = dict(image_embeddings=torch.randn(2, d), prompt_embeds=torch.randn(4, d), text_encoder_hidden_states=torch.randn(4, 5, d))
    with torch.no_grad():
        for a, b in zip(ours(**args, do_classifier_free_guidance=True), theirs(**args, do_classifier_free_guidance=True)):
            assert a.shape == b.shape and torch.equal(a, b)


# ---------------------------------------------------------------------- equivalence
def test_full_chain_matches_unclip_pipeline(lite, ref):
    prompts = ["a red circle", "two blue squares on the left"]
    expected = ref(
        prompts, prior_num_inference_steps=2, decoder_num_inference_steps=3, super_res_num_inference_steps=2,
        prior_guidance_scale=4.0, decoder_guidance_scale=8.0, generator=_gen(0), output_type="np",
    ).images  # fmt: skip
    out = lite(prompts, num_inference_steps=(2, 3, 2), guidance_scale=(4.0, 8.0, 1.0), generator=_gen(0), output_type="np")
    assert out.images.shape == expected.shape == (2, 32, 32, 3)
    diff = float(np.abs(out.images - expected).max())
    print(f"full chain max abs diff vs UnCLIPPipeline: {diff:.3g}")
    assert diff < TOL


def test_decoder_with_image_embeds_matches_variation_pipeline(lite, ref):
    """Given image embeddings the prior is skipped; diffusers' UnCLIPImageVariationPipeline is
    the reference (its text is the empty prompt, so ours gets the empty prompt's embeddings)."""
    from diffusers.pipelines.deprecated.unclip import UnCLIPImageVariationPipeline

    torch.manual_seed(1)
    vision, processor = U.clip_vision_encoder(U.TINY_UNCLIP.clip).eval(), U.clip_image_processor(U.TINY_UNCLIP.clip)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variation = _quiet(UnCLIPImageVariationPipeline(
            decoder=ref.decoder, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, text_proj=ref.text_proj,
            feature_extractor=processor, image_encoder=vision, super_res_first=ref.super_res_first,
            super_res_last=ref.super_res_last, decoder_scheduler=ref.decoder_scheduler,
            super_res_scheduler=ref.super_res_scheduler,
        ))  # fmt: skip
    captured = []
    hook = ref.super_res_first.register_forward_pre_hook(
        lambda m, args, kwargs: captured.append(kwargs["sample"][:, 3:].clone()), with_kwargs=True
    )
    try:
        expected = variation(
            image, num_images_per_prompt=2, decoder_num_inference_steps=3, super_res_num_inference_steps=2,
            decoder_guidance_scale=8.0, generator=_gen(3), output_type="np",
        ).images  # fmt: skip
    finally:
        hook.remove()

    embeds = encode_images(image, vision, processor)
    out = lite(
        prompt_embeds=lite.encode_prompt([""]), image_embeds=embeds, num_inference_steps=(1, 3, 2),
        guidance_scale=(1.0, 8.0, 1.0), num_images_per_prompt=2, generator=_gen(3), output_type="np",
        return_stage_outputs=True,
    )  # fmt: skip
    assert "prior" not in out.stage_seconds
    decoder_diff = float((upsample_bicubic(out.stage_images["decoder"], 32) - captured[0]).abs().max())
    final_diff = float(np.abs(out.images - expected).max())
    print(f"decoder (image_embeds) max abs diff: {decoder_diff:.3g}; after SR: {final_diff:.3g}")
    assert decoder_diff < TOL and final_diff < TOL


# ---------------------------------------------------------------------- behaviour
def test_seeding_reproducible(lite):
    kw = dict(num_inference_steps=2, num_stages=2, output_type="pt")
    a = lite("a red circle", generator=_gen(7), **kw).images
    b = lite("a red circle", generator=_gen(7), **kw).images
    c = lite("a red circle", generator=_gen(8), **kw).images
    assert a.shape == (1, 3, 16, 16)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_image_embeds_path(lite):
    d = lite.text_proj.config.clip_embeddings_dim
    z = torch.randn(2, d, generator=_gen(0))
    kw = dict(num_inference_steps=2, guidance_scale=(4.0, 8.0, 1.0), num_stages=2, return_stage_outputs=True)
    out = lite(["a red circle", "a blue square"], image_embeds=z, generator=_gen(0), output_type="pt", **kw)
    assert isinstance(out, ImageLiteOutput) and out.images.shape == (2, 3, 16, 16)
    assert set(out.stage_seconds) == {"text_encoder", "decoder"}  # no prior ran
    assert torch.equal(out.stage_images["prior"], z)
    other = lite(["a red circle", "a blue square"], image_embeds=-z, generator=_gen(0), output_type="pt", **kw)
    assert not torch.allclose(out.images, other.images)  # the decoder follows the embedding
    with pytest.raises(ValueError, match=r"image_embeds has shape \(1, 32\); expected \(2, 32\)"):
        lite(["a red circle", "a blue square"], image_embeds=z[:1], **kw)
    with pytest.raises(ValueError, match=r"prior_candidates=2 re-ranks prior samples, but image_embeds were given"):
        lite(["a red circle", "a blue square"], image_embeds=z, prior_candidates=2, **kw)


def test_text_guidance_scale_is_three_branch_guidance_that_reduces_to_the_usual_one(lite):
    """text_guidance_scale s_t: u + s_t (t - u) + s (c - t). At s_t == s it is the two-branch
    guidance u + s (c - u); at s_t = s = 1 the conditional branch alone; the caption-alone branch
    t (learned unconditional z_i) changes the image otherwise."""
    prompts = ["a red circle and a blue square", "a green triangle"]

    def run(s, st=None):
        return lite(prompts, num_inference_steps=(2, 3), guidance_scale=(2.0, s), text_guidance_scale=st, num_stages=2,
                    generator=_gen(1), output_type="pt").images  # fmt: skip

    assert torch.allclose(run(3.0, 3.0), run(3.0), atol=1e-4)
    assert torch.allclose(run(1.0, 1.0), run(1.0), atol=1e-4)
    assert not torch.allclose(run(2.0, 6.0), run(2.0), atol=1e-3)
    for bad in (-1.0, "2", True, float("nan")):
        with pytest.raises(ValueError, match="text_guidance_scale=.* must be None or a number >= 0"):
            run(2.0, bad)
    with pytest.raises(ValueError, match=r"the decoder's guidance_interval is \(0.0, 0.4\); use \(0, 1\)"):
        lite(prompts, num_inference_steps=(2, 3), guidance_scale=(2.0, 2.0), text_guidance_scale=3.0, num_stages=2,
             guidance_interval=(0.0, 0.4))  # fmt: skip


def test_prior_candidates_pick_the_embedding_closest_to_the_text(lite):
    """prior_candidates=k draws k prior samples per image from the same noise as k images per
    prompt would, and hands the decoder the one with the highest cosine similarity to z_t."""
    kw = dict(num_inference_steps=2, guidance_scale=(4.0, 8.0), num_stages=2, return_stage_outputs=True, output_type="pt")
    many = lite("a red circle", num_images_per_prompt=3, generator=_gen(3), **kw).stage_images["prior"]
    best = lite("a red circle", prior_candidates=3, generator=_gen(3), **kw)
    z_t = lite.encode_prompt(["a red circle"]).text_embeds
    sims = torch.nn.functional.cosine_similarity(many, z_t, dim=-1)
    assert sims.max() > sims.min()  # the candidates differ, so the choice matters
    assert best.images.shape == (1, 3, 16, 16)
    torch.testing.assert_close(best.stage_images["prior"], many[sims.argmax()][None])
    one = lite("a red circle", prior_candidates=1, generator=_gen(3), **kw).stage_images["prior"]
    assert torch.equal(one, lite("a red circle", generator=_gen(3), **kw).stage_images["prior"])  # 1 is the default


def test_decoder_candidates_keep_the_sample_with_the_lowest_caption_error(lite):
    """decoder_candidates=k draws k whole samples per image from the same noise as k images per
    prompt would, scores them with caption_error, and keeps each image's lowest; the prior's
    stage output follows the kept sample."""
    kw = dict(num_inference_steps=2, guidance_scale=(4.0, 8.0), num_stages=2, return_stage_outputs=True, output_type="pt")
    prompts = ["a red circle", "a blue square"]
    many = lite(prompts, num_images_per_prompt=3, generator=_gen(3), **kw)
    seen = []
    real = lite.caption_error
    lite.caption_error = lambda images, text, generator=None, group=1: seen.append((images, group, real(images, text, generator, group=group))) or seen[-1][2]
    try:
        best = lite(prompts, decoder_candidates=3, generator=_gen(3), **kw)
    finally:
        del lite.caption_error
    (scored, group, errors), = seen
    torch.testing.assert_close(scored, many.images)  # the candidates are the k-images-per-prompt draws
    assert group == 3  # each image's candidates share their noise draws
    assert errors.shape == (6,) and len(set(errors.tolist())) == 6  # distinct samples, distinct errors
    pick = errors.view(2, 3).argmin(dim=1) + torch.tensor([0, 3])
    assert best.images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(best.images, many.images[pick])
    torch.testing.assert_close(best.stage_images["prior"], many.stage_images["prior"][pick])
    one = lite(prompts, decoder_candidates=1, generator=_gen(3), **kw).images
    assert torch.equal(one, lite(prompts, generator=_gen(3), **kw).images)  # 1 is the default: no re-ranking
    two = lite(prompts, decoder_candidates=2, num_images_per_prompt=2, generator=_gen(3), **kw)
    assert two.images.shape == (4, 3, 16, 16)  # k candidates for each of the images per prompt


def test_caption_error_reads_the_caption_and_is_seeded(lite):
    """caption_error: one error per image, the same for the same generator seed, different for
    another caption (the caption-alone branch reads the text); shapes and timesteps checked."""
    images = lite(["a red circle"] * 2, num_inference_steps=2, num_stages=2, generator=_gen(0), output_type="pt").images
    red, green = lite.encode_prompt(["a red circle"] * 2), lite.encode_prompt(["a green triangle on the left"] * 2)
    e = lite.caption_error(images, red, _gen(1))
    assert e.shape == (2,) and torch.isfinite(e).all() and (e > 0).all()
    assert torch.equal(e, lite.caption_error(images, red, _gen(1)))
    assert not torch.allclose(e, lite.caption_error(images, green, _gen(1)))
    with pytest.raises(ValueError, match=r"caption_error takes \(N, 3, 16, 16\) images and N caption rows; got \(2, 3, 8, 8\)"):
        lite.caption_error(images[:, :, :8, :8], red)
    with pytest.raises(ValueError, match=r"timesteps=\(1000,\) must be ints in \[0, 1000\)"):
        lite.caption_error(images, red, timesteps=(1000,))
    with pytest.raises(ValueError, match=r"group=3 must be a positive integer that divides the 2 images"):
        lite.caption_error(images, red, group=3)
    # common random numbers: two copies of one image in a group get the same error
    twin = lite.caption_error(images[:1].repeat(2, 1, 1, 1), red, _gen(1), group=2)
    assert twin[0] == twin[1]
    apart = lite.caption_error(images[:1].repeat(2, 1, 1, 1), red, _gen(1))
    assert apart[0] != apart[1]

def test_guidance_interval_guides_only_its_steps(lite):
    """The prior's and decoder's steps outside guidance_interval run the conditional half alone
    (one row per image, its conditioning the conditional rows); (0, 1) guides every step."""
    batches = {}
    hooks = [getattr(lite, name).register_forward_pre_hook(
        lambda m, args, kwargs, name=name: batches.setdefault(name, []).append(args[0].shape[0]), with_kwargs=True)
        for name in ("prior", "decoder")]  # fmt: skip
    kw = dict(num_inference_steps=(4, 4, 2), guidance_scale=(4.0, 8.0, 1.0), num_stages=2, output_type="pt")
    try:
        full = lite("a red circle", generator=_gen(0), **kw).images
        assert batches == {"prior": [2] * 4, "decoder": [2] * 4}
        batches.clear()
        part = lite("a red circle", guidance_interval=[(0.5, 1.0), (0.0, 0.5)], generator=_gen(0), **kw).images
        assert batches == {"prior": [1, 1, 2, 2], "decoder": [2, 2, 1, 1]}
    finally:
        for h in hooks:
            h.remove()
    assert part.shape == full.shape and not torch.allclose(part, full)
    assert torch.equal(full, lite("a red circle", guidance_interval=(0, 1), generator=_gen(0), **kw).images)


def test_negative_prompt_and_prompt_embeds(lite):
    kw = dict(num_inference_steps=2, num_stages=2, guidance_scale=(4.0, 8.0), output_type="pt")
    base = lite("a red circle", generator=_gen(0), **kw).images
    embeds = lite(prompt_embeds=lite.encode_prompt(["a red circle"]), negative_prompt_embeds=lite.encode_prompt([""]), generator=_gen(0), **kw).images
    other = lite("a red circle", negative_prompt="a blue square", generator=_gen(0), **kw).images
    assert torch.equal(base, embeds) and not torch.allclose(base, other)
    with pytest.raises(ValueError, match="negative_prompt has 2 entries but prompt has 1"):
        lite("a red circle", negative_prompt=["a circle", "a square"], **kw)
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        lite("a red circle", prompt_embeds=lite.encode_prompt(["a red circle"]), **kw)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=""), r"prompt='' is empty"),
        (dict(prompt=[1]), r"prompt must contain only strings, got 1"),
        (dict(prompt=None), r"prompt=None is not valid"),
        (dict(num_inference_steps=(2, 2)), r"num_inference_steps=\(2, 2\) gives 2 value\(s\)"),
        (dict(num_inference_steps=(2, 0, 2)), r"num_inference_steps for stage 'decoder' is 0"),
        (dict(guidance_scale=(4.0, -1.0, 1.0)), r"guidance_scale for stage 'decoder' is -1.0"),
        (dict(guidance_scale=(4.0, 8.0, 4.0)), r"guidance_scale for stage 'sr_32' is 4.0"),
        (dict(num_stages=1), r"num_stages=1 is not valid"),
        (dict(guidance_interval=(0.4, 0.1)), r"guidance_interval is \(0.4, 0.1\); it must be a pair \(start, stop\)"),
        (dict(guidance_interval=[(0, 1), (0, 2), (0, 1)]), r"guidance_interval for stage 'decoder' is \(0, 2\)"),
        (dict(num_inference_steps=(2, 2, 2, 2)), r"num_inference_steps=\(2, 2, 2, 2\) gives 4 values but this model has 3 stage\(s\)"),
        (dict(guidance_interval=[(0, 1)] * 4), r"guidance_interval=.* gives 4 pairs but this model has 3 stage"),
        (dict(output_type="jpg"), r"output_type='jpg' is not valid"),
        (dict(num_images_per_prompt=0), r"num_images_per_prompt=0"),
        (dict(prior_candidates=0), r"prior_candidates=0 must be a positive integer"),
        (dict(prior_candidates=2.0), r"prior_candidates=2.0 must be a positive integer"),
        (dict(decoder_candidates=0), r"decoder_candidates=0 must be a positive integer"),
        (dict(decoder_candidates=True), r"decoder_candidates=True must be a positive integer"),
        (dict(num_inference_steps=(2, 1, 2)), r"num_inference_steps for stage .decoder. is 1; UnCLIPScheduler needs at least 2"),
    ],
)
def test_bad_inputs_name_the_value(lite, kwargs, match):
    call = dict(prompt="a red circle", num_inference_steps=2) | kwargs
    with pytest.raises(ValueError, match=match):
        lite(**call)


def test_bad_size_names_allowed_sizes(lite):
    with pytest.raises(ValueError, match=r"size=128 cannot be produced.*\[16, 32\]"):
        lite.num_stages_for_size(128)


def test_save_load_round_trip(lite, tmp_path):
    lite.save_pretrained(tmp_path / "lite", safe_serialization=True)
    index = json.loads((tmp_path / "lite" / "model_index.json").read_text())
    assert index["_class_name"] == "UnCLIPLitePipeline"
    assert index["text_proj"] == ["imagen_lite.models.text_proj", "UnCLIPTextProjection"]
    again = _quiet(UnCLIPLitePipeline.from_pretrained(tmp_path / "lite"))
    assert isinstance(again.text_proj, UnCLIPTextProjection) and again.config.unshuffle_factor == 1
    kw = dict(num_inference_steps=2, num_stages=2, output_type="pt")
    assert torch.equal(lite("a red circle", generator=_gen(0), **kw).images, again("a red circle", generator=_gen(0), **kw).images)


def test_decoder_only_cascade_with_unshuffle(tmp_path):
    """A 64px-only layout (no SR components) with the decoder on 2x2 patches saves and reloads."""
    size = U.UnCLIPSize(decoder=U.DecoderSize(sample_size=8, unshuffle_factor=2), sr=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = _quiet(UnCLIPLitePipeline(**U.build_components(size)))
    assert pipe.stage_names == ["prior", "decoder"] and pipe.stage_sizes == [16]
    assert pipe.num_stages_for_size(None) == 2
    pipe.save_pretrained(tmp_path / "p64")
    again = _quiet(UnCLIPLitePipeline.from_pretrained(tmp_path / "p64"))
    assert again.super_res_first is None and again.config.unshuffle_factor == 2
    out = again("a red circle", num_inference_steps=2, generator=_gen(0), output_type="np")
    assert out.images.shape == (1, 16, 16, 3)


def test_build_tiny_unclip_is_seeded_and_leaves_global_rng():
    state = torch.get_rng_state()
    a, b = build_tiny_unclip(seed=0), build_tiny_unclip(seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.decoder.parameters(), b.decoder.parameters()))
    assert isinstance(a, UnCLIPLitePipeline) and a.stage_names == ["prior", "decoder", "sr_32"]


def test_word_tokenizer_round_trips(tmp_path):
    tok = U.clip_word_tokenizer(model_max_length=16)
    ids = tok("A red circle to the left of an orange triangle").input_ids
    assert len(ids) == 12  # start + one token per word + end
    tok.save_pretrained(tmp_path / "tok")
    again = type(tok).from_pretrained(tmp_path / "tok")
    assert again("A red circle to the left of an orange triangle").input_ids == ids
    assert tok.eos_token_id not in tok("zebra").input_ids[1:-1]  # unknown words split, never into <|endoftext|>


# ---------------------------------------------------------------------- the deprecation rule
_DEPRECATED_NAMES = {"UnCLIPPipeline", "UnCLIPImageVariationPipeline", "UnCLIPTextProjModel"}


def test_package_never_imports_deprecated_diffusers_pipelines():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if re.search(r"diffusers[.\w]*\.deprecated|pipelines\.deprecated", text):
            offenders.append(f"{path}: mentions diffusers' deprecated pipelines package")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers"):
                bad = _DEPRECATED_NAMES & {a.name for a in node.names}
                if bad:
                    offenders.append(f"{path}:{node.lineno}: imports {sorted(bad)} from {node.module}")
    assert not offenders, "\n".join(offenders)


# ---------------------------------------------------------------------- through imagen_lite.generate()
@pytest.fixture(scope="module")
def api():
    try:
        from imagen_lite import api
    except ImportError as err:  # api.py is written alongside; say so rather than fail here
        pytest.skip(f"imagen_lite.api does not import: {err}")
    return api


@pytest.fixture(scope="module")
def lite_dir(lite, tmp_path_factory):
    path = tmp_path_factory.mktemp("lite") / "unclip-tiny"
    lite.save_pretrained(path, safe_serialization=True)
    return path


def test_generate_dalle2_from_saved_dir(api, lite_dir, lite):
    from imagen_lite.presets import DEFAULT_DALLE2

    images = api.generate("a red circle", pipeline="dalle2", model=str(lite_dir), device="cpu", seed=0, num_inference_steps=2)
    assert len(images) == 1 and images[0].size == (32, 32)
    expected = lite("a red circle", num_inference_steps=2, guidance_scale=DEFAULT_DALLE2.guidance_scale, generator=_gen(0))
    assert np.array_equal(np.asarray(images[0]), np.asarray(expected.images[0]))
    small = api.generate("a red circle", pipeline="dalle2", model=str(lite_dir), device="cpu", seed=0, num_inference_steps=2, size=16)
    assert small[0].size == (16, 16)


def test_generate_dalle2_karlo_layout_matches_unclip_pipeline(api, karlo_dir, ref):
    """A Karlo-layout directory runs with the karlo preset's guidance (4, 8, 1)."""
    images = api.generate("a red circle", pipeline="dalle2", model=str(karlo_dir), device="cpu", seed=0, num_inference_steps=2)
    expected = ref(
        "a red circle", prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2,
        prior_guidance_scale=4.0, decoder_guidance_scale=8.0, generator=_gen(0),
    ).images  # fmt: skip
    assert np.array_equal(np.asarray(images[0]), np.asarray(expected[0]))


def test_generate_dalle2_with_image_embeds(api, lite_dir, lite):
    z = torch.randn(1, lite.text_proj.config.clip_embeddings_dim, generator=_gen(1))
    kw = dict(pipeline="dalle2", model=str(lite_dir), device="cpu", seed=0, num_inference_steps=2, size=16)
    a = api.generate("a red circle", image_embeds=z, **kw)
    b = api.generate("a red circle", image_embeds=-z, **kw)
    assert a[0].size == (16, 16) and not np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_a_saved_text_guidance_scale_is_a_default_of_generate(api, lite, tmp_path):
    """imagen_lite_defaults.json may hold text_guidance_scale (ship_default --text-guidance):
    generate() then runs the three-branch decoder guidance unless the call says otherwise."""
    import json

    path = tmp_path / "unclip-tiny"
    lite.save_pretrained(path, safe_serialization=True)
    defaults = {"num_inference_steps": [2, 2, 2], "guidance_scale": [2.0, 2.0, 1.0], "text_guidance_scale": 5.0}
    (path / "imagen_lite_defaults.json").write_text(json.dumps(defaults))
    kw = dict(pipeline="dalle2", model=str(path), device="cpu", seed=0, size=16)
    saved = np.asarray(api.generate("a red circle and a blue square", **kw)[0])
    given = np.asarray(api.generate("a red circle and a blue square", text_guidance_scale=5.0, **kw)[0])
    plain = np.asarray(api.generate("a red circle and a blue square", text_guidance_scale=None, **kw)[0])
    assert np.array_equal(saved, given) and not np.array_equal(saved, plain)
    with pytest.raises(ValueError, match="text_guidance_scale"):
        api.generate("a red circle", pipeline="imagen", device="cpu", size=64, text_guidance_scale=2.0)


def test_saved_decoder_candidates_are_a_default_of_generate(api, lite, tmp_path):
    """imagen_lite_defaults.json may hold decoder_candidates (the embedded default's since the
    twenty-ninth session): generate() then re-ranks unless the call says otherwise."""
    import json

    path = tmp_path / "unclip-rerank"
    lite.save_pretrained(path, safe_serialization=True)
    defaults = {"num_inference_steps": [2, 2, 2], "guidance_scale": [2.0, 2.0, 1.0], "decoder_candidates": 3}
    (path / "imagen_lite_defaults.json").write_text(json.dumps(defaults))
    kw = dict(pipeline="dalle2", model=str(path), device="cpu", seed=0, size=16)
    pipe = api.load_pipeline("dalle2", model=str(path), device="cpu")
    calls = []
    h = pipe.decoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        api.generate("a red circle", **kw)
        assert calls[0] == 2 * 3  # guided rows of three candidates
        calls.clear()
        api.generate("a red circle", decoder_candidates=1, **kw)
        assert calls[0] == 2
    finally:
        h.remove()
    with pytest.raises(ValueError, match="decoder_candidates"):
        api.generate("a red circle", pipeline="imagen", device="cpu", size=64, decoder_candidates=2)


def test_the_cli_passes_text_guidance_to_generate():
    """--text-guidance on `generate` and `eval shapes` becomes text_guidance_scale; left out, the
    model's own default stands."""
    from imagen_lite.cli import build_parser, call_kwargs

    parser = build_parser()
    args = parser.parse_args(["eval", "shapes", "--pipeline", "dalle2", "--text-guidance", "4"])
    assert call_kwargs(args) == {"text_guidance_scale": 4.0}
    args = parser.parse_args(["generate", "a red circle", "--pipeline", "dalle2", "--text-guidance", "3.5"])
    assert call_kwargs(args)["text_guidance_scale"] == 3.5
    assert "text_guidance_scale" not in call_kwargs(parser.parse_args(["generate", "a red circle"]))
    args = parser.parse_args(["eval", "shapes", "--pipeline", "dalle2", "--decoder-candidates", "2"])
    assert call_kwargs(args) == {"decoder_candidates": 2}


# ---------------------------------------------------------------- the decoder's low-noise refiner
def _tiny_unclip_with_refiner(max_timestep: int = 300):
    """The tiny cascade with a fixed-variance decoder (a refiner predicts no variance) and the
    Imagen family's tiny refiner, both on the cosine schedule."""
    import dataclasses

    from imagen_lite.models import components as C

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        size = dataclasses.replace(U.TINY_UNCLIP, decoder=dataclasses.replace(U.TINY_UNCLIP.decoder, learned_variance=False))
        parts = U.build_components(size)
        plain = UnCLIPLitePipeline(**parts)
        side = plain.stage_sizes[0]
        pipe = UnCLIPLitePipeline(**parts, refiner=C.refiner_unet(side).eval(), refiner_scheduler=C.refiner_scheduler(),
                                  refiner_max_timestep=max_timestep)  # fmt: skip
    for p in (plain, pipe):
        p.set_progress_bar_config(disable=True)
    return pipe, plain


def test_the_decoder_hands_its_steps_below_refiner_start_to_the_refiner(tmp_path):
    """refiner_start=T: the decoder runs its steps at t >= T, the refiner (unconditional, predicting
    v) those below, its x0 entering the decoder's scheduler as the decoder's own kind of output;
    0 (the default) is the pipeline without one. It saves and loads with its refiner."""
    pipe, plain = _tiny_unclip_with_refiner()
    kw = dict(num_inference_steps=(3, 10), guidance_scale=(1.0, 3.0), num_stages=2, output_type="pt")
    pipe.decoder_scheduler.set_timesteps(10)
    full = [int(t) for t in pipe.decoder_scheduler.timesteps]
    seen = {"decoder": [], "refiner": []}
    hooks = [getattr(pipe, name).register_forward_pre_hook(
        lambda m, a, k, name=name: seen[name].append(int(a[1].flatten()[0]) if torch.is_tensor(a[1]) else int(a[1])),
        with_kwargs=True) for name in seen]  # fmt: skip
    try:
        off = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
        assert seen["decoder"] == full and seen["refiner"] == []
        assert torch.equal(off, plain("a red circle", generator=torch.Generator().manual_seed(0), **kw).images)
        seen["decoder"].clear()
        on = pipe("a red circle", refiner_start=300, generator=torch.Generator().manual_seed(0), **kw).images
        assert seen["decoder"] == [t for t in full if t >= 300] and seen["refiner"] == [t for t in full if t < 300]
        assert not torch.allclose(on, off)
    finally:
        for h in hooks:
            h.remove()
    pipe.save_pretrained(tmp_path / "p", safe_serialization=True)
    loaded = UnCLIPLitePipeline.from_pretrained(tmp_path / "p", use_safetensors=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.refiner_max_timestep == 300
    again = loaded("a red circle", refiner_start=300, generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.allclose(again, on, atol=1e-5)


def test_bad_decoder_refiner_starts_are_named():
    pipe, plain = _tiny_unclip_with_refiner()
    kw = dict(num_inference_steps=(2, 2), num_stages=2, output_type="pt")
    with pytest.raises(ValueError, match=r"refiner_start for stage 'decoder' is 301, above the timesteps this refiner was trained on: use 0 to 300"):
        pipe("a red circle", refiner_start=301, **kw)
    with pytest.raises(ValueError, match=r"refiner_start=-1 must be a timestep"):
        pipe("a red circle", refiner_start=-1, **kw)
    with pytest.raises(ValueError, match=r"refiner_start=80 needs a pipeline with a refiner"):
        plain("a red circle", refiner_start=80, **kw)
    learned = build_tiny_unclip()  # Karlo's learned-variance decoder: no refiner can take its steps
    with pytest.raises(ValueError, match="a refiner needs a decoder scheduler with fixed variance"):
        UnCLIPLitePipeline(**{k: v for k, v in learned.components.items() if v is not None}, refiner=pipe.refiner,
                           refiner_scheduler=pipe.refiner_scheduler, refiner_max_timestep=300)  # fmt: skip


def test_a_saved_refiner_start_is_a_dalle2_default_of_generate(tmp_path):
    """A DALL-E 2 directory whose defaults file saves ``refiner_start`` runs its refiner from
    ``generate()`` with no argument; ``refiner_start=0`` turns it off."""
    import imagen_lite
    from imagen_lite import presets

    pipe, _ = _tiny_unclip_with_refiner()
    model = tmp_path / "d2_refiner"
    pipe.save_pretrained(model, safe_serialization=True)
    (model / presets.DEFAULTS_FILE).write_text(json.dumps({"num_inference_steps": [2, 4], "guidance_scale": [1.0, 1.0],
                                                           "refiner_start": 300}))  # fmt: skip
    loaded = imagen_lite.load_pipeline("dalle2", model=str(model), device="cpu")
    seen = []
    h = loaded.refiner.register_forward_pre_hook(lambda m, a, k: seen.append(int(a[1].flatten()[0])), with_kwargs=True)
    try:
        imagen_lite.generate("a red circle", pipeline="dalle2", model=str(model), device="cpu", seed=0, size=16)
        assert seen and all(t < 300 for t in seen)
        seen.clear()
        imagen_lite.generate("a red circle", pipeline="dalle2", model=str(model), device="cpu", seed=0, size=16, refiner_start=0)
        assert seen == []
    finally:
        h.remove()


def test_a_dalle2_directory_can_borrow_the_refiner_of_a_sibling_imagen_directory(tmp_path):
    """The embedded DALL-E 2 default holds no refiner of its own: its defaults file names the Imagen
    directory beside it (``shared_refiner``), whose refiner the loader passes to ``from_pretrained``.
    A sibling without one is named in the error."""
    import imagen_lite
    from imagen_lite import presets
    from imagen_lite.models.tiny import build_tiny_imagen

    _, plain = _tiny_unclip_with_refiner()
    build_tiny_imagen(unshuffle_factor=2, with_refiner=True).save_pretrained(tmp_path / "imagen", safe_serialization=True)
    plain.save_pretrained(tmp_path / "dalle2", safe_serialization=True)
    assert not (tmp_path / "dalle2" / "refiner").exists()
    defaults = {"num_inference_steps": [2, 4], "guidance_scale": [1.0, 1.0], "refiner_start": 300, "shared_refiner": "imagen"}
    (tmp_path / "dalle2" / presets.DEFAULTS_FILE).write_text(json.dumps(defaults))
    pipe = imagen_lite.load_pipeline("dalle2", model=str(tmp_path / "dalle2"), device="cpu")
    from safetensors.torch import load_file

    own = load_file(str(next((tmp_path / "imagen" / "refiner").glob("*.safetensors"))))
    assert all(torch.equal(pipe.refiner.state_dict()[k], v) for k, v in own.items())
    assert pipe.config.refiner_max_timestep == 300
    seen = []
    h = pipe.refiner.register_forward_pre_hook(lambda m, a, k: seen.append(int(a[1].flatten()[0])), with_kwargs=True)
    try:
        imagen_lite.generate("a red circle", pipeline="dalle2", model=str(tmp_path / "dalle2"), device="cpu", seed=0, size=16)
    finally:
        h.remove()
    assert seen and all(t < 300 for t in seen)
    (tmp_path / "dalle2" / presets.DEFAULTS_FILE).write_text(json.dumps({**defaults, "shared_refiner": "nowhere"}))
    with pytest.raises(ValueError, match=r"borrows its refiner from .*nowhere.*which has no refiner/"):
        imagen_lite.api.shared_refiner(tmp_path / "dalle2")


def test_ship_default_ships_an_exported_dalle2_directory_that_borrows_the_imagen_refiner(tmp_path, capsys):
    """``ship_default.py --family dalle2 --from-dir DIR --refiner-start T``: a candidate exported
    earlier goes into the package as it is, with defaults that run the sibling Imagen default's
    refiner below T; a sibling without a refiner, a T above its training range, and a directory of
    another lineage are refused before anything is written."""
    import runpy

    import imagen_lite
    from imagen_lite import presets
    from imagen_lite.models.tiny import build_tiny_imagen
    from imagen_lite.training import default as D

    _, plain = _tiny_unclip_with_refiner()
    candidate = tmp_path / "candidate"
    plain.save_pretrained(candidate, safe_serialization=True)
    D.write_training_state(candidate, {"decoder": {"step": 16000, "cpu_hours": 3.5, "recipe": "v3", "config": {}},
                                       "sr": {"step": 1500, "cpu_hours": 0.9, "recipe": "v2", "config": {}}})  # fmt: skip
    package = tmp_path / "weights"
    package.mkdir()
    ship = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "ship_default.py"), run_name="ship")
    args = ["--family", "dalle2", "--recipe", "v3", "--from-dir", str(candidate), "--steps", "2,4,2", "--guidance", "1,1,1",
            "--scheduler", "ddpm", "--refiner-start", "150", "--out", str(package / "dalle2")]  # fmt: skip
    with pytest.raises(SystemExit):
        ship["main"](args)  # no Imagen directory with a refiner beside it yet
    assert "which has none" in capsys.readouterr().err and not (package / "dalle2").exists()
    build_tiny_imagen(unshuffle_factor=2, with_refiner=True).save_pretrained(package / "imagen", safe_serialization=True)
    with pytest.raises(SystemExit):
        ship["main"]([*args[:-4], "--refiner-start", "301", *args[-2:]])
    assert "above the timesteps the refiner" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ship["main"](["--recipe" if a == "--recipe" else ("v2" if a == "v3" else a) for a in args])
    assert "is lineage 'v3', not --recipe 'v2'" in capsys.readouterr().err and not (package / "dalle2").exists()

    ship["main"](args)
    shipped = package / "dalle2"
    assert presets.read_defaults(shipped)["refiner_start"] == 150 and presets.read_defaults(shipped)["shared_refiner"] == "imagen"
    assert not (shipped / "refiner").exists()  # the package holds the refiner once
    state = D.read_training_state(shipped)
    assert (state["decoder"]["step"], state["decoder"]["recipe"], state["sr"]["recipe"]) == (16000, "v3", "v2")
    pipe = imagen_lite.load_pipeline("dalle2", model=str(shipped), device="cpu")
    assert pipe.refiner is not None and pipe.config.refiner_max_timestep == 300


# ---------------------------------------------------------------------- an Imagen-style SR stage (twenty-sixth session)
KARLO_SR = ("super_res_first", "super_res_last", "super_res_scheduler")


def _tiny_unclip_with_imagen_sr():
    """The tiny fixed-variance cascade with its refiner and, instead of Karlo's SR, the tiny Imagen
    pipeline's SR (16 -> 32) with that pipeline's T5 for the null text; and the Imagen pipeline."""
    from imagen_lite.models.tiny import build_tiny_imagen

    pipe, _ = _tiny_unclip_with_refiner()
    imagen = build_tiny_imagen(unshuffle_factor=2, with_refiner=True)
    imagen.set_progress_bar_config(disable=True)
    parts = {k: v for k, v in pipe.components.items() if v is not None and k not in KARLO_SR}
    sr = UnCLIPLitePipeline(**parts, sr_unet=imagen.sr_unet, sr_scheduler=imagen.sr_scheduler,
                            image_noising_scheduler=imagen.image_noising_scheduler, sr_text_encoder=imagen.text_encoder,
                            sr_tokenizer=imagen.tokenizer, unshuffle_factor=pipe.config.unshuffle_factor,
                            refiner_max_timestep=300, sr_unshuffle_factor=imagen.config.sr_unshuffle_factor,
                            sr_max_sequence_length=imagen.config.max_sequence_length)  # fmt: skip
    sr.set_progress_bar_config(disable=True)
    return sr, imagen, pipe


def test_an_imagen_style_sr_stage_super_resolves_the_decoder_image_on_the_null_text():
    """``UnCLIPLitePipeline(sr_unet=...)``: the SR stage is the Imagen pipeline's own
    (``imagen.super_resolve``: noise-augmented upsample at ``noise_level``, img2img start at
    ``sr_strength``), fed the T5 states of "" -- draw for draw what the Imagen pipeline's SR makes
    of the decoder's image with the null prompt. ``refiner_start=(decoder, sr)`` runs the refiner
    on the SR's steps below the second."""
    from imagen_lite.pipelines.imagen import super_resolve

    sr, imagen, _ = _tiny_unclip_with_imagen_sr()
    assert sr.stage_names == ["prior", "decoder", "sr_32"] and sr.stage_sizes == [16, 32]
    kw = dict(num_inference_steps=(2, 3, 4), guidance_scale=(1.0, 1.0, 1.0), output_type="pt")
    g = torch.Generator().manual_seed(0)
    low = sr("a red circle", num_stages=2, generator=g, **kw).images
    out = sr("a red circle", noise_level=50, sr_strength=0.5, generator=torch.Generator().manual_seed(0),
             return_stage_outputs=True, **kw)  # fmt: skip
    assert out.images.shape == (1, 3, 32, 32)
    assert torch.allclose(out.stage_images["decoder"], low, atol=1e-5)
    with torch.no_grad():
        want = super_resolve(imagen, imagen.sr_unet, imagen.sr_scheduler, out.stage_images["decoder"],
                             imagen.encode_prompt([""]), steps=4, guidance=1.0, interval=(0.0, 1.0), noise_level=50,
                             sr_strength=0.5, refiner_start=0, generator=g, device=torch.device("cpu"))  # fmt: skip
    assert torch.allclose(out.stage_images["sr_32"], want, atol=1e-5) and torch.allclose(out.images, want, atol=1e-5)
    other = sr("a red circle", noise_level=400, sr_strength=0.5, generator=torch.Generator().manual_seed(0), **kw).images
    assert not torch.allclose(other, out.images, atol=1e-3)  # the noise level reaches the SR
    seen = []
    h = sr.refiner.register_forward_pre_hook(lambda m, a, k: seen.append(int(a[1].flatten()[0])), with_kwargs=True)
    try:
        sr("a red circle", refiner_start=(0, 300), generator=torch.Generator().manual_seed(0), **kw)
    finally:
        h.remove()
    assert seen and all(t < 300 for t in seen)  # the SR's steps below 300 only: the decoder's start is 0


def test_bad_imagen_style_sr_input_is_named():
    sr, imagen, karlo = _tiny_unclip_with_imagen_sr()
    parts = {k: v for k, v in karlo.components.items() if v is not None}
    with pytest.raises(ValueError, match=r"either Karlo's \(super_res_first/last\) or Imagen-style \(sr_unet\); got both"):
        UnCLIPLitePipeline(**parts, sr_unet=imagen.sr_unet, sr_scheduler=imagen.sr_scheduler, refiner_max_timestep=300,
                           image_noising_scheduler=imagen.image_noising_scheduler, sr_text_encoder=imagen.text_encoder,
                           sr_tokenizer=imagen.tokenizer)  # fmt: skip
    bare = {k: v for k, v in parts.items() if k not in KARLO_SR}
    with pytest.raises(ValueError, match=r"needs \[.*\] together; missing \['sr_text_encoder', 'sr_tokenizer'\]"):
        UnCLIPLitePipeline(**bare, sr_unet=imagen.sr_unet, sr_scheduler=imagen.sr_scheduler, refiner_max_timestep=300,
                           image_noising_scheduler=imagen.image_noising_scheduler)  # fmt: skip
    kw = dict(num_inference_steps=(2, 3, 4), guidance_scale=(1.0, 1.0, 1.0), output_type="pt")
    with pytest.raises(ValueError, match=r"noise_level=50 applies to an Imagen-style SR stage \(sr_unet\); this pipeline's SR is Karlo's"):
        karlo("a red circle", noise_level=50, **kw)
    with pytest.raises(ValueError, match=r"sr_strength=0.5 applies to an Imagen-style SR stage"):
        karlo("a red circle", sr_strength=0.5, **kw)
    with pytest.raises(ValueError, match=r"refiner_start=\(100, 100\) gives the SR stage a refiner .* this pipeline's SR is Karlo's"):
        karlo("a red circle", refiner_start=(100, 100), **kw)
    with pytest.raises(ValueError, match=r"refiner_start=\(1, 2, 3\) must be a timestep.*or a pair"):
        sr("a red circle", refiner_start=(1, 2, 3), **kw)
    with pytest.raises(ValueError, match=r"refiner_start for stage 'sr_32' is 400, above the timesteps"):
        sr("a red circle", refiner_start=(0, 400), **kw)
    with pytest.raises(ValueError, match=r"noise_level=1000 must be an int in \[0, 1000\)"):
        sr("a red circle", noise_level=1000, **kw)
    with pytest.raises(ValueError, match=r"sr_strength=0.2 leaves no step of the 4 sr_32 steps"):
        sr("a red circle", sr_strength=0.2, **kw)
    with pytest.raises(ValueError, match=r"guidance_scale for stage 'sr_32' is 2.0; the unCLIP super-resolution stage takes no text"):
        sr("a red circle", num_inference_steps=(2, 3, 4), guidance_scale=(1.0, 1.0, 2.0))


def test_a_dalle2_directory_can_borrow_the_sr_of_a_sibling_imagen_directory(tmp_path):
    """The embedded DALL-E 2 default holds no SR of its own since the twenty-sixth session: its
    defaults file names the Imagen directory beside it (``shared_sr``), whose SR and T5 load with
    plain diffusers/transformers classes, and saves the SR's noise level and strength, which
    ``generate()`` passes. A sibling without an SR is named; a saved copy loads on its own."""
    import imagen_lite
    from imagen_lite import presets

    sr, imagen, _ = _tiny_unclip_with_imagen_sr()
    imagen.save_pretrained(tmp_path / "imagen", safe_serialization=True)
    bare = UnCLIPLitePipeline(**{k: v for k, v in sr.components.items() if v is not None and not k.startswith("sr_")
                                 and k != "image_noising_scheduler"}, refiner_max_timestep=300)  # fmt: skip
    bare.save_pretrained(tmp_path / "dalle2", safe_serialization=True)
    assert not (tmp_path / "dalle2" / "sr_unet").exists()
    defaults = {"num_inference_steps": [2, 3, 4], "guidance_scale": [1.0, 1.0, 1.0], "noise_level": 50,
                "sr_strength": 0.5, "shared_sr": "imagen"}  # fmt: skip
    (tmp_path / "dalle2" / presets.DEFAULTS_FILE).write_text(json.dumps(defaults))
    pipe = imagen_lite.load_pipeline("dalle2", model=str(tmp_path / "dalle2"), device="cpu")
    assert pipe.stage_names == ["prior", "decoder", "sr_32"] and type(pipe.sr_text_encoder).__name__ == "T5EncoderModel"
    assert all(torch.equal(pipe.sr_unet.state_dict()[k], v) for k, v in imagen.sr_unet.state_dict().items())
    levels = []
    h = pipe.sr_unet.register_forward_pre_hook(lambda m, a, k: levels.append(k["class_labels"].tolist()), with_kwargs=True)
    try:
        got = imagen_lite.generate("a red circle", pipeline="dalle2", model=str(tmp_path / "dalle2"), device="cpu", seed=0)
    finally:
        h.remove()
    assert got[0].size == (32, 32) and levels == [[50]] * 2  # sr_strength 0.5 of 4 steps: 2 SR steps at level 50
    from imagen_lite.evaluation.compare import compare

    r = compare("a red circle", models={"dalle2": str(tmp_path / "dalle2")}, seeds=(0,), size=None, device="cpu", clip=None,
                progress=False)  # fmt: skip
    assert r.summary["dalle2"]["sr_strength"] == 0.5  # the compare table names the borrowed SR's start
    pipe.save_pretrained(tmp_path / "copy", safe_serialization=True)
    copy = UnCLIPLitePipeline.from_pretrained(tmp_path / "copy", use_safetensors=True)
    assert copy.stage_names == pipe.stage_names and copy.config.sr_max_sequence_length == imagen.config.max_sequence_length
    (tmp_path / "dalle2" / presets.DEFAULTS_FILE).write_text(json.dumps({**defaults, "shared_sr": "nowhere"}))
    with pytest.raises(ValueError, match=r"borrows its SR from .*nowhere.*which has no sr_unet/"):
        imagen_lite.api.shared_sr(tmp_path / "dalle2")


def test_ship_default_ships_a_dalle2_directory_that_borrows_the_imagen_sr(tmp_path, capsys):
    """``ship_default.py --family dalle2 --shared-sr``: the candidate ships without its Karlo SR
    (parts and model_index entries gone, its record kept as ``sr_retired``), with defaults that
    borrow the sibling Imagen default's SR at the given noise level, strength and refiner start;
    a second refiner start without ``--shared-sr`` is refused."""
    import runpy

    import imagen_lite
    from imagen_lite import presets
    from imagen_lite.training import default as D

    _, imagen, karlo = _tiny_unclip_with_imagen_sr()
    candidate = tmp_path / "candidate"
    karlo.save_pretrained(candidate, safe_serialization=True)
    D.write_training_state(candidate, {"decoder": {"step": 16000, "cpu_hours": 3.5, "recipe": "v3", "config": {}},
                                       "sr": {"step": 1800, "cpu_hours": 1.5, "recipe": "v3", "config": {}}})  # fmt: skip
    package = tmp_path / "weights"
    imagen.save_pretrained(package / "imagen", safe_serialization=True)
    ship = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "ship_default.py"), run_name="ship")
    args = ["--family", "dalle2", "--recipe", "v3", "--from-dir", str(candidate), "--steps", "2,3,4", "--guidance", "1,1,1",
            "--scheduler", "ddpm", "--noise-level", "50", "--sr-strength", "0.5", "--refiner-start", "150,120",
            "--out", str(package / "dalle2")]  # fmt: skip
    with pytest.raises(SystemExit):
        ship["main"](args)  # --sr-strength and a second start need --shared-sr
    assert "--shared-sr" in capsys.readouterr().err and not (package / "dalle2").exists()
    ship["main"]([*args, "--shared-sr"])
    shipped = package / "dalle2"
    d = presets.read_defaults(shipped)
    assert (d["shared_sr"], d["sr_strength"], d["noise_level"], d["refiner_start"]) == ("imagen", 0.5, 50, [150, 120])
    assert not any((shipped / part).exists() for part in KARLO_SR)
    assert not any(part in json.loads((shipped / "model_index.json").read_text()) for part in KARLO_SR)
    state = D.read_training_state(shipped)
    assert "sr" not in state and state["sr_retired"]["step"] == 1800
    pipe = imagen_lite.load_pipeline("dalle2", model=str(shipped), device="cpu")
    assert pipe.super_res_first is None and pipe.sr_unet is not None and pipe.stage_names[-1] == "sr_32"
