"""DALL-E 2-style cascade (unCLIP): CLIP text encoder -> prior -> 64px decoder -> super-resolution.

The family of unCLIP (Ramesh et al. 2022) and Kakao Brain's Karlo. Compare with ``imagen.py``:

| | Imagen (imagen.py) | DALL-E 2 (this file) |
|---|---|---|
| text encoder | T5 encoder, all token states | CLIP text tower, pooled embedding + token states |
| prior | none | PriorTransformer: text embedding -> CLIP image embedding |
| base conditioning | cross-attention on T5 tokens, pooled text added to the time embedding (``encoder_hid_dim``, ``addition_embed_type="text"``) | CLIP image embedding projected into the time embedding and into extra context tokens (``text_proj``) |
| super-resolution | bilinear upsample + noise-conditioning augmentation, noise level as ``class_labels`` | bicubic upsample, no augmentation and no text; ``super_res_first`` for all steps but the last, ``super_res_last`` for the last (Karlo) |

Components (registered under Karlo's names, so ``save_pretrained``/``from_pretrained``/``.to()``/
offloading work as in diffusers): ``tokenizer``, ``text_encoder`` (``CLIPTextModelWithProjection``),
``prior`` + ``prior_scheduler``, ``text_proj``
(:class:`~imagen_lite.models.text_proj.UnCLIPTextProjection`), ``decoder`` + ``decoder_scheduler``,
and optionally ``super_res_first`` + ``super_res_last`` + ``super_res_scheduler`` (64->256),
and ``refiner`` + ``refiner_scheduler``: a low-noise expert for the decoder, as ``ImagenPipeline``
has for its base (an unconditional full-resolution ``UNet2DModel`` on the decoder's noise
schedule; the call's ``refiner_start`` hands it the decoder's steps below that timestep).
Karlo's weights load unchanged with :func:`from_karlo_repo`.
Or, instead of Karlo's SR, an **Imagen-style SR stage** (twenty-sixth session): ``sr_unet`` +
``sr_scheduler`` + ``image_noising_scheduler`` as ``ImagenPipeline`` has them, with
``sr_text_encoder`` + ``sr_tokenizer`` (that SR's T5) to read the null text: the stage runs
:func:`imagen_lite.pipelines.imagen.super_resolve` on the T5 states of "" (the SR's
caption-dropout input), so it conditions on the 64 px image alone, as Karlo's SR does, and takes
the call's ``noise_level`` and ``sr_strength``. The embedded DALL-E 2 default borrows the Imagen
default's SR this way (``imagen_lite.api.shared_sr``): it scored as DALL-E 2's own SR did, and
that SR's training hours left the budget (docs/model_card.md).

Pipeline config (saved in ``model_index.json``):
- ``unshuffle_factor``: the decoder runs on ``r x r`` pixel patches (space-to-depth), as the
  Imagen family's base does for the embedded default. Karlo uses 1.
- ``coord_channels``: 0 (Karlo) or 2: x/y coordinate input channels after the decoder's noisy
  image, as ``ImagenPipeline``'s base (see there for why).
- ``refiner_max_timestep``: the refiner trained on t in [0, this); ``refiner_start`` may not
  exceed it. 0 without a refiner.
- ``sr_unshuffle_factor``, ``sr_max_sequence_length``: the Imagen-style SR's, as
  ``ImagenPipeline``'s ``sr_unshuffle_factor`` and ``max_sequence_length`` (unused with Karlo's SR).

Classifier-free guidance is decided per stage (``guidance_scale > 1``); the prior's
unconditional input is the empty (or negative) prompt, the decoder's is that prompt plus the
learned unconditional image embedding of ``text_proj``. Karlo's SR UNets take no text, so the
SR stage has no guidance.

The denoising math is :func:`imagen_lite.sampling.denoise`, shared with the Imagen family (the
prior's "sample" is a (B, D) embedding); this file reproduces diffusers' ``UnCLIPPipeline``
(and, given image embeddings, ``UnCLIPImageVariationPipeline``'s decoder and SR) draw for draw,
which ``tests/test_unclip.py`` checks.
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from .. import runtime, sampling
from ..models.text_proj import UnCLIPTextProjection
from .common import check_coord_channels, check_output_type, check_prompt, finish, inference_call, is_guidance_scale, load_scheduler, per_stage, per_stage_intervals, run_finite, timed, tokenize
from .imagen import check_refiner, check_refiner_stage, check_sr_strength, refine_prediction, super_resolve
from .speed import reuse_constant_inputs


RERANK_TIMESTEPS = (500, 600, 700, 800, 900)
"""Timesteps at which :meth:`UnCLIPLitePipeline.caption_error` noises a candidate. The high half
of the schedule: there the caption decides the layout, and on the embedded default the lower
half added nothing to the ranking (twenty-ninth session, model card)."""
RERANK_DRAWS = 2
"""Noise draws per timestep in :meth:`UnCLIPLitePipeline.caption_error`."""


class CLIPTextEmbeds(NamedTuple):
    """What :meth:`UnCLIPLitePipeline.encode_prompt` returns (a tuple, so it unpacks)."""

    text_embeds: torch.Tensor  # (B, D) pooled + projected: z_t
    hidden_states: torch.Tensor  # (B, L, D) token states
    mask: torch.Tensor  # (B, L) bool, True on real tokens

    def repeat_interleave(self, n: int) -> "CLIPTextEmbeds":
        return CLIPTextEmbeds(*(x.repeat_interleave(n, dim=0) for x in self))


def upsample_bicubic(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic upsampling of (B, C, h, w) to (B, C, size, size), as ``UnCLIPPipeline`` does it
    for the super-resolution stage's conditioning image."""
    antialias = {"antialias": True} if "antialias" in inspect.signature(F.interpolate).parameters else {}
    return F.interpolate(image, size=[size, size], mode="bicubic", align_corners=False, **antialias)


