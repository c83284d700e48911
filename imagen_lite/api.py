"""``generate()`` and ``load_pipeline()``: the public entry points.

``generate()`` checks its arguments before loading anything, resolves ``device``/``dtype``
(``runtime.py``), loads the pipeline once per (family, model, device, dtype, offload) and keeps
it cached, maps ``size`` to the number of stages, fills per-stage defaults from the model's
preset, seeds a generator on the execution device (diffusers' semantics), and returns PIL
images. With ``device="auto"`` a CUDA out-of-memory falls back to model CPU offload and then to
the CPU, with a warning each time.

``model`` is one of: ``None`` (the embedded default), a preset name (``presets.PRESETS``), a
local pipeline directory (imagen-lite's own, or a DeepFloyd IF / Karlo layout), or for the
Imagen family a dict ``{"base": ID_OR_DIR, "sr": [ID_OR_DIR, ...]}`` of IF-layout repos.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import presets, runtime
from .pipelines.common import check_prompt, is_one_interval, per_stage, per_stage_intervals
from .sampling import SCHEDULERS, make_scheduler

logger = logging.getLogger("imagen_lite")

# the seeds torch.Generator.manual_seed takes
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1

_CACHE: dict = {}


def check_seed_range(seed: int, name: str = "seed") -> None:
    """An integer seed outside torch.Generator.manual_seed's range is a ValueError naming it
    (torch itself says only "Overflow when unpacking long long"). Used by generate() and
    compare()."""
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"{name}={seed!r} is out of range; use an integer in [{SEED_MIN}, {SEED_MAX}]")


@dataclass
class Loaded:
    pipe: object
    preset: presets.Preset  # where the per-stage defaults come from
    description: str


def _model_key(model):
    if isinstance(model, dict):
        return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in model.items()))
    return model


def _random_default(pipeline: str):
    """Until trained weights ship for a family: a random tiny pipeline, with a warning."""
    warnings.warn(
        f"no trained embedded default for pipeline={pipeline!r} is installed; using a RANDOMLY "
        "INITIALISED tiny pipeline (outputs are noise). Train one with scripts/train_default.py "
        "or pass model=.",
        UserWarning,
        stacklevel=4,
    )
    if pipeline == "imagen":
        from .models.tiny import build_tiny_imagen

        return build_tiny_imagen()
    from .pipelines.unclip import build_tiny_unclip

    return build_tiny_unclip()


def _load(pipeline: str, model, torch_dtype) -> Loaded:
    """Build the pipeline object on the CPU (placement happens in ``runtime.place``)."""
    from .pipelines.imagen import ImagenPipeline, from_if_repos

    if model is None:
        preset = presets.DEFAULT_IMAGEN if pipeline == "imagen" else presets.DEFAULT_DALLE2
        directory = Path(preset.components["dir"])
        if not (directory / "model_index.json").is_file():
            return Loaded(_random_default(pipeline), preset, f"random tiny {pipeline} pipeline (no embedded weights)")
        model = str(directory)
        description = f"embedded default {pipeline} model ({directory})"
    else:
        description = f"model {model!r}"

    if isinstance(model, dict):
        if pipeline != "imagen":
            raise ValueError(f"model as a dict of stages is only for pipeline='imagen', not {pipeline!r}")
        unknown = set(model) - {"base", "sr"}
        if unknown or "base" not in model:
            raise ValueError(f"model dict keys are {sorted(model)}; expected 'base' and optionally 'sr' (a list)")
        sr = model.get("sr") or []
        sr = [sr] if isinstance(sr, str) else list(sr)
        base = model["base"]
        base = presets.PRESETS[base].components["base"] if base in presets.PRESETS else base
        sr = [presets.SR_ALIASES.get(s, s) for s in sr]
        pipe = from_if_repos(base, sr, torch_dtype=torch_dtype)
        return Loaded(pipe, presets.PRESETS["if-xl"], f"IF stages base={base!r} sr={sr!r}")

    if not isinstance(model, (str, Path)):
        raise ValueError(f"model={model!r} is not valid; pass None, a preset name {sorted(presets.PRESETS)}, a directory or a dict")
    model = str(model)
    if model in presets.PRESETS:
        preset = presets.PRESETS[model]
        if preset.pipeline != pipeline:
            raise ValueError(f"preset {model!r} is a {preset.pipeline!r} model; call with pipeline={preset.pipeline!r}")
        if pipeline == "imagen":
            pipe = from_if_repos(preset.components["base"], preset.components["sr"], variant=preset.variant, torch_dtype=torch_dtype)
        else:
            from .pipelines.unclip import from_karlo_repo

            pipe = from_karlo_repo(preset.components["repo"], torch_dtype=torch_dtype)
        return Loaded(pipe, preset, f"preset {model!r}")

    if presets.looks_like_hub_id(model):  # an IF / Karlo layout repo on the hub (needs a network)
        if pipeline == "imagen":
            return Loaded(from_if_repos(model, [], torch_dtype=torch_dtype), presets.PRESETS["if-xl"], description)
        from .pipelines.unclip import from_karlo_repo

        return Loaded(from_karlo_repo(model, torch_dtype=torch_dtype), presets.PRESETS["karlo"], description)
    if not presets.looks_like_path(model):
        raise ValueError(
            f"model={model!r} is neither a known preset {sorted(presets.PRESETS)} nor an existing directory"
        )
    if pipeline == "imagen":
        path = presets.check_model_dir(model, ("ImagenPipeline", "IFPipeline"))
        cls = presets.pipeline_class_of(path)
        if cls == "IFPipeline":
            return Loaded(from_if_repos(str(path), [], torch_dtype=torch_dtype), presets.PRESETS["if-xl"], description)
        pipe = ImagenPipeline.from_pretrained(path, **runtime.dtype_kwargs(torch_dtype), use_safetensors=True)
        preset = _dir_preset(path, pipeline, presets.DEFAULT_IMAGEN)
    else:
        from .pipelines.unclip import UnCLIPLitePipeline, from_karlo_repo

        path = presets.check_model_dir(model, ("UnCLIPLitePipeline", "UnCLIPPipeline"))
        if presets.pipeline_class_of(path) == "UnCLIPPipeline":
            return Loaded(from_karlo_repo(str(path), torch_dtype=torch_dtype), presets.PRESETS["karlo"], description)
        shared = {**shared_refiner(path, torch_dtype), **shared_sr(path, torch_dtype)}
        pipe = UnCLIPLitePipeline.from_pretrained(path, **runtime.dtype_kwargs(torch_dtype), use_safetensors=True, **shared)
        preset = _dir_preset(path, pipeline, presets.DEFAULT_DALLE2)
    return Loaded(pipe, preset, description)


SHARED_REFINER_KEY = "shared_refiner"
SHARED_SR_KEY = "shared_sr"


def _sibling(path: Path, key: str, needs: str, what: str) -> Path | None:
    """The sibling directory a DALL-E 2 directory's defaults file names under ``key`` (None when
    it names none); ValueError, naming ``what`` it borrows, when that sibling lacks ``needs``."""
    sibling = presets.read_defaults(path).get(key)
    if not sibling:
        return None
    source = (Path(path).parent / sibling).resolve()
    if not (source / needs / "config.json").is_file():
        raise ValueError(f"{str(path)!r} borrows {what} from {str(source)!r} ({key}={sibling!r} in "
                         f"{presets.DEFAULTS_FILE}), which has no {needs}/")  # fmt: skip
    return source


def shared_sr(path: Path, torch_dtype=None) -> dict:
    """The Imagen-style SR stage a DALL-E 2 directory borrows from a sibling Imagen directory, as
    ``from_pretrained`` keyword overrides (empty when its defaults file names none).

    Decision (twenty-sixth session): the embedded DALL-E 2 default super-resolves with the Imagen
    default's SR run on the null text (T5 of "", that SR's caption-dropout input), so it sees the
    64 px image alone, as Karlo's SR does. Measured on the standard 600 at 256 px it scores as
    DALL-E 2's own SR did (83.7% against 83.8%, paired 1 / 2), and its own SR's training hours
    leave the budget (docs/model_card.md, "Twenty-sixth session"). The directory's
    ``imagen_lite_defaults.json`` names the sibling (``"shared_sr": "imagen"``); every part loads
    with plain diffusers/transformers classes, and a directory saved from the loaded pipeline
    holds its own copy."""
    import diffusers
    import transformers

    source = _sibling(path, SHARED_SR_KEY, "sr_unet", "its SR")
    if source is None:
        return {}
    index = json.loads((source / "model_index.json").read_text())
    dtype = runtime.dtype_kwargs(torch_dtype)

    def cls(name, module):
        return getattr(module, index[name][1])

    return dict(
        sr_unet=diffusers.UNet2DConditionModel.from_pretrained(source / "sr_unet", use_safetensors=True, **dtype),
        sr_scheduler=cls("sr_scheduler", diffusers).from_pretrained(source / "sr_scheduler"),
        image_noising_scheduler=cls("image_noising_scheduler", diffusers).from_pretrained(source / "image_noising_scheduler"),
        sr_text_encoder=cls("text_encoder", transformers).from_pretrained(source / "text_encoder", use_safetensors=True, **dtype),
        sr_tokenizer=cls("tokenizer", transformers).from_pretrained(source / "tokenizer"),
        sr_unshuffle_factor=int(index.get("sr_unshuffle_factor", 1)),
        sr_max_sequence_length=int(index.get("max_sequence_length", 77)),
    )  # fmt: skip


def shared_refiner(path: Path, torch_dtype=None) -> dict:
    """The refiner components a DALL-E 2 directory borrows from a sibling Imagen directory, as
    ``from_pretrained`` keyword overrides (empty when its defaults file names none).

    Decision (twenty-second session): the embedded DALL-E 2 default runs the Imagen default's
    low-noise refiner on its decoder's last steps (an unconditional 64 px model of shapes renders,
    on the same cosine schedule), and the package holds that refiner once: a copy would take the
    weights over the issue's 40 MiB. The DALL-E 2 directory's ``imagen_lite_defaults.json`` names
    the sibling (``"shared_refiner": "imagen"``); the refiner loads from there with plain diffusers
    classes, and a directory saved from the loaded pipeline holds its own copy."""
    from diffusers import DDPMScheduler, UNet2DModel

    source = _sibling(path, SHARED_REFINER_KEY, "refiner", "its refiner")
    if source is None:
        return {}
    index = json.loads((source / "model_index.json").read_text())
    return dict(refiner=UNet2DModel.from_pretrained(source / "refiner", use_safetensors=True, **runtime.dtype_kwargs(torch_dtype)),
                refiner_scheduler=DDPMScheduler.from_pretrained(source / "refiner_scheduler"),
                refiner_max_timestep=int(index.get("refiner_max_timestep", 0)))  # fmt: skip


def _dir_preset(path: Path, pipeline: str, fallback: presets.Preset) -> presets.Preset:
    """Generation defaults saved beside a pipeline directory, else the family's defaults."""
    d = presets.read_defaults(path)
    if not d:
        return fallback
    return presets.Preset(
        str(path), pipeline, {"dir": str(path)},
        tuple(d.get("num_inference_steps", fallback.num_inference_steps)),
        tuple(d.get("guidance_scale", fallback.guidance_scale)),
        int(d.get("noise_level", fallback.noise_level)),
        sr_strength=float(d.get("sr_strength", fallback.sr_strength)),
        guidance_interval=_pairs(d.get("guidance_interval", fallback.guidance_interval)),
        extra={"scheduler": d.get("scheduler"), "text_guidance_scale": d.get("text_guidance_scale"),
               "denoising_end": d.get("denoising_end"), "refiner_start": d.get("refiner_start"),
               "decoder_candidates": d.get("decoder_candidates"), "saves_sr": "sr_strength" in d},
    )  # fmt: skip


