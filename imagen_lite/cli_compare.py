"""CLI subcommand ``compare``: the two families side by side, written as a report directory.

``register(subparsers)`` adds it to the main CLI. Importing this module does not import torch;
the handler imports what it needs.
"""

from __future__ import annotations

import argparse

__all__ = ["register", "cmd_compare"]


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an integer") from None


def _size(text: str):
    if text in ("full", "none", "None"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not an integer (or 'full': each cascade's full size)") from None


def _per_pipeline(values: list[str] | None, name: str, parse) -> dict:
    """``["25"]`` -> {"*": 25}; ``["imagen=25,10", "dalle2=25,25,7"]`` -> per pipeline."""
    from .presets import PIPELINES

    out = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep:
            key, value = "*", item
        elif key not in PIPELINES:
            raise ValueError(f"--{name} {item!r}: {key!r} is not a pipeline; use one of {PIPELINES} (PIPELINE=VALUE)")
        try:
            out[key] = parse(value)
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"--{name} {item!r}: {err}") from None
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``compare`` to an argparse subparsers object."""
    p = subparsers.add_parser(
        "compare",
        help="generate the same prompts and seeds with both families; write a grid, a page and metrics",
        description="Generate every prompt with every seed in each pipeline and write a report directory: "
        "grid.png (rows = prompts, columns = pipeline x seed), a self-contained index.html, metrics.json and "
        "metrics.csv (timings, peak memory, steps/guidance, shapes accuracy, CLIP score).",
    )
    p.add_argument("prompt", nargs="*", help="prompts (and/or --prompts-file)")
    p.add_argument("--prompts-file", default=None, help="a text file, one prompt per line ('#' lines skipped)")
    p.add_argument("--pipelines", nargs="+", default=["imagen", "dalle2"], help="families, in column order")
    p.add_argument("--models", nargs="+", default=None, metavar="PIPELINE=MODEL",
                   help="model per pipeline, e.g. imagen=DIR dalle2=karlo (default: the embedded defaults)")
    p.add_argument("--seeds", nargs="+", type=_seed, default=[0, 1], help="integer seeds (default: 0 1)")
    p.add_argument("--size", type=_size, default=256,
                   help="output side every pipeline makes (default 256; 'full': each cascade's last stage)")
    p.add_argument("--steps", nargs="+", default=None, metavar="[PIPELINE=]N[,N...]",
                   help="steps for every pipeline (25 or 25,10) or per pipeline (imagen=25,10 dalle2=25,25,7); "
                   "default: each model's own defaults")
    p.add_argument("--guidance", nargs="+", default=None, metavar="[PIPELINE=]G[,G...]",
                   help="guidance scale, like --steps")
    p.add_argument("--guidance-interval", nargs="+", default=None, metavar="[PIPELINE=]START,STOP",
                   help="the fraction of each guided stage's steps that use guidance, for every pipeline or per "
                   "pipeline (imagen=0,0.4); default: each model's own")
    p.add_argument("--scheduler", default=None, help="swap every pipeline's scheduler: ddpm, ddim, dpm++, unipc, ...")
    p.add_argument("--clip", default="auto",
                   help="CLIP for the CLIP score: 'auto' (the dalle2 pipeline's own, when it ships one), "
                   "a CLIP directory, or 'none'")
    p.add_argument("--stage-images", action="store_true", help="show each stage's intermediate image (e.g. 64px) on the page")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    p.add_argument("--out", required=True, help="report directory (created)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    """Handler of ``compare``: run, save, say where."""
    from .cli import _floats_or_float, _interval, _ints_or_int
    from .evaluation.compare import compare, read_prompts_file

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    if not prompts:
        raise ValueError("no prompts: give one or more prompts, or --prompts-file FILE")
    models = None
    if args.models:
        models = {}
        for item in args.models:
            key, sep, value = item.partition("=")
            if not sep or not value:
                raise ValueError(f"--models {item!r} is not PIPELINE=MODEL (e.g. imagen=/path/to/dir)")
            models[key] = value
    steps = _per_pipeline(args.steps, "steps", _ints_or_int)
    guidance = _per_pipeline(args.guidance, "guidance", _floats_or_float)
    interval = _per_pipeline(args.guidance_interval, "guidance-interval", _interval)
    kwargs, own = {}, {}
    for name, given in (("num_inference_steps", steps), ("guidance_scale", guidance), ("guidance_interval", interval)):
        for key, value in given.items():
            if key == "*":
                kwargs[name] = value
            else:
                own.setdefault(key, {})[name] = value
    if args.scheduler:
        kwargs["scheduler"] = args.scheduler
    report = compare(
        prompts, pipelines=args.pipelines, models=models, seeds=args.seeds, size=args.size, clip=args.clip,
        device=args.device, dtype=args.dtype, stage_images=args.stage_images, **kwargs, **own,
    )  # fmt: skip
    out = report.save(args.out)
    for p in report.pipelines:
        row = report.summary[p]
        print(f"{p}: {row['median_seconds_per_image']} s/image, peak {row['peak_memory_mb']} MB, "
              f"steps {row['steps']}, CLIP {row.get('clip_score_mean')}, shapes {row.get('shapes_accuracy')}")  # fmt: skip
    print(f"wrote {out / 'index.html'} (grid.png, metrics.json, metrics.csv)")
    return 0
