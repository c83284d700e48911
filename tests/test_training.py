"""Training and fine-tuning (issue #5): every stage of both families on a tiny folder, exact
resume, EMA, caption dropout, LoRA, and the errors bad input gets -- on tiny configs, CPU."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from imagen_lite import api
from imagen_lite.data.shapes import write_imagefolder
from imagen_lite.training import stages as S
from imagen_lite.training.config import TrainConfig
from imagen_lite.training.data import caption_words, indices_for, open_source
from imagen_lite.training.loop import latest_step, stage_loss, train

STAGES = [("imagen", "base"), ("imagen", "sr"), ("dalle2", "clip"), ("dalle2", "prior"), ("dalle2", "decoder"),
          ("dalle2", "sr")]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("captions") / "data", 4, seed=0, size=64)


@pytest.fixture(scope="module")
def start(tmp_path_factory, data_dir):
    """A saved from-scratch tiny pipeline per family (dalle2 with its CLIP vision tower, as the
    clip stage leaves it): the start point the fine-tuning runs load."""
    made = {}

    def get(family: str):
        if family not in made:
            words = caption_words(open_source(str(data_dir)))
            pipe, encoder, processor = S.build_scratch(family, "tiny", words, seed=0)
            path = tmp_path_factory.mktemp("start") / family
            pipe.save_pretrained(path, safe_serialization=True)
            if encoder is not None:
                encoder.save_pretrained(path / "image_encoder", safe_serialization=True)
                processor.save_pretrained(path / "feature_extractor")
            made[family] = str(path)
        return made[family]

    return get


def config(data_dir, out, **kw) -> TrainConfig:
    base = dict(data=str(data_dir), out=str(out), max_steps=8, batch_size=4, lr=1e-3, warmup_steps=0,
                caption_dropout=0.0, ema_decay=None, checkpoint_every=100, log_every=1, sr_crop=(8, 16))  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def images_of(family, model, lora=None):
    """(1, 32, 32, 3) float images in [0, 1] from the saved pipeline at ``model``."""
    pipe = api.load_pipeline(family, model=str(model), device="cpu", dtype="float32", lora=lora)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
               output_type="np")  # fmt: skip
    return np.asarray(out.images)


# ---------------------------------------------------------------------- every stage
@pytest.mark.parametrize("family,stage", STAGES)
def test_every_stage_trains_and_its_pipeline_generates(tmp_path, data_dir, start, family, stage):
    cfg = config(data_dir, tmp_path / "out", family=family, stage=stage, model=start(family),
                 train_text_encoder=True if stage == "base" else None)  # fmt: skip
    before = stage_loss(cfg, cfg.model)
    out = train(cfg)
    after = stage_loss(cfg, out)
    assert after < before, f"{family} {stage}: loss on the fixed batch went {before:.4f} -> {after:.4f}"
    assert json.loads((out / "train_config.json").read_text())["stage"] == stage
    images = images_of(family, out)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("family,stage", [("imagen", "base"), ("dalle2", "decoder")])
def test_coord_channels_grow_on_a_pipeline_without_them(tmp_path, data_dir, start, family, stage):
    """coord_channels=2 on a start pipeline without them: the grown pipeline draws what the start
    drew (zero weights on the new inputs); training reaches those weights; the exported pipeline
    keeps them and generates; a resume grows the start again and continues."""
    pipe = S.load_start(config(data_dir, tmp_path / "x", family=family, model=start(family)))[0]
    grown = S.with_coord_channels(pipe, 2)
    assert grown.config.coord_channels == 2 and S.with_coord_channels(grown, 2) is grown
    for p in (pipe, grown):
        p.set_progress_bar_config(disable=True)
    draw = [p("a red circle", num_inference_steps=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
              output_type="np").images for p in (pipe, grown)]  # fmt: skip
    assert np.abs(np.asarray(draw[0]) - np.asarray(draw[1])).max() < 1e-5
    cfg = config(data_dir, tmp_path / "out", family=family, stage=stage, model=start(family), coord_channels=2,
                 max_steps=4, checkpoint_every=2, train_text_encoder=True if stage == "base" else None)  # fmt: skip
    train(cfg.replace(stop_at=2))
    out = train(cfg.replace(resume="latest"))
    assert json.loads((out / "model_index.json").read_text())["coord_channels"] == 2
    unet = (out / ("unet" if family == "imagen" else "decoder") / "diffusion_pytorch_model.safetensors")
    weight = load_file(str(unet))["conv_in.weight"]
    assert weight[:, -2:].abs().sum() > 0
    assert np.isfinite(images_of(family, out)).all()
    with pytest.raises(ValueError, match="coord_channels=3"):
        config(data_dir, tmp_path / "o", coord_channels=3).check()


def test_from_scratch_preset_trains_the_t5_jointly(tmp_path, data_dir):
    out = train(config(data_dir, tmp_path / "out", model="tiny", max_steps=2))
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["train_text_encoder"] is True  # no pretrained T5 knows these words
    ckpt = load_file(str(out / "checkpoints" / "step_000002" / "model.safetensors"))
    assert any(k.startswith("parts.text_encoder.") for k in ckpt)
    assert (out / "tokenizer").is_dir() and (out / "text_encoder").is_dir()


# ---------------------------------------------------------------------- resume, EMA, dropout
def test_resume_is_exact(tmp_path, data_dir):
    run = dict(model="tiny", max_steps=4, batch_size=2, gradient_accumulation_steps=2, ema_decay=0.9,
               lr_schedule="cosine", warmup_steps=1, checkpoint_every=2, caption_dropout=0.5)  # fmt: skip
    a = train(config(data_dir, tmp_path / "a", **run))
    b = train(config(data_dir, tmp_path / "b", stop_at=2, **run))
    assert latest_step(b) == 2 and not (b / "model_index.json").exists()
    train(config(data_dir, tmp_path / "b", resume="latest", **run))
    for name in ("model.safetensors", "ema.safetensors"):
        wa = load_file(str(a / "checkpoints" / "step_000004" / name))
        wb = load_file(str(b / "checkpoints" / "step_000004" / name))
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=f"{name} {k}")
    ua = load_file(str(a / "unet" / "diffusion_pytorch_model.safetensors"))
    ub = load_file(str(b / "unet" / "diffusion_pytorch_model.safetensors"))
    for k in ua:
        torch.testing.assert_close(ua[k], ub[k], rtol=0, atol=1e-6)


def test_a_resume_at_another_lr_rescales_the_restored_schedule(tmp_path, data_dir):
    """lr may change on resume (dropping it for a last phase): the schedule continues from the
    checkpoint's position, scaled to the new peak; nothing else about the run may change."""
    run = dict(model="tiny", max_steps=6, batch_size=2, lr_schedule="cosine", warmup_steps=2, checkpoint_every=2)
    a = train(config(data_dir, tmp_path / "a", **run))
    b = tmp_path / "b"
    train(config(data_dir, b, stop_at=2, **run))
    train(config(data_dir, b, resume="latest", **dict(run, lr=1e-4)))
    lrs = lambda out: {r["step"]: r["lr"] for r in map(json.loads, (out / "logs" / "train_log.jsonl").open())}
    full, dropped = lrs(a), lrs(b)
    assert dropped[1] == pytest.approx(full[1]) and dropped[2] == pytest.approx(full[2])  # before the resume
    for s in range(3, 7):  # after it: the same cosine position, a tenth of the scale (1e-3 -> 1e-4)
        assert dropped[s] == pytest.approx(full[s] / 10, rel=1e-6), s
    assert json.loads((b / "checkpoints" / "step_000006" / "config.json").read_text())["lr"] == 1e-4


