"""The embedded-default trainer (scripts/train_default.py): tiny configs, a few steps each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import imagen_lite
from imagen_lite.training import default as D
from imagen_lite.training.checkpoint import list_checkpoints, load_checkpoint


def tiny_base_cfg(**kw) -> D.BaseRunConfig:
    cfg = D.BaseRunConfig(
        batch_size=4, warmup_steps=2, checkpoint_every=2, eval_every=0,
        t5=dict(d_model=32, num_layers=1, num_heads=2, d_ff=32, d_kv=16),
        unet=dict(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=8, cross_attention_dim=32,
                  attention_levels=(False, True)),
    )  # fmt: skip
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_vocabulary_covers_every_caption_word():
    from imagen_lite.data.shapes import prompt_set

    vocab = set(D.shapes_vocabulary())
    for caption, _ in prompt_set(200, seed=3):
        assert set(caption.split()) <= vocab, caption


def test_resume_is_exact(tmp_path):
    cfg = tiny_base_cfg()
    D.train_base(cfg, tmp_path / "straight", minutes=10, resume=None, max_steps=4)
    D.train_base(cfg, tmp_path / "split", minutes=10, resume=None, max_steps=2)
    D.train_base(cfg, tmp_path / "split", minutes=10, resume="latest", max_steps=4)
    a = load_file(str(list_checkpoints(tmp_path / "straight")[-1] / "model.safetensors"))
    b = load_file(str(list_checkpoints(tmp_path / "split")[-1] / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_loss_goes_down_and_export_generates(tmp_path):
    cfg = tiny_base_cfg(lr=2e-3)
    D.train_base(cfg, tmp_path / "run", minutes=10, resume=None, max_steps=1)
    first = (tmp_path / "run" / "train.log").read_text()
    D.train_base(cfg, tmp_path / "run", minutes=10, resume="latest", max_steps=30, export_dir=tmp_path / "pipe")
    log = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert "resumed from" in "\n".join(log) and len(first) > 0
    images = imagen_lite.generate("a red circle", model=str(tmp_path / "pipe"), device="cpu", seed=0,
                                  num_inference_steps=2)  # fmt: skip
    assert images[0].size == (64, 64)
    # the fixed-batch loss falls: compare the first step's loss with the trained weights' on the same batch
    tok, t5, unet, sched = D.build_base(cfg)
    model = D.Trainable(t5, unet)
    dataset = D.shapes.ShapesDataset(size=64, seed=cfg.data_seed, mixture=cfg.mixture, exclude_heldout=True)
    images_, texts = D.batch_at(cfg, dataset, 0)

    def loss_now():
        with torch.no_grad():
            return D.loss_fn(cfg, model, tok, sched, images_, texts, torch.Generator().manual_seed(0)).item()

    before = loss_now()
    load_checkpoint(list_checkpoints(tmp_path / "run")[-1], model)
    assert loss_now() < before


def test_in_training_curve_samples_with_the_configured_sampler(tmp_path):
    cfg = tiny_base_cfg(eval_every=2, eval_prompts=5)
    D.train_base(cfg, tmp_path / "run", minutes=10, resume=None, max_steps=2)
    curve = [json.loads(line) for line in (tmp_path / "run" / "curve.jsonl").read_text().splitlines()]
    assert [(c["step"], c["guidance"], c["sampler"]) for c in curve] == [(2, 1.0, "ddpm"), (2, 2.0, "ddpm")]
    assert all(0.0 <= c["overall"] <= 1.0 for c in curve)
    # why the wrong images failed (evaluation.shapes.failure_mode), counted: 5 prompts, 1 seed
    assert all(sum(c["failures"].values()) == round(5 * (1 - c["overall"])) for c in curve)
    tok, t5, unet, sched = D.build_base(cfg)
    with pytest.raises(ValueError, match="'euler'"):
        D.evaluate_base(cfg, tok, t5, unet, sched, 5, sampler="euler")
    # a bad sampler is refused before any training, not at the run's first evaluation
    with pytest.raises(ValueError, match="eval_sampler='euler'"):
        D.train_base(tiny_base_cfg(eval_sampler="euler"), tmp_path / "bad", minutes=10, resume=None, max_steps=2)
    assert not list_checkpoints(tmp_path / "bad")


def test_a_resumed_run_continues_its_recipe_not_the_code_defaults(tmp_path):
    from dataclasses import asdict

    from imagen_lite.training.checkpoint import resolve_resume

    cfg = tiny_base_cfg(lr=3e-5)
    D.train_base(cfg, tmp_path / "run", minutes=10, resume=None, max_steps=2)
    resumed = D.resumed_config(D.BaseRunConfig, resolve_resume(tmp_path / "run", "latest"))
    assert resumed.lr == 3e-5 and resumed.lr != D.BaseRunConfig().lr
    assert tuple(resumed.unet["block_out_channels"]) == (16, 32)
    # warm start on a new machine: the recipe recorded beside the shipped weights
    (tmp_path / "shipped").mkdir()
    D.write_training_state(tmp_path / "shipped", {"imagen-base": {"step": 2, "cpu_hours": 0.0, "config": asdict(cfg)}})
    assert D.resumed_config(D.BaseRunConfig, None, tmp_path / "shipped", "imagen-base").lr == 3e-5
    assert D.resumed_config(D.BaseRunConfig, None, tmp_path / "shipped", "imagen-sr") == D.BaseRunConfig()
    assert D.resumed_config(D.BaseRunConfig, None) == D.BaseRunConfig()


def test_corrupt_checkpoint_is_named(tmp_path):
    cfg = tiny_base_cfg()
    D.train_base(cfg, tmp_path / "run", minutes=10, resume=None, max_steps=2)
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        D.train_base(cfg, tmp_path / "run", minutes=10, resume="latest", max_steps=4)


@pytest.mark.slow  # ~50 s on a shared 2-core CPU (five small trainings)
def test_dalle2_default_trains_stage_after_stage_in_chunks_and_resumes(tmp_path):
    from imagen_lite.training.default import train_dalle2
    from imagen_lite.training.loop import latest_step

    plan = (dict(stage="clip", max_steps=2, batch_size=2), dict(stage="prior", max_steps=3, batch_size=2))
    assert train_dalle2(tmp_path, minutes=0, plan=plan, start="tiny") == {"clip": 0}  # no budget: nothing runs
    assert train_dalle2(tmp_path, minutes=30, chunk=2, plan=plan, start="tiny") == {"clip": 2, "prior": 3}
    assert latest_step(tmp_path / "prior") == 3
    saved = json.loads((tmp_path / "prior" / "train_config.json").read_text())
    assert saved["model"] == str(tmp_path / "clip")  # each stage starts from the previous stage's pipeline
    assert train_dalle2(tmp_path, minutes=30, chunk=2, plan=plan, start="tiny") == {"clip": 2, "prior": 3}

    # a new machine: an empty cache warm-starts from the "shipped" prior pipeline and trains only
    # the steps a longer plan still asks for
    from imagen_lite.training.default import dalle2_training_state, write_training_state

    shipped_state = dalle2_training_state(tmp_path, plan)
    # hours the "shipped" weights recorded (a tiny stage's own rounds to 0.0 h)
    shipped_state["clip"]["cpu_hours"], shipped_state["prior"]["cpu_hours"] = 0.25, 0.5
    write_training_state(tmp_path / "prior", shipped_state)
    longer = (plan[0], dict(plan[1], max_steps=5))
    new = tmp_path / "new"
    assert train_dalle2(new, minutes=30, chunk=2, plan=longer, start="tiny", warm_start=tmp_path / "prior") == {
        "clip": 2, "prior": 5}  # fmt: skip
    assert latest_step(new / "prior") == 2 and latest_step(new / "clip") is None  # clip: shipped, not retrained
    assert json.loads((new / "prior" / "warm_start.json").read_text())["step"] == 3
    # a ship from the new cache keeps the shipped stages' steps and hours, and adds its own
    shipped, state = D.read_training_state(tmp_path / "prior"), dalle2_training_state(new, longer)
    assert state["clip"]["step"] == 2 and state["clip"]["cpu_hours"] == shipped["clip"]["cpu_hours"] == 0.25
    assert state["prior"]["step"] == 5
    assert state["prior"]["cpu_hours"] == pytest.approx(0.5 + D.dalle2_hours(new)["prior"], abs=1e-4)


def test_a_dalle2_plan_drops_the_lr_at_the_step_it_names(tmp_path):
    from imagen_lite.training.default import settings_at, train_dalle2

    item = dict(stage="clip", max_steps=3, batch_size=2, lr=1e-3, lr_drops={2: 1e-4}, warmup_steps=0, log_every=1)
    assert [settings_at(item, s).get("lr", item["lr"]) for s in (0, 1, 2, 3)] == [1e-3, 1e-3, 1e-4, 1e-4]
    assert train_dalle2(tmp_path, minutes=30, chunk=5, plan=(item,), start="tiny") == {"clip": 3}
    logged = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "clip" / "logs" / "train_log.jsonl").open())}
    assert logged[1] == pytest.approx(1e-3) and logged[3] == pytest.approx(1e-4)  # the chunk stopped at the drop
    ckpts = tmp_path / "clip" / "checkpoints"
    assert json.loads((ckpts / "step_000003" / "config.json").read_text())["lr"] == pytest.approx(1e-4)


def test_a_dalle2_plan_phase_changes_the_timestep_bias_and_mixture_at_its_step(tmp_path):
    from imagen_lite.training.default import settings_at, train_dalle2

    range_phase = dict(timestep_bias_strategy="range", timestep_bias_multiplier=30.0, timestep_bias_begin=850,
                       timestep_bias_end=1000, shapes_mixture={"position": 1.0})  # fmt: skip
    item = dict(stage="clip", max_steps=4, batch_size=2, lr=1e-3, lr_drops={1: 5e-4}, warmup_steps=0, log_every=1,
                keep_checkpoints=10, phases={2: range_phase, 3: dict(lr=1e-4)})  # fmt: skip
    assert settings_at(item, 0) == {}
    assert settings_at(item, 2) == {"lr": 5e-4, **range_phase}
    assert settings_at(item, 3)["lr"] == 1e-4 and settings_at(item, 3)["shapes_mixture"] == {"position": 1.0}
    assert train_dalle2(tmp_path, minutes=30, chunk=10, plan=(item,), start="tiny") == {"clip": 4}
    ckpts = tmp_path / "clip" / "checkpoints"
    # every chunk stopped at a change, so each checkpoint records the settings it ran under
    before, during, after = (json.loads((ckpts / f"step_00000{s}" / "config.json").read_text()) for s in (2, 3, 4))
    assert before["timestep_bias_strategy"] == "none" and before["lr"] == pytest.approx(5e-4)
    assert during["timestep_bias_strategy"] == "range" and during["timestep_bias_begin"] == 850
    assert during["shapes_mixture"] == {"position": 1.0} and during["lr"] == pytest.approx(5e-4)
    assert after["timestep_bias_strategy"] == "range" and after["lr"] == pytest.approx(1e-4)


def test_a_dalle2_plan_phase_may_not_change_the_architecture(tmp_path):
    from imagen_lite.training.default import dalle2_stage_config

    item = dict(stage="decoder", max_steps=4, batch_size=2, phases={2: dict(batch_size=4)})
    with pytest.raises(ValueError, match="batch_size"):
        dalle2_stage_config(item, tmp_path, "tiny")


def test_a_dalle2_decoder_checkpoint_exports_as_a_loadable_fp16_pipeline(tmp_path):
    from imagen_lite import load_pipeline
    from imagen_lite.training.default import export_dalle2_checkpoint, train_dalle2

    plan = (dict(stage="decoder", max_steps=2, batch_size=2, warmup_steps=0, checkpoint_every=1, keep_checkpoints=5),)
    assert train_dalle2(tmp_path / "cache", minutes=30, chunk=1, plan=plan, start="tiny") == {"decoder": 2}
    defaults = {"num_inference_steps": [2, 2, 2], "guidance_scale": [1.0, 1.0, 1.0]}
    new = export_dalle2_checkpoint(tmp_path / "cache", tmp_path / "new", defaults=defaults, plan=plan)
    old = export_dalle2_checkpoint(tmp_path / "cache", tmp_path / "old", plan=plan,
                                   checkpoint=str(tmp_path / "cache" / "decoder" / "checkpoints" / "step_000001"))  # fmt: skip
    assert D.read_training_state(new)["decoder"]["step"] == 2 and D.read_training_state(old)["decoder"]["step"] == 1
    assert json.loads((new / "imagen_lite_defaults.json").read_text()) == defaults
    for part in ("decoder", "image_encoder", "prior", "text_encoder"):
        (weights,) = (new / part).glob("*.safetensors")
        assert {v.dtype for v in load_file(str(weights)).values()} == {torch.float16}, part
    decoder = [load_file(str(next((d / "decoder").glob("*.safetensors")))) for d in (new, old)]
    assert any(not torch.equal(decoder[0][k], decoder[1][k]) for k in decoder[0])  # step 2's EMA is not step 1's
    pipe = load_pipeline("dalle2", model=str(new), device="cpu", dtype="float32")
    assert pipe(["a red circle"], num_inference_steps=(2, 2, 2), output_type="np", generator=torch.Generator().manual_seed(0),
                ).images.shape[0] == 1  # fmt: skip


def tiny_sr_cfg() -> D.SRRunConfig:
    return D.SRRunConfig(
        batch_size=2, warmup_steps=2, checkpoint_every=2, eval_every=0, low_crops=(16,),
        unet=dict(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=8, cross_attention_dim=32,
                  attention_levels=(False, False)),
    )  # fmt: skip


def test_a_new_machine_warm_starts_from_exported_weights(tmp_path):
    """Empty cache + shipped weights: both Imagen stages continue from the exported EMA weights,
    step and hours continue from training_state.json; another architecture is refused."""
    cfg = tiny_base_cfg()
    D.train_base(cfg, tmp_path / "base_a", minutes=10, resume=None, max_steps=2, export_dir=tmp_path / "base")
    D.train_sr(tiny_sr_cfg(), tmp_path / "base", tmp_path / "sr_a", minutes=10, resume=None, max_steps=2,
               export_dir=tmp_path / "shipped")  # fmt: skip
    state = D.read_training_state(tmp_path / "shipped")
    assert state["imagen-base"]["step"] == 2 and state["imagen-sr"]["step"] == 2
    assert state["imagen-base"]["cpu_hours"] > 0

    # mark the shipped UNet (a fresh init would be close to 2-step weights): the run must start from it
    unet_file = tmp_path / "shipped" / "unet" / "diffusion_pytorch_model.safetensors"
    shipped = load_file(str(unet_file))
    shipped["conv_in.weight"] += 0.5
    save_file(shipped, str(unet_file), metadata={"format": "pt"})

    out = D.train_base(cfg, tmp_path / "base_b", minutes=10, max_steps=3, warm_start=tmp_path / "shipped")
    assert out["step"] == 3  # one step on top of the shipped two
    assert "warm start from" in (tmp_path / "base_b" / "train.log").read_text()
    ema = load_file(str(list_checkpoints(tmp_path / "base_b")[-1] / "ema.safetensors"))
    assert torch.allclose(ema["module.unet.conv_in.weight"], shipped["conv_in.weight"].float(), atol=1e-2)

    out = D.train_sr(tiny_sr_cfg(), tmp_path / "shipped", tmp_path / "sr_b", minutes=10, max_steps=3,
                     warm_start=tmp_path / "shipped")  # fmt: skip
    assert out["step"] == 3

    other = tiny_base_cfg(unet={**cfg.unet, "block_out_channels": (8, 16)})
    with pytest.raises(ValueError, match="block_out_channels|unet"):
        D.train_base(other, tmp_path / "base_c", minutes=10, max_steps=3, warm_start=tmp_path / "shipped")
    # resume=None means from scratch, even with shipped weights at hand
    assert D.train_base(cfg, tmp_path / "base_d", minutes=10, resume=None, max_steps=1,
                        warm_start=tmp_path / "shipped")["step"] == 1  # fmt: skip


def test_ship_defaults_only_rewrites_the_generation_defaults_and_leaves_the_weights(tmp_path, monkeypatch, capsys):
    import dataclasses
    import runpy
    from pathlib import Path

    from imagen_lite import presets

    ship = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "ship_default.py"), run_name="ship")
    shipped = tmp_path / "imagen"
    monkeypatch.setattr(presets, "DEFAULT_IMAGEN", dataclasses.replace(presets.DEFAULT_IMAGEN, components={"dir": str(shipped)}))
    argv = ["--family", "imagen", "--steps", "25,10", "--guidance", "2,1", "--scheduler", "ddpm", "--sr-strength", "0.5",
            "--defaults-only"]
    with pytest.raises(SystemExit, match="nothing shipped"):
        ship["main"](argv)
    (shipped / "unet").mkdir(parents=True)
    (shipped / "unet" / "weights.bin").write_bytes(b"weights")
    (shipped / presets.DEFAULTS_FILE).write_text(json.dumps({"guidance_scale": [1.0, 1.0]}))
    ship["main"](argv)
    assert json.loads((shipped / presets.DEFAULTS_FILE).read_text()) == {
        "num_inference_steps": [25, 10], "guidance_scale": [2.0, 1.0], "scheduler": "ddpm", "noise_level": 100,
        "sr_strength": 0.5}  # fmt: skip
    assert (shipped / "unet" / "weights.bin").read_bytes() == b"weights"
    ship["main"](argv + ["--guidance-interval", "0,0.4"])  # recorded only when given
    assert json.loads((shipped / presets.DEFAULTS_FILE).read_text())["guidance_interval"] == [0.0, 0.4]
    with pytest.raises(SystemExit) as exit_info:
        ship["main"](argv + ["--guidance-interval", "0.4,0.1"])
    assert exit_info.value.code == 2 and "--guidance-interval 0.4,0.1: guidance_interval is (0.4, 0.1)" in capsys.readouterr().err
    monkeypatch.setattr(presets, "DEFAULT_DALLE2", dataclasses.replace(presets.DEFAULT_DALLE2, components={"dir": str(tmp_path / "dalle2")}))
    with pytest.raises(SystemExit) as exit_info:  # argparse's error: Karlo's SR has no img2img start
        ship["main"](["--family", "dalle2", "--steps", "25,25,3", "--guidance", "2,2,1", "--sr-strength", "0.5",
                      "--defaults-only"])  # fmt: skip
    assert exit_info.value.code == 2 and "applies to --family imagen, or dalle2 with --shared-sr" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # v4 is a lineage of the Imagen base only
        ship["main"](["--family", "dalle2", "--recipe", "v4", "--steps", "25,25,3", "--guidance", "2,2,1"])
    assert exit_info.value.code == 2 and "--recipe v4: --family dalle2 has the lineages ['v1', 'v2', 'v2e', 'v3']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # the caption-alone branch is the DALL-E 2 decoder's
        ship["main"](argv + ["--text-guidance", "4"])
    assert exit_info.value.code == 2 and "--text-guidance 4.0 applies to --family dalle2 only" in capsys.readouterr().err
    (tmp_path / "dalle2").mkdir()
    (tmp_path / "dalle2" / presets.DEFAULTS_FILE).write_text("{}")
    ship["main"](["--family", "dalle2", "--steps", "25,25,3", "--guidance", "2,2,1", "--text-guidance", "4", "--defaults-only"])
    assert json.loads((tmp_path / "dalle2" / presets.DEFAULTS_FILE).read_text())["text_guidance_scale"] == 4.0
    d2 = ["--family", "dalle2", "--steps", "25,25,3", "--guidance", "2,2,1", "--defaults-only"]
    ship["main"](d2 + ["--decoder-candidates", "2"])  # the re-ranking: recorded when above 1
    assert json.loads((tmp_path / "dalle2" / presets.DEFAULTS_FILE).read_text())["decoder_candidates"] == 2
    ship["main"](d2 + ["--decoder-candidates", "1"])
    assert "decoder_candidates" not in json.loads((tmp_path / "dalle2" / presets.DEFAULTS_FILE).read_text())
    for bad, why in ((argv + ["--decoder-candidates", "2"], "--decoder-candidates 2 applies to --family dalle2 only"),
                     (d2 + ["--decoder-candidates", "0"], "--decoder-candidates 0: a positive number of samples")):
        with pytest.raises(SystemExit) as exit_info:
            ship["main"](bad)
        assert exit_info.value.code == 2 and why in capsys.readouterr().err
    ship["main"](argv + ["--denoising-end", "0.76"])  # the base's early stop: recorded only when given
    assert json.loads((shipped / presets.DEFAULTS_FILE).read_text())["denoising_end"] == 0.76
    for bad, why in ((["--denoising-end", "1.5"], "--denoising-end 1.5: denoising_end=1.5 must be a number in (0, 1]"),
                     (["--family", "dalle2", "--denoising-end", "0.5"], "--denoising-end 0.5 applies to --family imagen only")):
        with pytest.raises(SystemExit) as exit_info:
            ship["main"]((argv + bad) if bad[0] != "--family" else ["--steps", "25,25,3", "--guidance", "2,2,1", *bad, "--defaults-only"])
        assert exit_info.value.code == 2 and why in capsys.readouterr().err


def test_coordinate_channels_grow_from_weights_without_them(tmp_path):
    """A base run with coord_channels=2 warm-starts from exported weights that have none: the
    grown UNet draws exactly what the shipped one drew (zero weights on the new inputs) until a
    training step teaches it to use them; the export generates through ImagenPipeline."""
    import numpy as np

    D.train_base(tiny_base_cfg(), tmp_path / "plain", minutes=10, resume=None, max_steps=2, export_dir=tmp_path / "shipped")
    grown = tiny_base_cfg(coord_channels=2)
    D.train_base(grown, tmp_path / "grown", minutes=10, max_steps=2, warm_start=tmp_path / "shipped",
                 export_dir=tmp_path / "grown_pipe")  # fmt: skip
    config = json.loads((tmp_path / "grown_pipe" / "model_index.json").read_text())
    assert config["coord_channels"] == 2

    def draw(model):
        return np.asarray(imagen_lite.generate("a red circle on the left", model=str(model), device="cpu", seed=0,
                                               num_inference_steps=3, guidance_scale=2.0)[0], dtype=int)  # fmt: skip

    assert np.abs(draw(tmp_path / "shipped") - draw(tmp_path / "grown_pipe")).max() <= 1
    D.train_base(grown, tmp_path / "grown", minutes=10, max_steps=3, warm_start=tmp_path / "shipped")
    model = load_file(str(list_checkpoints(tmp_path / "grown")[-1] / "model.safetensors"))
    assert model["unet.conv_in.weight"].shape[1] == 3 * 16 + 2
    assert model["unet.conv_in.weight"][:, -2:].abs().sum() > 0  # the step reached the coordinate inputs


def test_coordinate_grid_and_bad_coord_channels():
    from imagen_lite.pipelines.imagen import ImagenPipeline
    from imagen_lite.sampling import coordinate_grid

    grid = coordinate_grid(2, 4)
    assert grid.shape == (2, 2, 4, 4)
    assert grid[0, 0, 0, 0] < 0 < grid[0, 0, 0, -1]  # x grows to the right
    assert grid[0, 1, 0, 0] < 0 < grid[0, 1, -1, 0]  # y grows downwards
    with pytest.raises(ValueError, match="coord_channels=3"):
        ImagenPipeline(tokenizer=None, text_encoder=None, unet=None, scheduler=None, coord_channels=3)


def test_a_dalle2_chunk_killed_after_checkpointing_still_counts_its_hours(tmp_path):
    """hours.json adds a chunk's time when it returns; a run killed after a checkpoint (simulated:
    the stage trained by the loop directly, not through train_dalle2) is counted at the next run
    from that checkpoint's run_seconds, once."""
    from imagen_lite.training.default import dalle2_hours, dalle2_stage_config, train_dalle2
    from imagen_lite.training.loop import train

    item = dict(stage="clip", max_steps=4, batch_size=2, checkpoint_every=2)
    assert train_dalle2(tmp_path, minutes=30, chunk=2, plan=(dict(item, max_steps=2),), start="tiny") == {"clip": 2}
    before = dalle2_hours(tmp_path)["clip"]
    train(dalle2_stage_config(item, tmp_path, "tiny").replace(stop_at=4))  # the "killed" chunk
    state = torch.load(tmp_path / "clip" / "checkpoints" / "step_000004" / "state.pt", weights_only=True)
    seconds = state["extra"]["run_seconds"]
    assert seconds > 0 and dalle2_hours(tmp_path)["clip"] == before
    assert train_dalle2(tmp_path, minutes=30, chunk=2, plan=(item,), start="tiny") == {"clip": 4}
    assert dalle2_hours(tmp_path)["clip"] == pytest.approx(before + seconds / 3600, abs=1e-4)
    train_dalle2(tmp_path, minutes=30, chunk=2, plan=(item,), start="tiny")
    assert dalle2_hours(tmp_path)["clip"] == pytest.approx(before + seconds / 3600, abs=1e-4)  # counted once


