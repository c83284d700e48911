"""The sampling core both families share: pure functions over tensors and diffusers schedulers.

Every stage of both pipelines -- the Imagen base and super-resolution UNets, the unCLIP prior,
decoder and super-resolution UNets -- is "run a diffusers scheduler over a model with optional
classifier-free guidance". That loop lives here once (:func:`denoise`), with the pieces it is
made of as small functions that can be tested on random tensors without any model:

- :func:`classifier_free_guidance` -- Ho & Salimans (2022), eq. 6, applied to the first
  ``sample_channels`` channels of the model output; learned-variance channels (IF's
  ``learned_range`` UNets) come from the conditional half, as in diffusers' IF pipelines.
- :func:`guided_steps` -- guidance in a limited interval of the steps (Kynkaanniemi et al. 2024,
  "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality"), with
  diffusers' guiders' ``start`` / ``stop`` rounding. Outside it a step runs the conditional
  half only (:func:`conditional_rows` picks its conditioning), so it costs one forward, not two.
- :func:`dynamic_threshold` -- Imagen (Saharia et al. 2022), sec. 2.3. The schedulers apply the
  same rule themselves when their config says ``thresholding=True`` (DeepFloyd IF's setting);
  this function is the reference and is used where no scheduler is involved.
- :func:`noise_augment` -- noise-conditioning augmentation (Ho et al. 2021, "Cascaded
  Diffusion Models"; Imagen sec. 2.5): the low-res image is noised to ``noise_level`` with a
  DDPM forward process before it conditions a super-resolution stage.
- :func:`upsample` -- the bilinear upsampling IF's stage II uses for its conditioning image.
- :func:`strength_timesteps` -- the tail of a schedule that an img2img start at ``strength``
  runs, as diffusers' img2img pipelines pick it (the Imagen SR's ``sr_strength``).
- :func:`pixel_unshuffle` / :func:`pixel_shuffle` -- space-to-depth for stages whose UNet runs
  on ``r x r`` patches (the embedded default's 64px base runs on 12x32x32).

The loop reproduces diffusers' IF and unCLIP pipelines operation for operation (same random
draws in the same order, same scheduler calls), which the equivalence tests check to 1e-4.
"""

from __future__ import annotations

import numbers
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

ModelFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``model_fn(model_input, t, i) -> model_output``; ``model_input`` is (B', C_in, ...) with the
CFG halves already concatenated as ``[uncond, cond]`` when step ``i`` is guided, and the
conditional rows alone when it is not (see :func:`conditional_rows`)."""

FULL_INTERVAL = (0.0, 1.0)


def check_guidance_interval(interval, where: str = "guidance_interval") -> tuple[float, float]:
    """``(start, stop)`` with ``0 <= start < stop <= 1`` (fractions of a stage's steps) -> floats."""
    ok = isinstance(interval, (list, tuple)) and len(interval) == 2 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in interval)  # fmt: skip
    if not ok or not 0.0 <= interval[0] < interval[1] <= 1.0:
        raise ValueError(f"{where} is {interval!r}; it must be a pair (start, stop) with 0 <= start < stop <= 1: "
                         "the fractions of a stage's steps that are guided, (0, 1) for all of them")  # fmt: skip
    return float(interval[0]), float(interval[1])


def guided_steps(num_steps: int, interval=FULL_INTERVAL) -> list[bool]:
    """Which of ``num_steps`` steps are guided: step ``i`` (0 = the noisiest) when
    ``int(start * n) <= i < int(stop * n)``, as diffusers' ``ClassifierFreeGuidance(start=, stop=)``."""
    start, stop = check_guidance_interval(interval)
    lo, hi = int(start * num_steps), int(stop * num_steps)
    return [lo <= i < hi for i in range(num_steps)]


def conditional_rows(tensor: torch.Tensor, model_input: torch.Tensor) -> torch.Tensor:
    """The rows of a conditioning ``tensor`` (built ``[uncond, cond]`` for guidance) that go with
    ``model_input``: all of them on a guided step, the conditional half on an unguided one."""
    return tensor[tensor.shape[0] - model_input.shape[0]:]


def classifier_free_guidance(
    model_output: torch.Tensor, guidance_scale: float, sample_channels: int
) -> torch.Tensor:
    """Combine the ``[uncond, cond]`` halves of a batched model output.

    Args:
        model_output: (2B, C_out, ...) -- the unconditional half first, as diffusers batches it.
        guidance_scale: ``w`` in ``eps = eps_u + w (eps_c - eps_u)``; 1 means the conditional
            prediction alone.
        sample_channels: how many leading channels are the prediction (3 for pixels, the
            embedding size for the prior); the rest (a learned variance) is taken from the
            conditional half unchanged.

    Returns:
        (B, C_out, ...)
    """
    uncond, cond = model_output.chunk(2)
    pred_uncond = uncond[:, :sample_channels]
    pred_cond, rest = cond[:, :sample_channels], cond[:, sample_channels:]
    guided = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
    if rest.shape[1] == 0:
        return guided
    return torch.cat([guided, rest], dim=1)


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.5) -> torch.Tensor:
    """Imagen's dynamic thresholding of a predicted clean sample ``x0`` (B, ...).

    ``s`` = the ``ratio`` quantile of ``|x0|`` per sample, clamped to ``[1, max_value]``;
    ``x0`` is clipped to ``[-s, s]`` and divided by ``s``. Computed in float32.
    """
    dtype = x0.dtype
    flat = x0.float().reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value)  # (B,)
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return (torch.maximum(torch.minimum(x0.float(), s), -s) / s).to(dtype)


