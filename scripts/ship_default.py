#!/usr/bin/env python
"""Copy the embedded default's current weights from the training cache into the package.

    python scripts/ship_default.py --family imagen --guidance 2,1 --steps 25,10 --scheduler ddpm --sr-strength 0.5
    python scripts/ship_default.py --family dalle2 --guidance 2,2,1 --steps 25,25,3 --scheduler ddpm
    python scripts/ship_default.py --family imagen --guidance 2,1 --steps 25,10 --scheduler ddpm --sr-strength 0.5 --defaults-only

imagen: the newest base checkpoint's EMA (``train_default/imagen-base``) + the newest SR
checkpoint's EMA (``train_default/imagen-sr``) -> ``imagen_lite/weights/imagen``.
``--recipe v2`` ships the v2 lineage instead (``train_default/<stage>-v2``; an Imagen base
with no SR of its own carries the shipped SR; v3 is an Imagen-only lineage), ``--out DIR`` writes a candidate elsewhere.
dalle2: the newest decoder checkpoint of the chained run (``train_default/dalle2``) on top of
its sr stage's pipeline (CLIP, prior, text_proj, SR) -> ``imagen_lite/weights/dalle2``, with
its CLIP vision tower (``image_encoder/``) for ``encode_images`` and CLIP scores.

Weights are written in float16 safetensors; ``training_state.json`` records each stage's
steps, wall hours and recipe (a new machine's training run starts from it, see
``scripts/train_default.py``); ``imagen_lite_defaults.json`` records the generation defaults (chosen by the sweep in docs/model_card.md; ``--defaults-only`` rewrites just that file,
e.g. after a guidance study, and leaves the weights alone). Read-only on the cache: stop
a run training the same stage first only if it might finish its stage meanwhile.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from imagen_lite import presets
from imagen_lite.pipelines.common import is_guidance_scale
from imagen_lite.sampling import check_guidance_interval, denoising_steps
from imagen_lite.training.checkpoint import list_checkpoints
from imagen_lite.training.default import (
    BASE_RECIPES, DALLE2_PLANS, DEFAULT_CACHE, export_base_checkpoint, export_cascade_carrying_sr, export_dalle2_checkpoint, export_sr_checkpoint,
    lineage_name, record_recipe,
)  # fmt: skip


def numbers(text: str, kind):
    return [kind(v) for v in text.split(",")]


def drop_local_paths(directory: Path) -> None:
    """Remove the ``_name_or_path`` that diffusers' ``save_pretrained`` copies into each config from
    the (temporary) folder a model was loaded from: a path on the shipping machine means nothing to
    a user, and ``from_pretrained`` sets it afresh on load."""
    for config in [*directory.glob("*/config.json"), directory / "model_index.json"]:
        if config.is_file():
            data = json.loads(config.read_text())
            if data.pop("_name_or_path", None) is not None:
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def swap_in(tmp: Path, out: Path) -> Path:
    """Replace ``out`` by the finished directory ``tmp`` (never a half-written default)."""
    drop_local_paths(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def ship_imagen(cache: Path, out: Path, defaults: dict, recipe: str = "v1") -> Path:
    """The base of ``recipe``'s lineage + its own SR; a lineage with no SR checkpoint of its own
    carries the shipped cascade's SR (``export_cascade_carrying_sr``)."""
    sr_cache = cache / lineage_name("imagen-sr", recipe)
    with tempfile.TemporaryDirectory() as work:
        base = export_base_checkpoint(cache / lineage_name("imagen-base", recipe), Path(work) / "base")
        tmp = Path(tempfile.mkdtemp(prefix=".ship-", dir=out.parent))
        if recipe != "v1" and not list_checkpoints(sr_cache):
            export_cascade_carrying_sr(base, presets.WEIGHTS_DIR / "imagen", tmp, defaults=defaults)
            record_recipe(tmp, ["imagen-base"], recipe)  # the carried SR keeps its own lineage's record
        else:
            export_sr_checkpoint(sr_cache, base, tmp, defaults=defaults)
            record_recipe(tmp, ["imagen-base", "imagen-sr"], recipe)
    return swap_in(tmp, out)