@pytest.mark.parametrize("ema_decay", [None, 0.5])
def test_ema_of_the_trained_weights_is_exported(tmp_path, data_dir, start, ema_decay):
    out = train(config(data_dir, tmp_path / "out", model=start("imagen"), max_steps=2, checkpoint_every=1,
                       ema_decay=ema_decay))  # fmt: skip
    w1 = load_file(str(out / "checkpoints" / "step_000001" / "model.safetensors"))
    w2 = load_file(str(out / "checkpoints" / "step_000002" / "model.safetensors"))
    exported = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    key = "conv_in.weight"
    raw1, raw2 = w1[f"parts.unet.{key}"], w2[f"parts.unet.{key}"]
    assert not torch.allclose(raw1, raw2)
    if ema_decay is None:
        torch.testing.assert_close(exported[key], raw2)
    else:  # diffusers' EMAModel: decay 0 at its first step, then min(decay, (1 + n) / (10 + n)) = 2/11
        d = 2 / 11
        torch.testing.assert_close(exported[key], d * raw1 + (1 - d) * raw2, rtol=0, atol=1e-6)


def test_caption_dropout_replaces_captions_and_the_loss_ignores_them(data_dir):
    g = torch.Generator().manual_seed(0)
    texts, drop = S.drop_captions(["a red circle"] * 2000, 0.25, g)
    assert abs(drop.float().mean().item() - 0.25) < 0.03
    assert all((t == "") == d for t, d in zip(texts, drop.tolist()))
    assert S.drop_captions(["x"] * 10, 0.0, g)[0] == ["x"] * 10 and S.drop_captions(["x"] * 10, 1.0, g)[0] == [""] * 10

    pipe, _, _ = S.build_scratch("imagen", "tiny", ["red", "blue", "circle", "square"], seed=0)
    stage = S.get_stage("imagen", "base")
    image = torch.rand(2, 3, 16, 16) * 2 - 1

    def loss(p, texts):
        cfg = TrainConfig(data=str(data_dir), out="x", caption_dropout=p, min_snr_gamma=None)
        ctx = S.Context(pipe, cfg, S.noise_schedule(pipe, stage), torch.device("cpu"))
        parts = torch.nn.ModuleDict({"unet": pipe.unet})
        with torch.no_grad():
            return stage.loss(parts, ctx, {"pixel_values": image, "text": texts}, torch.Generator().manual_seed(1))

    a, b = ["a red circle", "a red circle"], ["a blue square", "a blue square"]
    assert loss(1.0, a) == loss(1.0, b)  # every caption dropped: the captions cannot matter
    assert loss(0.0, a) != loss(0.0, b)