def test_probe_layout_prints_a_row_per_timestep_and_prompt(tmp_path, capsys):
    """scripts/probe_layout.py on an exported base with coordinate channels, raw checkpoint weights."""
    import runpy

    D.train_base(tiny_base_cfg(coord_channels=2), tmp_path / "run", minutes=10, resume=None, max_steps=2,
                 export_dir=tmp_path / "pipe")  # fmt: skip
    probe = runpy.run_path(str(imagen_lite.__path__[0] + "/../scripts/probe_layout.py"))
    probe["main"]([str(tmp_path / "pipe"), "--checkpoint", str(list_checkpoints(tmp_path / "run")[-1]),
                   "--timesteps", "999,500", "--draws", "2"])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith("| 999 ") or line.startswith("| 500 ")]
    assert len(rows) == 2 * len(probe["PROMPTS"])
    shares = json.loads(rows[0].split("|")[3])
    assert sum(shares) == pytest.approx(1.0, abs=0.02)
    assert [line.split(":")[0] for line in out if line.startswith("t=")] == ["t=999", "t=500"]
    # dx, dy: the left/right (top/bottom) gap of the ink between the position words
    left, right = ([0.6, 0.3, 0.1], [0.3, 0.4, 0.3]), ([0.2, 0.3, 0.5], [0.3, 0.4, 0.3])
    top, bottom = ([0.3, 0.4, 0.3], [0.7, 0.2, 0.1]), ([0.3, 0.4, 0.3], [0.1, 0.2, 0.7])
    names = probe["PROMPTS"]
    dx, dy = probe["position_gaps"](dict(zip(names[:4], (left, right, top, bottom))))
    assert (dx, dy) == (pytest.approx(0.8), pytest.approx(1.2))


