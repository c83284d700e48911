"""Compare the two families side by side: same prompts, same seeds, one report.

``compare(prompts)`` loads each pipeline once, generates every (prompt, seed) with each of
them -- one image per call, seeded exactly as ``generate(prompt, seed=s)`` seeds it, so a cell
of the grid is reproducible with ``generate()`` -- and measures as it goes:

- seconds per image (wall time of the call) and per stage (the pipeline's ``stage_seconds``),
  reported as medians over the images;
- peak memory while the pipeline is loaded and run: CUDA ``max_memory_allocated`` on a GPU;
  on the CPU the process's peak resident set (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` before each pipeline; elsewhere ``ru_maxrss``, which cannot be
  reset and so includes everything the process did before);
- the steps and guidance each stage ran with;
- shapes accuracy per category (:mod:`imagen_lite.evaluation.shapes`) for the prompts that
  parse as shapes captions;
- CLIP score, ``100 * max(cos(text, image), 0)`` (torchmetrics' convention), with a CLIP
  chosen by ``clip=`` (see :func:`resolve_clip`).

``report.save(DIR)`` writes ``grid.png`` (rows = prompts, columns = pipeline x seed),
``index.html`` (self-contained: images inline as data URIs, no script, no network),
``metrics.json`` and ``metrics.csv`` (the same numbers: both are written from
:meth:`ComparisonReport.flat_metrics`, and so is every number of the page), and ``images/``.
"""

from __future__ import annotations

import base64
import csv
import gc
import html
import io
import json
import logging
import numbers
import re
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..presets import PIPELINES

logger = logging.getLogger("imagen_lite")

__all__ = ["compare", "ComparisonReport", "ClipScorer", "clip_layout", "resolve_clip", "read_prompts_file", "grid_size", "GRID"]

# Generation settings compare() passes to a pipeline: given as keywords they apply to every
# pipeline; inside a per-pipeline dict (``dalle2={...}``) to that one only.
GENERATION_KWARGS = ("num_inference_steps", "guidance_scale", "guidance_interval", "negative_prompt", "scheduler", "noise_level", "sr_strength", "offload")


