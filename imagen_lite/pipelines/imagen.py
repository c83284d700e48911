"""Imagen-style cascade: T5 text encoder -> 64px base UNet -> super-resolution UNet(s).

The family of Imagen (Saharia et al. 2022) and DeepFloyd IF. Compare with ``unclip.py``:

| | Imagen (this file) | DALL-E 2 (unclip.py) |
|---|---|---|
| text encoder | T5 encoder, all token states | CLIP text tower, pooled embedding + token states |
| prior | none | PriorTransformer: text embedding -> CLIP image embedding |
| base conditioning | cross-attention on T5 tokens, pooled text added to the time embedding (``encoder_hid_dim``, ``addition_embed_type="text"``) | CLIP image embedding projected into the time embedding and into extra context tokens |
| super-resolution | bilinear upsample + noise-conditioning augmentation, noise level as ``class_labels`` | the same |

Components (registered, so ``save_pretrained``/``from_pretrained``/``.to()``/offloading work as
in diffusers): ``tokenizer``, ``text_encoder``, ``unet`` + ``scheduler`` (base), and
optionally ``sr_unet`` + ``sr_scheduler`` (64->256), ``sr_unet_2`` + ``sr_scheduler_2``
(256->1024), with ``image_noising_scheduler`` for the augmentation. The UNets are plain
diffusers ``UNet2DConditionModel``s, so DeepFloyd IF's stage I/II weights load unchanged.
Optionally also ``refiner`` + ``refiner_scheduler``: a low-noise expert for the base (twentieth
session; eDiff-I's expert denoisers, SDXL's base + refiner), an unconditional full-resolution
``UNet2DModel`` whose scheduler has the base's noise schedule and its own prediction type (v for
the embedded default). The call's ``refiner_start`` (a timestep, one value or one per stage) hands
it each stage's steps below it, at that stage's resolution (it is fully convolutional); its
estimate of x0 is converted to that stage's UNet's kind of output
(:func:`imagen_lite.sampling.prediction_from_x0`), so the stage's scheduler runs unchanged. Why:
the embedded base predicts x0 through 4x4 patches and returns ragged square edges even from a
clean true render, and its SR brings them back at 256 px; a v-predicting refiner keeps x_t's
edges at low noise (docs/model_card.md).

Pipeline config (saved in ``model_index.json``):
- ``unshuffle_factor``: the base UNet runs on ``r x r`` pixel patches (space-to-depth), e.g.
  12x32x32 for a 64px image with r=2 -- 2.6x cheaper for the embedded default on CPU.
  IF uses 1.
- ``sr_unshuffle_factor``: the same for the super-resolution UNets (noisy image and
  conditioning image both unshuffled); IF uses 1.
- ``max_sequence_length``: tokens given to T5 (IF trained with 77).
- ``refiner_max_timestep``: the refiner trained on t in [0, this); ``refiner_start`` may not
  exceed it. 0 without a refiner.
- ``coord_channels``: 0 (IF) or 2: the base UNet's input carries, after the noisy image, an x
  and a y coordinate channel (:func:`imagen_lite.sampling.coordinate_grid`, CoordConv):
  convolutions and attention otherwise see absolute position only through the zero padding.
  Added (fifth session) because the embedded default's base ignored "on the left" / "at the
  top". The shipped base (step 19,263, seventh session) has them, but learned positions in a
  later layout phase while ignoring these channels (docs/model_card.md).

The denoising math is :func:`imagen_lite.sampling.denoise`, shared with the unCLIP family; this
file reproduces diffusers' ``IFPipeline`` + ``IFSuperResolutionPipeline`` draw for draw, which
``tests/test_imagen.py`` (``test_base_matches_ifpipeline``) checks.
"""

from __future__ import annotations

import functools

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from .. import runtime, sampling
from .common import check_coord_channels, check_output_type, check_prompt, finish, inference_call, load_scheduler, per_stage, per_stage_intervals, run_finite, timed, tokenize
from .speed import reuse_constant_inputs