def upsample(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling of (B, C, h, w) to (B, C, size, size), as IF stage II does it."""
    return F.interpolate(image, (size, size), mode="bilinear", align_corners=True)


def noise_augment(image: torch.Tensor, noise: torch.Tensor, noise_level: torch.Tensor, noising_scheduler):
    """Noise-conditioning augmentation: ``q_sample(image, noise_level)`` with a DDPM scheduler.

    Args:
        image: (B, C, H, W) in [-1, 1]; noise: same shape; noise_level: (B,) integer timesteps.
    """
    return noising_scheduler.add_noise(image, noise, timesteps=noise_level)


def pixel_unshuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C*r*r, H/r, W/r); identity for ``factor == 1``."""
    return x if factor == 1 else F.pixel_unshuffle(x, factor)


def coordinate_grid(batch: int, side: int, device=None, dtype=None) -> torch.Tensor:
    """(B, 2, side, side) pixel-centre coordinates in (-1, 1): channel 0 is x (left -1 -> right
    +1), channel 1 is y (top -1 -> bottom +1). CoordConv input channels (Liu et al. 2018) for a
    base UNet that must place objects at absolute positions ("on the left", "at the top")."""
    axis = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x, y]).to(dtype=dtype).unsqueeze(0).expand(batch, -1, -1, -1)


