"""The training loop every stage of both families shares.

Reads top to bottom: check -> accelerator -> build/freeze -> prepare -> resume -> loop -> save.
What differs between stages (which modules train, what conditions them) is in
:mod:`.stages`; the run config is :class:`.config.TrainConfig`; checkpoints are
:mod:`.checkpoint`'s atomic directories.

Exactness: the data of micro-step ``m`` is a pure function of ``(data_seed, m)``
(:func:`.data.indices_for`) and its noise, timesteps, caption dropout and crops come from a
generator seeded with ``(seed, m, rank)``; with model, EMA, optimizer and LR-scheduler state in
the checkpoint, training N steps, stopping and resuming for N more gives the weights of 2N
uninterrupted steps. Runs under ``accelerate launch`` / ``torchrun`` as data-parallel DDP: rank
``r`` reads its slice of each global batch, and gradients are averaged across ranks.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint, verify_checkpoint
from .config import RESUMABLE_CHANGES, SCRATCH_PRESETS, TrainConfig, differences
from .data import Batches, caption_words, open_source
from .stages import (
    Context, build_scratch, clone_pipeline, get_stage, load_start, new_image_encoder, noise_schedule, with_coord_channels,
)  # fmt: skip

logger = logging.getLogger("imagen_lite.train")

CONFIG_FILE = "train_config.json"
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainedModules(torch.nn.Module):
    """The modules a stage trains, as one module for the optimizer, DDP, EMA and checkpoints;
    ``forward`` is the stage's loss, so DDP sees every trained parameter used."""

    def __init__(self, parts: dict, stage, ctx: Context):
        super().__init__()
        self.parts = torch.nn.ModuleDict(parts)
        self._stage, self._ctx = stage, ctx  # plain attributes: not submodules

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return self._stage.loss(self.parts, self._ctx, batch, generator)


def step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """The generator of one micro-step on one rank: noise, timesteps, dropout, crops."""
    state = np.random.SeedSequence([seed, micro_step, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@contextlib.contextmanager
def ema_weights(ema, params):
    """Swap the EMA weights into ``params`` for the block (no-op without EMA)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


class JsonlTracker:
    """Where logs go when TensorBoard is not installed: one JSON object per line."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, values: dict, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def _check_resume(root: Path, cfg: TrainConfig) -> tuple[Path | None, dict]:
    """The checkpoint to resume from and its saved run config, checked (files, config) before
    anything is built; ``(None, {})`` for a new run."""
    path = resolve_resume(root, cfg.resume)
    if path is None:
        if cfg.resume == "latest":
            logger.info("resume='latest': no checkpoint under %s yet; starting a new run", root)
        return None, {}
    verify_checkpoint(path)
    saved = json.loads((path / "config.json").read_text())
    changed = differences(saved, cfg)
    if changed:
        listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changed.items()))
        raise ValueError(
            f"checkpoint {str(path)!r} was made with a different run config ({listed}); resume with the same "
            f"settings (only {sorted(RESUMABLE_CHANGES)} may change), or start a new --out"
        )
    return path, saved


def _continue_at_lr(optimizer, lr_scheduler, old: float, new: float) -> None:
    """Rescale a restored optimizer and lr schedule from peak lr ``old`` to ``new``: the
    schedule's shape and position stay, its scale changes (``lr`` may change on resume)."""
    ratio = new / old
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    inner = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler
    inner.base_lrs = [lr * ratio for lr in inner.base_lrs]
    if hasattr(inner, "_last_lr"):
        inner._last_lr = [g["lr"] for g in optimizer.param_groups]


def _frozen_from_disk(start_dir: Path | None, name: str, module: torch.nn.Module, dtype: torch.dtype):
    """A frozen component as the start directory holds it, in ``dtype``; None when there is no
    copy there that its class loads. Mixed precision casts frozen components down for the run
    (bf16 keeps 8 bits of mantissa), and casting them back up keeps that rounding: the exported
    pipeline would carry changed copies of weights the run never trained (found in the
    twenty-first session: DALL-E 2 v3's CLIP, prior and SR moved by up to 2^-8 relative)."""
    if start_dir is None or not (Path(start_dir) / name).is_dir():
        return None
    from transformers import PreTrainedModel

    key = "dtype" if isinstance(module, PreTrainedModel) else "torch_dtype"
    try:
        return type(module).from_pretrained(Path(start_dir) / name, **{key: dtype}).eval()
    except (OSError, ValueError) as err:  # e.g. only a variant's files there: cast back up instead
        logger.warning("%s: not reloaded from %s (%s); exported from its mixed-precision copy", name, start_dir, err)
        return None