# ---------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("family,stage", [("imagen", "base"), ("dalle2", "sr")])
def test_lora_saves_separately_reloads_and_changes_the_output(tmp_path, data_dir, start, family, stage):
    pytest.importorskip("peft")
    cfg = config(data_dir, tmp_path / "out", family=family, stage=stage, model=start(family), finetune="lora",
                 lora_rank=4, lr=1e-2, max_steps=3, checkpoint_every=2)  # fmt: skip
    out = train(cfg)
    meta = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert set(meta["components"]) == set(S.get_stage(family, stage).lora_components)
    ckpt = load_file(str(out / "checkpoints" / "step_000003" / "model.safetensors"))
    assert ckpt and all("lora_" in k for k in ckpt)  # LoRA checkpoints hold the adapters only
    plain = images_of(family, start(family))
    adapted = images_of(family, start(family), lora=str(out / "lora"))
    merged = images_of(family, out)
    adapters = {}
    for f in (out / "lora").glob("*.safetensors"):
        adapters.update(load_file(str(f)))
    lora_b = [v for k, v in adapters.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # B starts at zero: training moved it
    # the tiny SR stages saturate to 0/1 after clamping, so the change can be small; zero means not applied
    assert np.abs(plain - adapted).max() > 1e-5
    np.testing.assert_allclose(adapted, merged, atol=1e-4)  # adapters folded in == adapters on top
    # a resumed LoRA run continues from its adapters
    train(cfg.replace(max_steps=4, resume="latest"))
    assert latest_step(out) == 4


def test_load_lora_errors_name_the_path(tmp_path):
    from imagen_lite.models.tiny import build_tiny_imagen
    from imagen_lite.training.lora import load_lora

    with pytest.raises(FileNotFoundError, match="not a LoRA directory"):
        load_lora(build_tiny_imagen(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"format": "imagen-lite-lora", "pipeline": "UnCLIPLitePipeline", "components": {"decoder": {}}}))
    with pytest.raises(ValueError, match="trained for a UnCLIPLitePipeline"):
        load_lora(build_tiny_imagen(), tmp_path)