def append_coordinates(x: torch.Tensor, coord_channels: int) -> torch.Tensor:
    """``x`` (B, C, S, S) with :func:`coordinate_grid` appended on channels when ``coord_channels``
    (a pipeline's ``coord_channels``: 0 or 2) asks for it; ``x`` itself otherwise."""
    if not coord_channels:
        return x
    return torch.cat([x, coordinate_grid(x.shape[0], x.shape[-1], x.device, x.dtype)], dim=1)


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C*r*r, H/r, W/r) -> (B, C, H, W); identity for ``factor == 1``."""
    return x if factor == 1 else F.pixel_shuffle(x, factor)


def denoise(
    model_fn: ModelFn,
    scheduler,
    sample: torch.Tensor,
    timesteps: Iterable,
    *,
    guidance_scale: float = 1.0,
    do_classifier_free_guidance: bool = False,
    guidance_interval=FULL_INTERVAL,
    cond_image: torch.Tensor | None = None,
    step_kwargs: Callable[[int, torch.Tensor], dict] | dict | None = None,
    progress_bar=None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    denoising_end: float = 1.0,
) -> torch.Tensor:
    """Run one diffusion stage: ``x_T -> x_0`` with a diffusers scheduler.

    Each step: concatenate the conditioning image on channels (super-resolution stages),
    duplicate for CFG, ``scheduler.scale_model_input``, call the model, combine the halves with
    :func:`classifier_free_guidance`, drop a learned variance the scheduler does not use, and
    ``scheduler.step``.

    Args:
        model_fn: see :data:`ModelFn`.
        scheduler: a diffusers scheduler on which ``set_timesteps`` was called.
        sample: (B, C, ...) the initial noise, already scaled by ``init_noise_sigma``.
        timesteps: the scheduler's timesteps.
        guidance_interval: ``(start, stop)``, the fraction of the steps that are guided when
            ``do_classifier_free_guidance`` (:func:`guided_steps`); the others run the
            conditional half only, and ``model_fn`` must then take the conditional rows of its
            conditioning (:func:`conditional_rows`).
        cond_image: (B, C_c, H, W) concatenated after ``sample`` on the channel axis.
        step_kwargs: extra ``scheduler.step`` keywords (``generator``, ``eta``,
            ``prev_timestep``...), or a function ``(i, t) -> dict``.
        progress_bar: anything with ``update()``.
        callback: ``callback(i, t, sample)`` after each step.
        denoising_end: in (0, 1]; below 1 the stage stops after the first
            ``denoising_steps(len(timesteps), denoising_end)`` steps and returns the model's
            prediction of x0 at the last of them (the scheduler step's ``pred_original_sample``)
            instead of running the low-noise steps (:func:`denoising_steps`). The guidance
            interval stays a fraction of all the steps.

    Returns:
        (B, C, ...) the denoised sample.
    """
    sample_channels = sample.shape[1]
    timesteps = list(timesteps)
    guided = guided_steps(len(timesteps), guidance_interval)
    variance_type = getattr(scheduler.config, "variance_type", None)
    run = denoising_steps(len(timesteps), denoising_end)
    for i, t in enumerate(timesteps[:run]):
        cfg = do_classifier_free_guidance and guided[i]
        model_input = sample if cond_image is None else torch.cat([sample, cond_image], dim=1)
        if cfg:
            model_input = torch.cat([model_input] * 2)
        model_input = scheduler.scale_model_input(model_input, t)

        model_output = model_fn(model_input, t, i)

        if cfg:
            model_output = classifier_free_guidance(model_output, guidance_scale, sample_channels)
        if model_output.shape[1] != sample_channels and variance_type not in ("learned", "learned_range"):
            model_output = model_output[:, :sample_channels]

        kwargs = step_kwargs(i, t) if callable(step_kwargs) else (step_kwargs or {})
        if run < len(timesteps) and i == run - 1:  # the last step run: its x0 prediction is the output
            out = scheduler.step(model_output, t, sample, **kwargs, return_dict=True)
            if getattr(out, "pred_original_sample", None) is None:
                raise ValueError(f"denoising_end={denoising_end!r} needs a scheduler whose step returns its x0 "
                                 f"prediction (DDPM, DDIM, Euler); {type(scheduler).__name__} does not")  # fmt: skip
            sample = out.pred_original_sample
        else:
            sample = scheduler.step(model_output, t, sample, **kwargs, return_dict=False)[0]

        if progress_bar is not None:
            progress_bar.update()
        if callback is not None:
            callback(i, t, sample)
    return sample


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def x0_from_prediction(output: torch.Tensor, sample: torch.Tensor, alpha_cumprod, prediction_type: str) -> torch.Tensor:
    """The x0 estimate a model output of ``prediction_type`` makes of ``sample`` (x_t, variance
    preserving) at a timestep whose ``alphas_cumprod`` is ``alpha_cumprod`` (a float or a tensor
    that broadcasts): DDPM's ``pred_original_sample``."""
    a = torch.as_tensor(alpha_cumprod, dtype=sample.dtype, device=sample.device)
    if prediction_type == "sample":
        return output
    if prediction_type == "epsilon":
        return (sample - (1 - a).sqrt() * output) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * output
    raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")


def prediction_from_x0(x0: torch.Tensor, sample: torch.Tensor, alpha_cumprod, prediction_type: str) -> torch.Tensor:
    """The model output of ``prediction_type`` that makes ``x0`` its estimate of ``sample`` (the
    inverse of :func:`x0_from_prediction`): how a refiner's estimate enters a base's scheduler."""
    a = torch.as_tensor(alpha_cumprod, dtype=sample.dtype, device=sample.device)
    if prediction_type == "sample":
        return x0
    if prediction_type == "epsilon":
        return (sample - a.sqrt() * x0) / (1 - a).sqrt()
    if prediction_type == "v_prediction":
        return (a.sqrt() * sample - x0) / (1 - a).sqrt()
    raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")


def denoising_steps(num_steps: int, denoising_end: float = 1.0) -> int:
    """How many of a stage's ``num_steps`` steps run with ``denoising_end`` (a fraction in (0, 1]
    of the steps, as diffusers' ``denoising_end``): ``round(num_steps * denoising_end)``, at
    least 1. ValueError naming a value outside (0, 1].

    Why (nineteenth session, docs/model_card.md): the embedded Imagen base's x0 prediction draws a
    square's edges cleanest in the middle of its schedule; the last, low-noise steps keep the
    sampling noise along an edge as a ragged half-covered row, which turns the square's box fill
    into a circle's. Stopping there and returning the x0 prediction is the model's own estimate
    of the clean image, with no noise left in it. Measured, it did not pay: 0.84 scored 80.3%
    against 80.7% on the standard 600 images (paired z -0.2). The base returns ragged edges even
    from a clean true render (``scripts/probe_square_edges.py``), so it stays off by default."""
    if isinstance(denoising_end, bool) or not isinstance(denoising_end, numbers.Real) or not 0.0 < denoising_end <= 1.0:
        raise ValueError(f"denoising_end={denoising_end!r} must be a number in (0, 1]: the fraction of the steps to run")
    return max(1, min(num_steps, int(round(num_steps * float(denoising_end)))))


def strength_timesteps(scheduler, num_inference_steps: int, strength: float) -> torch.Tensor:
    """The tail of ``scheduler.timesteps`` that an img2img start at ``strength`` runs, as
    diffusers' img2img pipelines pick it: the last ``int(num_inference_steps * strength)``
    steps (times the scheduler's ``order``). ``set_timesteps`` must have been called; the
    scheduler's begin index is moved to the first of them."""
    run = min(int(num_inference_steps * strength), num_inference_steps)
    begin = max(num_inference_steps - run, 0) * getattr(scheduler, "order", 1)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]