def _export(out: Path, pipe, stage, parts: dict, cfg: TrainConfig, lora_configs: dict, image_encoder, processor,
            dtypes: dict, start_dir: Path | None) -> None:  # fmt: skip
    """Write the output: a complete pipeline directory (the trained stage swapped into the start
    pipeline) and, for LoRA runs, the adapters in ``OUT/lora``. Components are written to a
    temporary directory and moved in, ``model_index.json`` last, so no reader ever sees a
    half-written pipeline under that name."""
    from ..presets import DEFAULTS_FILE
    from .lora import merge_lora, save_lora

    if lora_configs:
        save_lora(out / "lora", {n: parts[n] for n in lora_configs}, lora_configs, type(pipe).__name__, stage.name)
    if lora_configs and not cfg.save_pipeline:
        return
    replace = {}
    for name, module in parts.items():
        if name in pipe.components:
            replace[name] = merge_lora(copy.deepcopy(module)) if name in lora_configs else module
    for name, dtype in dtypes.items():  # frozen components were cast down for mixed precision
        module = pipe.components.get(name)
        if name not in replace and isinstance(module, torch.nn.Module) and module.dtype != dtype:
            original = _frozen_from_disk(start_dir, name, module, dtype)
            replace[name] = module.to(dtype) if original is None else original
    # the CLIP vision tower (dalle2) loads in float32 (stages.load_start); frozen, it was cast down too
    if image_encoder is not None and image_encoder.dtype != torch.float32 and not any(m is image_encoder for m in parts.values()):
        original = _frozen_from_disk(start_dir, "image_encoder", image_encoder, torch.float32)
        image_encoder = image_encoder.float() if original is None else original
    result = clone_pipeline(pipe, **replace)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=out))
    try:
        result.save_pretrained(tmp, safe_serialization=True)
        if image_encoder is not None:
            image_encoder.save_pretrained(tmp / "image_encoder", safe_serialization=True)
            processor.save_pretrained(tmp / "feature_extractor")
        if start_dir is not None and (start_dir / DEFAULTS_FILE).is_file():
            shutil.copy(start_dir / DEFAULTS_FILE, tmp / DEFAULTS_FILE)
        (out / "model_index.json").unlink(missing_ok=True)
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json"):
            dest = out / entry.name
            if dest.is_dir():
                doomed = out / f".tmp-old-{entry.name}"
                os.rename(dest, doomed)
                shutil.rmtree(doomed)
            os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _validate(pipe, stage, cfg: TrainConfig, prompts: list[str], step: int, out: Path, tracker, accelerator) -> Path | None:
    """Images for the fixed prompts through the stages up to this one; saved as one PNG row."""
    from PIL import Image

    n_stages = stage.validation_stages(pipe)
    if n_stages is None:
        return None
    pipe.set_progress_bar_config(disable=True)
    with torch.random.fork_rng(devices=[]), accelerator.autocast():
        generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        images = pipe(prompts, num_inference_steps=max(2, cfg.validation_steps), guidance_scale=cfg.validation_guidance,
                      num_stages=n_stages, generator=generator).images  # fmt: skip
    side = images[0].size[0]
    row = Image.new("RGB", (side * len(images), side), "white")
    for i, image in enumerate(images):
        row.paste(image, (i * side, 0))
    path = out / "validation" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    row.save(path)
    if tracker is not None and hasattr(tracker, "writer"):
        tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
    return path