# ---------------------------------------------------------------------- input checks
def read_prompts_file(path) -> list[str]:
    """Prompts from a text file: one per line; blank lines and lines starting with ``#`` skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {str(path)!r} has no prompts (one per line; blank and '#' lines are skipped)")
    return prompts


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(f"prompts={prompts!r}: compare needs at least one prompt (a string or a list of strings)")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts must be non-empty strings, got {p!r}")
    return [p.strip() for p in prompts]


def _check_pipelines(pipelines) -> list[str]:
    if isinstance(pipelines, str):
        pipelines = [pipelines]
    if not isinstance(pipelines, (list, tuple)) or len(pipelines) == 0:
        raise ValueError(f"pipelines={pipelines!r}: pass one or more of {PIPELINES}")
    for p in pipelines:
        if p not in PIPELINES:
            raise ValueError(f"pipeline {p!r} is not known; use one or more of {PIPELINES}")
    if len(set(pipelines)) != len(pipelines):
        raise ValueError(f"pipelines={tuple(pipelines)!r} names a pipeline twice; each family is compared once")
    return list(pipelines)


def _check_seeds(seeds) -> list[int]:
    from .. import api

    if isinstance(seeds, (int, str)) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, (list, tuple)) or len(seeds) == 0:
        raise ValueError(f"seeds={seeds!r}: pass one or more integer seeds, e.g. (0, 1)")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise ValueError(f"seeds must be integers, got {s!r} ({type(s).__name__}) in seeds={tuple(seeds)!r}")
        api.check_seed_range(int(s), "a seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={tuple(seeds)!r} repeats a seed; each column is one seed")
    return [int(s) for s in seeds]


def _check_models(models, pipelines: list[str]) -> dict:
    if models is None:
        return {p: None for p in pipelines}
    if isinstance(models, dict):
        unknown = set(models) - set(pipelines)
        if unknown:
            raise ValueError(f"models has keys {sorted(unknown)} that are not among pipelines={tuple(pipelines)}")
        return {p: models.get(p) for p in pipelines}
    if isinstance(models, (list, tuple)) and len(models) == len(pipelines):
        return dict(zip(pipelines, models))
    raise ValueError(
        f"models={models!r} is not valid; pass None (the embedded defaults), a dict {{pipeline: model}}, or one "
        f"model per pipeline {tuple(pipelines)}"
    )


def _split_kwargs(kwargs: dict, pipelines: list[str]) -> dict:
    """``**per_pipeline_kwargs`` -> {pipeline: generation kwargs}: plain keywords apply to every
    pipeline, ``imagen={...}`` / ``dalle2={...}`` to that one (and win). The Imagen SR's
    ``noise_level`` / ``sr_strength`` given as plain keywords apply to imagen only; inside
    ``dalle2={...}`` they are an error."""
    from .. import api

    common, own = {}, {p: {} for p in pipelines}
    for key, value in kwargs.items():
        if key in PIPELINES:
            if key not in pipelines:
                raise ValueError(f"settings for pipeline {key!r} were given but pipelines={tuple(pipelines)}")
            if not isinstance(value, dict):
                raise ValueError(f"{key}={value!r} must be a dict of generation settings, e.g. {{'num_inference_steps': 25}}")
            bad = set(value) - set(GENERATION_KWARGS)
            if bad:
                raise ValueError(f"{key}= has unknown settings {sorted(bad)}; allowed: {GENERATION_KWARGS}")
            api.check_family_kwargs(key, value)
            own[key] = dict(value)
        elif key in GENERATION_KWARGS:
            common[key] = value
        else:
            raise ValueError(
                f"compare() got an unknown keyword {key!r}; generation settings are {GENERATION_KWARGS}, given for "
                f"every pipeline or inside {'/'.join(PIPELINES)}={{...}} for one"
            )
    return {
        p: {**{k: v for k, v in common.items() if p == "imagen" or k not in api.IMAGEN_ONLY_KWARGS}, **own[p]}
        for p in pipelines
    }


def _step_policy(settings: dict) -> str:
    """One sentence saying how the step budget was chosen, for the report."""
    given = {p: s.get("num_inference_steps") for p, s in settings.items()}
    values = set(map(repr, given.values()))
    if all(v is None for v in given.values()):
        return "each pipeline ran its model's own per-stage default steps and guidance (listed per pipeline)"
    if len(values) == 1 and isinstance(next(iter(given.values())), int):
        return f"every stage of every pipeline ran {next(iter(given.values()))} denoising steps"
    parts = ", ".join(f"{p}: {v if v is not None else 'model defaults'}" for p, v in given.items())
    return f"steps set per pipeline ({parts}); per-stage values listed per pipeline"


# ---------------------------------------------------------------------- memory
class _PeakMemory:
    """Peak memory over a block: CUDA max allocated on a GPU, else peak RSS (see module doc)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rss_resettable = _reset_rss_peak()
        self.rss_before_mb = _current_rss_mb()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    def result(self) -> dict:
        rss = _peak_rss_mb()
        out = {"peak_rss_mb": _r(rss, 1), "rss_before_mb": _r(self.rss_before_mb, 1)}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            out["peak_memory_mb"] = _r(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            out["memory_measure"] = "torch.cuda.max_memory_allocated (reset before loading this pipeline)"
        else:
            out["peak_memory_mb"] = out["peak_rss_mb"]
            out["memory_measure"] = (
                "peak RSS of the process (VmHWM, reset before loading this pipeline)"
                if self.rss_resettable
                else "peak RSS of the process since it started (ru_maxrss; cannot be reset here)"
            )
        return out


def _reset_rss_peak() -> bool:
    try:  # Linux >= 4.0: writing 5 resets the peak resident set size (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_mb(field_name: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) / 1024 if m else None


def _current_rss_mb() -> float | None:
    return _proc_status_mb("VmRSS")


def _peak_rss_mb() -> float:
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _r(x, ndigits: int):
    return None if x is None else round(float(x), ndigits)


# ---------------------------------------------------------------------- CLIP score
def clip_layout(path) -> str:
    """``"pipeline"`` (a DALL-E 2 pipeline directory with its CLIP towers) or ``"transformers"``
    (a ``CLIPModel`` directory); anything else raises, naming what was expected."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"clip={str(path)!r}: no such directory (expected a transformers CLIP directory)")
    if (root / "image_encoder").is_dir() and (root / "text_encoder").is_dir():
        missing = [d for d in ("tokenizer", "feature_extractor") if not (root / d).is_dir()]
        if missing:
            raise ValueError(f"clip={str(path)!r} has image_encoder/ and text_encoder/ but no {missing}")
        return "pipeline"
    config = root / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type != "clip":
        raise ValueError(
            f"clip={str(path)!r} is not a CLIP: expected a transformers CLIPModel directory (config.json with "
            f"model_type 'clip', found {model_type!r}) or a DALL-E 2 pipeline directory with image_encoder/"
        )
    if not (root / "preprocessor_config.json").is_file():
        raise ValueError(f"clip={str(path)!r} has no preprocessor_config.json (the CLIP image processor)")
    return "transformers"


class ClipScorer:
    """CLIP text and vision towers with projections, scoring (image, prompt) pairs as
    ``100 * max(cos, 0)``. Build with :meth:`from_dir`."""

    def __init__(self, tokenizer, text_fn, image_fn, image_processor, max_length: int, description: str, source: str):
        self.tokenizer, self.text_fn, self.image_fn = tokenizer, text_fn, image_fn
        self.image_processor, self.max_length = image_processor, max_length
        self.description, self.source = description, source
        self.text_weights = None  # token embedding matrix: tells whether a pipeline shares this CLIP

    @classmethod
    def from_dir(cls, path) -> "ClipScorer":
        """A CLIP from disk: a ``transformers`` CLIP directory (``CLIPModel``: ``config.json``,
        weights, tokenizer, ``preprocessor_config.json``), or a DALL-E 2 pipeline directory that
        holds its CLIP towers (``text_encoder/``, ``tokenizer/``, ``image_encoder/``,
        ``feature_extractor/``, as ``imagen-lite train`` exports them)."""
        from transformers import (
            AutoTokenizer,
            CLIPImageProcessor,
            CLIPModel,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            CLIPVisionModelWithProjection,
        )

        root = Path(path).expanduser()
        if clip_layout(path) == "pipeline":
            text = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder").eval()
            vision = CLIPVisionModelWithProjection.from_pretrained(root / "image_encoder").eval()
            scorer = cls(
                CLIPTokenizer.from_pretrained(root / "tokenizer"),
                lambda ids: text(ids).text_embeds,
                lambda px: vision(px).image_embeds,
                CLIPImageProcessor.from_pretrained(root / "feature_extractor"),
                text.config.max_position_embeddings,
                f"CLIP towers of the pipeline directory {root} (text_encoder/ + image_encoder/)",
                str(root),
            )
            scorer.text_weights = text.text_model.embeddings.token_embedding.weight
            return scorer
        model = CLIPModel.from_pretrained(root).eval()
        scorer = cls(
            AutoTokenizer.from_pretrained(root),
            lambda ids: model.text_projection(model.text_model(input_ids=ids).pooler_output),
            lambda px: model.visual_projection(model.vision_model(pixel_values=px).pooler_output),
            CLIPImageProcessor.from_pretrained(root),
            model.config.text_config.max_position_embeddings,
            f"transformers CLIPModel {root}",
            str(root),
        )
        scorer.text_weights = model.text_model.embeddings.token_embedding.weight
        return scorer

    def fingerprint(self):
        """:func:`text_tower_fingerprint` of this CLIP's text tower."""
        return None if self.text_weights is None else _weights_fingerprint(self.text_weights)

    @torch.no_grad()
    def score(self, images: list, prompts: list[str]) -> list[float]:
        """CLIP score of each (image, prompt) pair: ``100 * max(cos(t, v), 0)``."""
        from ..pipelines.common import tokenize

        ids = tokenize(self.tokenizer, prompts, min(self.max_length, self.tokenizer.model_max_length)).input_ids
        t = torch.nn.functional.normalize(self.text_fn(ids).float(), dim=-1)  # (N, D)
        pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        v = torch.nn.functional.normalize(self.image_fn(pixels).float(), dim=-1)  # (N, D)
        return [round(100 * max(c, 0.0), 3) for c in (t * v).sum(-1).tolist()]


def _weights_fingerprint(w: torch.Tensor) -> tuple:
    w = w.detach().to("cpu", torch.float64)
    return tuple(w.shape), round(float(w.sum()), 6), round(float(w[:: max(1, w.shape[0] // 64)].abs().sum()), 6)


def text_tower_fingerprint(text_encoder) -> tuple | None:
    """A small fingerprint of a CLIP text tower's token embeddings (None for other encoders, e.g.
    T5): equal fingerprints mean the same CLIP, without keeping the encoder alive."""
    if text_encoder is None or not hasattr(text_encoder, "text_model"):
        return None
    return _weights_fingerprint(text_encoder.text_model.embeddings.token_embedding.weight)


def _model_dir(pipeline: str, model) -> Path | None:
    """The local directory a model reference names, if any (None: a preset, a hub id, a dict)."""
    from .. import presets

    if model is None:
        preset = presets.DEFAULT_IMAGEN if pipeline == "imagen" else presets.DEFAULT_DALLE2
        return Path(preset.components["dir"])
    if isinstance(model, (str, Path)) and str(model) not in presets.PRESETS and presets.looks_like_path(str(model)):
        return Path(model).expanduser()
    return None


def _check_clip(clip) -> None:
    """Reject a bad ``clip`` before anything is generated (it is loaded only after)."""
    if clip is None or clip is False or (isinstance(clip, str) and clip.lower() in ("auto", "none")):
        return
    if not isinstance(clip, (str, Path)):
        raise ValueError(f"clip={clip!r} is not valid; pass 'auto', None, or a CLIP directory")
    clip_layout(clip)


def resolve_clip(clip, models: dict) -> tuple[ClipScorer | None, str]:
    """The CLIP that scores, and a sentence saying which (or why none).

    ``clip="auto"``: the DALL-E 2 pipeline's own CLIP towers (its directory's ``text_encoder/``
    and ``image_encoder/``) when the comparison has a dalle2 model that ships them; else no
    CLIP score. ``clip=DIR``: any ``transformers`` CLIP directory, or a pipeline directory with
    both towers. ``clip=None`` / ``"none"``: no CLIP score.
    """
    if clip is None or clip is False or (isinstance(clip, str) and clip.lower() == "none"):
        return None, "CLIP score skipped: clip=None was given"
    if isinstance(clip, str) and clip == "auto":
        if "dalle2" not in models:
            return None, (
                "CLIP score skipped: clip='auto' uses the dalle2 pipeline's own CLIP, and dalle2 is not compared; "
                "pass clip=DIR (a transformers CLIP directory)"
            )
        directory = _model_dir("dalle2", models["dalle2"])
        if directory is None or not (directory / "image_encoder").is_dir():
            where = "the embedded default" if models["dalle2"] is None else f"model {models['dalle2']!r}"
            return None, (
                f"CLIP score skipped: the dalle2 pipeline ({where}) ships no CLIP vision tower (image_encoder/); "
                "pass clip=DIR (a transformers CLIP directory)"
            )
        return ClipScorer.from_dir(directory), ""
    if not isinstance(clip, (str, Path)):
        raise ValueError(f"clip={clip!r} is not valid; pass 'auto', None, or a CLIP directory")
    return ClipScorer.from_dir(clip), ""


# ---------------------------------------------------------------------- shapes accuracy
def _shapes_kinds(prompts: list[str]) -> list[str | None]:
    """The shapes category of each prompt, None where it is not a shapes caption."""
    from ..data.shapes import parse_caption

    kinds = []
    for p in prompts:
        try:
            kinds.append(parse_caption(p).kind)
        except ValueError:
            kinds.append(None)
    return kinds


# ---------------------------------------------------------------------- the report
# Grid layout in pixels: a column of prompt labels, a header row of (pipeline, seed) labels,
# and square cells of side clamp(largest image side, CELL_MIN, CELL_MAX) with PAD around them.
GRID = dict(row_label_width=220, header_height=40, pad=6, cell_min=128, cell_max=256)
_COLORS = {"imagen": (52, 101, 164), "dalle2": (173, 73, 30)}  # column header colours per family


@dataclass
class ComparisonReport:
    """What :func:`compare` measured. ``save(DIR)`` writes it; every number written (JSON, CSV,
    HTML) comes from :meth:`flat_metrics`."""

    prompts: list[str]
    pipelines: list[str]
    seeds: list[int]
    config: dict  # the run: size, device, step policy, models, per-pipeline settings
    images: dict  # (pipeline, prompt_index, seed) -> PIL.Image
    records: list[dict]  # one per image: pipeline, prompt_index, prompt, seed, numbers
    summary: dict  # pipeline -> its numbers and descriptions
    clip: dict  # which CLIP scored (or why none did) and the bias note
    shapes: dict  # whether shapes accuracy applies, and to which prompts
    stage_images: dict = field(default_factory=dict)  # (pipeline, i, seed) -> {stage: PIL.Image}

    # -------------------------------------------------------------- numbers
    def metrics(self) -> dict:
        """The JSON document."""
        return {
            "config": self.config,
            "clip": self.clip,
            "shapes": self.shapes,
            "pipelines": self.summary,
            "images": self.records,
        }

    def flat_metrics(self) -> list[dict]:
        """Every number as a row ``{pipeline, prompt_index, prompt, seed, metric, value}``;
        pipeline-level rows have an empty prompt_index/prompt/seed."""
        rows = []
        for p in self.pipelines:
            for metric, value in _flatten(self.summary[p]):
                rows.append(dict(pipeline=p, prompt_index="", prompt="", seed="", metric=metric, value=value))
        for rec in self.records:
            numbers = {k: v for k, v in rec.items() if k not in ("pipeline", "prompt_index", "prompt", "seed")}
            for metric, value in _flatten(numbers):
                rows.append(dict(pipeline=rec["pipeline"], prompt_index=rec["prompt_index"], prompt=rec["prompt"],
                                 seed=rec["seed"], metric=metric, value=value))  # fmt: skip
        return rows

    def markdown(self) -> str:
        """The headline numbers per pipeline as a Markdown table (for a README or a PR)."""
        cols = self.pipelines
        lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]

        def row(name, fn):
            lines.append(f"| {name} | " + " | ".join(str(fn(self.summary[p])) for p in cols) + " |")

        row("stages", lambda s: s["stages"])
        row("steps", lambda s: " / ".join(str(v) for v in s["steps"].values()))
        row("guidance", lambda s: " / ".join(str(v) for v in s["guidance"].values()))
        if any(tuple(v) != (0.0, 1.0) for p in cols for v in self.summary[p].get("guidance_interval", {}).values()):
            row("guided steps (fraction)", lambda s: " / ".join(f"[{a:g}, {b:g})" for a, b in s.get("guidance_interval", {}).values()))
        if any(self.summary[p].get("sr_strength") is not None for p in cols):
            row("SR strength (img2img start)", lambda s: "-" if s.get("sr_strength") is None else s["sr_strength"])
        if any(self.summary[p].get("candidates", 1) > 1 for p in cols):
            row("64 px samples per image (best kept)", lambda s: s.get("candidates", 1))
        row("median s / image", lambda s: s["median_seconds_per_image"])
        row("peak memory (MB)", lambda s: s["peak_memory_mb"])
        if self.shapes.get("applies"):
            kinds = list(dict.fromkeys(k for p in cols for k in self.summary[p]["shapes_accuracy"]))
            for k in kinds:
                row(f"shapes accuracy: {k}", lambda s, k=k: s["shapes_accuracy"].get(k, "-"))
            row("shapes failures (images)",
                lambda s: ", ".join(f"{m} {n}" for m, n in s["shapes_failures"].items()) or "none")  # fmt: skip
        row("CLIP score", lambda s: "-" if s.get("clip_score_mean") is None else s["clip_score_mean"])
        return "\n".join(lines) + "\n"

    # -------------------------------------------------------------- grid
    def grid(self) -> Image.Image:
        """Rows = prompts, columns = pipeline x seed; each column headed (pipeline, seed), each
        row labelled with its prompt. Size: see :func:`grid_size`."""
        n_rows, columns = len(self.prompts), [(p, s) for p in self.pipelines for s in self.seeds]
        side = max(im.size[0] for im in self.images.values())
        cell = min(max(side, GRID["cell_min"]), GRID["cell_max"])
        width, height = grid_size(n_rows, len(columns), cell)
        pad, left, top = GRID["pad"], GRID["row_label_width"], GRID["header_height"]
        canvas = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(canvas)
        font, small = _font(15), _font(13)
        for j, (p, s) in enumerate(columns):
            x = left + pad + j * (cell + pad)
            color = _COLORS.get(p, (60, 60, 60))
            draw.rectangle([x, 4, x + cell - 1, top - 6], fill=color)
            label = f"{p} \u00b7 seed {s}"
            tw = draw.textlength(label, font=font)
            draw.text((x + (cell - tw) / 2, 10), label, fill="white", font=font)
        for i, prompt in enumerate(self.prompts):
            y = top + pad + i * (cell + pad)
            lines = _wrap(f"{i + 1}. {prompt}", small, left - 2 * pad, draw)
            for k, line in enumerate(lines[: max(1, cell // 17)]):
                draw.text((pad, y + 2 + 17 * k), line, fill=(20, 20, 20), font=small)
            for j, (p, s) in enumerate(columns):
                x = left + pad + j * (cell + pad)
                im = self.images[(p, i, s)].convert("RGB")
                if im.size != (cell, cell):
                    resample = Image.NEAREST if im.size[0] < cell else Image.LANCZOS
                    im = im.resize((cell, cell), resample)
                canvas.paste(im, (x, y))
        return canvas

    # -------------------------------------------------------------- page
    def html(self, grid_png: bytes | None = None) -> str:
        """The self-contained page: grid, per-pipeline table, per-image table, notes. Every
        number cell carries ``data-key="pipeline|prompt_index|seed|metric"``."""
        grid_png = grid_png if grid_png is not None else _png_bytes(self.grid())
        flat = self.flat_metrics()
        summary = {(r["pipeline"], r["metric"]): r["value"] for r in flat if r["prompt_index"] == ""}
        per_image = {
            (r["pipeline"], r["prompt_index"], r["seed"], r["metric"]): r["value"] for r in flat if r["prompt_index"] != ""
        }
        esc = html.escape
        cfg = self.config

        def num(pipeline, metric, prompt_index="", seed=""):
            key = (pipeline, metric) if prompt_index == "" else (pipeline, prompt_index, seed, metric)
            value = (summary if prompt_index == "" else per_image).get(key)
            if value is None:
                return "<td class=na>&ndash;</td>"
            return f'<td class=num data-key="{esc(f"{pipeline}|{prompt_index}|{seed}|{metric}")}">{value}</td>'

        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8"><title>imagen-lite: families compared</title>',
            "<style>",
            "body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:24px;color:#1b1b1b;background:#fff}",
            "h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:22px 0 8px}",
            "table{border-collapse:collapse;margin:6px 0 14px} td,th{border:1px solid #9aa5b8;padding:4px 9px;font-size:13px}",
            "th{background:#dde6f5;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}",
            "td.na{color:#999;text-align:center} .note{font-size:13px;color:#333;max-width:1100px;margin:4px 0}",
            "img.grid{border:2px solid #34558b;max-width:100%;image-rendering:pixelated}",
            "img.cell{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ccc}",
            "img.stage{width:48px;height:48px;image-rendering:pixelated;border:1px solid #ccc}",
            "</style></head><body>",
            "<h1>imagen-lite: the two families side by side</h1>",
            f"<p class=note>{len(self.prompts)} prompt(s) &times; seeds {esc(str(self.seeds))} &times; pipelines "
            f"{esc(', '.join(self.pipelines))}; size {esc(str(cfg['size']))}; device {esc(str(cfg['device']))}. "
            f"Step budget: {esc(cfg['step_policy'])}.</p>",
            f'<img class=grid alt="comparison grid" src="data:image/png;base64,{base64.b64encode(grid_png).decode()}">',
            "<h2>Per pipeline</h2>",
            "<table id=summary><tr><th>metric</th>" + "".join(f"<th>{esc(p)}</th>" for p in self.pipelines) + "</tr>",
        ]
        metrics = sorted(dict.fromkeys(m for (_, m) in summary), key=_metric_order)
        for text_key in ("model", "description", "stages", "memory_measure"):
            out.append(f"<tr><th>{text_key}</th>" + "".join(
                f"<td>{esc(str(self.summary[p].get(text_key, '')))}</td>" for p in self.pipelines) + "</tr>")  # fmt: skip
        for m in metrics:
            out.append(f"<tr><th>{esc(m)}</th>" + "".join(num(p, m) for p in self.pipelines) + "</tr>")
        out.append("</table>")
        out.append(f"<p class=note><b>CLIP score.</b> {esc(self.clip['statement'])}</p>")
        out.append(f"<p class=note><b>Shapes accuracy.</b> {esc(self.shapes['statement'])}</p>")
        out.append(f"<p class=note><b>Memory.</b> {esc(cfg['memory_note'])} <b>Timing.</b> {esc(cfg['timing_note'])}</p>")

        image_metrics = []
        for (_, _, _, m) in per_image:
            if m not in image_metrics:
                image_metrics.append(m)
        out.append("<h2>Per image</h2><table id=images><tr><th>pipeline</th><th>prompt</th><th>seed</th><th>image</th>"
                   + ("<th>stages</th>" if self.stage_images else "")
                   + "".join(f"<th>{esc(m)}</th>" for m in image_metrics) + "</tr>")  # fmt: skip
        for rec in self.records:
            p, i, s = rec["pipeline"], rec["prompt_index"], rec["seed"]
            row = f"<tr><td>{esc(p)}</td><td>{i + 1}. {esc(rec['prompt'])}</td><td>{s}</td>"
            row += f'<td><img class=cell alt="{esc(p)} seed {s}" src="{_data_uri(self.images[(p, i, s)])}"></td>'
            if self.stage_images:
                stages = self.stage_images.get((p, i, s), {})
                row += "<td>" + "".join(
                    f'<img class=stage title="{esc(n)}" alt="{esc(n)}" src="{_data_uri(im)}">' for n, im in stages.items()
                ) + "</td>"  # fmt: skip
            row += "".join(num(p, m, i, s) for m in image_metrics) + "</tr>"
            out.append(row)
        out.append("</table>")
        out.append(f"<p class=note>Written by imagen-lite compare; the same numbers are in metrics.json and metrics.csv. "
                   f"Generation settings: <code>{esc(json.dumps(cfg['settings']))}</code></p>")  # fmt: skip
        out.append("</body></html>")
        return "\n".join(out) + "\n"

    # -------------------------------------------------------------- files
    def save(self, directory) -> Path:
        """Write grid.png, index.html, metrics.json, metrics.csv and images/ into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        grid_png = _png_bytes(self.grid())
        (out / "grid.png").write_bytes(grid_png)
        (out / "index.html").write_text(self.html(grid_png), encoding="utf-8")
        (out / "metrics.json").write_text(json.dumps(self.metrics(), indent=2) + "\n", encoding="utf-8")
        with open(out / "metrics.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["pipeline", "prompt_index", "prompt", "seed", "metric", "value"])
            writer.writeheader()
            writer.writerows(self.flat_metrics())
        images = out / "images"
        images.mkdir(exist_ok=True)
        for (p, i, s), im in self.images.items():
            im.save(images / f"{p}_p{i}_s{s}.png")
            for stage, sim in self.stage_images.get((p, i, s), {}).items():
                sim.save(images / f"{p}_p{i}_s{s}_{stage}.png")
        return out


_SUMMARY_ORDER = ("size", "steps", "guidance", "median_seconds_per_image", "median_stage_seconds", "load_seconds",
                  "peak_memory_mb", "peak_rss_mb", "rss_before_mb", "shapes_accuracy", "shapes_images_scored", "shapes_failures", "clip_score_mean")


def _metric_order(metric: str) -> int:
    """Rows of the per-pipeline table grouped by what they measure (stable within a group)."""
    head = metric.split(".")[0]
    return _SUMMARY_ORDER.index(head) if head in _SUMMARY_ORDER else len(_SUMMARY_ORDER)


def grid_size(n_rows: int, n_cols: int, cell: int) -> tuple[int, int]:
    """(width, height) of a grid of ``n_rows`` x ``n_cols`` cells of side ``cell``."""
    pad = GRID["pad"]
    return GRID["row_label_width"] + pad + n_cols * (cell + pad), GRID["header_height"] + pad + n_rows * (cell + pad)


def _flatten(d: dict, prefix: str = ""):
    """(dotted key, number) for every numeric leaf of a nested dict, in order."""
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, value


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError):
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, draw) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(image)).decode()


def _tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> PIL."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


# ---------------------------------------------------------------------- compare()
def compare(
    prompts,
    pipelines=("imagen", "dalle2"),
    models=None,
    seeds=(0, 1),
    size: int | None = 256,
    *,
    clip="auto",
    device="auto",
    dtype="auto",
    stage_images: bool = False,
    progress: bool = True,
    **per_pipeline_kwargs,
) -> ComparisonReport:
    """Generate every prompt with every seed in each pipeline; measure and score; return the report.

    Args:
        prompts: str or list[str] (``read_prompts_file`` reads a file).
        pipelines: families to compare, in column order: ``"imagen"``, ``"dalle2"``.
        models: None (the embedded defaults), ``{pipeline: model}``, or one model per pipeline
            (anything ``generate(model=...)`` takes).
        seeds: integer seeds; image (prompt, seed) equals ``generate(prompt, seed=seed, ...)``.
        size: output side (every pipeline must make it); None = each cascade's full size.
        clip: ``"auto"`` (the dalle2 pipeline's own CLIP towers, when it ships them), a CLIP
            directory, or None (no CLIP score). See :func:`resolve_clip`.
        device / dtype: as in ``generate()``, resolved once for all pipelines.
        stage_images: also keep each stage's intermediate image (e.g. the 64px base) for the page.
        progress: a progress bar over the whole run on stderr.
        **per_pipeline_kwargs: generation settings (:data:`GENERATION_KWARGS`) for every pipeline,
            e.g. ``num_inference_steps=25``, or per pipeline: ``dalle2={"guidance_scale": (4, 8, 1)}``.
            None given: each model's own per-stage defaults (the report says which).
    """
    from tqdm.auto import tqdm

    from .. import api, runtime
    from ..pipelines.common import per_stage, per_stage_intervals

    # 1. Check inputs before loading anything
    prompts = _check_prompts(prompts)
    pipelines = _check_pipelines(pipelines)
    seeds = _check_seeds(seeds)
    models = _check_models(models, pipelines)
    settings = _split_kwargs(per_pipeline_kwargs, pipelines)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size={size!r} must be a positive integer or None (each cascade's full size)")
    dev = runtime.resolve_device(device)
    dt = runtime.resolve_dtype(dtype, dev)
    _check_clip(clip)
    kinds = _shapes_kinds(prompts)

    # 2. Generate: each pipeline loaded once, one image per (prompt, seed), progress over the run
    images, stage_pils, records, summary = {}, {}, [], {}
    bar = tqdm(total=len(pipelines) * len(prompts) * len(seeds), desc="compare", unit="img", disable=not progress,
               file=sys.stderr)  # fmt: skip
    text_towers = {}
    for pipeline in pipelines:
        bar.set_description(f"compare: {pipeline}")
        s = dict(settings[pipeline])
        cached_before = {id(v) for v in api._CACHE.values()}
        meter = _PeakMemory(dev)
        t0 = time.perf_counter()
        pipe = api.load_pipeline(pipeline, models[pipeline], device=dev, dtype=dt, offload=bool(s.pop("offload", False)),
                                 scheduler=s.pop("scheduler", None))  # fmt: skip
        load_seconds = time.perf_counter() - t0
        preset = pipe.imagen_lite_preset
        n_stages = pipe.num_stages_for_size(size)
        stages = pipe.stage_names[:n_stages]
        steps = s.pop("num_inference_steps", None)
        steps = per_stage(preset.num_inference_steps if steps is None else steps, stages, "num_inference_steps", kind="steps")
        guidance = s.pop("guidance_scale", None)
        guidance = preset.guidance_scale if guidance is None else guidance
        if pipeline == "dalle2" and not isinstance(guidance, (list, tuple)):  # one value: prior and decoder; SR takes none
            guidance = (guidance, guidance) + (1.0,) * (n_stages - 2)
        guidance = per_stage(guidance, stages, "guidance_scale", kind="guidance")
        s = {**api.family_call_defaults(pipeline, preset), **s}
        gen_device = "cpu" if dev.type == "mps" else dev
        progress_config = dict(getattr(pipe, "_progress_bar_config", {}) or {})
        pipe.set_progress_bar_config(disable=True)
        seconds, stage_seconds = [], {}
        try:
            for i, prompt in enumerate(prompts):
                for seed in seeds:
                    t = time.perf_counter()
                    out = pipe(prompt=[prompt], num_inference_steps=steps, guidance_scale=guidance, num_stages=n_stages,
                               generator=torch.Generator(gen_device).manual_seed(seed), return_stage_outputs=stage_images,
                               **s)  # fmt: skip
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    elapsed = time.perf_counter() - t
                    images[(pipeline, i, seed)] = out.images[0]
                    if stage_images:
                        stage_pils[(pipeline, i, seed)] = {
                            name: _tensor_to_pil(x[0]) for name, x in out.stage_images.items() if x.ndim == 4 and x.shape[1] == 3
                        }
                    seconds.append(elapsed)
                    for name, sec in out.stage_seconds.items():
                        stage_seconds.setdefault(name, []).append(sec)
                    records.append(dict(
                        pipeline=pipeline, prompt_index=i, prompt=prompt, seed=seed, seconds=_r(elapsed, 4),
                        stage_seconds={k: _r(v, 4) for k, v in out.stage_seconds.items()},
                    ))  # fmt: skip
                    bar.update(1)
        finally:
            pipe.set_progress_bar_config(**progress_config)
        memory = meter.result()
        summary[pipeline] = {
            "model": "embedded default" if models[pipeline] is None else str(models[pipeline]),
            "description": _describe(pipe, models[pipeline]),
            "stages": ", ".join(stages),
            "size": images[(pipeline, 0, seeds[0])].size[0],
            "steps": dict(zip(stages, steps)),
            "guidance": dict(zip(stages, guidance)),
            "guidance_interval": dict(zip(stages, per_stage_intervals(s.get("guidance_interval", (0.0, 1.0)), stages))),
            # an Imagen SR's start: imagen's, and a dalle2 model's with an Imagen-style SR (its saved defaults)
            "sr_strength": s.get("sr_strength") if n_stages > 1 else None,
            # a dalle2 default's re-ranking (twenty-ninth session): samples drawn per image kept
            "candidates": int(s.get("decoder_candidates", 1)),
            "load_seconds": _r(load_seconds, 4),
            "median_seconds_per_image": _r(statistics.median(seconds), 4),
            "median_stage_seconds": {k: _r(statistics.median(v), 4) for k, v in stage_seconds.items()},
            **memory,
        }
        # keep only a fingerprint of the text tower: it tells whether the scoring CLIP is this pipeline's own
        text_towers[pipeline] = text_tower_fingerprint(getattr(pipe, "text_encoder", None))
        if id(pipe) not in cached_before:  # release what compare loaded, so the next pipeline's memory is its own
            for key in [k for k, v in api._CACHE.items() if v is pipe]:
                del api._CACHE[key]
            del pipe, out
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()

    # 3. Shapes accuracy, per category, for the prompts that are shapes captions
    shapes = _score_shapes(prompts, kinds, pipelines, images, records, summary)

    # 4. CLIP score (the CLIP loads after the pipelines, so their peak memory does not include it)
    clip_info = _score_clip(clip, models, pipelines, prompts, images, records, summary, text_towers)

    config = {
        "prompts": prompts,
        "pipelines": pipelines,
        "seeds": seeds,
        "size": size,
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
        "step_policy": _step_policy(settings),
        "settings": {p: {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings[p].items()} for p in pipelines},
        "timing_note": "seconds per image: wall time of one pipeline call making one image (text encoding included), "
        "median over all images; the first call of each pipeline includes warm-up. Loading is timed apart "
        "(load_seconds; the first pipeline's also includes one-time library imports).",
        "memory_note": "peak memory is measured from just before loading each pipeline to the end of its last "
        "image; pipelines compare loaded are released before the next one starts.",
        "torch_threads": torch.get_num_threads(),
    }
    return ComparisonReport(prompts, pipelines, seeds, config, images, records, summary, clip_info, shapes, stage_pils)


def _describe(pipe, model) -> str:
    params = sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    what = "embedded default" if model is None else str(model)
    return f"{type(pipe).__name__} ({what}), {params / 1e6:.2f}M parameters"


def _score_shapes(prompts, kinds, pipelines, images, records, summary) -> dict:
    from .shapes import FAILURE_MODES, detect_objects, failure_mode, parse_caption

    scored = [i for i, k in enumerate(kinds) if k is not None]
    if not scored:
        for p in pipelines:
            summary[p]["shapes_accuracy"] = summary[p]["shapes_failures"] = None
        return {"applies": False, "statement": "not computed: none of the prompts is a shapes caption (docs/shapes.md)."}
    for rec in records:
        i = rec["prompt_index"]
        if kinds[i] is None:
            rec["shapes_ok"] = rec["shapes_failure"] = None
            continue
        # as evaluate() scores: failure_mode is None exactly for a right image, else says why
        image = images[(rec["pipeline"], i, rec["seed"])]
        rec["shapes_failure"] = failure_mode(detect_objects(image), parse_caption(prompts[i]))
        rec["shapes_ok"] = int(rec["shapes_failure"] is None)
    for p in pipelines:
        recs = [r for r in records if r["pipeline"] == p and r["shapes_ok"] is not None]
        acc = {"overall": _r(sum(r["shapes_ok"] for r in recs) / len(recs), 4)}
        for kind in dict.fromkeys(k for k in kinds if k is not None):
            oks = [r["shapes_ok"] for r in recs if kinds[r["prompt_index"]] == kind]
            acc[kind] = _r(sum(oks) / len(oks), 4)
        summary[p]["shapes_accuracy"] = acc
        summary[p]["shapes_images_scored"] = len(recs)
        # counts per failure mode (only those that occur, in FAILURE_MODES order): numbers, so
        # metrics.csv carries them too; the per-image mode is the record's "shapes_failure"
        failures = [r["shapes_failure"] for r in recs]
        summary[p]["shapes_failures"] = {m: failures.count(m) for m in FAILURE_MODES if m in failures}
    skipped = len(prompts) - len(scored)
    return {
        "applies": True,
        "prompts_scored": len(scored),
        "statement": f"exact shapes scorer (imagen_lite.evaluation.shapes) on {len(scored)} of {len(prompts)} prompt(s)"
        + (f"; {skipped} prompt(s) are not shapes captions and are not scored" if skipped else "")
        + "; accuracy = fraction of images whose detected objects satisfy the caption, per category.",
    }


def _score_clip(clip, models, pipelines, prompts, images, records, summary, text_towers) -> dict:
    scorer, reason = resolve_clip(clip, models)
    if scorer is None:
        for p in pipelines:
            summary[p]["clip_score_mean"] = None
        return {"used": None, "statement": reason + "."}
    order = [(r["pipeline"], r["prompt_index"], r["seed"]) for r in records]
    scores = scorer.score([images[k] for k in order], [prompts[k[1]] for k in order])
    for rec, value in zip(records, scores):
        rec["clip_score"] = value
    for p in pipelines:
        values = [r["clip_score"] for r in records if r["pipeline"] == p]
        summary[p]["clip_score_mean"] = _r(statistics.fmean(values), 3)
    shared = [p for p, fp in text_towers.items() if fp is not None and fp == scorer.fingerprint()]
    if "dalle2" in pipelines and clip == "auto":
        shared = sorted(set(shared) | {"dalle2"})
    bias = (
        f" This CLIP is the one the {', '.join(shared)} pipeline conditions on (its text tower is shared), so the "
        f"score favours {'it' if len(shared) == 1 else 'them'}: the DALL-E 2 prior is trained to produce exactly this "
        "CLIP's image embeddings for the prompt, and the decoder to invert them. Read it as agreement with that CLIP, "
        "not as a neutral judge; shapes accuracy (exact) is the neutral measure here."
        if shared
        else " A CLIP shared with the DALL-E 2 pipeline (the one its prior was trained on) would favour that pipeline; "
        "this one's text tower differs from every compared pipeline's."
    )
    logger.info("compare: CLIP score by %s (shared with %s)", scorer.description, shared or "no compared pipeline")
    return {
        "used": scorer.description,
        "source": scorer.source,
        "shared_with": shared,
        "statement": f"scored by {scorer.description}: 100 * max(cos(text, image), 0), mean per pipeline." + bias,
    }