def test_probe_unclip_layout_measures_where_positions_are_lost(tmp_path, capsys):
    """scripts/probe_unclip_layout.py: its centroid gap reads true renderings as placed (dx, dy
    near a third), and it runs end to end on an exported DALL-E 2 pipeline with raw weights."""
    import runpy

    import numpy as np
    from PIL import Image

    from imagen_lite.data.shapes import render, scene_for_caption
    from imagen_lite.training.default import export_dalle2_checkpoint, train_dalle2

    probe = runpy.run_path(str(imagen_lite.__path__[0] + "/../scripts/probe_unclip_layout.py"))
    rng = np.random.default_rng(0)
    centroids = {pos: [probe["ink_centroid"](Image.fromarray(render(scene_for_caption(f"a red circle {pos}", rng), 64)))
                       for _ in range(4)] for pos in probe["POSITIONS"]}  # fmt: skip
    dx, dy = probe["position_gaps"](centroids)
    assert dx > 0.25 and dy > 0.25
    assert probe["ink_centroid"](Image.new("RGB", (8, 8), "white")) == (0.5, 0.5)

    plan = (dict(stage="decoder", max_steps=1, batch_size=2, warmup_steps=0),)
    train_dalle2(tmp_path / "cache", minutes=30, plan=plan, start="tiny")
    export_dalle2_checkpoint(tmp_path / "cache", tmp_path / "pipe", plan=plan)
    ckpt = list_checkpoints(tmp_path / "cache" / "decoder" / "checkpoints")[-1]
    probe["main"]([str(tmp_path / "pipe"), "--checkpoint", str(ckpt), "--renders", "2", "--seeds", "1", "--steps", "2,2"])
    out = capsys.readouterr().out
    assert "CLIP image embeddings: cosine within a caption" in out and "CLIP text token states" in out
    hits = int(out.split("the right position first for ")[1].split(" of ")[0])
    assert 0 <= hits <= 16
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| prior") or line.startswith("| oracle")]
    assert [r[1].strip() for r in rows] == ["prior", "oracle"]
    assert all(abs(float(r[2])) <= 1 and abs(float(r[3])) <= 1 for r in rows)
    probe["main"]([str(tmp_path / "pipe"), "--clip-only", "--renders", "2"])
    out = capsys.readouterr().out
    assert "CLIP text -> image" in out and "| prior" not in out


def test_the_base_trainer_draws_timesteps_with_its_bias(tmp_path):
    """The layout phase's timestep bias reaches the base's loss: "earlier" x0 over 90% of the steps
    leaves only t >= 900; the default draws uniformly. A bad bias is refused before training."""

    def drawn(cfg):
        tok, t5, unet, sched = D.build_base(cfg)
        seen = []
        unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[1].clone()), with_kwargs=True)
        images = torch.zeros(32, 3, 64, 64)
        D.loss_fn(cfg, D.Trainable(t5, unet), tok, sched, images, ["a red circle"] * 32, torch.Generator().manual_seed(0))
        return seen[0]

    assert int(drawn(tiny_base_cfg(timestep_bias_strategy="earlier", timestep_bias_multiplier=0.0,
                                   timestep_bias_portion=0.9)).min()) >= 900  # fmt: skip
    assert int(drawn(tiny_base_cfg()).min()) < 900
    with pytest.raises(ValueError, match="timestep_bias_strategy='noisy'"):
        D.train_base(tiny_base_cfg(timestep_bias_strategy="noisy"), tmp_path / "bad", minutes=10, resume=None, max_steps=2)
    assert not list_checkpoints(tmp_path / "bad")