# ---------------------------------------------------------------------- CLI, validation, logs
def test_cli_train_writes_validation_images_logs_and_config(tmp_path, data_dir):
    from imagen_lite.cli import main

    out = tmp_path / "out"
    (tmp_path / "run.json").write_text(json.dumps({"max_steps": 5, "batch_size": 2, "lr": 1e-3}))
    rc = main(["train", "--family", "imagen", "--stage", "base", "--data", str(data_dir), "--out", str(out),
               "--config", str(tmp_path / "run.json"), "--max-steps", "2", "--validation-every", "2",
               "--validation-steps", "2", "--log-every", "1", "--validation-prompts", "a red circle", "a blue square"])  # fmt: skip
    assert rc == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["max_steps"] == 2 and saved["batch_size"] == 2  # flags override the file
    assert Image.open(out / "validation" / "step_000002.png").size == (32, 16)
    if importlib.util.find_spec("tensorboard") is None:  # else accelerate's TensorBoard tracker
        lines = (out / "logs" / "train_log.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert main(["train", "--family", "imagen", "--stage", "prior", "--data", str(data_dir), "--out", str(out)]) == 2


# ---------------------------------------------------------------------- data
def test_data_order_is_a_seeded_pure_function_split_across_ranks():
    one = [i for m in range(2) for i in indices_for(m, 0, 1, 5, 10, data_seed=3)]
    assert sorted(one) == list(range(10))  # an epoch is a permutation
    assert one == [i for m in range(2) for i in indices_for(m, 0, 1, 5, 10, data_seed=3)]
    assert one != [i for m in range(2) for i in indices_for(m, 0, 1, 5, 10, data_seed=4)]
    r0, r1 = indices_for(0, 0, 2, 5, 10, 3), indices_for(0, 1, 2, 5, 10, 3)
    assert sorted(r0 + r1) == list(range(10))  # ranks read disjoint slices of the global batch


def _png(path, color=(255, 0, 0)):
    Image.new("RGB", (20, 12), color).save(path)


def test_txt_captions_and_skipped_items_are_counted(tmp_path):
    for name in ("a", "b", "c"):
        _png(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"a red {name}\n")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "broken.txt").write_text("a broken image")
    _png(tmp_path / "empty.png")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.warns(UserWarning, match=r"skipped 2 of 5 items: 1 unreadable images.*1 empty captions"):
        source = open_source(str(tmp_path))
    assert len(source) == 3 and source.caption(0) == "a red a"


def test_unreadable_image_mid_run_is_replaced_not_fatal(tmp_path):
    from imagen_lite.training.data import Batches

    for name in ("a", "b"):
        _png(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(name)
    source = open_source(str(tmp_path))
    (tmp_path / "a.png").write_bytes(b"garbage")  # breaks after the check
    with pytest.warns(UserWarning, match="could not read image"):
        batch = Batches(source, {"pixel_values": 8}, 4, data_seed=0)(0)
    assert batch["pixel_values"].shape == (4, 3, 8, 8) and set(batch["text"]) == {"b"}


def test_datasets_dataset_with_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"img": [Image.new("RGB", (8, 8))] * 2, "caption": ["a red circle", ""]})
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.warns(UserWarning, match="1 empty captions"):
        source = open_source(str(tmp_path / "ds"), image_column="img", caption_column="caption")
    assert len(source) == 1 and source.image(0).size == (8, 8)
    with pytest.raises(ValueError, match="no column 'image'"):
        open_source(str(tmp_path / "ds"), image_column="image", caption_column="caption")