def _pairs(value) -> tuple:
    """A JSON ``guidance_interval`` (a pair, or a list of pairs) as tuples."""
    return tuple(value) if is_one_interval(value) else tuple(tuple(v) for v in value)


def load_pipeline(pipeline: str = "imagen", model=None, device="auto", dtype="auto", offload: bool = False,
                  scheduler: str | None = None, lora=None, compile: bool = False):
    """Load (or fetch from the cache) a pipeline placed on ``device`` in ``dtype``.

    ``compile=True`` wraps the denoising networks in ``torch.compile`` (opt-in: each new shape
    pays a compilation, minutes on a CPU, before it runs faster; see
    :func:`imagen_lite.pipelines.speed.compile_models`). Not with ``offload``.

    Returns the diffusers pipeline object (``ImagenPipeline`` or ``UnCLIPLitePipeline``); its
    ``imagen_lite_preset`` attribute holds the per-stage defaults ``generate()`` uses and
    ``imagen_lite_source`` says what was loaded (e.g. which embedded default, or that none is
    installed); the same line is logged at INFO level on the ``imagen_lite`` logger.
    """
    presets.check_pipeline(pipeline)
    dev = runtime.resolve_device(device)
    dt = runtime.resolve_dtype(dtype, dev)
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r} is not known; use one of {sorted(SCHEDULERS)}")
    if not isinstance(compile, bool):
        raise ValueError(f"compile={compile!r} must be True or False")
    if compile and offload:
        raise ValueError("compile=True and offload=True do not go together (offload hooks re-enter the compiled graphs)")

    def load(d, t, off):
        if compile:
            return _load_compiled(pipeline, model, d, t, offload or off, scheduler, lora)
        return _load_placed(pipeline, model, d, t, offload or off, scheduler, lora)

    return runtime.run_with_fallback(load, dev, dt, auto=(device in (None, "auto")) and not offload)


