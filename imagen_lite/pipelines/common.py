"""Small functions both pipeline families call: input checks, per-stage settings, tokenising
with a truncation warning, post-processing, and the fp16 NaN guard.

Kept as functions (not a base class) so each pipeline file reads top to bottom on its own.
"""

from __future__ import annotations

import functools
import logging
import time
from contextlib import contextmanager
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("imagen_lite")

OUTPUT_TYPES = ("pil", "np", "pt")


def check_prompt(prompt, name: str = "prompt") -> list[str]:
    """A non-empty string or non-empty list of non-empty strings -> list[str]."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(f"{name}={prompt!r} is not valid; pass a non-empty string or a non-empty list of strings")
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"{name} must contain only strings, got {p!r} of type {type(p).__name__}")
        if not p.strip():
            raise ValueError(f"{name}={p!r} is empty; pass a non-empty string")
    return list(prompts)


def _check_count(value, n: int, stages, model_stages, name: str, what: str) -> None:
    """A per-stage tuple of ``n`` entries (``what``: "value" or "pair") covers the stages a call
    runs and may be longer, up to the stages the model has (``model_stages``, when given)."""
    if n < len(stages):
        raise ValueError(f"{name}={value!r} gives {n} {what}(s) but this call runs {len(stages)} stage(s) "
                         f"{tuple(stages)}; pass one {what} or one per stage")  # fmt: skip
    if model_stages is not None and n > len(model_stages):
        raise ValueError(f"{name}={value!r} gives {n} {what}s but this model has {len(model_stages)} stage(s) "
                         f"{tuple(model_stages)}; pass one {what} or one per stage")  # fmt: skip


def is_guidance_scale(v) -> bool:
    """Whether ``v`` is a valid guidance scale: a finite real number >= 0 (not a bool)."""
    return not isinstance(v, bool) and isinstance(v, (int, float, np.floating, np.integer)) and bool(np.isfinite(v)) and v >= 0


def per_stage(value, stages: Sequence[str], name: str, *, kind: str, model_stages: Sequence[str] | None = None) -> tuple:
    """Expand one value or a tuple (one per stage) into a tuple of ``len(stages)`` checked values.

    ``kind="steps"``: positive ints. ``kind="guidance"``: floats >= 0. ``kind="timestep"``: ints >= 0. A tuple shorter than
    ``stages`` is an error (it would leave a stage undefined); a longer one is allowed up to
    ``model_stages`` (all the model's stages, when given), so a 2-stage tuple serves a call that
    runs only the base, while a 3-stage tuple for a 2-stage cascade is an error, not cut.
    """
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * len(stages)
    _check_count(value, len(values), stages, model_stages, name, "value")
    out = []
    for stage, v in zip(stages, values):
        if kind in ("steps", "timestep"):
            low = 1 if kind == "steps" else 0
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                what = "a positive integer" if kind == "steps" else "a timestep, an integer >= 0"
                raise ValueError(f"{name} for stage {stage!r} is {v!r}; it must be {what}")
            out.append(int(v))
        else:
            if not is_guidance_scale(v):
                raise ValueError(f"{name} for stage {stage!r} is {v!r}; it must be a number >= 0")
            out.append(float(v))
    return tuple(out)


def is_one_interval(value) -> bool:
    """Whether a ``guidance_interval`` is one ``(start, stop)`` pair (for every stage) rather than
    a sequence of pairs, one per stage."""
    return not (isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)))


def per_stage_intervals(
    value, stages: Sequence[str], name: str = "guidance_interval", model_stages: Sequence[str] | None = None
) -> tuple:
    """``guidance_interval`` per stage: one ``(start, stop)`` pair for every stage, or a tuple of
    pairs, one per stage (longer allowed up to ``model_stages``, as :func:`per_stage`). Each pair is checked by
    :func:`imagen_lite.sampling.check_guidance_interval`."""
    from ..sampling import check_guidance_interval

    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name}={value!r} must be a pair (start, stop) or one pair per stage {tuple(stages)}")
    if is_one_interval(value):
        return (check_guidance_interval(value, name),) * len(stages)
    values = tuple(value)
    _check_count(value, len(values), stages, model_stages, name, "pair")
    return tuple(check_guidance_interval(v, f"{name} for stage {stage!r}") for stage, v in zip(stages, values))


def check_coord_channels(coord_channels, unet, what: str) -> None:
    """A pipeline's ``coord_channels`` (x/y input channels of ``unet``, named ``what``): 0 or 2,
    leaving the UNet at least one image channel."""
    if coord_channels not in (0, 2):
        raise ValueError(f"coord_channels={coord_channels!r}: 0 (none) or 2 (x and y) are allowed")
    if unet is not None and coord_channels >= unet.config.in_channels:
        raise ValueError(f"coord_channels={coord_channels} leaves no image channel: {what} takes "
                         f"{unet.config.in_channels} input channels")  # fmt: skip


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r} is not valid; use one of {OUTPUT_TYPES}")


def tokenize(tokenizer, texts: list[str], max_length: int):
    """Pad to ``max_length``; warn (naming what was cut) when a prompt is longer."""
    inputs = tokenizer(
        texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True, return_tensors="pt"
    )
    untruncated = tokenizer(texts, padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] > inputs.input_ids.shape[-1]:
        removed = tokenizer.batch_decode(untruncated[:, max_length - 1 : -1])
        logger.warning(
            "The following part of your input was truncated because the text encoder takes at most %d tokens: %s",
            max_length,
            removed,
        )
    return inputs


def postprocess(x: torch.Tensor, output_type: str):
    """(N, 3, H, W) in [-1, 1] -> PIL list / float array in [0, 1] / the raw tensor."""
    if output_type == "pt":
        return x
    arr = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return arr
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arr]


def finish(pipe, image: torch.Tensor, output_type: str, return_dict: bool, stage_outputs: dict, seconds: dict,
           return_stage_outputs: bool):
    """The end of both families' ``__call__``: free offload hooks, post-process the last
    stage's image, and wrap it (with per-stage images and seconds) as diffusers callers expect."""
    from .output import ImageLiteOutput

    pipe.maybe_free_model_hooks()
    images = postprocess(image, output_type)
    if not return_dict:
        return (images,)
    return ImageLiteOutput(images=images, stage_images=stage_outputs if return_stage_outputs else {}, stage_seconds=seconds)


@contextmanager
def timed(store: dict, name: str):
    start = time.perf_counter()
    yield
    store[name] = store.get(name, 0.0) + time.perf_counter() - start


def run_finite(stage: str, fn: Callable[[], torch.Tensor], modules: list, generator=None) -> torch.Tensor:
    """Run ``fn``; if a half-precision result holds NaN/inf, re-run the stage in float32.

    The offending ``modules`` are upcast to float32 (and stay so for later calls, with a
    warning naming them), and the generator is restored to its state before the first try, so
    the rerun draws the same noise.
    """
    state = generator.get_state() if isinstance(generator, torch.Generator) else None
    out = fn()
    if torch.isfinite(out).all() or out.dtype == torch.float32:
        return out
    names = [type(m).__name__ for m in modules if m is not None]
    logger.warning("stage %r produced NaN/inf in %s; re-running it in float32 (%s upcast)", stage, out.dtype, names)
    import warnings

    warnings.warn(f"stage {stage!r} produced NaN/inf in {out.dtype}; re-ran it with {names} in float32", RuntimeWarning)
    with torch.inference_mode(False):  # parameters stay ordinary tensors (trainable later)
        for m in modules:
            if m is not None:
                m.to(torch.float32)
    if state is not None:
        generator.set_state(state)
    return fn()


def inference_call(call: Callable) -> Callable:
    """Decorate a pipeline's ``__call__``: run it under ``torch.inference_mode`` and hand back
    ordinary tensors.

    ``inference_mode`` is ``no_grad`` without the per-tensor bookkeeping (version counters,
    view tracking), which is a measurable share of a small network's step on a CPU; the
    numbers are the same. Tensors made inside it cannot be updated in place outside it, so
    the tensors in the result are copied out (images and stage outputs: small)."""

    @functools.wraps(call)
    def wrapper(*args, **kwargs):
        with torch.inference_mode():
            out = call(*args, **kwargs)
        with torch.no_grad():
            return _ordinary(out)

    return wrapper


def _ordinary(x):
    """``x`` with every inference tensor inside (dataclass fields, dicts, lists, tuples) cloned."""
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_inference() else x
    if isinstance(x, dict):
        for k in list(x):  # in place: BaseOutput is a dict whose fields mirror its keys
            x[k] = _ordinary(x[k])
        return x
    if isinstance(x, list):
        return [_ordinary(v) for v in x]
    if isinstance(x, tuple):
        return type(x)(*(_ordinary(v) for v in x)) if hasattr(x, "_fields") else tuple(_ordinary(v) for v in x)
    return x


def load_scheduler(repo: str, subfolder: str, default: str, **kw):
    """A scheduler of the class its ``scheduler_config.json`` names (``default`` when it names
    none: IF ships DDPMScheduler, Karlo UnCLIPScheduler), from a hub id or a local directory."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(repo, subfolder=subfolder, **kw)  # reads the JSON only
    cls = getattr(diffusers, config.get("_class_name", default), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"{repo}/{subfolder} names scheduler {config.get('_class_name')!r}, which diffusers lacks")
    return cls.from_config(config)