# ---------------------------------------------------------------------- bad input
def test_bad_data_is_an_error_naming_the_value(tmp_path):
    with pytest.raises(FileNotFoundError, match="'/nonexistent/dir' does not exist"):
        open_source("/nonexistent/dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        open_source(str(tmp_path / "empty"))
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    _png(nocap / "x.png")
    with pytest.raises(ValueError, match="1 images but no captions"):
        open_source(str(nocap))
    meta = tmp_path / "meta"
    meta.mkdir()
    _png(meta / "x.png")
    for line, match in [
        ('{"file_name": "x.png", "text": "ok"}\n{not json', "line 2 is not JSON"),
        ('{"file_name": "../x.png", "text": "a"}', r"file_name='../x.png'.*outside the folder"),
        ('{"file_name": "/etc/passwd", "text": "a"}', r"file_name='/etc/passwd', an absolute path"),
        ('{"file_name": "x.png", "caption": "a"}', "no caption key 'text'"),
    ]:
        (meta / "metadata.jsonl").write_text(line)
        with pytest.raises(ValueError, match=match):
            open_source(str(meta))


def test_bad_run_config_is_an_error_before_any_step(tmp_path, data_dir):
    with pytest.raises(ValueError, match="stage='decoder' is not a stage of family 'imagen'"):
        train(config(data_dir, tmp_path / "o", stage="decoder"))
    with pytest.raises(ValueError, match="resolution=17 does not fit the base UNet.*multiple of 2"):
        train(config(data_dir, tmp_path / "o", resolution=17))
    with pytest.raises(ValueError, match="resolution=20 does not fit the CLIP vision tower"):
        train(config(data_dir, tmp_path / "o", family="dalle2", stage="prior", resolution=20))
    with pytest.raises(ValueError, match="mixed_precision='fp8' is not valid"):
        train(config(data_dir, tmp_path / "o", mixed_precision="fp8"))
    with pytest.raises(ValueError, match="unknown field"):
        TrainConfig.from_dict({"stages": "base"})
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.parametrize("damage", ["truncate_weights", "truncate_state", "other_config"])
def test_corrupt_checkpoint_or_other_run_is_refused_before_any_step(tmp_path, data_dir, damage):
    cfg = config(data_dir, tmp_path / "out", model="tiny", max_steps=1)
    out = train(cfg)
    ckpt = out / "checkpoints" / "step_000001"
    if damage == "truncate_weights":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
        match = "step_000001.*corrupt or truncated"
    elif damage == "truncate_state":
        (ckpt / "state.pt").write_bytes((ckpt / "state.pt").read_bytes()[:100])
        match = "step_000001.*corrupt or truncated"
    else:
        cfg = cfg.replace(weight_decay=0.5)
        match = r"different run config \(weight_decay: 0.01 -> 0.5\)"
    with pytest.raises(ValueError, match=match):
        train(cfg.replace(max_steps=3, resume="latest"))
    assert latest_step(out) == 1


def test_snr_floor_weights_the_high_noise_steps_and_may_change_on_resume(tmp_path, data_dir):
    """x0 weight clamp(SNR, floor, gamma): min-SNR alone gives high noise ~0 weight; the floor
    lifts it. A run may resume with another floor (a recipe change, like lr)."""
    snr = torch.tensor([0.0, 0.02, 0.5, 2.0, 10.0])
    assert S.snr_floor_weight(snr, 5.0).tolist() == pytest.approx([0.0, 0.02, 0.5, 2.0, 5.0])
    assert S.snr_floor_weight(snr, 5.0, 1.0).tolist() == pytest.approx([1.0, 1.0, 1.0, 2.0, 5.0])
    with pytest.raises(ValueError, match="snr_floor=-1"):
        config(data_dir, tmp_path / "o", snr_floor=-1).check()
    cfg = config(data_dir, tmp_path / "out", max_steps=4, checkpoint_every=2)
    train(cfg.replace(stop_at=2))
    out = train(cfg.replace(resume="latest", snr_floor=1.0))
    saved = json.loads((out / "checkpoints" / "step_000004" / "config.json").read_text())
    assert saved["snr_floor"] == 1.0


def test_snr_floor_raises_the_loss_of_high_noise_draws(data_dir):
    """On the same draws, a floor only adds weight where SNR < floor: the loss can only grow,
    and it does when a high-noise timestep is drawn."""
    from imagen_lite.models import components as C

    scheduler = C.ddpm_scheduler(prediction_type="sample")
    x0 = torch.rand(8, 3, 8, 8) * 2 - 1

    def model_fn(x_t, t):
        return torch.zeros_like(x_t)

    plain = S.diffusion_loss(model_fn, x0, scheduler, torch.Generator().manual_seed(0), 5.0)
    floored = S.diffusion_loss(model_fn, x0, scheduler, torch.Generator().manual_seed(0), 5.0, snr_floor=1.0)
    assert floored > plain


def test_timestep_bias_draws_the_biased_timesteps_more_often():
    """diffusers' --timestep_bias_* semantics: "later" multiplies the draw weight of the noisiest
    `portion`, "earlier" of the first, "range" of [begin, end); "none" or multiplier 1 is uniform."""
    assert S.timestep_bias_weights(1000) is None
    assert S.timestep_bias_weights(1000, "later", 1.0, 0.3) is None
    w = S.timestep_bias_weights(1000, "later", 3.0, 0.3)
    assert w[:700].unique().tolist() == [1.0] and w[700:].unique().tolist() == [3.0]
    t = S.sample_timesteps(20000, 1000, torch.Generator().manual_seed(0), w)
    assert float((t >= 700).float().mean()) == pytest.approx(900 / 1600, abs=0.015)  # 56% instead of 30%
    w = S.timestep_bias_weights(1000, "range", 0.0, begin=100, end=900)
    t = S.sample_timesteps(5000, 1000, torch.Generator().manual_seed(0), w)
    assert bool(((t < 100) | (t >= 900)).all())
    w = S.timestep_bias_weights(1000, "earlier", 2.0, 0.5)
    assert w[:500].unique().tolist() == [2.0] and w[500:].unique().tolist() == [1.0]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(timestep_bias_strategy="late"), r"timestep_bias_strategy='late': one of \('none', 'later', 'earlier', 'range'\)"),
        (dict(timestep_bias_multiplier=-1.0), r"timestep_bias_multiplier=-1.0 must be a number >= 0"),
        (dict(timestep_bias_portion=1.5), r"timestep_bias_portion=1.5 must be in \(0, 1\]"),
        (dict(timestep_bias_strategy="range", timestep_bias_begin=900, timestep_bias_end=100),
         r"timestep_bias_begin=900, timestep_bias_end=100: need 0 <= begin < end <= 1000"),
        (dict(shapes_mixture={"position": 1.0}), r"shapes_mixture=\{'position': 1.0\} is for data 'shapes'"),
        (dict(shapes_contrast_group=4), r"shapes_contrast_group=4 is for data 'shapes'"),
        (dict(data="shapes", shapes_contrast_group=3, batch_size=4), r"shapes_contrast_group=3 must divide batch_size=4"),
        (dict(data="shapes", shapes_contrast_group=0), r"shapes_contrast_group=0 must be an int >= 1"),
    ],
)  # fmt: skip
def test_bad_timestep_bias_and_mixture_are_rejected_by_name(tmp_path, data_dir, kw, match):
    with pytest.raises(ValueError, match=match):
        config(data_dir, tmp_path / "o", **kw).check()