class ImagenPipeline(DiffusionPipeline):
    """T5 -> base 64px -> SR 256 (-> SR 1024). See the module docstring."""

    model_cpu_offload_seq = "text_encoder->unet->refiner->sr_unet->sr_unet_2"
    _optional_components = ["sr_unet", "sr_scheduler", "image_noising_scheduler", "sr_unet_2", "sr_scheduler_2",
                            "refiner", "refiner_scheduler"]  # fmt: skip

    def __init__(
        self,
        tokenizer,
        text_encoder,
        unet,
        scheduler,
        sr_unet=None,
        sr_scheduler=None,
        image_noising_scheduler=None,
        sr_unet_2=None,
        sr_scheduler_2=None,
        refiner=None,
        refiner_scheduler=None,
        unshuffle_factor: int = 1,
        max_sequence_length: int = 77,
        sr_unshuffle_factor: int = 1,
        coord_channels: int = 0,
        refiner_max_timestep: int = 0,
    ):
        super().__init__()
        check_coord_channels(coord_channels, unet, "the base UNet")
        check_refiner(refiner, refiner_scheduler, scheduler, refiner_max_timestep)
        if sr_unet is not None and (sr_scheduler is None or image_noising_scheduler is None):
            raise ValueError("sr_unet needs both sr_scheduler and image_noising_scheduler")
        if sr_unet_2 is not None and (sr_unet is None or sr_scheduler_2 is None):
            raise ValueError("sr_unet_2 needs sr_unet (the 256 stage) and sr_scheduler_2")
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            unet=unet,
            scheduler=scheduler,
            sr_unet=sr_unet,
            sr_scheduler=sr_scheduler,
            image_noising_scheduler=image_noising_scheduler,
            sr_unet_2=sr_unet_2,
            sr_scheduler_2=sr_scheduler_2,
            refiner=refiner,
            refiner_scheduler=refiner_scheduler,
        )
        self.register_to_config(
            unshuffle_factor=int(unshuffle_factor),
            max_sequence_length=int(max_sequence_length),
            sr_unshuffle_factor=int(sr_unshuffle_factor),
            coord_channels=int(coord_channels),
            refiner_max_timestep=int(refiner_max_timestep) if refiner is not None else 0,
        )

    # ------------------------------------------------------------------ structure
    @property
    def stage_names(self) -> list[str]:
        """Names of the stages present, in order: ``base``, ``sr_256``, ``sr_1024``."""
        names = ["base"]
        if self.sr_unet is not None:
            names.append(f"sr_{self.stage_sizes[1]}")
        if self.sr_unet_2 is not None:
            names.append(f"sr_{self.stage_sizes[2]}")
        return names

    @property
    def stage_sizes(self) -> list[int]:
        """Output side of each stage; ``size`` in ``generate()`` picks one of these."""
        sizes = [self.unet.config.sample_size * self.config.unshuffle_factor]
        for unet in (self.sr_unet, self.sr_unet_2):
            if unet is not None:
                sizes.append(unet.config.sample_size * self.config.sr_unshuffle_factor)
        return sizes

    def num_stages_for_size(self, size: int | None) -> int:
        """How many stages produce an image of side ``size`` (None: all of them)."""
        sizes = self.stage_sizes
        if size is None:
            return len(sizes)
        if size not in sizes:
            raise ValueError(f"size={size!r} cannot be produced by this cascade; its stages produce {sizes}")
        return sizes.index(size) + 1

    def free_text_encoder(self) -> None:
        """Drop the T5 (IF-I-XL's is 4.8B params) once the prompts are encoded: afterwards call
        with ``prompt_embeds``/``negative_prompt_embeds`` from :meth:`encode_prompt`."""
        self.register_modules(text_encoder=None)
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompt(self, prompt: list[str], device=None) -> torch.Tensor:
        """T5 token states (B, L, D) for a list of prompts (empty strings allowed: the
        unconditional embedding). Call once and pass ``prompt_embeds`` to free the T5 after."""
        device = device or self._execution_device
        inputs = tokenize(self.tokenizer, prompt, self.config.max_sequence_length)
        embeds = self.text_encoder(inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device))[0]
        return embeds

    # ------------------------------------------------------------------ refiner
    def check_refiner_start(self, refiner_start, stages=None) -> tuple[int, ...]:
        """``refiner_start`` (one timestep, or one per stage) as a tuple for ``stages`` (default:
        all); ValueError naming a value this pipeline cannot run."""
        stages = stages or self.stage_names
        starts = per_stage(refiner_start, stages, "refiner_start", kind="timestep", model_stages=self.stage_names)
        schedulers = dict(zip(self.stage_names, (self.scheduler, self.sr_scheduler, self.sr_scheduler_2)))
        for stage, start in zip(stages, starts):
            check_refiner_stage(self, refiner_start, start, schedulers[stage], stage)
        return starts

    def _refine(self, model_input: torch.Tensor, t, factor: int | None = None, prediction_type: str | None = None) -> torch.Tensor:
        """The refiner's estimate of x0 at timestep ``t``, as the output a stage's UNet would give:
        ``prediction_type`` (default: the base scheduler's) on ``factor`` x ``factor`` pixel
        patches (default: the base's ``unshuffle_factor``). ``model_input`` is the stage's scaled
        input (variance preserving x_t), its noisy image channels only; CFG rows run alike."""
        r = self.config.unshuffle_factor if factor is None else factor
        return refine_prediction(self.refiner, self.refiner_scheduler, model_input, t, r,
                                 prediction_type or self.scheduler.config.prediction_type)  # fmt: skip

    # ------------------------------------------------------------------ call
    @inference_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps=None,
        guidance_scale=None,
        guidance_interval=(0.0, 1.0),
        noise_level: int = 250,
        sr_strength: float = 1.0,
        denoising_end: float = 1.0,
        refiner_start: int = 0,
        num_stages: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_stage_outputs: bool = False,
        callback=None,
        return_dict: bool = True,
    ):
        """Generate images.

        Args:
            prompt / negative_prompt: str or list[str]; or pass ``prompt_embeds`` (B, L, D) and
                ``negative_prompt_embeds`` computed with :meth:`encode_prompt`.
            num_inference_steps / guidance_scale: one value or one per stage, in stage order
                (base, sr_256, sr_1024); a tuple may be longer than the stages this call runs
                (``num_stages``), not than the model has. Guidance > 1 turns on classifier-free
                guidance. Default (None): IF's, 100 / 7 for the base and 50 / 4 for each SR.
            guidance_interval: ``(start, stop)``, or one pair per stage: the fraction of a
                guided stage's steps that use guidance (0 = the noisiest step), as ``start`` /
                ``stop`` of diffusers' ``ClassifierFreeGuidance`` guider; the other steps run
                the conditional branch alone. ``(0, 1)`` (the default): every step, as IF.
            noise_level: noise-conditioning augmentation timestep for the SR stages (IF: 250).
            sr_strength: in (0, 1]; where each SR stage starts, as ``strength`` in diffusers'
                img2img pipelines (``IFImg2ImgSuperResolutionPipeline``). 1 (IF, the default):
                from pure noise. Below 1: from the bilinear upsample of the stage below,
                noised to the timestep that leaves ``int(steps * sr_strength)`` of the stage's
                steps to run, so the SR keeps the low-res layout and only sharpens it (and
                costs that fraction of its steps).
            denoising_end: in (0, 1]; the fraction of the base stage's steps to run, as
                ``denoising_end`` in diffusers' SDXL pipelines; below 1 the base returns its
                x0 prediction at the last step it runs (``sampling.denoise``), where SDXL
                returns the noisy latents for a refiner. 1 (the default): every step.
            refiner_start: a timestep, or one per stage: the stage's steps at timesteps below it
                run on the pipeline's ``refiner`` (the low-noise expert) instead of the stage's
                UNet, at that stage's resolution. 0 (the default): none. At most the
                ``refiner_max_timestep`` it was trained to.
            num_stages: run only the first N stages (default: all).
            generator: a seeded ``torch.Generator``; all noise is drawn from it in order.
            output_type: ``"pil"``, ``"np"`` or ``"pt"`` (see :class:`ImageLiteOutput`).
        """
        # 1. Check inputs
        check_output_type(output_type)
        all_stages = self.stage_names
        n_stages = len(all_stages) if num_stages is None else num_stages
        if isinstance(n_stages, bool) or not isinstance(n_stages, int) or not 1 <= n_stages <= len(all_stages):
            raise ValueError(f"num_stages={num_stages!r} is not valid; this cascade has stages {all_stages}")
        stages = all_stages[:n_stages]
        if num_inference_steps is None:
            num_inference_steps = (100,) + (50,) * (len(all_stages) - 1)
        if guidance_scale is None:
            guidance_scale = (7.0,) + (4.0,) * (len(all_stages) - 1)
        steps = per_stage(num_inference_steps, stages, "num_inference_steps", kind="steps", model_stages=all_stages)
        guidance = per_stage(guidance_scale, stages, "guidance_scale", kind="guidance", model_stages=all_stages)
        intervals = per_stage_intervals(guidance_interval, stages, model_stages=all_stages)
        if prompt_embeds is None:
            prompts = check_prompt(prompt)
            if self.text_encoder is None:
                raise ValueError("this pipeline's text encoder was freed; pass prompt_embeds from encode_prompt()")
        elif prompt is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} must be a positive integer")
        max_level = self.image_noising_scheduler.config.num_train_timesteps if self.image_noising_scheduler else 1000
        if len(stages) > 1 and not 0 <= int(noise_level) < max_level:
            raise ValueError(f"noise_level={noise_level!r} must be in [0, {max_level})")
        check_sr_strength(sr_strength, dict(zip(stages[1:], steps[1:])))
        sampling.denoising_steps(steps[0], denoising_end)  # ValueError naming a bad value, before any work
        refiner_starts = self.check_refiner_start(refiner_start, stages)
        device = self._execution_device
        any_cfg = any(g > 1.0 for g in guidance)
        seconds: dict[str, float] = {}
        stage_outputs: dict[str, torch.Tensor] = {}

        # 2. Encode the prompt (and the negative prompt when any stage uses guidance)
        with timed(seconds, "text_encoder"):
            if prompt_embeds is None:
                prompt_embeds = run_finite("text_encoder", lambda: self.encode_prompt(prompts, device), [self.text_encoder])
            batch = prompt_embeds.shape[0]
            if any_cfg and negative_prompt_embeds is None:
                if self.text_encoder is None:
                    raise ValueError("guidance_scale > 1 needs negative_prompt_embeds once the text encoder is freed")
                negs = [""] * batch if negative_prompt is None else check_prompt(negative_prompt, "negative_prompt")
                if len(negs) == 1 and batch > 1:
                    negs = negs * batch
                if len(negs) != batch:
                    raise ValueError(
                        f"negative_prompt has {len(negs)} entries but prompt has {batch}; pass one or {batch}"
                    )
                negative_prompt_embeds = self.encode_prompt(negs, device)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        n = prompt_embeds.shape[0]

        def text_context(cfg: bool) -> torch.Tensor:
            return torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds

        # 3. Base stage: noise -> 64px
        r = self.config.unshuffle_factor

        def run_base() -> torch.Tensor:
            unet, scheduler, cfg = self.unet, self.scheduler, guidance[0] > 1.0
            scheduler.set_timesteps(steps[0], device=device)
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
            side, coords = unet.config.sample_size, self.config.get("coord_channels", 0)
            x = randn_tensor((n, unet.config.in_channels - coords, side, side), generator=generator, device=device, dtype=unet.dtype)
            grid = sampling.coordinate_grid(n, side, device, unet.dtype) if coords else None
            x = x * scheduler.init_noise_sigma
            context = text_context(cfg).to(unet.dtype)

            def model_fn(model_input, t, i):
                if int(t) < refiner_starts[0]:
                    return self._refine(model_input[:, : unet.config.in_channels - coords], t)
                return unet(model_input, t, encoder_hidden_states=sampling.conditional_rows(context, model_input),
                            return_dict=False)[0]  # fmt: skip

            with self.progress_bar(total=steps[0]) as bar, reuse_constant_inputs(unet):
                x = sampling.denoise(
                    model_fn, scheduler, x, scheduler.timesteps,
                    guidance_scale=guidance[0], do_classifier_free_guidance=cfg, guidance_interval=intervals[0], cond_image=grid,
                    step_kwargs=sampling.scheduler_step_kwargs(scheduler, generator),
                    progress_bar=bar, callback=callback, denoising_end=denoising_end,
                )  # fmt: skip
            return sampling.pixel_shuffle(x, r)  # (N, 3, 64, 64)

        with timed(seconds, "base"):
            image = run_finite("base", run_base, [self.unet, self.refiner if refiner_starts[0] else None], generator)
        stage_outputs["base"] = image

        # 4. Super-resolution stages: upsample + noise augmentation -> 256 (-> 1024)
        sr = [(self.sr_unet, self.sr_scheduler), (self.sr_unet_2, self.sr_scheduler_2)]
        for k, name in enumerate(stages[1:], start=1):
            unet, scheduler = sr[k - 1]
            low_res = image

            def run_sr(unet=unet, scheduler=scheduler, low_res=low_res, k=k) -> torch.Tensor:
                return super_resolve(
                    self, unet, scheduler, low_res, text_context(guidance[k] > 1.0), steps=steps[k], guidance=guidance[k],
                    interval=intervals[k], noise_level=noise_level, sr_strength=sr_strength,
                    refiner_start=refiner_starts[k], generator=generator, device=device, callback=callback,
                )  # fmt: skip

            with timed(seconds, name):
                image = run_finite(name, run_sr, [unet, self.refiner if refiner_starts[k] else None], generator)
            stage_outputs[name] = image

        # 5. Post-process
        return finish(self, image, output_type, return_dict, stage_outputs, seconds, return_stage_outputs)