def test_a_base_plan_changes_lr_and_mixture_at_the_steps_its_phases_name(tmp_path):
    from imagen_lite.training.checkpoint import resolve_resume

    mix = {"position": 1.0}
    cfg = tiny_base_cfg(phases={2: {"lr": 1e-4}, "4": {"mixture": mix, "snr_floor": 1.0}})
    out = D.train_base_plan(cfg, tmp_path / "run", minutes=10, resume=None, max_steps=5, export_dir=tmp_path / "pipe")
    assert out["step"] == 5
    exported = D.read_training_state(tmp_path / "pipe")["imagen-base"]  # the last chunk's checkpoint, exported once
    assert exported["step"] == 5 and exported["config"]["mixture"] == {"position": 1.0}
    configs = {int(p.name.split("_")[1]): json.loads((p / "config.json").read_text()) for p in list_checkpoints(tmp_path / "run")}
    assert configs[2]["lr"] == cfg.lr and configs[4]["lr"] == 1e-4 and configs[5]["lr"] == 1e-4
    assert configs[4]["mixture"] == cfg.mixture and configs[5]["mixture"] == mix and configs[5]["snr_floor"] == 1.0
    # a resume re-applies the phases it is past, and keeps them in its config
    resumed = D.resumed_config(D.BaseRunConfig, resolve_resume(tmp_path / "run", "latest"))
    assert resumed.phases == {"2": {"lr": 1e-4}, "4": {"mixture": mix, "snr_floor": 1.0}}
    assert D.train_base_plan(resumed, tmp_path / "run", minutes=10, max_steps=6)["step"] == 6


def test_a_base_phase_may_not_change_the_architecture(tmp_path):
    with pytest.raises(ValueError, match=r"unshuffle_factor.*may change only"):
        D.train_base_plan(tiny_base_cfg(phases={3: {"unshuffle_factor": 2}}), tmp_path / "run", minutes=10, resume=None,
                          max_steps=4)  # fmt: skip
    with pytest.raises(ValueError, match="step 'later'"):
        D.check_base_phases({"later": {"lr": 1e-4}})
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _train_default_script(tmp_path, monkeypatch):
    """scripts/train_default.py loaded as a module, its base trainer replaced by one that records
    (cfg, cache, warm_start) in the returned dict, its cache under ``tmp_path``."""
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location("train_default", pathlib.Path(imagen_lite.__file__).parents[1] / "scripts" / "train_default.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    seen = {}

    def fake_plan(cfg, cache, minutes, resume, export, max_steps, warm_start=None):
        seen.update(cfg=cfg, cache=cache, warm_start=warm_start)
        return {"step": 0}

    monkeypatch.setattr(script, "train_base_plan", fake_plan)
    monkeypatch.setattr(script, "DEFAULT_CACHE", tmp_path / "cache")
    return script, seen


def test_the_v2_recipe_starts_from_scratch_in_its_own_cache(tmp_path, monkeypatch):
    """--recipe v2: a lineage beside the shipped one, with BASE_RECIPES["v2"] applied on a fresh
    start and a warm start only from its own wip/ directory, never from the shipped v1 weights."""
    script, seen = _train_default_script(tmp_path, monkeypatch)
    monkeypatch.setattr(script, "WIP_DIR", tmp_path / "wip")
    monkeypatch.setattr(imagen_lite.presets, "WEIGHTS_DIR", tmp_path / "weights")  # v1 ships (nothing recorded)
    script.main(["--stage", "imagen-base", "--recipe", "v2", "--minutes", "1"])
    assert seen["cache"] == tmp_path / "cache" / "imagen-base-v2" and seen["warm_start"] is None
    for key, value in D.BASE_RECIPES["v2"].items():
        assert getattr(seen["cfg"], key) == value, key
    assert D.BaseRunConfig().bf16 is False and seen["cfg"].bf16 is True  # the recipe, not the defaults
    with pytest.raises(SystemExit):
        script.main(["--stage", "imagen-sr", "--recipe", "v2"])
    script.main(["--stage", "imagen-base", "--minutes", "1"])  # no --recipe: the shipped lineage (v1 here)
    assert seen["cache"] == tmp_path / "cache" / "imagen-base"

    # once v2 ships (its record says so), v2 warm-starts from the package and v1 only from its wip/
    shipped = tmp_path / "weights" / "imagen"
    shipped.mkdir(parents=True)
    D.write_training_state(shipped, {"imagen-base": {"step": 5, "cpu_hours": 0.1, "config": {}}})
    D.record_recipe(shipped, ["imagen-base"], "v2")
    script.main(["--stage", "imagen-base", "--recipe", "v2", "--cache", str(tmp_path / "c2"), "--minutes", "1"])
    assert seen["warm_start"] == shipped
    script.main(["--stage", "imagen-base", "--minutes", "1"])  # no --recipe: now v2, from the package
    assert seen["cache"] == tmp_path / "cache" / "imagen-base-v2" and seen["warm_start"] == shipped
    script.main(["--stage", "imagen-base", "--recipe", "v1", "--cache", str(tmp_path / "c1"), "--minutes", "1"])
    assert seen["warm_start"] is None  # no wip/imagen-base: from scratch, never from v2's weights
    (tmp_path / "wip" / "imagen-base").mkdir(parents=True)
    D.write_training_state(tmp_path / "wip" / "imagen-base", {"imagen-base": {"step": 3, "cpu_hours": 0.1, "config": {}}})
    script.main(["--stage", "imagen-base", "--recipe", "v1", "--cache", str(tmp_path / "c3"), "--minutes", "1"])
    assert seen["warm_start"] == tmp_path / "wip" / "imagen-base"

    # v3 (binding loss from step 0) while v2 ships: from scratch in its own cache, never v2's weights
    script.main(["--stage", "imagen-base", "--recipe", "v3", "--minutes", "1"])
    assert seen["cache"] == tmp_path / "cache" / "imagen-base-v3" and seen["warm_start"] is None
    assert seen["cfg"].binding_weight == 0.5 and seen["cfg"].phases == D.BASE_RECIPES["v3"]["phases"]
    assert seen["cfg"].layout_weight == 0.0
    # v4 (binding and layout losses from step 0): likewise, in its own cache
    script.main(["--stage", "imagen-base", "--recipe", "v4", "--minutes", "1"])
    assert seen["cache"] == tmp_path / "cache" / "imagen-base-v4" and seen["warm_start"] is None
    assert (seen["cfg"].binding_weight, seen["cfg"].layout_weight) == (0.5, 0.5)
    # v5: v4 with 2x2 patches, in its own cache
    script.main(["--stage", "imagen-base", "--recipe", "v5", "--minutes", "1"])
    assert seen["cache"] == tmp_path / "cache" / "imagen-base-v5" and seen["warm_start"] is None
    assert seen["cfg"].unshuffle_factor == 2 and seen["cfg"].phases == D.BASE_RECIPES["v4"]["phases"]


def test_cpu_flags_say_whether_bf16_autocast_pays():
    from imagen_lite import runtime

    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    assert runtime.cpu_has_fast_bf16(avx2) is False
    assert runtime.cpu_has_fast_bf16(avx2.replace("avx2", "avx2 avx512f avx512_bf16")) is True
    assert runtime.cpu_has_fast_bf16(avx2.replace("avx2", "avx2 amx_bf16 amx_tile")) is True
    assert runtime.cpu_has_fast_bf16("model name\t: something\n") is None  # no flags line: unknown
    assert runtime.cpu_has_fast_bf16() in (True, False, None)  # this machine's /proc/cpuinfo parses


def test_a_bf16_recipe_on_a_cpu_without_fast_bf16_warns_and_names_the_fix(tmp_path, monkeypatch, capsys):
    """v2+ bases train under bf16 autocast, ~10x slower than float32 on AVX2-only CPUs: the
    script says so and names --set bf16=false; the recipe itself is left as it is."""
    from imagen_lite import runtime

    script, seen = _train_default_script(tmp_path, monkeypatch)
    monkeypatch.setattr(script, "WIP_DIR", tmp_path / "wip")
    monkeypatch.setattr(imagen_lite.presets, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda cpuinfo=None: False)
    script.main(["--stage", "imagen-base", "--recipe", "v2", "--minutes", "1"])
    err = capsys.readouterr().err
    assert seen["cfg"].bf16 is True and "avx512_bf16" in err and "--set bf16=false" in err
    script.main(["--stage", "imagen-base", "--recipe", "v2", "--minutes", "1", "--set", "bf16=false"])
    assert seen["cfg"].bf16 is False and "bf16" not in capsys.readouterr().err
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda cpuinfo=None: True)
    script.main(["--stage", "imagen-base", "--recipe", "v2", "--minutes", "1"])
    assert seen["cfg"].bf16 is True and "bf16" not in capsys.readouterr().err


def test_a_base_branch_takes_its_recipe_over_the_weights_of_another_lineage(tmp_path, monkeypatch):
    """--recipe v4d --warm-start <v4 weights>: the v4 weights and step, v4d's settings and phases
    (its detail phase: uniform timesteps from 24,366), in its own cache; the same weights under
    their own recipe keep the config they were trained with."""
    script, seen = _train_default_script(tmp_path, monkeypatch)
    monkeypatch.setattr(imagen_lite.presets, "WEIGHTS_DIR", tmp_path / "weights")
    v4 = tmp_path / "weights" / "imagen"
    v4.mkdir(parents=True)
    trained = dict(D.BASE_RECIPES["v4"], timestep_bias_multiplier=10.0, timestep_bias_portion=0.2, lr=1e-4)
    D.write_training_state(v4, {"imagen-base": D.stage_record(24366, 2.95, D.BaseRunConfig(**trained))})
    D.record_recipe(v4, ["imagen-base"], "v4")
    script.main(["--stage", "imagen-base", "--recipe", "v4d", "--warm-start", str(v4), "--minutes", "1"])
    cfg = seen["cfg"]
    assert seen["cache"] == tmp_path / "cache" / "imagen-base-v4d" and seen["warm_start"] == v4
    assert cfg.phases == D.BASE_RECIPES["v4d"]["phases"] and (cfg.binding_weight, cfg.layout_weight) == (0.5, 0.5)
    at = D.settings_at({"phases": cfg.phases}, 24366)  # what the plan runs from the warm start's step
    assert (at["timestep_bias_strategy"], at["lr"]) == ("none", 1e-4)
    assert D.settings_at({"phases": cfg.phases}, 24365)["timestep_bias_strategy"] == "later"  # v4's own phases before it
    script.main(["--stage", "imagen-base", "--recipe", "v4", "--warm-start", str(v4), "--minutes", "1"])
    assert seen["cfg"].phases == D.BASE_RECIPES["v4"]["phases"] and seen["cfg"].timestep_bias_multiplier == 10.0


def _tiny_dalle2_donor(tmp_path, **records) -> Path:
    """A tiny trained DALL-E 2 pipeline exported with a training state: its decoder at step 7 and
    1.5 hours, plus ``records`` ({stage: record}) for the stages it claims to bring."""
    from imagen_lite.training.default import export_dalle2_checkpoint, train_dalle2

    donor_plan = (dict(stage="decoder", max_steps=1, batch_size=2, warmup_steps=0),)
    train_dalle2(tmp_path / "donor_cache", minutes=30, plan=donor_plan, start="tiny")
    donor = export_dalle2_checkpoint(tmp_path / "donor_cache", tmp_path / "donor", plan=donor_plan)
    state = D.read_training_state(donor)
    state["decoder"].update(step=7, cpu_hours=1.5)
    D.write_training_state(donor, {**state, **records})
    return donor