def _load_compiled(pipeline, model, device, dtype, offload, scheduler=None, lora=None):
    """A compiled twin of the cached pipeline, cached apart (the plain one stays plain)."""
    from .pipelines.speed import compile_models

    key = ("compiled", pipeline, _model_key(model), str(device), str(dtype), offload, scheduler, str(lora) if lora else None)
    if key not in _CACHE:
        plain = _load_placed(pipeline, model, device, dtype, offload, scheduler, lora)
        pipe = type(plain)(**plain.components, **{k: v for k, v in plain.config.items() if not k.startswith("_") and k not in plain.components})
        pipe.imagen_lite_preset, pipe.imagen_lite_source = plain.imagen_lite_preset, plain.imagen_lite_source
        names = compile_models(pipe)
        logger.info("torch.compile on %s (compiled at the first call of each shape)", names)
        _CACHE[key] = pipe
    return _CACHE[key]


def _load_placed(pipeline, model, device, dtype, offload, scheduler=None, lora=None):
    key = (pipeline, _model_key(model), str(device), str(dtype), offload, scheduler, str(lora) if lora else None)
    if key in _CACHE:
        return _CACHE[key]
    loaded = _load(pipeline, model, dtype)
    pipe = loaded.pipe
    if lora is not None:
        from .training.lora import load_lora

        load_lora(pipe, lora)
    runtime.place(pipe, device, dtype, offload)
    name = scheduler or loaded.preset.extra.get("scheduler")
    if name:
        for attr in ("scheduler", "decoder_scheduler"):
            if getattr(pipe, attr, None) is not None:
                setattr(pipe, attr, make_scheduler(name, getattr(pipe, attr).config))
    pipe.imagen_lite_preset = loaded.preset
    pipe.imagen_lite_source = loaded.description
    logger.info("loaded %s on %s (%s)%s", loaded.description, device, dtype, " with CPU offload" if offload else "")
    _CACHE[key] = pipe
    return pipe