def _step_kwargs(scheduler, generator, timesteps):
    """``scheduler.step`` keywords per step: the generator, and ``prev_timestep`` (the next
    timestep, None at the last) for schedulers that take it -- UnCLIPScheduler needs it to step
    over respaced timesteps."""
    base = sampling.scheduler_step_kwargs(scheduler, generator)
    if "prev_timestep" not in inspect.signature(scheduler.step).parameters:
        return base
    timesteps = list(timesteps)
    return lambda i, t: {**base, "prev_timestep": timesteps[i + 1] if i + 1 < len(timesteps) else None}


class UnCLIPLitePipeline(DiffusionPipeline):
    """CLIP -> prior -> decoder 64px -> SR 256. See the module docstring."""

    # the prior's clip_mean/clip_std are used outside forward (post_process_latents), so it
    # stays out of model CPU offload, as in diffusers' UnCLIPPipeline
    model_cpu_offload_seq = "text_encoder->text_proj->decoder->refiner->super_res_first->super_res_last->sr_text_encoder->sr_unet"
    _exclude_from_cpu_offload = ["prior"]
    _optional_components = ["super_res_first", "super_res_last", "super_res_scheduler", "refiner", "refiner_scheduler",
                            "sr_unet", "sr_scheduler", "image_noising_scheduler", "sr_text_encoder", "sr_tokenizer"]  # fmt: skip

    def __init__(
        self,
        prior,
        decoder,
        text_proj,
        text_encoder,
        tokenizer,
        prior_scheduler,
        decoder_scheduler,
        super_res_first=None,
        super_res_last=None,
        super_res_scheduler=None,
        refiner=None,
        refiner_scheduler=None,
        sr_unet=None,
        sr_scheduler=None,
        image_noising_scheduler=None,
        sr_text_encoder=None,
        sr_tokenizer=None,
        unshuffle_factor: int = 1,
        coord_channels: int = 0,
        refiner_max_timestep: int = 0,
        sr_unshuffle_factor: int = 1,
        sr_max_sequence_length: int = 77,
    ):
        super().__init__()
        check_coord_channels(coord_channels, decoder, "the decoder")
        check_refiner(refiner, refiner_scheduler, decoder_scheduler, refiner_max_timestep, "decoder")
        sr = (super_res_first, super_res_last, super_res_scheduler)
        if any(c is not None for c in sr) and any(c is None for c in sr):
            raise ValueError(
                "super_res_first, super_res_last and super_res_scheduler come together; got "
                f"{[type(c).__name__ if c is not None else None for c in sr]}"
            )
        imagen_sr = {"sr_unet": sr_unet, "sr_scheduler": sr_scheduler, "image_noising_scheduler": image_noising_scheduler,
                     "sr_text_encoder": sr_text_encoder, "sr_tokenizer": sr_tokenizer}  # fmt: skip
        if any(c is not None for c in imagen_sr.values()):
            missing = [k for k, c in imagen_sr.items() if c is None]
            if missing:
                raise ValueError(f"an Imagen-style SR stage needs {list(imagen_sr)} together; missing {missing}")
            if super_res_first is not None:
                raise ValueError("the SR stage is either Karlo's (super_res_first/last) or Imagen-style (sr_unet); "
                                 "got both")  # fmt: skip
        self.register_modules(
            prior=prior,
            decoder=decoder,
            text_proj=text_proj,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            super_res_first=super_res_first,
            super_res_last=super_res_last,
            prior_scheduler=prior_scheduler,
            decoder_scheduler=decoder_scheduler,
            super_res_scheduler=super_res_scheduler,
            refiner=refiner,
            refiner_scheduler=refiner_scheduler,
            **imagen_sr,
        )
        self.register_to_config(unshuffle_factor=int(unshuffle_factor), coord_channels=int(coord_channels),
                                refiner_max_timestep=int(refiner_max_timestep) if refiner is not None else 0,
                                sr_unshuffle_factor=int(sr_unshuffle_factor),
                                sr_max_sequence_length=int(sr_max_sequence_length))  # fmt: skip

    # ------------------------------------------------------------------ structure
    @property
    def stage_names(self) -> list[str]:
        """Names of the stages present, in order: ``prior``, ``decoder``, ``sr_256``."""
        names = ["prior", "decoder"]
        if self.sr_side is not None:
            names.append(f"sr_{self.sr_side}")
        return names

    @property
    def sr_side(self) -> int | None:
        """Output side of the SR stage (Karlo's or Imagen-style), None without one."""
        if self.super_res_first is not None:
            return self.super_res_first.config.sample_size
        if getattr(self, "sr_unet", None) is not None:
            return self.sr_unet.config.sample_size * self.config.get("sr_unshuffle_factor", 1)
        return None

    @property
    def _sr_kind(self) -> str:
        """The SR stage's kind, as errors name it."""
        if self.super_res_first is not None:
            return "Karlo's (super_res_first/last)"
        return "Imagen-style (sr_unet)" if getattr(self, "sr_unet", None) is not None else "absent"

    @property
    def stage_sizes(self) -> list[int]:
        """Output side of each image stage (the prior makes an embedding, not an image);
        ``size`` in ``generate()`` picks one of these."""
        sizes = [self.decoder.config.sample_size * self.config.unshuffle_factor]
        if self.sr_side is not None:
            sizes.append(self.sr_side)
        return sizes

    def num_stages_for_size(self, size: int | None) -> int:
        """How many stages, the prior included, produce an image of side ``size`` (None: all)."""
        sizes = self.stage_sizes
        if size is None:
            return len(self.stage_names)
        if size not in sizes:
            raise ValueError(f"size={size!r} cannot be produced by this cascade; its stages produce {sizes}")
        return sizes.index(size) + 2

    # ------------------------------------------------------------------ refiner
    def check_refiner_start(self, refiner_start) -> tuple[int, int]:
        """``refiner_start`` as (decoder, SR) timesteps. One int is the decoder's alone (the SR
        stage gets none); a pair ``(decoder, sr)`` also hands the SR stage its steps below the
        second, which needs an Imagen-style SR (``sr_unet``, on the refiner's noise schedule).
        ValueError naming a value this pipeline cannot run."""
        values = list(refiner_start) if isinstance(refiner_start, (list, tuple)) else [refiner_start]
        if not 1 <= len(values) <= 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise ValueError(f"refiner_start={refiner_start!r} must be a timestep, an int >= 0 (0: no refiner), or a "
                             f"pair of them (decoder, sr)")  # fmt: skip
        decoder_start, sr_start = (values + [0])[:2]
        # checked at each call: the decoder's scheduler may have been swapped since the pipeline was built
        check_refiner_stage(self, refiner_start, decoder_start, self.decoder_scheduler, "decoder")
        if sr_start:
            if self.sr_unet is None:
                raise ValueError(f"refiner_start={refiner_start!r} gives the SR stage a refiner below t = {sr_start}, but "
                                 f"only an Imagen-style SR (sr_unet) runs the refiner; this pipeline's SR is {self._sr_kind}: "
                                 f"pass one timestep (the decoder's)")  # fmt: skip
            check_refiner_stage(self, refiner_start, sr_start, self.sr_scheduler, f"sr_{self.sr_side}")
        return decoder_start, sr_start

    @torch.no_grad()
    def sr_context(self, n: int, device=None) -> torch.Tensor:
        """The Imagen-style SR's text input for ``n`` images: the T5 token states of "" (its
        caption-dropout input in training), so it conditions on the image alone, as Karlo's SR."""
        device = device or self._execution_device
        inputs = tokenize(self.sr_tokenizer, [""], self.config.sr_max_sequence_length)
        states = self.sr_text_encoder(inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device))[0]
        return states.expand(n, -1, -1)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompt(self, prompt: list[str], device=None) -> CLIPTextEmbeds:
        """CLIP text embeddings for a list of prompts (empty strings allowed: the unconditional
        input). The text tower runs without an attention mask, as in CLIP and Karlo (it is
        causal, so padding cannot reach the real tokens); the mask is returned for the prior
        and decoder. Call once and pass ``prompt_embeds`` to free the text encoder after."""
        device = device or self._execution_device
        inputs = tokenize(self.tokenizer, prompt, self.tokenizer.model_max_length)
        out = self.text_encoder(inputs.input_ids.to(device))
        return CLIPTextEmbeds(out.text_embeds, out.last_hidden_state, inputs.attention_mask.bool().to(device))

    # ------------------------------------------------------------------ decoder conditioning
    def decoder_context(self, image_embeddings: torch.Tensor, text: CLIPTextEmbeds, cfg: bool = False):
        """``text_proj`` of CLIP image embeddings and text rows -> the decoder's
        ``(encoder_hidden_states, class_labels, attention_mask)`` in its dtype; ``cfg``: ``text``
        holds [uncond, cond] rows and the learned unconditional image embedding goes with the
        first half (``UnCLIPTextProjModel``'s ``do_classifier_free_guidance``). The mask covers
        the extra image tokens too. Shared by the sampling loop and :meth:`caption_error`."""
        proj, dtype = self.text_proj, self.decoder.dtype
        context, time_embeddings = proj(
            image_embeddings=image_embeddings.to(proj.dtype), prompt_embeds=text.text_embeds.to(proj.dtype),
            text_encoder_hidden_states=text.hidden_states.to(proj.dtype), do_classifier_free_guidance=cfg,
        )  # fmt: skip
        mask = F.pad(text.mask, (proj.config.clip_extra_context_tokens, 0), value=True)  # the image tokens
        return context.to(dtype), time_embeddings.to(dtype), mask

    # ------------------------------------------------------------------ re-ranking
    @torch.no_grad()
    def caption_error(self, images: torch.Tensor, text: CLIPTextEmbeds, generator: torch.Generator | None = None,
                      timesteps=None, group: int = 1) -> torch.Tensor:
        """How badly the decoder's caption-alone branch explains each 64 px image: (N,) mean x0
        squared error over ``timesteps`` (default :data:`RERANK_TIMESTEPS`) and
        :data:`RERANK_DRAWS` noise draws each, the decoder given its row's caption (``text``:
        :meth:`encode_prompt` rows, one per image) and the learned unconditional image embedding.

        A diffusion model's conditional denoising error is a zero-shot classifier of its
        condition (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier";
        Clark & Jaini 2023). The caption-alone branch, not the prior's z_i: the decoder draws
        what its z_i says, so that branch agrees with a wrong image too (why re-ranking by the
        family's CLIP did not help, ninth session); the caption-alone branch, which a decoder
        trained with ``image_embed_dropout`` has learned, judges the image against the words.
        ``images``: (N, 3, H, W) in [-1, 1] at the decoder's output size. ``group``: rows
        ``i*group .. i*group+group-1`` are candidates for one image and are noised with the same
        draws (common random numbers: their errors differ by the images, not by the noise).
        Lower is better."""
        decoder, scheduler, proj = self.decoder, self.decoder_scheduler, self.text_proj
        timesteps = RERANK_TIMESTEPS if timesteps is None else tuple(timesteps)
        n_train = scheduler.config.num_train_timesteps
        if not timesteps or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_train for t in timesteps):
            raise ValueError(f"timesteps={timesteps!r} must be ints in [0, {n_train})")
        r = self.config.unshuffle_factor
        side, coords = decoder.config.sample_size, self.config.get("coord_channels", 0)
        n, device = images.shape[0], images.device
        if isinstance(group, bool) or not isinstance(group, int) or group < 1 or n % group:
            raise ValueError(f"group={group!r} must be a positive integer that divides the {n} images")
        if tuple(images.shape[1:]) != (3, side * r, side * r) or text.text_embeds.shape[0] != n:
            raise ValueError(f"caption_error takes (N, 3, {side * r}, {side * r}) images and N caption rows; got "
                             f"{tuple(images.shape)} and {text.text_embeds.shape[0]} rows")  # fmt: skip
        learned = proj.learned_classifier_free_guidance_embeddings.unsqueeze(0).expand(n, -1)
        context, time_embeddings, mask = self.decoder_context(learned, text)
        x0 = sampling.pixel_unshuffle(images.to(decoder.dtype), r)
        grid = sampling.coordinate_grid(n, side, device, decoder.dtype) if coords else None
        alphas = scheduler.alphas_cumprod
        errors = torch.zeros(n, device=device, dtype=torch.float32)
        for _ in range(RERANK_DRAWS):
            for t in timesteps:
                noise = randn_tensor((n // group, *x0.shape[1:]), generator=generator, device=device, dtype=x0.dtype)
                noise = noise.repeat_interleave(group, dim=0)
                a = alphas[t].item()
                x_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise
                model_input = x_t if grid is None else torch.cat([x_t, grid], dim=1)
                out = decoder(model_input, torch.full((n,), t, device=device), encoder_hidden_states=context,
                              class_labels=time_embeddings, attention_mask=mask, return_dict=False)[0]  # fmt: skip
                x0_hat = sampling.x0_from_prediction(out[:, : x0.shape[1]], x_t, a, scheduler.config.prediction_type)
                errors += (x0_hat.float() - x0.float()).pow(2).mean(dim=(1, 2, 3))
        return errors / (RERANK_DRAWS * len(timesteps))

    # ------------------------------------------------------------------ call
    @inference_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps=None,
        guidance_scale=None,
        guidance_interval=(0.0, 1.0),
        num_stages: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        prior_candidates: int = 1,
        decoder_candidates: int = 1,
        image_embeds: torch.Tensor | None = None,
        text_guidance_scale: float | None = None,
        refiner_start: int | tuple = 0,
        noise_level: int | None = None,
        sr_strength: float = 1.0,
        prompt_embeds: CLIPTextEmbeds | tuple | None = None,
        negative_prompt_embeds: CLIPTextEmbeds | tuple | None = None,
        output_type: str = "pil",
        return_stage_outputs: bool = False,
        callback=None,
        return_dict: bool = True,
    ):
        """Generate images.

        Args:
            prompt / negative_prompt: str or list[str]; or pass ``prompt_embeds`` (and
                ``negative_prompt_embeds``) as computed by :meth:`encode_prompt`. The negative
                prompt (default ``""``) is the unconditional input of the prior and decoder.
            num_inference_steps / guidance_scale: one value or one per stage, in stage order
                (prior, decoder, sr). Guidance > 1 turns on classifier-free guidance; the SR
                stage takes none, so a single value applies to the prior and decoder, and a
                tuple must give the SR stage 1. A tuple may be longer than the stages this call
                runs (``num_stages``), not than the model has. Default (None): Karlo's, 25 / 4
                for the prior, 25 / 8 for the decoder, 7 / 1 for each SR.
            guidance_interval: ``(start, stop)``, or one pair per stage: the fraction of the
                prior's and decoder's steps that use guidance (0 = the noisiest step), as
                ``start`` / ``stop`` of diffusers' ``ClassifierFreeGuidance`` guider; the other
                steps run the conditional branch alone. ``(0, 1)`` (the default): every step.
            num_stages: run only the first N stages, the prior included (2: 64px; default: all).
            generator: a seeded ``torch.Generator``; all noise is drawn from it in order.
            prior_candidates: image embeddings the prior draws per image; the decoder gets the
                one whose cosine similarity with the prompt's CLIP text embedding is highest
                (DALL-E 2, section 2.1: two samples, the higher dot product with z_t). 1 (the
                default) draws one, as ``UnCLIPPipeline`` does; k costs k prior samples, and
                the prior is the cheap stage. Must be 1 when ``image_embeds`` are given.
            decoder_candidates: whole 64 px samples (prior and decoder) drawn per image; the one
                the decoder's caption-alone branch explains best is kept and goes on to the SR
                (:meth:`caption_error`: its x0 error at timesteps :data:`RERANK_TIMESTEPS`, given
                the caption and the learned unconditional image embedding; lower is better).
                1 (the default, as ``UnCLIPPipeline``): no re-ranking. k costs k prior and
                decoder samples plus ``RERANK_DRAWS * len(RERANK_TIMESTEPS)`` (10) decoder passes per candidate.
                Needs a decoder trained with ``image_embed_dropout`` (one that has learned the
                caption alone); the embedded default's is (twenty-ninth session, model card).
            image_embeds: (B, D) CLIP image embeddings (e.g. from :func:`encode_images`), one per
                prompt; given, the prior is skipped and the decoder is conditioned on them.
            text_guidance_scale: None (the default): the decoder's guidance is the usual two-branch
                one, (caption, z_i) against ("", learned unconditional z_i). A number ``s_t``: three
                branches, as InstructPix2Pix guides by text and image separately -- ``u`` ("", learned
                z_i), ``t`` (caption, learned z_i: the caption alone) and ``c`` (caption, z_i) --
                combined as ``u + s_t (t - u) + s (c - t)``, ``s`` the decoder's ``guidance_scale``;
                1.5x the decoder's work. Meant for a decoder trained with ``image_embed_dropout``
                (``TrainConfig``), which has learned the caption-alone branch; it guides every
                decoder step, so the decoder's ``guidance_interval`` must be (0, 1).
            refiner_start: a timestep: the decoder's steps at timesteps below it run on the
                pipeline's ``refiner`` (the low-noise expert, unconditional, so those steps take no
                guidance) instead of the decoder. 0 (the default): none; at most the
                ``refiner_max_timestep`` it was trained to. A pair ``(decoder, sr)`` also runs the
                refiner on an Imagen-style SR stage's steps below the second.
            noise_level / sr_strength: an Imagen-style SR stage's (``sr_unet``) noise-conditioning
                augmentation level (None: IF's 250) and img2img start, as ``ImagenPipeline`` takes
                them; Karlo's SR takes neither (an error when given).
            output_type: ``"pil"``, ``"np"`` or ``"pt"`` (see :class:`ImageLiteOutput`).
        """
        # 1. Check inputs
        refiner_start, sr_refiner_start = self.check_refiner_start(refiner_start)
        if text_guidance_scale is not None and not is_guidance_scale(text_guidance_scale):
            raise ValueError(f"text_guidance_scale={text_guidance_scale!r} must be None or a number >= 0")
        check_output_type(output_type)
        all_stages = self.stage_names
        n_stages = len(all_stages) if num_stages is None else num_stages
        if isinstance(n_stages, bool) or not isinstance(n_stages, int) or not 2 <= n_stages <= len(all_stages):
            raise ValueError(
                f"num_stages={num_stages!r} is not valid; this cascade has stages {all_stages} and an image needs "
                "at least the first 2 (the prior makes an embedding)"
            )
        stages = all_stages[:n_stages]
        if num_inference_steps is None:
            num_inference_steps = (25, 25) + (7,) * (len(all_stages) - 2)
        if guidance_scale is None:
            guidance_scale = (4.0, 8.0) + (1.0,) * (len(all_stages) - 2)
        steps = per_stage(num_inference_steps, stages, "num_inference_steps", kind="steps", model_stages=all_stages)
        if isinstance(guidance_scale, (list, tuple)):
            guidance = per_stage(guidance_scale, stages, "guidance_scale", kind="guidance", model_stages=all_stages)
        else:
            guidance = per_stage(guidance_scale, stages[:2], "guidance_scale", kind="guidance", model_stages=all_stages) + (1.0,) * (n_stages - 2)
        if n_stages > 2 and guidance[2] != 1.0:
            raise ValueError(
                f"guidance_scale for stage {stages[2]!r} is {guidance[2]!r}; the unCLIP super-resolution stage takes "
                "no text, so it must be 1"
            )
        if self.sr_unet is None:
            for name, value, unset in (("noise_level", noise_level, None), ("sr_strength", sr_strength, 1.0)):
                if value != unset:
                    raise ValueError(f"{name}={value!r} applies to an Imagen-style SR stage (sr_unet); this pipeline's "
                                     f"SR is {self._sr_kind}, which takes no {name}")  # fmt: skip
        else:
            noise_level = 250 if noise_level is None else noise_level
            max_level = self.image_noising_scheduler.config.num_train_timesteps
            if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level < max_level:
                raise ValueError(f"noise_level={noise_level!r} must be an int in [0, {max_level})")
            check_sr_strength(sr_strength, dict(zip(stages[2:], steps[2:])))
        intervals = per_stage_intervals(guidance_interval, stages, model_stages=all_stages)
        if text_guidance_scale is not None and tuple(intervals[1]) != (0.0, 1.0):
            raise ValueError(
                f"text_guidance_scale={text_guidance_scale!r} guides every decoder step, but the decoder's "
                f"guidance_interval is {tuple(intervals[1])!r}; use (0, 1) for the decoder with it"
            )
        if prompt_embeds is None:
            prompts = check_prompt(prompt)
        elif prompt is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r} must be a positive integer")
        if isinstance(prior_candidates, bool) or not isinstance(prior_candidates, int) or prior_candidates < 1:
            raise ValueError(f"prior_candidates={prior_candidates!r} must be a positive integer (1: no re-ranking)")
        if isinstance(decoder_candidates, bool) or not isinstance(decoder_candidates, int) or decoder_candidates < 1:
            raise ValueError(f"decoder_candidates={decoder_candidates!r} must be a positive integer (1: no re-ranking)")
        batch = len(prompts) if prompt_embeds is None else prompt_embeds[0].shape[0]
        width = self.text_proj.config.clip_embeddings_dim
        if image_embeds is not None and (
            not isinstance(image_embeds, torch.Tensor) or tuple(image_embeds.shape) != (batch, width)
        ):
            got = tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
            raise ValueError(f"image_embeds has shape {got}; expected ({batch}, {width}): one CLIP image embedding per prompt")
        if image_embeds is not None and prior_candidates != 1:  # no prior runs, so nothing would be re-ranked
            raise ValueError(
                f"prior_candidates={prior_candidates!r} re-ranks prior samples, but image_embeds were given and the "
                "prior is skipped; pass one or the other"
            )
        run_prior = image_embeds is None
        schedulers = [self.prior_scheduler if run_prior else None, self.decoder_scheduler,
                      self.super_res_scheduler if self.sr_unet is None else self.sr_scheduler]  # fmt: skip
        for stage, k, scheduler in zip(stages, steps, schedulers):
            if k < 2 and type(scheduler).__name__ == "UnCLIPScheduler":  # its set_timesteps divides by k - 1
                raise ValueError(f"num_inference_steps for stage {stage!r} is {k}; UnCLIPScheduler needs at least 2")
        device = self._execution_device
        dual = text_guidance_scale is not None  # three-branch decoder guidance (docstring)
        cfg_prior, cfg_decoder = run_prior and guidance[0] > 1.0, guidance[1] > 1.0 or dual
        seconds: dict[str, float] = {}
        stage_outputs: dict[str, torch.Tensor] = {}

        # 2. Encode the prompt (and the negative prompt when the prior or decoder uses guidance)
        with timed(seconds, "text_encoder"):
            if prompt_embeds is None:
                encoded = {}

                def encode() -> torch.Tensor:
                    encoded["cond"] = self.encode_prompt(prompts, device)
                    return encoded["cond"].hidden_states

                run_finite("text_encoder", encode, [self.text_encoder])
                prompt_embeds = encoded["cond"]
            if (cfg_prior or cfg_decoder) and negative_prompt_embeds is None:
                negs = [""] * batch if negative_prompt is None else check_prompt(negative_prompt, "negative_prompt")
                if len(negs) == 1 and batch > 1:
                    negs = negs * batch
                if len(negs) != batch:
                    raise ValueError(f"negative_prompt has {len(negs)} entries but prompt has {batch}; pass one or {batch}")
                negative_prompt_embeds = self.encode_prompt(negs, device)
        per_prompt = num_images_per_prompt * decoder_candidates  # rows i*k .. i*k+k-1: image i's candidates
        cond = CLIPTextEmbeds(*(x.to(device) for x in prompt_embeds)).repeat_interleave(per_prompt)
        uncond = None
        if negative_prompt_embeds is not None:
            uncond = CLIPTextEmbeds(*(x.to(device) for x in negative_prompt_embeds)).repeat_interleave(per_prompt)
        n = cond.text_embeds.shape[0]

        def text_inputs(cfg: bool, dtype, k: int = 1) -> CLIPTextEmbeds:
            c = cond.repeat_interleave(k) if k > 1 else cond
            u = uncond.repeat_interleave(k) if k > 1 and cfg else uncond
            parts = CLIPTextEmbeds(*(torch.cat([a, b]) for a, b in zip(u, c))) if cfg else c
            return CLIPTextEmbeds(parts.text_embeds.to(dtype), parts.hidden_states.to(dtype), parts.mask)

        # 3. Prior: noise -> CLIP image embedding z_i (skipped when image_embeds are given)
        def run_prior_stage() -> torch.Tensor:
            prior, scheduler = self.prior, self.prior_scheduler
            scheduler.set_timesteps(steps[0], device=device)
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
            k = prior_candidates  # rows i*k .. i*k+k-1 are image i's candidates
            z = randn_tensor((n * k, prior.config.embedding_dim), generator=generator, device=device, dtype=prior.dtype)
            z = z * scheduler.init_noise_sigma
            text = text_inputs(cfg_prior, prior.dtype, k)

            def model_fn(model_input, t, i):
                rows = functools.partial(sampling.conditional_rows, model_input=model_input)
                return prior(
                    model_input, timestep=t, proj_embedding=rows(text.text_embeds),
                    encoder_hidden_states=rows(text.hidden_states), attention_mask=rows(text.mask),
                ).predicted_image_embedding  # fmt: skip

            with self.progress_bar(total=steps[0]) as bar, reuse_constant_inputs(prior):
                z = sampling.denoise(
                    model_fn, scheduler, z, scheduler.timesteps,
                    guidance_scale=guidance[0], do_classifier_free_guidance=cfg_prior, guidance_interval=intervals[0],
                    step_kwargs=_step_kwargs(scheduler, generator, scheduler.timesteps),
                    progress_bar=bar, callback=callback,
                )  # fmt: skip
            z = prior.post_process_latents(z)  # (N * k, D)
            if k == 1:
                return z
            sims = F.cosine_similarity(z.float().view(n, k, -1), cond.text_embeds.float()[:, None, :], dim=-1)
            return z.view(n, k, -1)[torch.arange(n, device=z.device), sims.argmax(dim=1)]  # (N, D)

        if run_prior:
            with timed(seconds, "prior"):
                image_embeds = run_finite("prior", run_prior_stage, [self.prior], generator)
        else:
            image_embeds = image_embeds.to(device).repeat_interleave(per_prompt, dim=0)
        stage_outputs["prior"] = image_embeds

        # 4. Decoder: z_i + text -> 64px
        r = self.config.unshuffle_factor

        def run_decoder() -> torch.Tensor:
            decoder, scheduler, proj = self.decoder, self.decoder_scheduler, self.text_proj
            text = text_inputs(cfg_decoder, proj.dtype)
            if dual:  # rows [u, t, c]: ("", learned z_i), (caption, learned z_i), (caption, z_i)
                learned = proj.learned_classifier_free_guidance_embeddings.unsqueeze(0).expand(n, -1)
                u, c = (CLIPTextEmbeds(*(x[i * n:(i + 1) * n] for x in text)) for i in (0, 1))
                text = CLIPTextEmbeds(*(torch.cat([a, b, b]) for a, b in zip(u, c)))
                z = torch.cat([learned, learned, image_embeds.to(proj.dtype)])
                context, time_embeddings, mask = self.decoder_context(z, text)
            else:
                context, time_embeddings, mask = self.decoder_context(image_embeds, text, cfg=cfg_decoder)
            scheduler.set_timesteps(steps[1], device=device)
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
            side, coords = decoder.config.sample_size, self.config.get("coord_channels", 0)
            x = randn_tensor((n, decoder.config.in_channels - coords, side, side), generator=generator, device=device, dtype=decoder.dtype)
            grid = sampling.coordinate_grid(n, side, device, decoder.dtype) if coords else None
            x = x * scheduler.init_noise_sigma

            def model_fn(model_input, t, i):
                if int(t) < refiner_start:  # every guidance branch alike: the refiner takes no condition
                    return refine_prediction(self.refiner, self.refiner_scheduler, model_input[:, : x.shape[1]], t, r,
                                             scheduler.config.prediction_type)  # fmt: skip
                if dual:
                    out_u, out_t, out_c = decoder(
                        model_input.repeat(3, *([1] * (model_input.ndim - 1))), t, encoder_hidden_states=context,
                        class_labels=time_embeddings, attention_mask=mask, return_dict=False,
                    )[0].chunk(3)  # fmt: skip
                    k = x.shape[1]  # guide the sample channels; a learned variance (Karlo) comes from c, as in CFG
                    guided = out_u[:, :k] + text_guidance_scale * (out_t[:, :k] - out_u[:, :k]) + guidance[1] * (out_c[:, :k] - out_t[:, :k])
                    return torch.cat([guided, out_c[:, k:]], dim=1)
                rows = functools.partial(sampling.conditional_rows, model_input=model_input)
                return decoder(
                    model_input, t, encoder_hidden_states=rows(context), class_labels=rows(time_embeddings),
                    attention_mask=rows(mask), return_dict=False,
                )[0]  # fmt: skip

            with self.progress_bar(total=steps[1]) as bar, reuse_constant_inputs(decoder):
                x = sampling.denoise(
                    model_fn, scheduler, x, scheduler.timesteps,
                    guidance_scale=guidance[1], do_classifier_free_guidance=cfg_decoder and not dual,
                    guidance_interval=intervals[1],
                    cond_image=grid,
                    step_kwargs=_step_kwargs(scheduler, generator, scheduler.timesteps),
                    progress_bar=bar, callback=callback,
                )  # fmt: skip
            return sampling.pixel_shuffle(x, r).clamp(-1, 1)  # (N, 3, 64, 64)

        with timed(seconds, "decoder"):
            image = run_finite("decoder", run_decoder, [self.decoder, self.text_proj, self.refiner if refiner_start else None], generator)
        stage_outputs["decoder"] = image

        if decoder_candidates > 1:  # keep each image's best candidate (docstring: decoder_candidates)
            with timed(seconds, "rerank"):
                k = decoder_candidates
                errors = run_finite("rerank", lambda: self.caption_error(image, cond, generator, group=k), [self.decoder, self.text_proj])
                best = errors.view(-1, k).argmin(dim=1) + torch.arange(0, errors.numel(), k, device=errors.device)
                image, n = image[best], n // k
                stage_outputs = {name: out[best] for name, out in stage_outputs.items()}

        # 5. Super-resolution: bicubic upsample -> 256; super_res_first, then super_res_last for the last step
        #    (Karlo's), or an Imagen-style SR on the null text (super_resolve)
        if n_stages > 2 and self.sr_unet is not None:
            name, low_res = stages[2], image

            def run_imagen_sr() -> torch.Tensor:
                return super_resolve(
                    self, self.sr_unet, self.sr_scheduler, low_res, self.sr_context(n, device), steps=steps[2],
                    guidance=1.0, interval=intervals[2], noise_level=noise_level, sr_strength=sr_strength,
                    refiner_start=sr_refiner_start, generator=generator, device=device, callback=callback,
                )  # fmt: skip

            with timed(seconds, name):
                image = run_finite(name, run_imagen_sr, [self.sr_text_encoder, self.sr_unet,
                                                         self.refiner if sr_refiner_start else None], generator)  # fmt: skip
            stage_outputs[name] = image
        elif n_stages > 2:
            name, low_res = stages[2], image

            def run_sr() -> torch.Tensor:
                first, last, scheduler = self.super_res_first, self.super_res_last, self.super_res_scheduler
                scheduler.set_timesteps(steps[2], device=device)
                if hasattr(scheduler, "set_begin_index"):
                    scheduler.set_begin_index(0)
                timesteps = scheduler.timesteps
                side, channels = first.config.sample_size, first.config.in_channels // 2
                x = randn_tensor((n, channels, side, side), generator=generator, device=device, dtype=first.dtype)
                x = x * scheduler.init_noise_sigma
                upscaled = upsample_bicubic(low_res.to(device=device, dtype=first.dtype), side)

                def model_fn(model_input, t, i):
                    unet = last if i == len(timesteps) - 1 else first
                    return unet(model_input, t, return_dict=False)[0]

                with self.progress_bar(total=steps[2]) as bar:
                    return sampling.denoise(
                        model_fn, scheduler, x, timesteps, cond_image=upscaled,
                        step_kwargs=_step_kwargs(scheduler, generator, timesteps),
                        progress_bar=bar, callback=callback,
                    )  # fmt: skip

            with timed(seconds, name):
                image = run_finite(name, run_sr, [self.super_res_first, self.super_res_last], generator)
            stage_outputs[name] = image

        # 6. Post-process
        return finish(self, image, output_type, return_dict, stage_outputs, seconds, return_stage_outputs)