def test_a_grafted_decoder_starts_from_another_lineage_and_keeps_its_steps_and_hours(tmp_path):
    """DALLE2_V2_PLAN's graft: a new CLIP and prior, then the decoder stage starts from a trained
    donor's decoder, text_proj and SR weights at the donor's recorded step; the donor's decoder and
    SR hours stay in the new lineage's training state."""
    from imagen_lite.training.default import export_dalle2_checkpoint, graft_start, train_dalle2

    donor = _tiny_dalle2_donor(tmp_path, sr={"step": 3, "cpu_hours": 0.25, "config": {}})

    graft = dict(source=str(donor), components=D.GRAFT_COMPONENTS, stages=("decoder", "sr"))
    plan = (dict(stage="clip", max_steps=2, batch_size=4, shapes_contrast_group=4, shapes_mixture={"position": 1.0}),
            dict(stage="decoder", max_steps=9, batch_size=2, warmup_steps=0, graft=graft, phases={8: dict(lr=5e-5)}))  # fmt: skip
    assert train_dalle2(tmp_path / "cache", minutes=30, plan=plan, start="tiny") == {"clip": 2, "decoder": 9}
    seed = json.loads((tmp_path / "cache" / "decoder" / "warm_start.json").read_text())
    assert seed["step"] == 7 and seed["from"] == str(tmp_path / "cache" / "decoder-graft")
    grafted = tmp_path / "cache" / "decoder-graft"
    # the donor's decoder (upcast to float32), the new stage's CLIP text tower
    donor_w = load_file(str(next((donor / "decoder").glob("*.safetensors"))))
    graft_w = load_file(str(next((grafted / "decoder").glob("*.safetensors"))))
    assert {v.dtype for v in graft_w.values()} == {torch.float32}
    assert all(torch.equal(graft_w[k], donor_w[k].float()) for k in donor_w)
    clip_w = load_file(str(next((tmp_path / "cache" / "clip" / "text_encoder").glob("*.safetensors"))))
    text_w = load_file(str(next((grafted / "text_encoder").glob("*.safetensors"))))
    assert all(torch.equal(text_w[k], clip_w[k]) for k in clip_w)

    out = export_dalle2_checkpoint(tmp_path / "cache", tmp_path / "v2", plan=plan)
    shipped = D.read_training_state(out)
    assert shipped["decoder"]["step"] == 9 and shipped["decoder"]["cpu_hours"] >= 1.5
    assert shipped["sr"] == {"step": 3, "cpu_hours": 0.25, "config": {"grafted_from": str(donor)}}
    assert shipped["clip"]["step"] == 2
    # a graft that asks for a lineage refuses a source of another one (v2 once it ships)
    D.record_recipe(donor, ["decoder", "sr"], "v2")
    with pytest.raises(ValueError, match=r"holds lineage 'v2', but the plan grafts 'v1'"):
        graft_start(dict(graft, recipe="v1"), str(tmp_path / "cache" / "clip"), tmp_path / "other2" / "decoder")
    assert not (tmp_path / "other2").exists()
    with pytest.raises(ValueError, match=r"no training_state.json record of \['decoder', 'sr'\]"):
        graft_start(dict(graft, stages=("decoder", "sr"), source=str(tmp_path / "donor_cache" / "decoder")),
                    str(tmp_path / "cache" / "clip"), tmp_path / "other" / "decoder")  # fmt: skip


def test_a_fresh_decoder_starts_from_new_weights_on_a_trained_clip_prior_and_sr(tmp_path, monkeypatch):
    """DALLE2_V3_PLAN's fresh start: the decoder stage starts from a trained pipeline whose decoder
    and text_proj get new random weights, at step 0; the source's CLIP, prior and SR weights, steps
    and hours stay in the new lineage's training state."""
    import runpy

    from imagen_lite.training.default import export_dalle2_checkpoint, fresh_start, train_dalle2

    donor = _tiny_dalle2_donor(tmp_path, clip={"step": 4, "cpu_hours": 0.5, "config": {}},
                               prior={"step": 2, "cpu_hours": 0.125, "config": {}}, sr={"step": 3, "cpu_hours": 0.25, "config": {}})  # fmt: skip
    state = D.read_training_state(donor)
    D.record_recipe(donor, list(state), "v2")

    fresh = dict(D.FRESH_DECODER, source=str(donor))
    cache = tmp_path / "dalle2-v3"
    plan = (dict(stage="decoder", max_steps=3, batch_size=2, warmup_steps=0, image_embed_dropout=0.3, fresh=fresh,
                 phases={2: dict(lr=5e-5)}),)  # fmt: skip
    assert train_dalle2(cache, minutes=30, plan=plan, start="tiny") == {"decoder": 3}
    seed = json.loads((cache / "decoder" / "warm_start.json").read_text())
    start = cache / "decoder-fresh"
    assert seed["step"] == 0 and seed["from"] == str(start)
    assert not (start / "training_state.json").exists()
    weights = lambda d, part: load_file(str(next((d / part).glob("*.safetensors"))))  # noqa: E731
    for part in ("text_encoder", "prior", "super_res_first", "image_encoder"):  # the source's, unchanged
        a, b = weights(donor, part), weights(start, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)
    for part in ("decoder", "text_proj"):  # the same shapes, new values
        a, b = weights(donor, part), weights(start, part)
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        assert not all(torch.equal(a[k].float(), b[k].float()) for k in a if a[k].float().std() > 0)

    out = export_dalle2_checkpoint(cache, tmp_path / "v3", plan=plan)
    shipped = D.read_training_state(out)
    assert shipped["decoder"]["step"] == 3 and shipped["decoder"]["cpu_hours"] < 1.5  # its own hours only
    assert shipped["clip"] == {"step": 4, "cpu_hours": 0.5, "recipe": "v2", "config": {"grafted_from": str(donor)}}
    assert shipped["sr"]["step"] == 3 and shipped["prior"]["cpu_hours"] == 0.125
    # shipped: the decoder is v3's, the stages the fresh start brought keep v2's record
    monkeypatch.setitem(D.DALLE2_PLANS, "v3", plan)
    ship = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "ship_default.py"), run_name="ship")
    ship["ship_dalle2"](tmp_path, tmp_path / "shipped", {"guidance_scale": [2.0, 2.0, 1.0]}, "v3")
    recipes = {stage: D.recipe_of(D.read_training_state(tmp_path / "shipped"), stage) for stage in state}
    assert recipes == {"clip": "v2", "prior": "v2", "sr": "v2", "decoder": "v3"}
    # a new machine resumes the lineage from its export (wip/dalle2-v3): its step, and the brought stages' records
    longer = (dict(plan[0], max_steps=4),)
    assert train_dalle2(tmp_path / "new_machine", minutes=30, plan=longer, start="tiny", warm_start=out) == {"decoder": 4}
    resumed = D.read_training_state(export_dalle2_checkpoint(tmp_path / "new_machine", tmp_path / "v3b", plan=longer))
    assert resumed["decoder"]["step"] == 4 and resumed["decoder"]["cpu_hours"] >= shipped["decoder"]["cpu_hours"]
    assert {s: (resumed[s]["step"], resumed[s]["recipe"]) for s in ("clip", "prior", "sr")} == {
        "clip": (4, "v2"), "prior": (2, "v2"), "sr": (3, "v2")}
    # a source of another lineage, or one without the stages' records, is refused before anything is written
    with pytest.raises(ValueError, match=r"holds lineage 'v2', but the plan builds on 'v1'"):
        fresh_start(dict(fresh, recipe="v1"), tmp_path / "other" / "decoder")
    with pytest.raises(ValueError, match=r"no training_state.json record of \['clip', 'prior', 'sr'\]"):
        fresh_start(dict(fresh, source=str(tmp_path / "donor_cache" / "decoder")), tmp_path / "other" / "decoder")
    assert not (tmp_path / "other").exists()


