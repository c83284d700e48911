"""What differs between the stages: which modules train, which are frozen, what conditions them.

The training loop (:mod:`.loop`) is the same for every stage; a :class:`Stage` says only

- ``image_sizes``: the image sides the data loader must produce (and checks ``resolution``);
- ``trained``: the pipeline components (or extra modules) that train, by name;
- ``loss``: one batch -> a scalar, given the trained modules and the frozen rest.

| family | stage | trains | frozen | conditioning |
|---|---|---|---|---|
| imagen | base | ``unet`` (+ ``text_encoder`` jointly) | T5 | T5 token states |
| imagen | sr | ``sr_unet`` | T5 | T5 states, bilinear-upsampled low-res crop + noise augmentation, level as ``class_labels`` |
| dalle2 | clip | ``text_encoder`` + CLIP vision tower | -- | contrastive (InfoNCE) between the two |
| dalle2 | prior | ``prior`` | CLIP text + vision | pooled text, token states; target: normalised CLIP image embedding |
| dalle2 | decoder | ``decoder`` + ``text_proj`` | CLIP text + vision | CLIP image embedding (dropped to the learned one with the caption) + text |
| dalle2 | sr | ``super_res_first`` + ``super_res_last`` | -- | bicubic-upsampled low-res crop (Karlo's SR takes no text) |

Decisions:
- Learned-variance UNets (IF, Karlo) train their mean half only, as diffusers' IF DreamBooth
  script does; the variance half keeps its pretrained values. From-scratch presets therefore
  use fixed variances (a learned variance would need the VLB term to train).
- Super-resolution stages train on the input they get at inference: the low-res image
  upsampled exactly as the pipeline does it (bilinear + noise-conditioning augmentation at a
  random level for Imagen; bicubic for Karlo), on random crops (``sr_crop``, low-res side).
- ``super_res_last`` runs only for the last denoising step (t = 0 with UnCLIPScheduler), so it
  trains on the low-noise end, t < ``SR_LAST_MAX_T``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from .. import sampling
from .config import check_timestep_bias, timestep_bias_args

logger = logging.getLogger("imagen_lite.train")

SR_LAST_MAX_T = 150  # super_res_last trains on t in [0, 150): UnCLIPScheduler's last step is t = 0


# ---------------------------------------------------------------------- shared pieces
def drop_captions(texts: list[str], p: float, generator: torch.Generator) -> tuple[list[str], torch.Tensor]:
    """Replace each caption by "" with probability ``p`` (classifier-free guidance's
    unconditional branch). Returns the captions and the (B,) bool mask of dropped ones."""
    drop = torch.rand(len(texts), generator=generator) < p
    return ["" if d else t for d, t in zip(drop.tolist(), texts)], drop


def snr_floor_weight(snr: torch.Tensor, gamma: float, floor: float = 0.0) -> torch.Tensor:
    """The x0-space loss weight ``clamp(SNR, floor, gamma)``. Min-SNR alone (floor 0) weights an
    x0 error by ~SNR at high noise: 0.02 at t=900 of a 1,000-step cosine schedule, 0 at 999,
    against 5 at low noise. Those are the steps where a sample's layout is decided; the embedded
    default, trained with ~zero weight there, predicts the same x0 from noise for "on the left"
    and "on the right" (issue #10, fifth session; 2,400 steps at floor 1 did not change that, a
    timestep bias did: :func:`timestep_bias_weights`). floor 1 gives every step with SNR < 1
    (t > ~500) weight 1."""
    return snr.clamp(max=gamma).clamp(min=min(floor, gamma))


@functools.lru_cache(maxsize=8)  # called every training step with the run's fixed settings
def timestep_bias_weights(num_train_timesteps: int, strategy: str = "none", multiplier: float = 1.0,
                          portion: float = 0.25, begin: int = 0, end: int | None = None) -> torch.Tensor | None:  # fmt: skip
    """Relative sampling weights (T,) of the training timesteps, or None for uniform. The options
    are those of diffusers' SDXL training script (``--timestep_bias_*``): "later" multiplies the
    weight of the last ``portion`` of the timesteps (the noisiest) by ``multiplier``, "earlier"
    the first ``portion``, "range" the timesteps in ``[begin, end)``.

    Why (issue #10, sixth session): the x0 prediction from pure noise decides a sample's layout.
    With uniform t only 10% of the draws fall in t >= 900; "later" gives those steps the share
    a caption's position word needs to move them. The tensor is cached per setting: read it, do
    not change it."""
    check_timestep_bias(strategy, multiplier, portion, begin, end, num_train_timesteps)
    if strategy == "none" or multiplier == 1:
        return None
    weights = torch.ones(num_train_timesteps, dtype=torch.float64)
    k = max(1, int(round(portion * num_train_timesteps)))
    span = {"later": slice(num_train_timesteps - k, None), "earlier": slice(0, k),
            "range": slice(begin, num_train_timesteps if end is None else end)}[strategy]  # fmt: skip
    weights[span] *= multiplier
    if float(weights.sum()) == 0:
        raise ValueError(f"timestep_bias_multiplier=0 over every timestep ({strategy!r}, portion {portion}) leaves none to train")
    return weights


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator,
                     weights: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(B,) int64 training timesteps: uniform on [0, T) or drawn from ``weights`` (T,)."""
    if weights is None:
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    return torch.multinomial(weights[:num_train_timesteps], batch, replacement=True, generator=generator)


def loss_weighting(cfg, scheduler) -> dict:
    """``diffusion_loss``'s ``snr_floor`` and ``t_weights`` from a TrainConfig."""
    weights = timestep_bias_weights(scheduler.config.num_train_timesteps, *timestep_bias_args(cfg))
    return {"snr_floor": cfg.snr_floor, "t_weights": weights}


def diffusion_loss(model_fn, x0: torch.Tensor, scheduler, generator: torch.Generator,
                   min_snr_gamma: float | None = None, t_max: int | None = None, snr_floor: float = 0.0,
                   t_weights: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The denoising loss on clean samples ``x0`` (B, ...): draw t ~ U[0, t_max) (or from
    ``t_weights``, :func:`timestep_bias_weights`) and noise,
    form ``x_t = q_sample(x0, t)``, predict with ``model_fn(x_t, t)`` and regress the
    scheduler's ``prediction_type`` target (epsilon, sample or v). Extra output channels (a
    learned variance) are ignored. With ``min_snr_gamma`` each sample is weighted by min-SNR
    (Hang et al. 2023, via diffusers' ``compute_snr``): x0-space weight ``min(SNR, gamma)``,
    raised to ``snr_floor`` where SNR is below it (``snr_floor_weight``)."""
    b, device = x0.shape[0], x0.device
    n_t = scheduler.config.num_train_timesteps if t_max is None else t_max
    t = sample_timesteps(b, n_t, generator, t_weights).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)
    x_t = scheduler.add_noise(x0, noise, t)
    prediction = model_fn(x_t, t)[:, : x0.shape[1]]
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "sample":
        target = x0
    elif kind == "v_prediction":
        ac = scheduler.alphas_cumprod.to(device)[t].view(-1, *([1] * (x0.ndim - 1)))
        target = ac.sqrt() * noise - (1 - ac).sqrt() * x0
    else:
        raise ValueError(f"prediction_type={kind!r} of {type(scheduler).__name__} is not supported for training")
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)  # (B,)
    if min_snr_gamma is None:
        return per_sample.mean()
    snr = compute_snr(scheduler, t).clamp(min=1e-8)
    clipped = snr_floor_weight(snr, min_snr_gamma, snr_floor)
    weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[kind]
    return (weight * per_sample).mean()


def downsample(image: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, H) -> (B, 3, size, size), antialiased bicubic (what a base stage would make)."""
    return F.interpolate(image, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def sr_crops(high: torch.Tensor, low_side: int, crop: tuple | None, multiple: int, generator: torch.Generator):
    """Random aligned crops of a (high, low-res) pair, as Imagen trains its SR models.

    ``high`` (B, 3, H, H) is the target; ``low`` = ``high`` downsampled to ``low_side``. One
    low-res crop side c is drawn per batch from ``crop`` = (min, max) (clamped to ``low_side``;
    a multiple of ``multiple`` low-res px so the UNet can halve it), one position per sample.
    Returns ``(high_crops (B, 3, c*f, c*f), low_crops (B, 3, c, c))``."""
    f = high.shape[-1] // low_side
    low = downsample(high, low_side)
    sides = [low_side]
    if crop:
        sides = [c for c in range(min(crop[0], low_side), min(crop[1], low_side) + 1) if c % multiple == 0] or [low_side]
    c = sides[int(torch.randint(len(sides), (1,), generator=generator))]
    if c == low_side:
        return high, low
    ys = torch.randint(0, low_side - c + 1, (high.shape[0],), generator=generator).tolist()
    xs = torch.randint(0, low_side - c + 1, (high.shape[0],), generator=generator).tolist()
    hi = torch.stack([high[i, :, y * f : (y + c) * f, x * f : (x + c) * f] for i, (y, x) in enumerate(zip(ys, xs))])
    lo = torch.stack([low[i, :, y : y + c, x : x + c] for i, (y, x) in enumerate(zip(ys, xs))])
    return hi, lo


def _unet_multiple(unet) -> int:
    """The factor a UNet input side must be a multiple of (2 per downsampling level)."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def _crop_multiple(high_multiple: int, factor: int) -> int:
    """The smallest low-res crop step m such that every high-res crop side m * k * factor is a
    multiple of ``high_multiple``."""
    return high_multiple // math.gcd(high_multiple, factor)


def _check_side(name: str, side: int, multiple: int, what: str) -> None:
    if side % multiple:
        raise ValueError(f"resolution={side} does not fit {what}: it must be a multiple of {multiple}")


def _resolution(cfg, own: int, multiple: int, what: str, module=None, scale: int = 1) -> int:
    """The training side of a stage: its own size, or ``cfg.resolution`` when it fits (then the
    module's ``sample_size`` follows, so the saved pipeline generates at that size)."""
    if cfg.resolution is None or cfg.resolution == own:
        return own
    _check_side("resolution", cfg.resolution, multiple * scale, what)
    if module is None:
        raise ValueError(f"resolution={cfg.resolution} does not fit {what}, which takes exactly {own} px")
    logger.warning("resolution=%d: %s changes its sample_size from %d to %d", cfg.resolution, what,
                   module.config.sample_size, cfg.resolution // scale)  # fmt: skip
    module.register_to_config(sample_size=cfg.resolution // scale)
    return cfg.resolution


def encode_t5(tokenizer, text_encoder, texts: list[str], max_length: int, device) -> torch.Tensor:
    """T5 token states (B, L, D), as ``ImagenPipeline.encode_prompt`` makes them."""
    ids = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return text_encoder(ids.input_ids.to(device), attention_mask=ids.attention_mask.to(device))[0]


def encode_clip_text(tokenizer, text_encoder, texts: list[str], device):
    """(text_embeds (B, D), token states (B, L, D), mask (B, L) bool), as
    ``UnCLIPLitePipeline.encode_prompt`` makes them."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")  # fmt: skip
    out = text_encoder(ids.input_ids.to(device))
    return out.text_embeds, out.last_hidden_state, ids.attention_mask.bool().to(device)


def clip_pixels(images: torch.Tensor, processor) -> torch.Tensor:
    """[-1, 1] images already at the vision tower's side -> CLIP-normalised pixel values."""
    mean = torch.tensor(processor.image_mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, device=images.device).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def clip_side(processor) -> int:
    crop = processor.crop_size  # a dict, or transformers 5's SizeDict
    return int(crop["height"] if not isinstance(crop, int) else crop)


class LogitScale(torch.nn.Module):
    """CLIP's learned temperature, log(1 / 0.07) at start (Radford et al. 2021)."""

    def __init__(self):
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(2.6592))


@dataclasses.dataclass
class Context:
    """What a stage's loss reads besides the trained modules (all frozen or constant)."""

    pipe: object
    cfg: object
    scheduler: object  # the stage's noise schedule (a copy of the pipeline's scheduler)
    device: torch.device
    image_encoder: object = None  # dalle2: CLIPVisionModelWithProjection
    image_processor: object = None


def _frozen(module):
    """Run a frozen module without building a graph."""
    return torch.no_grad() if module is None or not any(p.requires_grad for p in module.parameters()) else contextlib.nullcontext()


# ---------------------------------------------------------------------- stages
class Stage:
    family = ""
    name = ""
    lora_components: tuple[str, ...] = ()  # what LoRA adapts
    needs_image_encoder = False
    scheduler_attr = ""

    def image_sizes(self, pipe, cfg, ctx) -> dict[str, int]:
        raise NotImplementedError

    def trained(self, pipe, cfg, ctx) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def keep_frozen(self, parts) -> list[torch.nn.Parameter]:
        """Parameters of the trained modules that stay fixed."""
        return []

    def setup(self, parts, ctx, batches) -> None:
        """One-off preparation before the first step (from-scratch statistics...)."""

    def loss(self, parts, ctx: Context, batch: dict, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def validation_stages(self, pipe) -> int | None:
        """How many pipeline stages a validation image runs through (None: no images)."""
        return None


class ImagenBase(Stage):
    family, name = "imagen", "base"
    lora_components = ("unet",)
    scheduler_attr = "scheduler"

    def image_sizes(self, pipe, cfg, ctx):
        r = pipe.config.unshuffle_factor
        own = pipe.unet.config.sample_size * r
        what = f"the base UNet of {type(pipe).__name__} (unshuffle_factor {r}, {len(pipe.unet.config.block_out_channels)} levels)"
        return {"pixel_values": _resolution(cfg, own, _unet_multiple(pipe.unet), what, pipe.unet, r)}

    def trained(self, pipe, cfg, ctx):
        parts = {"unet": pipe.unet}
        if cfg.train_text_encoder:
            parts["text_encoder"] = pipe.text_encoder
        return parts

    def loss(self, parts, ctx, batch, generator):
        pipe, cfg = ctx.pipe, ctx.cfg
        texts, _ = drop_captions(batch["text"], cfg.caption_dropout, generator)
        t5 = parts["text_encoder"] if "text_encoder" in parts else pipe.text_encoder
        with _frozen(t5 if "text_encoder" in parts else None):
            states = encode_t5(pipe.tokenizer, t5, texts, pipe.config.max_sequence_length, ctx.device)
        unet = parts["unet"]
        x0 = sampling.pixel_unshuffle(batch["pixel_values"], pipe.config.unshuffle_factor)  # (B, 3r^2, S/r, S/r)
        coords = pipe.config.get("coord_channels", 0)  # the embedded default's x/y input channels

        def model_fn(x_t, t):
            x_t = sampling.append_coordinates(x_t, coords)
            return unet(x_t, t, encoder_hidden_states=states.to(x_t.dtype), return_dict=False)[0]

        return diffusion_loss(model_fn, x0, ctx.scheduler, generator, cfg.min_snr_gamma, **loss_weighting(cfg, ctx.scheduler))

    def validation_stages(self, pipe):
        return 1


class ImagenSR(Stage):
    family, name = "imagen", "sr"
    lora_components = ("sr_unet",)
    scheduler_attr = "sr_scheduler"

    def image_sizes(self, pipe, cfg, ctx):
        if pipe.sr_unet is None:
            raise ValueError(
                f"model={cfg.model!r} has no super-resolution UNet (sr_unet); start from a pipeline with one, or "
                "from a preset ('tiny', 'small')"
            )
        s = pipe.config.get("sr_unshuffle_factor", 1)
        own = pipe.unet.config.sample_size * pipe.config.unshuffle_factor
        high = _resolution(cfg, pipe.sr_unet.config.sample_size * s, _unet_multiple(pipe.sr_unet),
                           "the SR UNet (sr_unet)", pipe.sr_unet, s)  # fmt: skip
        if high % own:
            raise ValueError(f"resolution={high} does not fit the SR stage: it must be a multiple of the base size {own}")
        self.low_side = own
        return {"pixel_values": high}

    def trained(self, pipe, cfg, ctx):
        return {"sr_unet": pipe.sr_unet}

    def loss(self, parts, ctx, batch, generator):
        pipe, cfg = ctx.pipe, ctx.cfg
        texts, _ = drop_captions(batch["text"], cfg.caption_dropout, generator)
        with torch.no_grad():
            states = encode_t5(pipe.tokenizer, pipe.text_encoder, texts, pipe.config.max_sequence_length, ctx.device)
        unet, s = parts["sr_unet"], pipe.config.get("sr_unshuffle_factor", 1)
        multiple = _crop_multiple(_unet_multiple(unet) * s, batch["pixel_values"].shape[-1] // self.low_side)
        high, low = sr_crops(batch["pixel_values"], self.low_side, cfg.sr_crop, multiple, generator)
        # the inference input: bilinear upsample + noise-conditioning augmentation at a random level
        noising = pipe.image_noising_scheduler
        top = cfg.sr_noise_level_max or noising.config.num_train_timesteps
        level = torch.randint(0, top, (high.shape[0],), generator=generator).to(ctx.device)
        upscaled = sampling.upsample(low, high.shape[-1])
        aug_noise = torch.randn(upscaled.shape, generator=generator).to(ctx.device, upscaled.dtype)
        upscaled = sampling.noise_augment(upscaled, aug_noise, level, noising)
        cond = sampling.pixel_unshuffle(upscaled, s)
        x0 = sampling.pixel_unshuffle(high, s)

        def model_fn(x_t, t):
            model_input = torch.cat([x_t, cond.to(x_t.dtype)], dim=1)
            return unet(model_input, t, encoder_hidden_states=states, class_labels=level, return_dict=False)[0]

        return diffusion_loss(model_fn, x0, ctx.scheduler, generator, cfg.min_snr_gamma, **loss_weighting(cfg, ctx.scheduler))

    def validation_stages(self, pipe):
        return 2


class DalleClip(Stage):
    family, name = "dalle2", "clip"
    needs_image_encoder = True

    def image_sizes(self, pipe, cfg, ctx):
        side = clip_side(ctx.image_processor)
        if cfg.resolution not in (None, side):
            raise ValueError(f"resolution={cfg.resolution} does not fit the CLIP vision tower, which takes exactly {side} px")
        return {"clip_pixel_values": side}

    def trained(self, pipe, cfg, ctx):
        return {"text_encoder": pipe.text_encoder, "image_encoder": ctx.image_encoder, "logit_scale": LogitScale()}

    def loss(self, parts, ctx, batch, generator):
        pipe = ctx.pipe
        text, _, _ = encode_clip_text(pipe.tokenizer, parts["text_encoder"], batch["text"], ctx.device)
        image = parts["image_encoder"](clip_pixels(batch["clip_pixel_values"], ctx.image_processor)).image_embeds
        text, image = F.normalize(text.float(), dim=-1), F.normalize(image.float(), dim=-1)
        logits = parts["logit_scale"].value.clamp(max=4.6052).exp() * text @ image.T  # (B, B); scale <= 100
        labels = torch.arange(len(logits), device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class DallePrior(Stage):
    family, name = "dalle2", "prior"
    lora_components = ("prior",)
    needs_image_encoder = True
    scheduler_attr = "prior_scheduler"

    def image_sizes(self, pipe, cfg, ctx):
        return DalleClip.image_sizes(self, pipe, cfg, ctx)

    def trained(self, pipe, cfg, ctx):
        return {"prior": pipe.prior}

    def keep_frozen(self, parts):
        return [parts["prior"].clip_mean, parts["prior"].clip_std]  # CLIP embedding statistics, not learned

    def setup(self, parts, ctx, batches):
        prior = parts["prior"]
        if bool((prior.clip_std != 0).any()):
            return
        # a from-scratch prior: normalise with the statistics of the data's CLIP image embeddings
        with torch.no_grad():
            n = min(256, batches.source.size or 256)
            embeds = [self._image_embeds(ctx, batches(i)) for i in range(max(1, n // batches.batch_size))]
        embeds = torch.cat(embeds)
        prior.clip_mean.data.copy_(embeds.mean(0, keepdim=True))
        prior.clip_std.data.copy_(embeds.std(0, keepdim=True).clamp(min=1e-3))
        logger.info("prior: clip_mean/clip_std set from %d CLIP image embeddings of the data", len(embeds))

    @staticmethod
    def _image_embeds(ctx, batch):
        pixels = clip_pixels(batch["clip_pixel_values"].to(ctx.device), ctx.image_processor)
        return ctx.image_encoder(pixels.to(ctx.image_encoder.dtype)).image_embeds.float()

    def loss(self, parts, ctx, batch, generator):
        pipe, cfg, prior = ctx.pipe, ctx.cfg, parts["prior"]
        texts, _ = drop_captions(batch["text"], cfg.caption_dropout, generator)
        with torch.no_grad():
            text_embeds, states, mask = encode_clip_text(pipe.tokenizer, pipe.text_encoder, texts, ctx.device)
            z_i = self._image_embeds(ctx, batch)
        z0 = (z_i - prior.clip_mean) / prior.clip_std  # what post_process_latents undoes

        def model_fn(z_t, t):
            return prior(z_t, timestep=t, proj_embedding=text_embeds.to(z_t.dtype), encoder_hidden_states=states.to(z_t.dtype),
                         attention_mask=mask).predicted_image_embedding  # fmt: skip

        return diffusion_loss(model_fn, z0, ctx.scheduler, generator, cfg.min_snr_gamma, **loss_weighting(cfg, ctx.scheduler))

    def validation_stages(self, pipe):
        return 2


class DalleDecoder(Stage):
    family, name = "dalle2", "decoder"
    lora_components = ("decoder",)
    needs_image_encoder = True
    scheduler_attr = "decoder_scheduler"

    def image_sizes(self, pipe, cfg, ctx):
        r = pipe.config.unshuffle_factor
        own = pipe.decoder.config.sample_size * r
        side = _resolution(cfg, own, _unet_multiple(pipe.decoder), f"the decoder (unshuffle_factor {r})", pipe.decoder, r)
        return {"pixel_values": side, "clip_pixel_values": clip_side(ctx.image_processor)}

    def trained(self, pipe, cfg, ctx):
        return {"decoder": pipe.decoder, "text_proj": pipe.text_proj}

    def loss(self, parts, ctx, batch, generator):
        pipe, cfg = ctx.pipe, ctx.cfg
        decoder, proj = parts["decoder"], parts["text_proj"]
        texts, drop = drop_captions(batch["text"], cfg.caption_dropout, generator)
        with torch.no_grad():
            text_embeds, states, mask = encode_clip_text(pipe.tokenizer, pipe.text_encoder, texts, ctx.device)
            z_i = DallePrior._image_embeds(ctx, batch)
        # the unconditional branch at inference: empty prompt + the learned unconditional z_i;
        # image_embed_dropout also gives some captioned samples the unconditional z_i (drawn only
        # when set, so runs without it keep their random stream)
        uncond = proj.learned_classifier_free_guidance_embeddings.unsqueeze(0).expand_as(z_i)
        if cfg.image_embed_dropout > 0:
            drop = drop | (torch.rand(len(texts), generator=generator) < cfg.image_embed_dropout)
        z_i = torch.where(drop.to(ctx.device)[:, None], uncond, z_i.to(uncond.dtype))
        context, time_embeddings = proj(image_embeddings=z_i, prompt_embeds=text_embeds.to(z_i.dtype),
                                        text_encoder_hidden_states=states.to(z_i.dtype), do_classifier_free_guidance=False)  # fmt: skip
        mask = F.pad(mask, (proj.config.clip_extra_context_tokens, 0), value=True)  # the image tokens
        x0 = sampling.pixel_unshuffle(batch["pixel_values"], pipe.config.unshuffle_factor)
        coords = pipe.config.get("coord_channels", 0)

        def model_fn(x_t, t):
            x_t = sampling.append_coordinates(x_t, coords)
            return decoder(x_t, t, encoder_hidden_states=context, class_labels=time_embeddings, attention_mask=mask,
                           return_dict=False)[0]  # fmt: skip

        return diffusion_loss(model_fn, x0, ctx.scheduler, generator, cfg.min_snr_gamma, **loss_weighting(cfg, ctx.scheduler))

    def validation_stages(self, pipe):
        return 2


class DalleSR(Stage):
    family, name = "dalle2", "sr"
    lora_components = ("super_res_first", "super_res_last")
    scheduler_attr = "super_res_scheduler"

    def image_sizes(self, pipe, cfg, ctx):
        if pipe.super_res_first is None:
            raise ValueError(
                f"model={cfg.model!r} has no super-resolution UNets (super_res_first/last); start from a pipeline "
                "with them, or from a preset ('tiny', 'small')"
            )
        own = pipe.decoder.config.sample_size * pipe.config.unshuffle_factor
        high = _resolution(cfg, pipe.super_res_first.config.sample_size, _unet_multiple(pipe.super_res_first),
                           "the SR UNets (super_res_first/last)", None)  # fmt: skip
        if high % own:
            raise ValueError(f"resolution={high} does not fit the SR stage: it must be a multiple of the decoder size {own}")
        self.low_side = own
        return {"pixel_values": high}

    def trained(self, pipe, cfg, ctx):
        return {"super_res_first": pipe.super_res_first, "super_res_last": pipe.super_res_last}

    def loss(self, parts, ctx, batch, generator):
        from ..pipelines.unclip import upsample_bicubic

        cfg = ctx.cfg
        multiple = _crop_multiple(_unet_multiple(parts["super_res_first"]), batch["pixel_values"].shape[-1] // self.low_side)
        high, low = sr_crops(batch["pixel_values"], self.low_side, cfg.sr_crop, multiple, generator)
        upscaled = upsample_bicubic(low, high.shape[-1])  # the inference input (no text, no augmentation)
        losses = []
        for name, t_max in (("super_res_first", None), ("super_res_last", SR_LAST_MAX_T)):
            unet = parts[name]

            def model_fn(x_t, t, unet=unet):
                return unet(torch.cat([x_t, upscaled.to(x_t.dtype)], dim=1), t, return_dict=False)[0]

            losses.append(diffusion_loss(model_fn, high, ctx.scheduler, generator, cfg.min_snr_gamma, t_max, **loss_weighting(cfg, ctx.scheduler)))
        return sum(losses)

    def validation_stages(self, pipe):
        return 3


STAGES = {(s.family, s.name): s for s in (ImagenBase, ImagenSR, DalleClip, DallePrior, DalleDecoder, DalleSR)}


def get_stage(family: str, name: str) -> Stage:
    from .config import FAMILY_STAGES

    if (family, name) not in STAGES:
        raise ValueError(f"stage={name!r} is not a stage of family {family!r}; its stages are {FAMILY_STAGES.get(family)}")
    return STAGES[(family, name)]()


# ---------------------------------------------------------------------- start points
def build_scratch(family: str, preset: str, words: list[str], seed: int):
    """A from-scratch pipeline of the ``tiny`` or ``small`` preset, its tokenizer built on the
    caption ``words``; for dalle2 also ``(image_encoder, image_processor)``. Fixed variances
    (see the module docstring). The global RNG is left as it was."""
    from ..models import components as C
    from ..models import unclip_components as U

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "imagen":
            from ..pipelines.imagen import ImagenPipeline

            if preset == "tiny":  # 16 px base -> 32 px SR, seconds per step on a CPU (tests)
                t5, base, sr, side, r, sr_side, length = C.TINY_T5, C.TINY_BASE, C.TINY_SR, 16, 1, 32, 16
            else:  # the embedded default's base (64 px on 16x16x48 patches) + a 256 px SR
                t5 = C.T5Size(d_model=128, num_layers=3, num_heads=4, d_ff=256, d_kv=32)
                base = C.UNetSize(block_out_channels=(48, 96, 192), attention_head_dim=32, cross_attention_dim=128,
                                  attention_levels=(False, True, True))  # fmt: skip
                sr = C.UNetSize(block_out_channels=(32, 64, 128), cross_attention_dim=128, attention_levels=(False,) * 3)
                side, r, sr_side, length = 64, 4, 256, 32
            tok = C.word_tokenizer(words)
            pipe = ImagenPipeline(
                tokenizer=tok, text_encoder=C.t5_encoder(len(tok), t5),
                unet=C.if_unet(sample_size=side // r, in_channels=3 * r * r, out_channels=3 * r * r, text_dim=t5.d_model, size=base),
                scheduler=C.ddpm_scheduler(prediction_type="sample" if preset == "small" else "epsilon"),
                sr_unet=C.if_unet(sample_size=sr_side, in_channels=6, out_channels=3, text_dim=t5.d_model, size=sr,
                                  super_resolution=True),
                sr_scheduler=C.ddpm_scheduler(), image_noising_scheduler=C.noising_scheduler(),
                unshuffle_factor=r, max_sequence_length=length,
            )  # fmt: skip
            return pipe, None, None
        from ..pipelines.unclip import UnCLIPLitePipeline

        size = U.TINY_UNCLIP if preset == "tiny" else U.SMALL_UNCLIP
        size = dataclasses.replace(size, decoder=dataclasses.replace(size.decoder, learned_variance=False))
        pipe = UnCLIPLitePipeline(**U.build_components(size, words=words))
        return pipe, U.clip_vision_encoder(size.clip), U.clip_image_processor(size.clip)


def load_start(cfg):
    """The pipeline to fine-tune (``cfg.model``: a pipeline directory, IF / Karlo layout, or a
    preset), in float32 on the CPU; for dalle2 also its CLIP vision tower when the directory has
    one (``image_encoder/`` + ``feature_extractor/``)."""
    from ..api import _load

    pipeline = "imagen" if cfg.family == "imagen" else "dalle2"
    pipe = _load(pipeline, cfg.model, torch.float32).pipe
    encoder = processor = None
    root = Path(str(cfg.model))
    if cfg.family == "dalle2" and (root / "image_encoder").is_dir():
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        encoder = CLIPVisionModelWithProjection.from_pretrained(root / "image_encoder", use_safetensors=True, dtype=torch.float32)
        processor = CLIPImageProcessor.from_pretrained(root / "feature_extractor")
    return pipe, encoder, processor


def new_image_encoder(pipe):
    """A fresh CLIP vision tower matching ``pipe``'s text tower width (for the clip stage)."""
    from ..models import unclip_components as U

    text = pipe.text_encoder.config
    size = U.ClipSize(embedding_dim=text.projection_dim, num_layers=text.num_hidden_layers,
                      num_heads=text.num_attention_heads, intermediate_size=text.intermediate_size)  # fmt: skip
    return U.clip_vision_encoder(size), U.clip_image_processor(size)


COORD_UNETS = {"ImagenPipeline": "unet", "UnCLIPLitePipeline": "decoder"}  # the UNet that takes coord_channels


def with_coord_channels(pipe, coord_channels: int | None):
    """``pipe`` with ``coord_channels`` x/y input channels on its base UNet (Imagen) or decoder
    (unCLIP): unchanged when it has them (or ``coord_channels`` is None); grown, with zero
    weights on the new inputs, when it has none -- so it draws what it drew before."""
    have = pipe.config.get("coord_channels", 0)
    if coord_channels is None or coord_channels == have:
        return pipe
    attr = COORD_UNETS.get(type(pipe).__name__)
    if attr is None or have != 0:
        raise ValueError(f"coord_channels={coord_channels!r}: {type(pipe).__name__} with coord_channels={have} "
                         f"cannot be changed to it (only grown from 0, on {sorted(COORD_UNETS)})")  # fmt: skip
    from ..models import components as C

    unet = getattr(pipe, attr)
    grown = C.with_input_channels(unet, unet.config.in_channels + coord_channels)
    return clone_pipeline(pipe, **{attr: grown, "coord_channels": coord_channels})


def clone_pipeline(pipe, **replace):
    """A new pipeline object of ``pipe``'s class sharing its components, with ``replace`` swapped in."""
    params = inspect.signature(type(pipe).__init__).parameters
    kwargs = {k: v for k, v in pipe.components.items() if k in params}
    kwargs.update({k: pipe.config[k] for k in params if k in pipe.config and k not in kwargs and not k.startswith("_")})
    kwargs.update(replace)
    return type(pipe)(**kwargs)


def noise_schedule(pipe, stage: Stage):
    """A copy of the stage's scheduler: ``add_noise`` and ``alphas_cumprod`` for training."""
    return copy.deepcopy(getattr(pipe, stage.scheduler_attr)) if stage.scheduler_attr else None