def test_diffusion_loss_draws_only_the_weighted_timesteps():
    """With "earlier" x0 (multiplier 0) over 90% of the steps, every draw lands in t >= 900: the
    biased sampler reaches the loss."""
    from imagen_lite.models import components as C

    scheduler = C.ddpm_scheduler(prediction_type="sample")
    seen = []

    def model_fn(x_t, t):
        seen.append(t.clone())
        return torch.zeros_like(x_t)

    w = S.timestep_bias_weights(1000, "earlier", 0.0, 0.9)
    S.diffusion_loss(model_fn, torch.zeros(64, 3, 4, 4), scheduler, torch.Generator().manual_seed(0), 5.0, t_weights=w)
    assert int(seen[0].min()) >= 900


def test_shapes_mixture_sets_the_caption_kinds_and_bias_may_change_on_resume(tmp_path):
    """--shapes-mixture picks the caption kinds of the shapes stream; a run may resume with a
    timestep bias and mixture it did not have (the layout phase of the embedded default)."""
    from imagen_lite.cli_train import _typed
    from imagen_lite.data.shapes import POSITIONS

    source = open_source("shapes", shapes_mixture={"position": 1.0})
    assert all(any(w in source.caption(i) for w in POSITIONS) for i in range(20))
    assert not all(any(w in open_source("shapes").caption(i) for w in POSITIONS) for i in range(20))
    assert _typed("dict | None")('{"position": 1.0}') == {"position": 1.0}
    with pytest.raises(ValueError, match="mixture has unknown kind"):
        open_source("shapes", shapes_mixture={"positions": 1.0})
    cfg = TrainConfig(data="shapes", out=str(tmp_path / "out"), max_steps=4, batch_size=2, lr=1e-3, warmup_steps=0,
                      ema_decay=None, checkpoint_every=2, log_every=1)  # fmt: skip
    train(cfg.replace(stop_at=2))
    layout = dict(timestep_bias_strategy="later", timestep_bias_multiplier=3.0, timestep_bias_portion=0.3,
                  shapes_mixture={"position": 0.5, "relation": 0.5})  # fmt: skip
    out = train(cfg.replace(resume="latest", **layout))
    saved = json.loads((out / "checkpoints" / "step_000004" / "config.json").read_text())
    assert {k: saved[k] for k in layout} == layout