def test_a_bf16_run_exports_its_frozen_components_as_it_found_them(tmp_path):
    """Mixed precision casts frozen components down for the run; the exported pipeline carries them
    as the start directory holds them, not their bf16-rounded copies (DALL-E 2 v3 trains its decoder
    in bf16 beside v2's CLIP, prior and SR, which must ship unchanged)."""
    from accelerate.state import AcceleratorState

    from imagen_lite.training.default import export_dalle2_checkpoint, train_dalle2

    donor = _tiny_dalle2_donor(tmp_path, clip={"step": 4, "cpu_hours": 0.5, "config": {}},
                               prior={"step": 2, "cpu_hours": 0.125, "config": {}}, sr={"step": 3, "cpu_hours": 0.25, "config": {}})  # fmt: skip
    D.record_recipe(donor, list(D.read_training_state(donor)), "v2")
    plan = (dict(stage="decoder", max_steps=2, batch_size=2, warmup_steps=0, mixed_precision="bf16",
                 fresh=dict(D.FRESH_DECODER, source=str(donor))),)  # fmt: skip
    AcceleratorState._reset_state(True)  # accelerate keeps one mixed-precision setting per process
    try:
        train_dalle2(tmp_path / "dalle2-v3", minutes=30, plan=plan, start="tiny")
        out = export_dalle2_checkpoint(tmp_path / "dalle2-v3", tmp_path / "v3", plan=plan)
    finally:
        AcceleratorState._reset_state(True)
    weights = lambda d, part: load_file(str(next((d / part).glob("*.safetensors"))))  # noqa: E731
    for part in ("text_encoder", "prior", "super_res_first", "super_res_last", "image_encoder"):
        a, b = weights(donor, part), weights(out, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    trained = weights(out, "decoder")
    assert any(not torch.equal(v, weights(tmp_path / "dalle2-v3" / "decoder-fresh", "decoder")[k].half()) for k, v in trained.items())


def test_the_dalle2_v3_plan_is_well_formed():
    """v3: one decoder stage from new weights on the shipped v2's CLIP, prior and SR, with the Imagen
    base v4's phases and image_embed_dropout from step 0."""
    from imagen_lite.training.default import DALLE2_V3_PLAN, dalle2_stage_config, phase_starts, settings_at

    (decoder,) = DALLE2_V3_PLAN
    cfg = dalle2_stage_config(decoder, Path("/tmp/unused"), "small")
    cfg.check()
    assert (cfg.stage, cfg.image_embed_dropout, cfg.mixed_precision) == ("decoder", 0.3, "bf16")
    assert decoder["fresh"]["recipe"] == "v2" and set(decoder["fresh"]["stages"]) == {"clip", "prior", "sr"}
    assert phase_starts(decoder) == [6200, 8600, 10600]
    assert settings_at(decoder, 6200)["timestep_bias_begin"] == 850  # the range phase
    late = settings_at(decoder, 10600)
    assert (late["lr"], late["timestep_bias_end"], late["shapes_mixture"]) == (1e-4, None, D.BASE_CONSOLIDATION_PHASE["mixture"])


def test_the_dalle2_v2_plan_is_well_formed():
    from imagen_lite.training.default import DALLE2_V2_PLAN, dalle2_stage_config, phase_starts

    stages = {item["stage"]: item for item in DALLE2_V2_PLAN}
    assert list(stages) == ["clip", "prior", "decoder"]
    assert stages["clip"]["batch_size"] % stages["clip"]["shapes_contrast_group"] == 0
    for item in DALLE2_V2_PLAN:
        dalle2_stage_config(item, Path("/tmp/unused"), "small").check()  # every stage's config passes its checks
    decoder = stages["decoder"]
    assert set(decoder["graft"]["stages"]) == {"decoder", "sr"}
    assert decoder["graft"]["recipe"] == "v1"  # v1's decoder, never the v2 default that now ships
    assert all(18800 < at < decoder["max_steps"] for at in phase_starts(decoder))  # after the v1 decoder's last step


def test_the_dalle2_v2e_plan_is_v2_with_image_embed_dropout_after_the_shipped_decoder(tmp_path):
    """v2e = v2's CLIP and prior, and its decoder continued past the shipped 26,000 with
    image_embed_dropout; a plan phase may switch the dropout on mid-stage (a resumable change)."""
    from imagen_lite.training.default import DALLE2_V2_PLAN, DALLE2_V2E_PLAN, dalle2_stage_config, settings_at, train_dalle2

    assert DALLE2_V2E_PLAN[:2] == DALLE2_V2_PLAN[:2]
    decoder, v2 = DALLE2_V2E_PLAN[2], DALLE2_V2_PLAN[2]
    assert decoder["max_steps"] > v2["max_steps"]
    assert settings_at(decoder, v2["max_steps"] - 1) == settings_at(v2, v2["max_steps"] - 1)  # v2 up to what shipped
    after = settings_at(decoder, v2["max_steps"])
    assert after["image_embed_dropout"] == 0.3 and after["lr"] == 1e-4
    dalle2_stage_config(decoder, Path("/tmp/unused"), "small").replace(**after).check()

    item = dict(stage="decoder", max_steps=2, batch_size=2, warmup_steps=0, log_every=1, keep_checkpoints=5,
                phases={1: dict(image_embed_dropout=0.5)})  # fmt: skip
    assert train_dalle2(tmp_path, minutes=30, chunk=5, plan=(item,), start="tiny") == {"decoder": 2}
    ckpts = tmp_path / "decoder" / "checkpoints"
    first, second = (json.loads((ckpts / f"step_00000{s}" / "config.json").read_text()) for s in (1, 2))
    assert first["image_embed_dropout"] == 0.0 and second["image_embed_dropout"] == 0.5


def test_a_v2_base_ships_carrying_the_shipped_sr(tmp_path, monkeypatch):
    """ship_default --recipe v2 --out: the v2 base's EMA under the shipped cascade's SR UNet, whose
    training record comes along; the result loads and draws at 256 px."""
    import runpy

    from imagen_lite import load_pipeline, presets

    cfg = tiny_base_cfg()
    D.train_base(cfg, tmp_path / "v1base", minutes=10, resume=None, max_steps=1, export_dir=tmp_path / "base")
    D.train_sr(tiny_sr_cfg(), tmp_path / "base", tmp_path / "v1sr", minutes=10, resume=None, max_steps=1,
               export_dir=tmp_path / "weights" / "imagen")  # fmt: skip
    D.train_base(cfg, tmp_path / "cache" / "imagen-base-v2", minutes=10, resume=None, max_steps=2)
    monkeypatch.setattr(presets, "WEIGHTS_DIR", tmp_path / "weights")
    ship = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "ship_default.py"), run_name="ship")
    ship["main"](["--family", "imagen", "--recipe", "v2", "--steps", "2,2", "--guidance", "1,1", "--scheduler", "ddpm",
                  "--sr-strength", "0.5", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "cand")])  # fmt: skip
    state = D.read_training_state(tmp_path / "cand")
    assert state["imagen-base"]["step"] == 2
    assert state["imagen-sr"]["step"] == 1 and state["imagen-sr"]["config"]["carried_from"] == str(tmp_path / "weights" / "imagen")
    assert D.shipped_recipe(tmp_path / "cand", "imagen-base") == "v2"  # its lineage, recorded for warm starts
    assert "recipe" not in state["imagen-sr"]  # the carried SR keeps the v1 record it came with
    configs = [*(tmp_path / "cand").glob("*/config.json"), tmp_path / "cand" / "model_index.json"]
    assert len(configs) >= 4 and not [c for c in configs if "_name_or_path" in json.loads(c.read_text())]
    shipped_sr = load_file(str(next((tmp_path / "weights" / "imagen" / "sr_unet").glob("*.safetensors"))))
    carried_sr = load_file(str(next((tmp_path / "cand" / "sr_unet").glob("*.safetensors"))))
    assert all(torch.equal(shipped_sr[k], carried_sr[k]) for k in shipped_sr)
    v2_ema = load_file(str(list_checkpoints(tmp_path / "cache" / "imagen-base-v2")[-1] / "ema.safetensors"))
    unet = load_file(str(next((tmp_path / "cand" / "unet").glob("*.safetensors"))))
    assert torch.allclose(unet["conv_in.weight"].float(), v2_ema["module.unet.conv_in.weight"], atol=1e-3)
    pipe = load_pipeline("imagen", model=str(tmp_path / "cand"), device="cpu", dtype="float32")
    out = pipe(["a red circle"], num_inference_steps=(2, 2), output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape[1:3] == (256, 256)
    with pytest.raises(ValueError, match="has no SR stage"):
        D.export_cascade_carrying_sr(tmp_path / "base", tmp_path / "base", tmp_path / "bad")


def test_binding_targets_pair_each_colour_with_the_shape_after_it():
    from imagen_lite.data.shapes import COLORS, SHAPES

    tok = D.C.word_tokenizer(D.shapes_vocabulary())
    captions = ["a small red circle above a blue square", "three green triangles", "a purple square", ""]
    ids = tok(captions, padding="max_length", max_length=16, return_tensors="pt").input_ids
    to_colour, to_shape = D.binding_targets(tok, ids)
    colour, shape = list(COLORS).index, list(SHAPES).index
    # "a small red circle above a blue square": red (2) -> circle (3), blue (6) -> square (7)
    assert {j: v for j, v in enumerate(to_colour[0].tolist()) if v >= 0} == {3: colour("red"), 7: colour("blue")}
    assert {j: v for j, v in enumerate(to_shape[0].tolist()) if v >= 0} == {2: shape("circle"), 6: shape("square")}
    assert to_colour[1, 2] == colour("green") and to_shape[1, 1] == shape("triangle")  # plural shape word
    assert (to_colour[3] < 0).all() and (to_shape[3] < 0).all()  # a dropped caption has no targets


AUXILIARY_TEXT_LOSSES = {
    # field: (loss, two captions that differ only in what the term reads, a training batch with the
    # term, a batch with nothing for it to read)
    "binding_weight": ("binding_loss", ["a red circle and a blue square", "a blue circle and a red square"],
                       ["a red circle and a blue square", "a green triangle"], ["", "a cat on the left"]),
    "layout_weight": ("layout_loss", ["a red circle above a blue square", "a blue square above a red circle"],
                      ["a red circle below a blue square", "a green triangle on the right"], ["three red circles", ""]),
}  # fmt: skip


@pytest.mark.parametrize("field", sorted(AUXILIARY_TEXT_LOSSES))
def test_auxiliary_text_losses_are_learnable_and_off_by_default(field):
    """binding_weight / layout_weight > 0 add a term the T5 can drive down (its outputs come to
    name each object's colour / side at its shape word; the two captions have the same words, so
    only binding / word order tells them apart); 0 leaves the diffusion loss exactly as before;
    a batch with nothing to read adds nothing; a phase may switch the term on."""
    name, pair, texts, nothing = AUXILIARY_TEXT_LOSSES[field]
    aux = getattr(D, name)
    cfg = tiny_base_cfg()
    tok, t5, _unet, _ = D.build_base(cfg)
    ids = tok(pair * 4, padding="max_length", max_length=cfg.max_length, return_tensors="pt").input_ids
    opt = torch.optim.AdamW(t5.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = aux(tok, t5, t5(ids)[0], ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    # in the training loss: the term is added only when asked for
    tok, t5, unet, scheduler = D.build_base(cfg)
    model = D.Trainable(t5, unet)
    images = torch.zeros(2, 3, 64, 64)
    off = D.loss_fn(tiny_base_cfg(caption_dropout=0.0), model, tok, scheduler, images, texts, torch.Generator().manual_seed(0))
    on = D.loss_fn(tiny_base_cfg(caption_dropout=0.0, **{field: 1.0}), model, tok, scheduler, images, texts,
                   torch.Generator().manual_seed(0))  # fmt: skip
    ids = tok(texts, padding="max_length", max_length=cfg.max_length, return_tensors="pt")
    extra = aux(tok, t5, t5(ids.input_ids, attention_mask=ids.attention_mask)[0], ids.input_ids)
    assert extra > 0 and torch.allclose(on - off, extra, rtol=1e-4, atol=1e-5)
    none = tok(nothing, padding="max_length", max_length=cfg.max_length, return_tensors="pt").input_ids
    assert aux(tok, t5, t5(none)[0], none).item() == 0.0  # nothing to read in the batch: no term
    D.check_base_phases({"20600": {field: 0.05}})


def test_layout_targets_name_where_each_object_goes():
    tok = D.C.word_tokenizer(D.shapes_vocabulary())
    captions = ["a red circle to the left of a blue square", "a blue square below an orange circle",
                "a small green triangle at the top", "a red circle in the center", "a red circle and a blue square",
                "three green triangles", "", "a cat on the left"]  # fmt: skip
    ids = tok(captions, padding="max_length", max_length=16, return_tensors="pt").input_ids
    target = D.layout_targets(tok, ids)
    side = list(D.LAYOUT_WORDS).index
    found = [{j: v for j, v in enumerate(row.tolist()) if v >= 0} for row in target]
    assert found[0] == {2: side("left"), 9: side("right")}  # A to the left of B: A left, B right
    assert found[1] == {2: side("below"), 6: side("above")}
    assert found[2] == {3: side("above")} and found[3] == {2: side("center")}  # "at the top": the upper class
    assert found[4:] == [{}, {}, {}, {}]  # no layout named, dropped, or outside the grammar (<unk> words)


def test_probe_text_layout_reads_sides_off_shape_words(tmp_path, capsys):
    """scripts/probe_text_layout.py: every relation caption once, each shape word labelled with
    its object's side; the probe finds a side that the features carry and not one they lack;
    end to end on an exported tiny base."""
    import runpy

    probe = runpy.run_path(str(imagen_lite.__path__[0] + "/../scripts/probe_text_layout.py"))
    captions = probe["relation_captions"]()
    assert len(captions) == len({c for c, _ in captions}) == 18 * 17 * 4
    assert ("a red circle to the left of a blue square", 0) in captions and ("an orange square below a red circle", 3) in captions
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=gen)
    noise = torch.randn(400, 16, generator=gen)
    carried = noise + 5 * F.one_hot(y, 16).float()
    assert probe["probe_accuracy"](carried, y) > 0.9 and probe["probe_accuracy"](noise, y) < 0.45
    D.train_base(tiny_base_cfg(), tmp_path / "run", minutes=10, resume=None, max_steps=2, export_dir=tmp_path / "pipe")
    tok, encode = probe["load_text_encoder"](tmp_path / "pipe")
    x, sides = probe["shape_word_features"](tok, encode, captions[:4])
    assert x.shape[0] == 8 and sides.tolist()[:2] == [captions[0][1], probe["OPPOSITE"][captions[0][1]]]
    acc = probe["main"]([str(tmp_path / "pipe")])
    assert 0.0 <= acc <= 1.0 and "probe test accuracy" in capsys.readouterr().out


def test_probe_square_edges_scores_the_x0_prediction_of_true_renders(tmp_path, capsys):
    """scripts/probe_square_edges.py: a base that gives its input back scores every true render
    right at t = 0, one that returns a blank canvas none; end to end on an exported tiny base."""
    import runpy
    from types import SimpleNamespace

    probe = runpy.run_path(str(imagen_lite.__path__[0] + "/../scripts/probe_square_edges.py"))
    scheduler = D.C.ddpm_scheduler(prediction_type="sample")
    for unet, want in ((lambda x, t, **k: (x,), 4), (lambda x, t, **k: (torch.ones_like(x),), 0)):
        pipe = SimpleNamespace(config=SimpleNamespace(unshuffle_factor=4), scheduler=scheduler, unet=unet,
                               encode_prompt=lambda prompts, device: torch.zeros(len(prompts), 4, 8))  # fmt: skip
        assert probe["returned_right"](pipe, "a blue square", 0, n=4) == (4, want)
    D.train_base(tiny_base_cfg(), tmp_path / "run", minutes=10, resume=None, max_steps=2, export_dir=tmp_path / "pipe")
    rows = probe["main"](["--model", str(tmp_path / "pipe"), "--timesteps", "0,500", "--n", "2"])
    assert set(rows) == {0, 500} and all(true == 8 and 0 <= got <= 8 for got, true in rows.values())
    assert "| 500 | 8 / 8 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        probe["main"](["--model", str(tmp_path / "pipe"), "--timesteps", "0,1000"])


def test_probe_square_edges_asks_the_refiner_with_refiner(tmp_path, capsys):
    """--refiner: the refiner's x0 (its v through ImagenPipeline._refine) is scored. A v of 0 at
    t = 0 gives x_t back (every true render right); a huge v gives a black canvas (none)."""
    import runpy

    from imagen_lite.models.tiny import build_tiny_imagen

    probe = runpy.run_path(str(imagen_lite.__path__[0] + "/../scripts/probe_square_edges.py"))
    pipe = build_tiny_imagen(unshuffle_factor=2, with_refiner=True)
    for value, want in ((0.0, 4), (1e4, 0)):
        pipe.refiner.forward = lambda x, t, return_dict=True, value=value: (torch.full_like(x, value),)
        assert probe["returned_right"](pipe, "a blue square", 0, n=4, refiner=True) == (4, want)
    model = tmp_path / "with_refiner"
    build_tiny_imagen(unshuffle_factor=2, with_refiner=True).save_pretrained(model, safe_serialization=True)
    rows = probe["main"](["--model", str(model), "--refiner", "--timesteps", "0,100", "--n", "2"])
    assert set(rows) == {0, 100} and all(true == 8 for _, true in rows.values())
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the refiner trained on t < 300 only
        probe["main"](["--model", str(model), "--refiner", "--timesteps", "300"])
    assert "each must be in [0, 300) (the refiner's trained timesteps)" in capsys.readouterr().err
    plain = tmp_path / "plain"
    build_tiny_imagen(unshuffle_factor=2).save_pretrained(plain, safe_serialization=True)
    with pytest.raises(SystemExit):
        probe["main"](["--model", str(plain), "--refiner"])
    assert "has no refiner" in capsys.readouterr().err


def test_probe_dalle2_binding_runs_both_checks_on_the_shipped_default(capsys):
    """scripts/probe_dalle2_binding.py, a few prompts: the clip check is a share, the oracle
    counts every two-object / relation image once per conditioning."""
    import runpy

    probe = runpy.run_path(str(imagen_lite.__path__[0] + "/../scripts/probe_dalle2_binding.py"))
    out = probe["main"](["--pairs", "2", "--seeds", "0", "--n-prompts", "10"])
    assert 0.0 <= out["clip"] <= 1.0
    kinds = {"two_objects": 2, "relation": 2}  # prompt_set(10) takes turns over the 5 kinds
    for mode in ("prior", "oracle"):
        for kind, n in kinds.items():
            assert sum(out["oracle"][(mode, kind)].values()) == n
    assert "oracle: prior " in capsys.readouterr().out


def test_probe_dalle2_binding_oracle_takes_any_kinds_and_prompt_set(capsys):
    """--kinds / --prompt-seed choose the prompts; the summary counts every image once per mode."""
    import runpy

    from imagen_lite.data.shapes import prompt_set

    probe = runpy.run_path(str(imagen_lite.__path__[0] + "/../scripts/probe_dalle2_binding.py"))
    out = probe["main"](["--checks", "oracle", "--kinds", "single", "counting", "--prompt-seed", "1", "--seeds", "0",
                         "--n-prompts", "10"])  # fmt: skip
    wanted = {k for _, k in prompt_set(10, 1) if k in ("single", "counting")}
    assert {kind for _, kind in out["oracle"]} == wanted
    n = sum(1 for _, k in prompt_set(10, 1) if k in wanted)
    printed = capsys.readouterr().out
    for mode in ("prior", "oracle"):
        assert sum(sum(c.values()) for (m, _), c in out["oracle"].items() if m == mode) == n
        assert f"oracle: {mode:6s} right " in printed
    with pytest.raises(SystemExit):
        probe["main"](["--checks", "oracle", "--kinds", "squares"])


def tiny_refiner_cfg(**kw) -> D.RefinerRunConfig:
    return D.RefinerRunConfig(batch_size=2, warmup_steps=2, checkpoint_every=2,
                              size=dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8), **kw)  # fmt: skip


def test_the_refiner_trains_resumes_and_exports_onto_a_cascade(tmp_path):
    """train_refiner: v loss on t < max_timestep, checkpoints that resume at their step, and an
    export that is the given cascade plus the EMA refiner (training state and defaults kept)."""
    from imagen_lite import presets
    from imagen_lite.models.tiny import build_tiny_imagen

    cascade = tmp_path / "cascade"
    build_tiny_imagen(unshuffle_factor=2).save_pretrained(cascade, safe_serialization=True)
    D.write_training_state(cascade, {"imagen-base": {"step": 7, "cpu_hours": 0.1, "config": {}}})
    (cascade / presets.DEFAULTS_FILE).write_text(json.dumps({"num_inference_steps": [4, 2]}))
    cfg = tiny_refiner_cfg(max_timestep=200)
    first = D.train_refiner(cfg, tmp_path / "cache", minutes=10, resume=None, max_steps=2)
    assert first["step"] == 2
    again = D.train_refiner(cfg, tmp_path / "cache", minutes=10, max_steps=4, export_dir=tmp_path / "out", base_dir=cascade)
    assert again["step"] == 4 and again["cpu_hours"] > first["cpu_hours"]
    state = D.read_training_state(tmp_path / "out")
    assert state["imagen-base"]["step"] == 7 and state["imagen-refiner"]["step"] == 4
    assert state["imagen-refiner"]["config"]["max_timestep"] == 200
    assert json.loads((tmp_path / "out" / presets.DEFAULTS_FILE).read_text()) == {"num_inference_steps": [4, 2]}
    pipe = imagen_lite.load_pipeline("imagen", model=str(tmp_path / "out"), device="cpu", dtype="float32")
    assert pipe.config.refiner_max_timestep == 200 and pipe.refiner.dtype == torch.float32
    out = pipe(["a red circle"], num_inference_steps=(4, 2), refiner_start=(200, 0), output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape[1:3] == (32, 32)
    D.export_cascade(tmp_path / "out", D.build_sr(tiny_sr_cfg(), 32), tiny_sr_cfg(), tmp_path / "with_sr")
    assert json.loads((tmp_path / "with_sr" / "model_index.json").read_text())["refiner_max_timestep"] == 200
    assert (tmp_path / "with_sr" / "refiner").is_dir()  # an SR exported onto it keeps the refiner
    with pytest.raises(ValueError, match="max_timestep=0: the refiner's timesteps"):
        D.train_refiner(tiny_refiner_cfg(max_timestep=0), tmp_path / "bad", minutes=1, max_steps=1)
    with pytest.raises(ValueError, match="export_dir needs base_dir"):
        D.train_refiner(cfg, tmp_path / "cache", minutes=1, max_steps=4, export_dir=tmp_path / "x")


def test_ship_default_puts_the_refiner_on_an_exported_cascade(tmp_path, capsys):
    """ship_default --refiner-start T --base-dir DIR: DIR's stages as they are + the newest refiner
    checkpoint, and refiner_start in the generation defaults; bad combinations are named."""
    import runpy

    from imagen_lite import presets
    from imagen_lite.models.tiny import build_tiny_imagen

    cascade = tmp_path / "cascade"
    build_tiny_imagen(unshuffle_factor=2).save_pretrained(cascade, safe_serialization=True)
    D.train_refiner(tiny_refiner_cfg(), tmp_path / "cache" / "imagen-refiner", minutes=10, resume=None, max_steps=2)
    ship = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "ship_default.py"), run_name="ship")
    argv = ["--family", "imagen", "--steps", "4,2", "--guidance", "1,1", "--scheduler", "ddpm", "--cache",
            str(tmp_path / "cache"), "--base-dir", str(cascade), "--out", str(tmp_path / "cand")]  # fmt: skip
    ship["main"](argv + ["--refiner-start", "80,120"])  # one per stage: base, SR
    assert json.loads((tmp_path / "cand" / presets.DEFAULTS_FILE).read_text())["refiner_start"] == [80, 120]
    ship["main"](argv + ["--refiner-start", "80"])
    assert json.loads((tmp_path / "cand" / presets.DEFAULTS_FILE).read_text())["refiner_start"] == 80
    assert D.read_training_state(tmp_path / "cand")["imagen-refiner"]["step"] == 2
    base = load_file(str(next((cascade / "unet").glob("*.safetensors"))))
    carried = load_file(str(next((tmp_path / "cand" / "unet").glob("*.safetensors"))))
    assert all(torch.allclose(base[k].half().float(), carried[k].float()) for k in base)
    pipe = imagen_lite.load_pipeline("imagen", model=str(tmp_path / "cand"), device="cpu", dtype="float32")
    assert pipe.imagen_lite_preset.extra["refiner_start"] == 80
    for bad, why in ((["--refiner-start", "301"], "--refiner-start 301 is above the timesteps the refiner was trained on"),
                     (["--refiner-start", "0"], "--refiner-start 0: timesteps >= 0, at least one >= 1"),
                     (["--refiner-start", "80,80,80"], "at most one per stage"),
                     (["--refiner-start", "eighty"], "--refiner-start eighty: timesteps, one or one per stage"),
                     ([], "--base-dir is for --refiner-start")):
        with pytest.raises(SystemExit) as exit_info:
            ship["main"](argv + bad)
        assert exit_info.value.code == 2 and why in capsys.readouterr().err
    assert not list(tmp_path.glob(".ship-*"))  # a refused refiner leaves no half-written directory
    with pytest.raises(SystemExit) as exit_info:
        ship["main"](["--family", "dalle2", "--steps", "25,25,3", "--guidance", "2,2,1", "--refiner-start", "80,120",
                      "--out", str(tmp_path / "d2")])  # fmt: skip
    assert exit_info.value.code == 2 and "--family dalle2 takes one timestep (its decoder)" in capsys.readouterr().err
    # a DALL-E 2 ship with nothing to export (an empty cache) leaves no half-written directory either
    with pytest.raises(SystemExit) as exit_info:
        ship["main"](["--family", "dalle2", "--steps", "25,25,3", "--guidance", "2,2,1", "--cache", str(tmp_path / "empty"),
                      "--out", str(tmp_path / "d2")])  # fmt: skip
    assert exit_info.value.code == 2 and not list(tmp_path.glob(".ship-*")) and not (tmp_path / "d2").exists()