def train(cfg: TrainConfig) -> Path:
    """Run ``cfg`` to the end (or resume it); returns the output pipeline directory."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, cast_training_params
    from tqdm.auto import tqdm

    # 1. Check the config, the data and the resume point -- before anything is built
    scratch = cfg.model in SCRATCH_PRESETS
    if cfg.train_text_encoder is None:  # T5 trains jointly when there is no pretrained one
        cfg = cfg.replace(train_text_encoder=scratch and (cfg.family, cfg.stage) == ("imagen", "base"))
    cfg.check()
    stage = get_stage(cfg.family, cfg.stage)
    if cfg.finetune == "lora" and importlib.util.find_spec("peft") is None:
        raise ValueError("finetune='lora' needs peft: pip install 'imagen-lite[lora]' (or pip install peft)")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={cfg.out!r} is a file; pass a directory for the output pipeline")
    ckpt_root = out / "checkpoints"
    resume_from, resumed_cfg = _check_resume(ckpt_root, cfg)
    source = open_source(cfg.data, cfg.image_column, cfg.caption_column, seed=cfg.data_seed, shapes_mixture=cfg.shapes_mixture,
                         shapes_contrast_group=cfg.shapes_contrast_group)

    # 2. Accelerator: devices, processes, mixed precision, gradient accumulation, logging
    use_tensorboard = importlib.util.find_spec("tensorboard") is not None
    # several processes (torchrun / accelerate launch) and no GPU: data-parallel on CPUs over gloo
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=multi_cpu,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard" if use_tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / CONFIG_FILE)
        logger.info("data: %s", source.description)
    weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]

    # 3. Build the start pipeline; freeze everything but the stage's modules
    if scratch:
        pipe, image_encoder, processor = build_scratch(cfg.family, cfg.model, caption_words(source), cfg.seed)
        start_dir = None
    else:
        pipe, image_encoder, processor = load_start(cfg)
        start_dir = Path(cfg.model) if Path(cfg.model).is_dir() else None
    pipe = with_coord_channels(pipe, cfg.coord_channels)
    if stage.needs_image_encoder and image_encoder is None:
        if stage.name != "clip":
            raise ValueError(
                f"model={cfg.model!r} has no CLIP vision tower (image_encoder/ + feature_extractor/); the {stage.name} "
                "is conditioned on CLIP image embeddings of the training images: train --stage clip first and start "
                "from its output, or put the CLIPVisionModelWithProjection that matches the text encoder there"
            )
        warnings.warn(f"model={cfg.model!r} has no CLIP vision tower; the clip stage starts a new one", UserWarning)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            image_encoder, processor = new_image_encoder(pipe)
    ctx = Context(pipe, cfg, noise_schedule(pipe, stage), device, image_encoder, processor)
    sizes = stage.image_sizes(pipe, cfg, ctx)  # checks cfg.resolution against the UNet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        parts = stage.trained(pipe, cfg, ctx)
    modules = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    dtypes = {k: v.dtype for k, v in modules.items()}
    for module in [*modules.values(), image_encoder]:
        if module is not None:
            module.requires_grad_(False).eval()
    lora_configs = {}
    if cfg.finetune == "lora":
        from .lora import add_lora

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for name in stage.lora_components:
                lora_configs[name] = add_lora(parts[name], cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    else:
        for module in parts.values():
            module.requires_grad_(True)
    for p in stage.keep_frozen(parts):
        p.requires_grad_(False)
    for module in parts.values():
        module.train()
    if cfg.gradient_checkpointing:
        enabled = [n for n, m in parts.items() if _enable_checkpointing(m)]
        if not enabled:
            raise ValueError(f"gradient_checkpointing=True, but none of {list(parts)} supports it")
        logger.info("gradient checkpointing on %s", enabled)
    pipe.to(device)
    for module in [*modules.values(), image_encoder]:  # frozen encoders (and LoRA base weights) cast down
        if module is not None and not any(m is module for m in parts.values()) and module.dtype != weight_dtype:
            module.to(weight_dtype)
    for name, module in parts.items():
        module.to(device)
        if lora_configs.get(name) and weight_dtype != torch.float32:
            module.to(weight_dtype)
            cast_training_params(module, dtype=torch.float32)  # the adapters train in float32
    if image_encoder is not None:
        image_encoder.to(device)
    model = TrainedModules(parts, stage, ctx)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps * world,
                                 num_training_steps=cfg.max_steps * world)  # fmt: skip
    ema = EMAModel(trainable, decay=cfg.ema_decay) if cfg.ema_decay else None
    batches = Batches(source, sizes, cfg.batch_size, cfg.data_seed, rank, world, cfg.num_workers)
    stage.setup(parts, ctx, batches)  # from-scratch statistics (the prior's CLIP mean/std)

    # 4. Prepare (DDP wrapping, autocast, accumulation-aware optimizer and scheduler)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    # 5. Resume
    step = resumed_step = 0
    if resume_from is not None:
        info = load_checkpoint(resume_from, accelerator.unwrap_model(model), optimizer, lr_scheduler, ema,
                               trainable_only=bool(lora_configs))  # fmt: skip
        step = resumed_step = info["step"]
        if ema is not None:
            ema.to(device)
        logger.info("resumed from %s at step %d", resume_from, step)
        saved_lr = resumed_cfg.get("lr", cfg.lr)
        if saved_lr != cfg.lr:
            _continue_at_lr(optimizer, lr_scheduler, saved_lr, cfg.lr)
            logger.info("lr %g -> %g from step %d (the restored schedule, rescaled)", saved_lr, cfg.lr, step)
    micro = step * cfg.gradient_accumulation_steps
    started = time.monotonic()

    def checkpoint() -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # run_seconds: wall time of this call up to the checkpoint, so a caller that adds up
            # hours per call (the DALL-E 2 default) can count a call killed after checkpointing
            extra = {"micro_step": micro, "run_seconds": round(time.monotonic() - started, 3)}
            save_checkpoint(ckpt_root, step, accelerator.unwrap_model(model), optimizer, lr_scheduler, ema,
                            extra=extra, config=json.loads(cfg.to_json()),
                            keep=cfg.keep_checkpoints, trainable_only=bool(lora_configs))  # fmt: skip
        accelerator.wait_for_everyone()

    tracker = None
    if accelerator.is_main_process:
        if use_tensorboard:
            accelerator.init_trackers(f"{cfg.family}-{cfg.stage}")
            tracker = accelerator.get_tracker("tensorboard", unwrap=False)
        else:
            tracker = JsonlTracker(out / "logs" / "train_log.jsonl")
            logger.warning("tensorboard is not installed; logging to %s", tracker.path)
    prompts = list(cfg.validation_prompts) or source.captions(limit=4)

    # 6. Loop
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"{cfg.family} {cfg.stage}",
               disable=not accelerator.is_local_main_process)  # fmt: skip
    losses: list[float] = []
    end = min(cfg.max_steps, cfg.stop_at or cfg.max_steps)
    while step < end:
        batch = batches(micro)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with accelerator.accumulate(model):
            loss = model(batch, step_generator(cfg.seed, micro, rank))
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm:
                accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        losses.append(loss.detach().item())
        if not accelerator.sync_gradients:
            continue
        step += 1
        if ema is not None:
            ema.step(trainable)
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-cfg.gradient_accumulation_steps:]):.4f}")
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            if tracker is not None:
                values = {"loss": float(np.mean(losses)), "lr": lr_scheduler.get_last_lr()[0]}
                tracker.log(values, step=step)
            losses = []
        if step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            checkpoint()
        if cfg.validation_every and step % cfg.validation_every == 0:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                with ema_weights(ema, trainable), torch.no_grad():
                    model.eval()
                    _validate(pipe, stage, cfg, prompts, step, out, tracker, accelerator)
                    model.train()
            accelerator.wait_for_everyone()
    bar.close()
    batches.close()
    logger.info("rank %d/%d step %d weights sha256 %s", rank, world, step, fingerprint(trainable))

    # 7. Save: a last checkpoint, then (at max_steps) the pipeline with EMA weights and the run config
    if step != resumed_step or resume_from is None:
        checkpoint()
    if accelerator.is_main_process and step >= cfg.max_steps:
        with ema_weights(ema, trainable), torch.no_grad():
            _export(out, pipe, stage, dict(accelerator.unwrap_model(model).parts), cfg, lora_configs,
                    image_encoder, processor, dtypes, start_dir)  # fmt: skip
        cfg.save(out / CONFIG_FILE)
        logger.info("wrote %s (%d steps)", out, step)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


@torch.no_grad()
def stage_loss(cfg: TrainConfig, model: str, draws: int = 4, micro_step: int = 0) -> float:
    """The stage loss of the pipeline at ``model`` on the batch of ``micro_step``, averaged over
    ``draws`` fixed draws of noise and timesteps (no training): to compare a pipeline before and
    after a run on the same numbers."""
    cfg = cfg.replace(model=str(model))
    stage = get_stage(cfg.family, cfg.stage)
    source = open_source(cfg.data, cfg.image_column, cfg.caption_column, seed=cfg.data_seed, shapes_mixture=cfg.shapes_mixture,
                         shapes_contrast_group=cfg.shapes_contrast_group)
    pipe, image_encoder, processor = load_start(cfg)
    ctx = Context(pipe, cfg, noise_schedule(pipe, stage), torch.device("cpu"), image_encoder, processor)
    sizes = stage.image_sizes(pipe, cfg, ctx)
    parts = torch.nn.ModuleDict(stage.trained(pipe, cfg, ctx)).eval()
    batches = Batches(source, sizes, cfg.batch_size, cfg.data_seed)
    stage.setup(parts, ctx, batches)
    batch = batches(micro_step)
    return float(np.mean([stage.loss(parts, ctx, batch, step_generator(10_007, i, 0)).item() for i in range(draws)]))


def fingerprint(params) -> str:
    """sha256 of the parameters' bytes: equal on every data-parallel rank when they are in sync."""
    import hashlib

    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _enable_checkpointing(module) -> bool:
    if getattr(module, "_supports_gradient_checkpointing", False) and hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
        return True
    if getattr(module, "supports_gradient_checkpointing", False):
        module.gradient_checkpointing_enable()
        return True
    return False


def latest_step(out) -> int | None:
    """The step of the newest checkpoint under ``OUT/checkpoints`` (None: none yet)."""
    found = list_checkpoints(Path(out) / "checkpoints")
    return int(found[-1].name.split("_")[-1]) if found else None


__all__ = ["train", "TrainConfig", "latest_step", "step_generator", "TrainedModules"]