def ship_dalle2(cache: Path, out: Path, defaults: dict, recipe: str = "v1") -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=".ship-", dir=out.parent))
    export_dalle2_checkpoint(cache / lineage_name("dalle2", recipe), tmp, defaults=defaults, plan=DALLE2_PLANS[recipe])
    record_recipe(tmp, [p["stage"] for p in DALLE2_PLANS[recipe]] + ["sr"], recipe)
    return swap_in(tmp, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("imagen", "dalle2"), required=True)
    p.add_argument("--steps", required=True, help="per stage, comma-separated")
    p.add_argument("--guidance", required=True, help="per stage, comma-separated")
    p.add_argument("--guidance-interval", default=None, metavar="START,STOP",
                   help="the fraction of each guided stage's steps that use guidance (default: all, 0,1)")
    p.add_argument("--text-guidance", type=float, default=None,
                   help="dalle2: the decoder's text_guidance_scale (three-branch guidance; default: none, two-branch)")
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--noise-level", type=int, default=100)
    p.add_argument("--sr-strength", type=float, default=None,
                   help="imagen: img2img start of the SR stage, (0, 1] (default 1: from pure noise)")
    p.add_argument("--denoising-end", type=float, default=None,
                   help="imagen: the fraction of the base's steps to run, (0, 1]; below 1 the base returns its x0 "
                        "prediction there (default: unset, every step)")  # fmt: skip
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--recipe", choices=sorted({*BASE_RECIPES, *DALLE2_PLANS}), default="v1",
                   help="the lineage to ship (scripts/train_default.py --recipe): its cache folders <stage>-<recipe>")
    p.add_argument("--out", type=Path, default=None,
                   help="write the directory here instead of into the package (a candidate to evaluate first)")
    p.add_argument("--defaults-only", action="store_true",
                   help="rewrite only the shipped directory's generation defaults (weights untouched)")
    args = p.parse_args(argv)
    defaults = {"num_inference_steps": numbers(args.steps, int), "guidance_scale": numbers(args.guidance, float),
                "scheduler": args.scheduler, "noise_level": args.noise_level}  # fmt: skip
    if args.guidance_interval is not None:
        try:
            defaults["guidance_interval"] = list(check_guidance_interval(tuple(numbers(args.guidance_interval, float))))
        except ValueError as err:
            p.error(f"--guidance-interval {args.guidance_interval}: {err}")
    if args.text_guidance is not None:
        if args.family != "dalle2":
            p.error(f"--text-guidance {args.text_guidance} applies to --family dalle2 only (its decoder's caption-alone branch)")
        if not is_guidance_scale(args.text_guidance):
            p.error(f"--text-guidance {args.text_guidance}: it must be a number >= 0")
        defaults["text_guidance_scale"] = args.text_guidance
    if args.family == "imagen":
        defaults["sr_strength"] = 1.0 if args.sr_strength is None else args.sr_strength
    elif args.sr_strength is not None:
        p.error(f"--sr-strength {args.sr_strength} applies to --family imagen only (the DALL-E 2 SR has no such start)")
    if args.denoising_end is not None:
        if args.family != "imagen":
            p.error(f"--denoising-end {args.denoising_end} applies to --family imagen only (its base stage)")
        try:
            denoising_steps(defaults["num_inference_steps"][0], args.denoising_end)
        except ValueError as err:
            p.error(f"--denoising-end {args.denoising_end}: {err}")
        defaults["denoising_end"] = args.denoising_end
    lineages = BASE_RECIPES if args.family == "imagen" else DALLE2_PLANS
    if args.recipe not in lineages:
        p.error(f"--recipe {args.recipe}: --family {args.family} has the lineages {sorted(lineages)}")
    preset = presets.DEFAULT_IMAGEN if args.family == "imagen" else presets.DEFAULT_DALLE2
    out = args.out or Path(preset.components["dir"])
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.defaults_only:  # e.g. a guidance study changed the defaults, not the weights
        if not (out / presets.DEFAULTS_FILE).is_file():
            raise SystemExit(f"--defaults-only: nothing shipped at {out} yet")
        (out / presets.DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2))
        print(f"{out / presets.DEFAULTS_FILE}: {defaults}")
        return
    ship = ship_imagen if args.family == "imagen" else ship_dalle2
    path = ship(args.cache, out, defaults, args.recipe)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"{path}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