IMAGEN_ONLY_KWARGS = ("noise_level", "sr_strength", "denoising_end")
"""Pipeline-call keywords of the Imagen family's stages (its SR stages; the base's early stop);
the unCLIP family has no such knobs. (``refiner_start`` is both families': the DALL-E 2 decoder
takes a low-noise refiner since the twenty-second session.)"""


def check_family_kwargs(pipeline: str, kwargs: dict) -> None:
    """Name an Imagen-only keyword given to another family, before anything loads (the unCLIP
    pipeline would otherwise fail deep inside with a TypeError)."""
    if pipeline == "imagen":
        return
    for name in IMAGEN_ONLY_KWARGS:
        if name in kwargs:
            raise ValueError(f"{name}={kwargs[name]!r} applies to pipeline='imagen' only (its SR stages); "
                             f"pipeline={pipeline!r} takes no {name}")  # fmt: skip


# the pipeline-call keywords generate() sets itself (from its own arguments)
_SET_BY_GENERATE = ("self", "prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "num_stages",
                    "num_images_per_prompt", "generator")  # fmt: skip


def check_call_kwargs(pipeline: str, kwargs: dict) -> None:
    """Name a keyword that neither ``generate()`` nor the family's pipeline call takes, before
    anything loads (it would otherwise be a TypeError from the pipeline, after the load)."""
    import inspect

    if pipeline == "imagen":
        from .pipelines.imagen import ImagenPipeline as cls
    else:
        from .pipelines.unclip import UnCLIPLitePipeline as cls
    allowed = [k for k in inspect.signature(cls.__call__).parameters if k not in _SET_BY_GENERATE] + ["lora"]
    for name in kwargs:
        if name not in allowed:
            raise ValueError(f"{name}={kwargs[name]!r} is not a keyword of generate() nor of the {pipeline!r} "
                             f"pipeline; its extra keywords are {allowed}")  # fmt: skip