def test_ship_default_puts_a_finetuned_sr_run_into_the_dalle2_default(tmp_path, capsys):
    """``ship_default.py --family dalle2 --sr-from RUN``: the SR UNets of an ``imagen-lite train
    --family dalle2 --stage sr`` run replace the candidate's (float16), the decoder stays, and the
    SR record counts on from the run's start (steps and wall hours added); shipping the run into
    its own start directory again counts from the record before it. A run of another stage, one
    with no pipeline written yet, and a DALL-E 2 directory shipped as the Imagen default are refused."""
    import runpy

    from imagen_lite.training.config import TrainConfig
    from imagen_lite.training.loop import train

    donor = _tiny_dalle2_donor(tmp_path, sr={"step": 3, "cpu_hours": 0.25, "recipe": "v2", "config": {}})
    state = D.read_training_state(donor)
    D.write_training_state(donor, {"decoder": {**state["decoder"], "recipe": "v3"}})
    cfg = TrainConfig(family="dalle2", stage="sr", model=str(donor), data="shapes", out=str(tmp_path / "run"), max_steps=2,
                      batch_size=2, lr=1e-3, warmup_steps=0, ema_decay=None, checkpoint_every=1, log_every=1, sr_crop=(16, 16))  # fmt: skip
    ship = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "ship_default.py"), run_name="ship")
    out = tmp_path / "weights" / "dalle2"
    out.parent.mkdir()
    args = ["--family", "dalle2", "--recipe", "v3", "--from-dir", str(donor), "--steps", "2,2,2", "--guidance", "1,1,1",
            "--sr-from", str(tmp_path / "run"), "--out", str(out)]  # fmt: skip

    train(cfg.replace(stop_at=1))  # checkpointed, no pipeline written yet
    with pytest.raises(SystemExit):
        ship["main"](args)
    assert "no super_res_first/ and super_res_last/ written there yet" in capsys.readouterr().err and not out.exists()
    assert not list(out.parent.glob(".ship-*"))
    run = train(cfg)
    with pytest.raises(SystemExit):
        ship["main"](["--family", "imagen", *args[2:]])
    assert "holds a UnCLIPLitePipeline; expected one of ('ImagenPipeline',)" in capsys.readouterr().err and not out.exists()
    decoder_run = tmp_path / "decoder_run"
    decoder_run.mkdir()
    (decoder_run / "train_config.json").write_text(json.dumps({"family": "dalle2", "stage": "decoder"}))
    with pytest.raises(SystemExit):
        ship["main"]([*args[:-3], str(decoder_run), *args[-2:]])
    assert "stage='decoder'" in capsys.readouterr().err and not out.exists()

    ship["main"](args)
    seconds = torch.load(list_checkpoints(run / "checkpoints")[-1] / "state.pt", weights_only=True)["extra"]["run_seconds"]
    record = D.read_training_state(out)["sr"]
    assert (record["step"], record["recipe"], record["config"]["finetuned_from"]) == (5, "v3", {"step": 3, "cpu_hours": 0.25, "recipe": "v2"})
    assert record["cpu_hours"] == pytest.approx(0.25 + seconds / 3600, abs=1e-4) and seconds > 0
    assert record["config"]["run"]["sr_crop"] == [16, 16]
    for name in ("super_res_first", "super_res_last"):
        new, trained = load_file(str(out / name / "diffusion_pytorch_model.safetensors")), load_file(str(run / name / "diffusion_pytorch_model.safetensors"))
        assert all(v.dtype == torch.float16 and torch.equal(v, trained[k].half()) for k, v in new.items())
        assert not all(torch.equal(v, w) for v, w in zip(new.values(), load_file(str(donor / name / "diffusion_pytorch_model.safetensors")).values()))
    assert all(torch.equal(v, w) for v, w in zip(load_file(str(out / "decoder" / "diffusion_pytorch_model.safetensors")).values(),
                                                 load_file(str(donor / "decoder" / "diffusion_pytorch_model.safetensors")).values()))  # fmt: skip
    images = imagen_lite.generate("a red circle", pipeline="dalle2", model=str(out), device="cpu", seed=0, size=32)
    assert [im.size for im in images] == [(32, 32)]

    for _ in range(2):  # the run shipped into its own start directory, twice: the count does not grow
        D.put_sr_run(donor, run, "v3")
        assert D.read_training_state(donor)["sr"]["step"] == 5