def check_sr_strength(sr_strength, sr_steps: dict[str, int]) -> None:
    """ValueError naming an ``sr_strength`` outside (0, 1], or one that leaves an SR stage
    (``sr_steps``: name -> the steps it is given) no step to run. Both families' Imagen SR stages."""
    if isinstance(sr_strength, bool) or not isinstance(sr_strength, (int, float)) or not 0.0 < sr_strength <= 1.0:
        raise ValueError(f"sr_strength={sr_strength!r} must be a number in (0, 1]")
    for name, steps in sr_steps.items():
        if int(steps * sr_strength) < 1:
            raise ValueError(f"sr_strength={sr_strength!r} leaves no step of the {steps} {name} steps to run; "
                             f"use sr_strength >= {1 / steps:.3g} or more steps")  # fmt: skip


def super_resolve(pipe, unet, scheduler, low_res: torch.Tensor, context: torch.Tensor, *, steps: int, guidance: float,
                  interval, noise_level: int, sr_strength: float, refiner_start: int, generator, device,
                  callback=None) -> torch.Tensor:
    """One Imagen-style super-resolution stage: ``low_res`` (N, 3, h, w) in [-1, 1] -> (N, 3, H, H).

    The upsample (bilinear, noise-augmented to ``noise_level`` with ``pipe.image_noising_scheduler``,
    given as ``class_labels``) is concatenated to the noisy image; ``context`` is the T5 token
    states (both CFG halves, unconditional first, when ``guidance`` > 1). Below 1, ``sr_strength``
    starts from the upsample noised to the timestep that leaves ``int(steps * sr_strength)`` steps
    (diffusers' img2img ``strength``); steps below ``refiner_start`` run on ``pipe.refiner``.
    ``pipe`` gives ``config.sr_unshuffle_factor``, the refiner and the progress bar. Shared by
    :class:`ImagenPipeline` and, since the twenty-sixth session, the unCLIP pipeline's Imagen-style
    SR (``UnCLIPLitePipeline(sr_unet=...)``)."""
    cfg = guidance > 1.0
    n = low_res.shape[0]
    scheduler.set_timesteps(steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    s = pipe.config.sr_unshuffle_factor
    side = unet.config.sample_size
    channels = unet.config.in_channels // 2
    x = randn_tensor((n, channels, side, side), generator=generator, device=device, dtype=unet.dtype)
    upscaled = sampling.upsample(low_res.to(device=device, dtype=unet.dtype), side * s)
    timesteps = scheduler.timesteps
    if sr_strength < 1.0:  # img2img: start from the upsample, noised (same draw as x)
        timesteps = sampling.strength_timesteps(scheduler, steps, sr_strength)
        start = sampling.pixel_unshuffle(upscaled, s)
        x = scheduler.add_noise(start, x, timesteps[:1].repeat(n))
    else:
        x = x * scheduler.init_noise_sigma
    level = torch.tensor([int(noise_level)] * n, device=device)
    noise = randn_tensor(upscaled.shape, generator=generator, device=device, dtype=upscaled.dtype)
    upscaled = sampling.noise_augment(upscaled, noise, level, pipe.image_noising_scheduler)
    upscaled = sampling.pixel_unshuffle(upscaled, s)  # (N, 3*s*s, side, side)
    labels = torch.cat([level] * 2) if cfg else level
    context = context.to(device=device, dtype=unet.dtype)

    def model_fn(model_input, t, i):
        if int(t) < refiner_start:
            return refine_prediction(pipe.refiner, pipe.refiner_scheduler, model_input[:, :channels], t, s,
                                     scheduler.config.prediction_type)  # fmt: skip
        rows = functools.partial(sampling.conditional_rows, model_input=model_input)
        return unet(model_input, t, encoder_hidden_states=rows(context), class_labels=rows(labels), return_dict=False)[0]

    with pipe.progress_bar(total=len(timesteps)) as bar, reuse_constant_inputs(unet):
        x = sampling.denoise(
            model_fn, scheduler, x, timesteps,
            guidance_scale=guidance, do_classifier_free_guidance=cfg, guidance_interval=interval,
            cond_image=upscaled,
            step_kwargs=sampling.scheduler_step_kwargs(scheduler, generator),
            progress_bar=bar, callback=callback,
        )  # fmt: skip
    return sampling.pixel_shuffle(x, s)  # (N, 3, side*s, side*s)


def refine_prediction(refiner, refiner_scheduler, model_input: torch.Tensor, t, factor: int, prediction_type: str) -> torch.Tensor:
    """A low-noise refiner's estimate of x0 at timestep ``t``, as the output a stage's UNet would
    give: ``prediction_type`` on ``factor`` x ``factor`` pixel patches. ``model_input`` is the
    stage's scaled input (variance preserving x_t), its noisy image channels only; CFG rows run
    alike. Shared by both families (the DALL-E 2 decoder's refiner since the twenty-second session)."""
    x = sampling.pixel_shuffle(model_input, factor).to(refiner.dtype)
    tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    a = refiner_scheduler.alphas_cumprod[int(t)].item()
    out = refiner(x, tt, return_dict=False)[0]
    x0 = sampling.x0_from_prediction(out, x, a, refiner_scheduler.config.prediction_type)
    x0 = sampling.pixel_unshuffle(x0, factor).to(model_input.dtype)
    return sampling.prediction_from_x0(x0, model_input, a, prediction_type)


def check_refiner_stage(pipe, given, start: int, scheduler, stage: str) -> None:
    """One stage's ``refiner_start`` (``given``: what the caller passed): ``pipe`` must have a
    refiner, trained up to ``start``, on that stage's noise schedule (both families' pipelines)."""
    if start and pipe.refiner is None:
        raise ValueError(f"refiner_start={given!r} needs a pipeline with a refiner; this one has none "
                         f"(use refiner_start=0)")  # fmt: skip
    if start > pipe.config.get("refiner_max_timestep", 0):
        raise ValueError(f"refiner_start for stage {stage!r} is {start}, above the timesteps this refiner was "
                         f"trained on: use 0 to {pipe.config.refiner_max_timestep}")  # fmt: skip
    if start:
        check_refiner(pipe.refiner, pipe.refiner_scheduler, scheduler, pipe.config.refiner_max_timestep, stage)


def check_refiner(refiner, refiner_scheduler, scheduler, max_timestep, stage: str = "base") -> None:
    """A refiner (``UNet2DModel``, 3 image channels in and out) needs its scheduler, the noise
    schedule of the stage it runs in (``scheduler``) and a stage scheduler with fixed variance
    (the refiner predicts no variance)."""
    if refiner is None:
        return
    if refiner_scheduler is None:
        raise ValueError("refiner needs refiner_scheduler (its prediction type and noise schedule)")
    if (refiner.config.in_channels, refiner.config.out_channels) != (3, 3):
        raise ValueError(f"the refiner takes and returns RGB images (3 channels), not "
                         f"{refiner.config.in_channels} -> {refiner.config.out_channels}")  # fmt: skip
    a, b = refiner_scheduler.alphas_cumprod, scheduler.alphas_cumprod
    if a.shape != b.shape or not torch.allclose(a, b, atol=1e-6):
        raise ValueError(f"refiner_scheduler must have the {stage} scheduler's noise schedule (alphas_cumprod): "
                         f"the refiner takes over that stage's x_t")  # fmt: skip
    if refiner_scheduler.config.prediction_type not in sampling.PREDICTION_TYPES:
        raise ValueError(f"refiner_scheduler predicts {refiner_scheduler.config.prediction_type!r}; "
                         f"one of {sampling.PREDICTION_TYPES} is needed")  # fmt: skip
    if getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range"):
        raise ValueError(f"a refiner needs a {stage} scheduler with fixed variance; this {stage} learns its variance")
    n = scheduler.config.num_train_timesteps
    if isinstance(max_timestep, bool) or not isinstance(max_timestep, int) or not 0 < max_timestep <= n:
        raise ValueError(f"refiner_max_timestep={max_timestep!r}: the timesteps the refiner was trained on, "
                         f"an int in (0, {n}]")  # fmt: skip


# ---------------------------------------------------------------------- loading DeepFloyd IF
def from_if_repos(base: str, sr: list[str] = (), *, variant: str | None = None, torch_dtype=None) -> ImagenPipeline:
    """Assemble an :class:`ImagenPipeline` from DeepFloyd IF repos (hub ids or local dirs).

    ``base`` is a stage I repo (IFPipeline layout), ``sr`` up to two stage II/III repos
    (IFSuperResolutionPipeline layout). Safetensors only; the T5 comes from the stage I repo
    (IF's stage II repos ship without one and take stage I's embeddings).
    """
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, T5EncoderModel

    if len(sr) > 2:
        raise ValueError(f"sr={list(sr)!r} names {len(sr)} super-resolution repos; at most 2 (256 and 1024)")
    load = dict(use_safetensors=True, **runtime.dtype_kwargs(torch_dtype))
    text_load = dict(use_safetensors=True, **runtime.dtype_kwargs(torch_dtype, "transformers"))

    def unet(repo):
        try:
            return UNet2DConditionModel.from_pretrained(repo, subfolder="unet", variant=variant, **load)
        except (OSError, ValueError):
            if variant is None:
                raise
            return UNet2DConditionModel.from_pretrained(repo, subfolder="unet", **load)

    def t5(repo):
        try:
            return T5EncoderModel.from_pretrained(repo, subfolder="text_encoder", variant=variant, **text_load)
        except (OSError, ValueError):
            if variant is None:
                raise
            return T5EncoderModel.from_pretrained(repo, subfolder="text_encoder", **text_load)

    parts = dict(
        tokenizer=AutoTokenizer.from_pretrained(base, subfolder="tokenizer"),
        text_encoder=t5(base),
        unet=unet(base),
        scheduler=load_scheduler(base, "scheduler", "DDPMScheduler"),
    )
    names = [("sr_unet", "sr_scheduler"), ("sr_unet_2", "sr_scheduler_2")]
    for (u, s), repo in zip(names, sr):
        parts[u] = unet(repo)
        parts[s] = load_scheduler(repo, "scheduler", "DDPMScheduler")
        if "image_noising_scheduler" not in parts:
            parts["image_noising_scheduler"] = load_scheduler(repo, "image_noising_scheduler", "DDPMScheduler")
    return ImagenPipeline(**parts)