def scheduler_step_kwargs(scheduler, generator=None, eta: float = 0.0) -> dict:
    """The ``generator``/``eta`` keywords that this scheduler's ``step`` accepts (as diffusers'
    ``prepare_extra_step_kwargs`` does), and ``use_clipped_model_output=True`` for a DDIM-style
    step whose scheduler clips or thresholds its x0 prediction.

    Why (twenty-fourth session, a bug): DDIM's step derives the noise it carries forward from the
    model's raw x0 prediction, before its own clipping / dynamic thresholding. Under classifier-free
    guidance an x0-predicting model's guided x0 lies far outside [-1, 1] (guidance 4 extrapolates
    the two halves), so that noise was wrong at every step and ``scheduler="ddim"`` drew coloured
    noise with the embedded Imagen default at its guidance 4 (0 of 8 probe prompts right, median
    pixel 128, against 7 of 8 with DDPM), and likewise with guidance 2. DDPM's posterior uses the
    thresholded x0, and GLIDE re-derives the noise from the clipped x0 -- diffusers' DDIM does so
    when asked (``use_clipped_model_output``); the clip then means what it means in DDPM."""
    import inspect

    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    config = getattr(scheduler, "config", {})
    if "use_clipped_model_output" in params and (config.get("thresholding") or config.get("clip_sample")):
        kwargs["use_clipped_model_output"] = True
    return kwargs


# ---------------------------------------------------------------------- schedulers by name
SCHEDULERS = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}
"""Scheduler names accepted by ``generate(scheduler=...)`` -> (diffusers class, config overrides)."""


def make_scheduler(name: str, config) -> object:
    """A diffusers scheduler of kind ``name`` built from another scheduler's ``config`` (so the
    training schedule -- betas, prediction type, thresholding -- carries over)."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is not known; use one of {sorted(SCHEDULERS)}")
    cls_name, overrides = SCHEDULERS[name]
    config = dict(config)
    if config.get("variance_type") in ("learned", "learned_range") and name != "ddpm":
        config["variance_type"] = None  # only DDPM samples the learned variance; the rest drop it
    return getattr(diffusers, cls_name).from_config(config, **overrides)