# ---------------------------------------------------------------------- image embeddings
@torch.no_grad()
def encode_images(images, vision_model, image_processor) -> torch.Tensor:
    """CLIP image embeddings (B, D) of PIL images / arrays (or already-processed pixel values
    (B, 3, H, W)) with a ``CLIPVisionModelWithProjection`` and its ``CLIPImageProcessor``;
    pass them as ``image_embeds`` to skip the prior."""
    if not isinstance(images, torch.Tensor):
        images = image_processor(images=images, return_tensors="pt").pixel_values
    param = next(vision_model.parameters())
    return vision_model(images.to(device=param.device, dtype=param.dtype)).image_embeds


# ---------------------------------------------------------------------- building and loading
def build_tiny_unclip(seed: int = 0) -> UnCLIPLitePipeline:
    """A random tiny 16px -> 32px cascade (test sizes), built in code; the global RNG is left as
    it was."""
    from ..models import unclip_components as U

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UnCLIPLitePipeline(**U.build_components(U.TINY_UNCLIP))


def from_karlo_repo(repo: str, *, torch_dtype=None) -> UnCLIPLitePipeline:
    """Assemble an :class:`UnCLIPLitePipeline` from a ``kakaobrain/karlo-v1-alpha``-layout repo
    (hub id or local dir), component by component.

    Needed because that layout's ``model_index.json`` names ``diffusers.UnCLIPTextProjModel``,
    which diffusers 0.42 no longer exports, so ``UnCLIPPipeline.from_pretrained`` fails on it;
    here ``text_proj/`` loads into :class:`UnCLIPTextProjection`. Safetensors only; the SR
    components load when ``model_index.json`` lists them.
    """
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    repo = str(repo)
    index = DiffusionPipeline.load_config(repo)
    missing = [k for k in ("prior", "decoder", "text_proj", "text_encoder", "tokenizer") if not (index.get(k) or [None])[0]]
    if missing:
        raise ValueError(f"{repo!r} has no {missing} in its model_index.json; is it a Karlo (UnCLIPPipeline) layout?")
    load = dict(use_safetensors=True, **runtime.dtype_kwargs(torch_dtype))
    text_load = dict(use_safetensors=True, **runtime.dtype_kwargs(torch_dtype or torch.float32, "transformers"))
    parts = dict(
        tokenizer=CLIPTokenizer.from_pretrained(repo, subfolder="tokenizer"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(repo, subfolder="text_encoder", **text_load),
        prior=PriorTransformer.from_pretrained(repo, subfolder="prior", **load),
        text_proj=UnCLIPTextProjection.from_pretrained(repo, subfolder="text_proj", **load),
        decoder=UNet2DConditionModel.from_pretrained(repo, subfolder="decoder", **load),
        prior_scheduler=load_scheduler(repo, "prior_scheduler", "UnCLIPScheduler"),
        decoder_scheduler=load_scheduler(repo, "decoder_scheduler", "UnCLIPScheduler"),
        unshuffle_factor=index.get("unshuffle_factor", 1),
        coord_channels=index.get("coord_channels", 0),
    )
    if (index.get("super_res_first") or [None])[0]:
        parts.update(
            super_res_first=UNet2DModel.from_pretrained(repo, subfolder="super_res_first", **load),
            super_res_last=UNet2DModel.from_pretrained(repo, subfolder="super_res_last", **load),
            super_res_scheduler=load_scheduler(repo, "super_res_scheduler", "UnCLIPScheduler"),
        )
    return UnCLIPLitePipeline(**parts)