def test_ship_default_puts_a_finetuned_sr_run_into_the_imagen_default(tmp_path, capsys):
    """``ship_default.py --family imagen --from-dir DIR --sr-from RUN``: DIR as it is (refiner
    included) with new defaults, its SR UNet replaced by the run's (float16) and counted on in the
    ``imagen-sr`` record, whose lineage stays DIR's; a DALL-E 2 SR run is refused for it."""
    import runpy

    from imagen_lite.models.tiny import build_tiny_imagen
    from imagen_lite.training.config import TrainConfig
    from imagen_lite.training.loop import train

    start = tmp_path / "imagen"
    build_tiny_imagen(unshuffle_factor=2, with_refiner=True).save_pretrained(start, safe_serialization=True)
    D.write_training_state(start, {"imagen-sr": {"step": 1200, "cpu_hours": 0.69, "config": {}}})
    run = train(TrainConfig(family="imagen", stage="sr", model=str(start), data="shapes", out=str(tmp_path / "run"), max_steps=2,
                            batch_size=2, lr=1e-3, warmup_steps=0, ema_decay=None, checkpoint_every=1, log_every=1))  # fmt: skip
    ship = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "ship_default.py"), run_name="ship")
    out = tmp_path / "weights" / "imagen"
    out.parent.mkdir()
    args = ["--family", "imagen", "--from-dir", str(start), "--sr-from", str(run), "--steps", "2,2", "--guidance", "1,1",
            "--refiner-start", "80,0", "--out", str(out)]  # fmt: skip
    ship["main"](args)
    record = D.read_training_state(out)["imagen-sr"]
    assert (record["step"], record["recipe"], record["config"]["finetuned_from"]["step"]) == (1202, "v1", 1200)
    new, trained = load_file(str(out / "sr_unet" / "diffusion_pytorch_model.safetensors")), load_file(str(run / "sr_unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 and torch.equal(v, trained[k].half()) for k, v in new.items())
    assert (out / "refiner").is_dir() and json.loads((out / "imagen_lite_defaults.json").read_text())["refiner_start"] == [80, 0]
    images = imagen_lite.generate("a red circle", pipeline="imagen", model=str(out), device="cpu", seed=0)
    assert len(images) == 1

    dalle2_run = tmp_path / "dalle2_run"
    dalle2_run.mkdir()
    (dalle2_run / "train_config.json").write_text(json.dumps({"family": "dalle2", "stage": "sr"}))
    with pytest.raises(ValueError, match="a dalle2 SR run, but .* is a ImagenPipeline"):
        D.put_sr_run(out, dalle2_run)