def test_a_clip_batch_with_contrast_groups_holds_each_caption_with_its_position_variants(tmp_path):
    """shapes_contrast_group=4: every position/relation caption of a batch comes with 3 captions
    that differ from it only in the position word or relation (CLIP hard negatives)."""
    from imagen_lite.data.shapes import contrast_variants
    from imagen_lite.training.data import Batches

    source = open_source("shapes", shapes_mixture={"position": 0.5, "relation": 0.5}, shapes_contrast_group=4)
    batch = Batches(source, {"pixel_values": 32}, batch_size=8, data_seed=0)(micro_step=3)
    texts = batch["text"]
    for g in range(0, 8, 4):
        group = texts[g : g + 4]
        allowed = contrast_variants(group[0])
        assert len(allowed) > 1 and set(group) <= set(allowed), group
        assert len(set(group)) >= 3, group  # at least three places/relations (a held-out variant may be skipped)
    cfg = TrainConfig(family="dalle2", stage="clip", data="shapes", out=str(tmp_path / "clip"), max_steps=2, batch_size=4,
                      shapes_contrast_group=4, shapes_mixture={"position": 1.0}, warmup_steps=0, log_every=1)  # fmt: skip
    cfg.check()
    out = train(cfg)
    assert json.loads((out / "checkpoints" / "step_000002" / "config.json").read_text())["shapes_contrast_group"] == 4


def test_shapes_batches_are_drawn_at_their_largest_side():
    """A 64 px batch of the shapes stream is the spec's 64 px render exactly (not a bicubic
    downsample of a 256 px one); a 64 + 256 px batch (the SR stage) is drawn at 256."""
    from imagen_lite.data.shapes import render
    from imagen_lite.training.data import Batches

    source = open_source("shapes")
    batch = Batches(source, {"pixel_values": 64}, batch_size=2, data_seed=0)(micro_step=1)
    for j, i in enumerate(indices_for(1, 0, 1, 2, None, 0)):
        want = torch.from_numpy(render(source.dataset.scene(i), 64)).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.allclose(batch["pixel_values"][j], want, atol=1e-6)
        assert batch["text"][j] == source.caption(i)
    pair = Batches(source, {"pixel_values": 256, "low": 64}, batch_size=2, data_seed=0)(micro_step=1)
    high = torch.from_numpy(render(source.dataset.scene(indices_for(1, 0, 1, 2, None, 0)[0]), 256)).permute(2, 0, 1)
    assert torch.allclose(pair["pixel_values"][0], high.float() / 127.5 - 1, atol=1e-6)
    assert pair["low"].shape == (2, 3, 64, 64)


def test_image_embed_dropout_makes_the_decoder_loss_read_only_the_caption(data_dir):
    """image_embed_dropout=1: every sample gets the learned unconditional image embedding, so the
    decoder loss cannot depend on the image the embedding came from, but still on the caption."""
    pipe, image_encoder, processor = S.build_scratch("dalle2", "tiny", ["red", "blue", "circle", "square"], seed=0)
    stage = S.get_stage("dalle2", "decoder")
    side = pipe.decoder.config.sample_size * pipe.config.unshuffle_factor
    image = torch.rand(2, 3, side, side) * 2 - 1
    clip_side = S.clip_side(processor)

    def loss(p, texts, clip_seed):
        cfg = TrainConfig(data=str(data_dir), out="x", family="dalle2", stage="decoder", caption_dropout=0.0,
                          image_embed_dropout=p, min_snr_gamma=None)  # fmt: skip
        ctx = S.Context(pipe, cfg, S.noise_schedule(pipe, stage), torch.device("cpu"), image_encoder, processor)
        parts = torch.nn.ModuleDict({"decoder": pipe.decoder, "text_proj": pipe.text_proj})
        clip_images = torch.rand(2, 3, clip_side, clip_side, generator=torch.Generator().manual_seed(clip_seed)) * 2 - 1
        with torch.no_grad():
            batch = {"pixel_values": image, "clip_pixel_values": clip_images, "text": texts}
            return stage.loss(parts, ctx, batch, torch.Generator().manual_seed(1)).item()

    a, b = ["a red circle"] * 2, ["a blue square"] * 2
    assert loss(1.0, a, 0) == loss(1.0, a, 1)  # the image embedding is never seen
    assert loss(1.0, a, 0) != loss(1.0, b, 0)  # the caption still is
    assert loss(0.0, a, 0) != loss(0.0, a, 1)  # off (the default): the embedding matters
    with pytest.raises(ValueError, match=r"image_embed_dropout=1.5 must be in \[0, 1\]"):
        TrainConfig(data=str(data_dir), out="x", family="dalle2", stage="decoder", image_embed_dropout=1.5).check()
    with pytest.raises(ValueError, match="image_embed_dropout=0.2 is for the dalle2 decoder, not imagen base"):
        TrainConfig(data=str(data_dir), out="x", image_embed_dropout=0.2).check()