def family_call_defaults(pipeline: str, preset: presets.Preset) -> dict:
    """The pipeline-call keywords a model's preset fills in when the caller gives none: its
    ``guidance_interval``, for DALL-E 2 a saved ``text_guidance_scale``, ``refiner_start`` and
    ``decoder_candidates`` (twenty-ninth session), and
    for the Imagen family its :data:`IMAGEN_ONLY_KWARGS` and ``refiner_start`` (``denoising_end`` and
    ``refiner_start`` only where its defaults file saves them)."""
    if pipeline != "imagen":  # a saved text_guidance_scale (three-branch decoder guidance) / refiner_start are dalle2 defaults too
        saved = {k: preset.extra.get(k) for k in ("text_guidance_scale", "refiner_start", "decoder_candidates")}
        if preset.extra.get("saves_sr"):  # an Imagen-style SR stage's settings (twenty-sixth session)
            saved.update(noise_level=preset.noise_level, sr_strength=preset.sr_strength)
        return {"guidance_interval": preset.guidance_interval, **{k: v for k, v in saved.items() if v is not None}}
    saved = {k: preset.extra.get(k) for k in ("denoising_end", "refiner_start")}  # nineteenth, twentieth sessions
    return {"guidance_interval": preset.guidance_interval, "noise_level": preset.noise_level,
            "sr_strength": preset.sr_strength, **{k: v for k, v in saved.items() if v is not None}}  # fmt: skip


