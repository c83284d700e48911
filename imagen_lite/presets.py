"""Named models: hub ids, per-stage generation defaults, and the loaders for each on-disk layout.

A preset is a *generation* setting (which weights, how many steps, which guidance); what a
saved component is lives in its own diffusers ``config.json``. Three layouts load:

1. **imagen-lite pipeline dirs** (``model_index.json`` naming ``ImagenPipeline`` or
   ``UnCLIPLitePipeline``), written by ``save_pretrained`` or by training; generation
   defaults, when the directory has them, sit in ``imagen_lite_defaults.json`` beside it.
2. **DeepFloyd IF repos**: a stage I repo (``IFPipeline`` layout: tokenizer, text_encoder,
   unet, scheduler) plus optional stage II repos (``IFSuperResolutionPipeline`` layout: unet,
   scheduler, image_noising_scheduler), by hub id or local directory, assembled into one
   :class:`~imagen_lite.pipelines.imagen.ImagenPipeline`.
3. **Karlo** (``kakaobrain/karlo-v1-alpha`` layout): see ``pipelines/unclip.py``.

Weights load as safetensors only (``use_safetensors=True``) and never with
``trust_remote_code``. Hub ids only download when the machine is online; tests use local
directories in the same layouts.

Left out on purpose: the Stable Diffusion x4 upscaler as a 1024 stage. It is a latent
upscaler (VAE + CLIP text encoder) rather than an IF-style pixel SR UNet, so it does not fit
the cascade's stage contract; ``IF_UPSCALER_ID`` names it for users who run it after the
cascade with diffusers' ``StableDiffusionUpscalePipeline``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("imagen_lite")

PIPELINES = ("imagen", "dalle2")
DEFAULTS_FILE = "imagen_lite_defaults.json"
IF_UPSCALER_ID = "stabilityai/stable-diffusion-x4-upscaler"
WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Preset:
    name: str
    pipeline: str  # "imagen" | "dalle2"
    components: dict  # imagen: {"base": id, "sr": [ids]}; dalle2: {"repo": id}
    num_inference_steps: tuple  # per stage
    guidance_scale: tuple  # per stage
    noise_level: int = 250  # SR noise-conditioning augmentation (IF: 250)
    sr_strength: float = 1.0  # where the SR stages start (img2img strength; IF: 1, from pure noise)
    # the fraction of a guided stage's steps that use guidance: one (start, stop) pair or one per
    # stage (pipelines' ``guidance_interval``; IF and Karlo guide every step: (0, 1))
    guidance_interval: tuple = (0.0, 1.0)
    variant: str | None = None  # weight file variant on the hub ("fp16" for IF)
    note: str = ""
    extra: dict = field(default_factory=dict)


# DeepFloyd IF's own defaults: stage I 100 steps, guidance 7; stage II 50 steps, guidance 4, noise 250.
_IF = dict(num_inference_steps=(100, 50), guidance_scale=(7.0, 4.0), noise_level=250, variant="fp16")
_IF_BASE = {"IF-I-XL": "DeepFloyd/IF-I-XL-v1.0", "IF-I-L": "DeepFloyd/IF-I-L-v1.0", "IF-I-M": "DeepFloyd/IF-I-M-v1.0"}
_IF_SR = {"IF-II-L": "DeepFloyd/IF-II-L-v1.0", "IF-II-M": "DeepFloyd/IF-II-M-v1.0"}

PRESETS: dict[str, Preset] = {
    # The cascades IF's model card recommends: XL/L with II-L, M with II-M.
    "if-xl": Preset("if-xl", "imagen", {"base": _IF_BASE["IF-I-XL"], "sr": [_IF_SR["IF-II-L"]]}, **_IF,
                    note="4.3B + 1.2B params; needs model CPU offload below ~24 GB of GPU memory"),
    "if-l": Preset("if-l", "imagen", {"base": _IF_BASE["IF-I-L"], "sr": [_IF_SR["IF-II-L"]]}, **_IF),
    "if-m": Preset("if-m", "imagen", {"base": _IF_BASE["IF-I-M"], "sr": [_IF_SR["IF-II-M"]]}, **_IF),
    # Single-stage names, so any base can be combined with any SR through model={"base":..., "sr": [...]}.
    **{k.lower(): Preset(k.lower(), "imagen", {"base": v, "sr": []}, **_IF) for k, v in _IF_BASE.items()},
    # Karlo's defaults: prior 25 steps, guidance 4; decoder 25 steps, guidance 8; SR 7 steps.
    "karlo": Preset("karlo", "dalle2", {"repo": "kakaobrain/karlo-v1-alpha"},
                    num_inference_steps=(25, 25, 7), guidance_scale=(4.0, 8.0, 1.0), noise_level=0),
}  # fmt: skip
SR_ALIASES = {k.lower(): v for k, v in _IF_SR.items()}

DEFAULT_IMAGEN = Preset("default", "imagen", {"dir": str(WEIGHTS_DIR / "imagen")}, (25, 25), (1.0, 1.0), 100)
DEFAULT_DALLE2 = Preset("default", "dalle2", {"dir": str(WEIGHTS_DIR / "dalle2")}, (25, 25, 25), (1.0, 1.0, 1.0), 100)


def check_pipeline(pipeline) -> str:
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline={pipeline!r} is not known; use one of {PIPELINES}")
    return pipeline


def read_defaults(directory) -> dict:
    path = Path(directory) / DEFAULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def pipeline_class_of(directory) -> str | None:
    """The ``_class_name`` in a directory's ``model_index.json`` (None when there is none)."""
    index = Path(directory) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text()).get("_class_name")
    except json.JSONDecodeError as err:
        raise ValueError(f"{index} is not valid JSON ({err}); is this a diffusers pipeline directory?") from None


def looks_like_path(ref: str) -> bool:
    """A local path (existing, or written like one); ``owner/name`` alone reads as a hub id."""
    return Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1


def looks_like_hub_id(ref: str) -> bool:
    return not looks_like_path(ref) and ref.count("/") == 1 and all(ref.split("/"))


def check_model_dir(ref: str, expect: tuple[str, ...]) -> Path:
    """A local directory holding a pipeline of one of the ``expect`` classes."""
    path = Path(ref).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model={ref!r}: no such directory (expected a pipeline directory or a preset name)")
    if not path.is_dir():
        raise ValueError(f"model={ref!r} is a file; expected a pipeline directory with a model_index.json")
    cls = pipeline_class_of(path)
    if cls is None:
        raise ValueError(f"model={ref!r} has no model_index.json; it is not a diffusers pipeline directory")
    if cls not in expect:
        raise ValueError(f"model={ref!r} holds a {cls}; expected one of {expect}")
    return path