def generate(
    prompt,
    pipeline: str = "imagen",
    model=None,
    size: int | None = None,
    num_images_per_prompt: int = 1,
    num_inference_steps=None,
    guidance_scale=None,
    negative_prompt=None,
    seed: int | None = None,
    device="auto",
    dtype="auto",
    scheduler: str | None = None,
    offload: bool = False,
    **kwargs,
):
    """Text to images with either family. Returns ``list[PIL.Image.Image]``.

    Args:
        prompt: str or list[str].
        pipeline: ``"imagen"`` (T5 -> base -> SR) or ``"dalle2"`` (CLIP -> prior -> decoder -> SR).
        model: None (embedded default), preset name, pipeline directory, or IF stage dict.
        size: output side; picks how many stages run (64 = base/decoder only). None = all.
        num_inference_steps / guidance_scale: one value or one per stage -- (base, sr...) for
            imagen, (prior, decoder, sr) for dalle2; None = the model's defaults.
        seed: as diffusers' ``generator=torch.Generator(device).manual_seed(seed)``.
        device: ``"auto"`` (cuda -> mps -> cpu), ``"cpu"``, ``"cuda"``...; dtype: ``"auto"``
            (float16 on CUDA, else float32), ``"float32"``, ``"float16"``, ``"bfloat16"``.
        scheduler: swap the denoising scheduler by name (see ``sampling.SCHEDULERS``).
        offload: model CPU offload (each component on the GPU only while it runs) -- for
            large presets such as ``if-xl`` on GPUs under ~24 GB.
        **kwargs: passed to the pipeline call (``guidance_interval``: a ``(start, stop)`` pair or
            one per stage, the fraction of a guided stage's steps that use guidance;
            ``noise_level``, ``sr_strength`` for imagen; ``image_embeds`` for dalle2...);
            ``guidance_interval`` and imagen's two default to the model's own.
    """
    # 1. Check inputs before loading anything
    presets.check_pipeline(pipeline)
    prompts = check_prompt(prompt)
    if negative_prompt is not None:
        check_prompt(negative_prompt, "negative_prompt")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed={seed!r} must be an integer or None")
    if seed is not None:
        check_seed_range(seed)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size={size!r} must be a positive integer or None")
    for name, value, kind in (("num_inference_steps", num_inference_steps, "steps"), ("guidance_scale", guidance_scale, "guidance")):
        if value is not None:
            n = len(value) if isinstance(value, (list, tuple)) else 1
            per_stage(value, [f"stage {i}" for i in range(max(n, 1))], name, kind=kind)
    check_family_kwargs(pipeline, kwargs)
    check_call_kwargs(pipeline, kwargs)
    if "guidance_interval" in kwargs:
        value = kwargs["guidance_interval"]
        n = 1 if is_one_interval(value) else len(value)
        per_stage_intervals(value, [f"stage {i}" for i in range(n)])
    dev = runtime.resolve_device(device)
    dt = runtime.resolve_dtype(dtype, dev)
    auto = device in (None, "auto")

    # 2. Load (cached), run, falling back on CUDA OOM when device="auto"
    lora = kwargs.pop("lora", None)

    def run(d, t, off):
        pipe = _load_placed(pipeline, model, d, t, offload or off, scheduler, lora)
        preset = pipe.imagen_lite_preset
        num_stages = pipe.num_stages_for_size(size)
        # A preset's defaults may be longer than the model (IF-XL's (100, 50) for an IF stage I
        # alone): cut them to its stages. A caller's tuple is not cut: the pipeline rejects one
        # longer than the model's stages (a 3-stage tuple for a 2-stage cascade is a mistake).
        n = len(pipe.stage_names)
        steps = _fit(preset.num_inference_steps, n) if num_inference_steps is None else num_inference_steps
        guidance = _fit(preset.guidance_scale, n) if guidance_scale is None else guidance_scale
        defaults = family_call_defaults(pipeline, preset)
        if not is_one_interval(defaults["guidance_interval"]):
            defaults["guidance_interval"] = _fit(defaults["guidance_interval"], n)
        call = {**defaults, **kwargs}
        gen_device = "cpu" if d.type == "mps" else d
        generator = torch.Generator(gen_device).manual_seed(seed) if seed is not None else None
        out = pipe(
            prompt=prompts, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
            num_stages=num_stages, num_images_per_prompt=num_images_per_prompt, generator=generator, **call,
        )  # fmt: skip
        return out.images

    return runtime.run_with_fallback(run, dev, dt, auto=auto and not offload)


def _fit(values, n: int):
    """A preset's per-stage default cut to a model's ``n`` stages (a single value as is)."""
    return tuple(values)[:n] if isinstance(values, (list, tuple)) else values


def clear_cache() -> None:
    """Forget every cached pipeline (frees their memory once no one else holds them)."""
    _CACHE.clear()
