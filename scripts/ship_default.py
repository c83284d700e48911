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
``--sr-from RUN`` puts the SR UNet(s) of an ``imagen-lite train --family F --stage sr`` run in
instead, for either family (the twenty-third session's full-canvas fine-tunes of the shipped
SRs; their steps and wall hours are added to the SR record), e.g. on the shipped directory as it is:

    python scripts/ship_default.py --family imagen --from-dir imagen_lite/weights/imagen --sr-from RUN --steps 25,10 ...

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
    BASE_RECIPES, DALLE2_PLANS, DEFAULT_CACHE, export_base_checkpoint, export_cascade_carrying_sr, export_dalle2_checkpoint,
    export_refiner_checkpoint, export_sr_checkpoint, lineage_name, put_sr_run, read_training_state, recipe_of,
    record_recipe,
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


def copy_with_defaults(from_dir: Path, tmp: Path, defaults: dict) -> None:
    """A ``--from-dir`` ship: the directory as it is, with the new generation defaults."""
    shutil.copytree(from_dir, tmp, dirs_exist_ok=True)
    (tmp / presets.DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2))


def ship_imagen(cache: Path, out: Path, defaults: dict, recipe: str = "v1", base_dir: Path | None = None,
                from_dir: Path | None = None, sr_from: Path | None = None) -> Path:
    """The base of ``recipe``'s lineage + its own SR; a lineage with no SR checkpoint of its own
    carries the shipped cascade's SR (``export_cascade_carrying_sr``). ``base_dir``: an exported
    cascade (e.g. the shipped one) to use as it is instead. With a ``refiner_start`` in
    ``defaults``, the newest refiner checkpoint (``train_default/imagen-refiner``) goes on top.
    ``from_dir``: a complete directory (e.g. the shipped one, refiner included) shipped as it is
    with ``defaults``; ``sr_from``: the SR UNet of an ``imagen-lite train --family imagen --stage
    sr`` run replaces its SR (``imagen_lite.training.default.put_sr_run``)."""
    sr_cache = cache / lineage_name("imagen-sr", recipe)
    start = defaults.get("refiner_start", 0)
    refiner = max(start if isinstance(start, list) else [start]) > 0
    tmp = Path(tempfile.mkdtemp(prefix=".ship-", dir=out.parent))
    try:
        if from_dir is not None:
            copy_with_defaults(from_dir, tmp, defaults)
            if refiner:
                check_refiner_start(tmp, defaults["refiner_start"])
        else:
            with tempfile.TemporaryDirectory() as work:
                cascade = base_dir if base_dir is not None else Path(work) / "cascade" if refiner else tmp
                if base_dir is None:
                    base = export_base_checkpoint(cache / lineage_name("imagen-base", recipe), Path(work) / "base")
                    if recipe != "v1" and not list_checkpoints(sr_cache):
                        export_cascade_carrying_sr(base, presets.WEIGHTS_DIR / "imagen", cascade, defaults=defaults)
                        record_recipe(cascade, ["imagen-base"], recipe)  # the carried SR keeps its own lineage's record
                    else:
                        export_sr_checkpoint(sr_cache, base, cascade, defaults=defaults)
                        record_recipe(cascade, ["imagen-base", "imagen-sr"], recipe)
                if refiner:
                    export_refiner_checkpoint(cache / "imagen-refiner", cascade, tmp, defaults=defaults)
                    check_refiner_start(tmp, defaults["refiner_start"])
        if sr_from is not None:
            put_sr_run(tmp, sr_from)
    except BaseException:  # never leave a half-written directory beside the package's
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return swap_in(tmp, out)


def check_refiner_start(directory: Path, refiner_start) -> None:
    """ValueError when the refiner exported to ``directory`` cannot run ``refiner_start`` (one
    timestep or one per stage)."""
    model_index = json.loads((directory / "model_index.json").read_text())
    top = max(refiner_start if isinstance(refiner_start, list) else [refiner_start])
    if top > model_index.get("refiner_max_timestep", 0):
        raise ValueError(f"--refiner-start {top} is above the timesteps the refiner was trained on "
                         f"(0 to {model_index.get('refiner_max_timestep', 0)})")  # fmt: skip


def ship_dalle2(cache: Path, out: Path, defaults: dict, recipe: str = "v1", from_dir: Path | None = None,
                sr_from: Path | None = None) -> Path:
    """The newest checkpoint of lineage ``recipe`` -- or ``from_dir``, a directory this script
    exported earlier with ``--out`` (a checkpoint selected on the selection prompts that the cache,
    keeping its last two, no longer holds) -- with ``defaults``, swapped into ``out``; ``sr_from``:
    the SR UNets of an ``imagen-lite train --family dalle2 --stage sr`` run replace its SR
    (``imagen_lite.training.default.put_sr_run``)."""
    check_shared_refiner(out, defaults)
    check_shared_sr(out, defaults)
    plan = DALLE2_PLANS[recipe]
    have = recipe_of(read_training_state(from_dir), plan[-1]["stage"]) if from_dir is not None else recipe
    if have != recipe:
        raise ValueError(f"--from-dir {from_dir}: its {plan[-1]['stage']} is lineage {have!r}, not --recipe {recipe!r}")
    tmp = Path(tempfile.mkdtemp(prefix=".ship-", dir=out.parent))
    try:
        if from_dir is None:
            export_dalle2_checkpoint(cache / lineage_name("dalle2", recipe), tmp, defaults=defaults, plan=plan)
        else:
            copy_with_defaults(from_dir, tmp, defaults)
        # stages a fresh start brought trained (v3: v2's CLIP, prior and SR) keep their own lineage's record
        kept = {s for item in plan for s in (item.get("fresh") or {}).get("stages", ())}
        own_sr = [] if defaults.get("shared_sr") else ["sr"]
        record_recipe(tmp, [s for s in [*(item["stage"] for item in plan), *own_sr] if s not in kept], recipe)
        if sr_from is not None:
            put_sr_run(tmp, sr_from, recipe)
        if defaults.get("shared_sr"):
            retire_own_sr(tmp)
    except BaseException:  # never leave a half-written directory beside the package's (e.g. no checkpoint)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return swap_in(tmp, out)


def check_shared_refiner(out: Path, defaults: dict) -> None:
    """A DALL-E 2 default that borrows the sibling Imagen directory's refiner
    (``imagen_lite.api.shared_refiner``) needs that refiner there, trained up to its ``refiner_start``."""
    sibling = defaults.get("shared_refiner")
    if not sibling:
        return
    source = out.parent / sibling
    if not (source / "refiner").is_dir() or not (source / "model_index.json").is_file():
        raise ValueError(f"--refiner-start: the DALL-E 2 decoder borrows the refiner of {source}, "
                         f"which has none (ship the Imagen default with its refiner first)")  # fmt: skip
    check_refiner_start(source, defaults["refiner_start"])


KARLO_SR_PARTS = ("super_res_first", "super_res_last", "super_res_scheduler")


def retire_own_sr(directory: Path) -> None:
    """A DALL-E 2 directory that borrows the Imagen default's SR (``"shared_sr"``; twenty-sixth
    session) ships without its own Karlo-style SR: the parts and their ``model_index.json`` entries
    go, and the SR's record in ``training_state.json`` moves to ``"sr_retired"`` (its history; its
    hours no longer count towards the default's budget, docs/model_card.md)."""
    for part in KARLO_SR_PARTS:
        shutil.rmtree(directory / part, ignore_errors=True)
    index_file = directory / "model_index.json"
    index = json.loads(index_file.read_text())
    for part in KARLO_SR_PARTS:
        index.pop(part, None)
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    state_file = directory / "training_state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if "sr" in state:
            state["sr_retired"] = {**state.pop("sr"), "retired": "the default borrows the Imagen default's SR (shared_sr)"}
            state_file.write_text(json.dumps(state, indent=2) + "\n")


def check_shared_sr(out: Path, defaults: dict) -> None:
    """A DALL-E 2 default that borrows the sibling Imagen directory's SR (``imagen_lite.api.shared_sr``)
    needs that SR (and the T5 it reads the null text with) there."""
    sibling = defaults.get("shared_sr")
    if not sibling:
        return
    source = out.parent / sibling
    missing = [d for d in ("sr_unet", "sr_scheduler", "image_noising_scheduler", "text_encoder", "tokenizer")
               if not (source / d).is_dir()]  # fmt: skip
    if missing or not (source / "model_index.json").is_file():
        raise ValueError(f"--shared-sr: the DALL-E 2 default borrows the SR of {source}, which lacks "
                         f"{missing or ['model_index.json']} (ship the Imagen default with its SR first)")  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=("imagen", "dalle2"), required=True)
    p.add_argument("--steps", required=True, help="per stage, comma-separated")
    p.add_argument("--guidance", required=True, help="per stage, comma-separated")
    p.add_argument("--guidance-interval", default=None, metavar="START,STOP",
                   help="the fraction of each guided stage's steps that use guidance (default: all, 0,1)")
    p.add_argument("--text-guidance", type=float, default=None,
                   help="dalle2: the decoder's text_guidance_scale (three-branch guidance; default: none, two-branch)")
    p.add_argument("--decoder-candidates", type=int, default=None, metavar="K",
                   help="dalle2: 64 px samples per image, re-ranked by the decoder's caption-alone error (default: 1, none)")
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--noise-level", type=int, default=100)
    p.add_argument("--sr-strength", type=float, default=None,
                   help="imagen: img2img start of the SR stage, (0, 1] (default 1: from pure noise)")
    p.add_argument("--denoising-end", type=float, default=None,
                   help="imagen: the fraction of the base's steps to run, (0, 1]; below 1 the base returns its x0 "
                        "prediction there (default: unset, every step)")  # fmt: skip
    p.add_argument("--refiner-start", default=None, metavar="T[,T...]",
                   help="imagen: add the newest refiner checkpoint (train_default/imagen-refiner); each stage's steps "
                        "below this timestep (one per stage: base,sr) run on it (default: no refiner); dalle2: one "
                        "timestep, the decoder's steps below it run on the refiner of the Imagen directory beside "
                        "the output (imagen_lite.api.shared_refiner)")  # fmt: skip
    p.add_argument("--shared-sr", action="store_true",
                   help="dalle2: ship without its own SR; it borrows the Imagen directory's beside the output, run on "
                        "the null text (imagen_lite.api.shared_sr), with --noise-level and --sr-strength")  # fmt: skip
    p.add_argument("--from-dir", type=Path, default=None,
                   help="ship this directory as it is, with the new defaults, instead of exporting the cache's newest "
                        "checkpoints (dalle2: one exported earlier with --out; imagen: a complete cascade, refiner "
                        "included, such as the shipped imagen_lite/weights/imagen)")  # fmt: skip
    p.add_argument("--sr-from", type=Path, default=None,
                   help="take the SR UNet(s) from this `imagen-lite train --family F --stage sr` output (a run started "
                        "from a shipped directory of --family and trained in one call: its steps and wall hours are added "
                        "to that directory's SR record)")  # fmt: skip
    p.add_argument("--base-dir", type=Path, default=None,
                   help="imagen, with --refiner-start: put the refiner on this exported cascade (e.g. the shipped "
                        "imagen_lite/weights/imagen) instead of exporting the base and SR from the cache")  # fmt: skip
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
    if args.decoder_candidates is not None:
        if args.family != "dalle2":
            p.error(f"--decoder-candidates {args.decoder_candidates} applies to --family dalle2 only (its decoder re-ranks)")
        if args.decoder_candidates < 1:
            p.error(f"--decoder-candidates {args.decoder_candidates}: a positive number of samples per image (1: none)")
        if args.decoder_candidates > 1:
            defaults["decoder_candidates"] = args.decoder_candidates
    if args.shared_sr and args.family != "dalle2":
        p.error("--shared-sr applies to --family dalle2 only (it borrows the Imagen default's SR)")
    if args.family == "imagen" or args.shared_sr:
        defaults["sr_strength"] = 1.0 if args.sr_strength is None else args.sr_strength
        if args.shared_sr:
            defaults["shared_sr"] = "imagen"
    elif args.sr_strength is not None:
        p.error(f"--sr-strength {args.sr_strength} applies to --family imagen, or dalle2 with --shared-sr (Karlo's SR "
                f"has no such start)")  # fmt: skip
    if args.denoising_end is not None:
        if args.family != "imagen":
            p.error(f"--denoising-end {args.denoising_end} applies to --family imagen only (its base stage)")
        try:
            denoising_steps(defaults["num_inference_steps"][0], args.denoising_end)
        except ValueError as err:
            p.error(f"--denoising-end {args.denoising_end}: {err}")
        defaults["denoising_end"] = args.denoising_end
    if args.refiner_start is not None and args.family == "dalle2":
        most = 2 if args.shared_sr else 1
        try:
            starts = numbers(args.refiner_start, int)
        except ValueError:
            starts = []
        if not 1 <= len(starts) <= most:
            p.error(f"--refiner-start {args.refiner_start}: --family dalle2 takes one timestep (its decoder), such as 150"
                    + (", or two (decoder,sr), such as 150,120" if args.shared_sr else
                       "; a second (its SR's) needs --shared-sr"))  # fmt: skip
        if starts[0] < 1 or min(starts) < 0:
            p.error(f"--refiner-start {args.refiner_start}: timesteps >= 0, the decoder's >= 1 (leave it out for no refiner)")
        defaults.update(refiner_start=starts[0] if len(starts) == 1 else starts, shared_refiner="imagen")
    elif args.refiner_start is not None:
        try:
            starts = numbers(args.refiner_start, int)
        except ValueError:
            p.error(f"--refiner-start {args.refiner_start}: timesteps, one or one per stage (base,sr), such as 80,120")
        if min(starts) < 0 or max(starts) < 1 or len(starts) > len(defaults["num_inference_steps"]):
            p.error(f"--refiner-start {args.refiner_start}: timesteps >= 0, at least one >= 1, at most one per stage "
                    f"(leave it out for no refiner)")  # fmt: skip
        defaults["refiner_start"] = starts[0] if len(starts) == 1 else starts
    if args.base_dir is not None and args.refiner_start is None:
        p.error("--base-dir is for --refiner-start (a refiner put on an exported cascade); "
                "to change only the generation defaults use --defaults-only")  # fmt: skip
    if args.from_dir is not None:
        want = "ImagenPipeline" if args.family == "imagen" else "UnCLIPLitePipeline"
        try:
            presets.check_model_dir(str(args.from_dir), (want,))
        except (ValueError, FileNotFoundError) as err:
            p.error(f"--from-dir (--family {args.family}): {err}")
    if args.from_dir is not None and args.base_dir is not None:
        p.error("--from-dir ships a complete directory; --base-dir builds one from a cascade and the cache's refiner: pass one")
    if args.base_dir is not None and not (args.base_dir / "model_index.json").is_file():
        p.error(f"--base-dir {args.base_dir}: no model_index.json there (an exported Imagen cascade is needed)")
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
    try:
        if args.family == "imagen":
            path = ship_imagen(args.cache, out, defaults, args.recipe, args.base_dir, args.from_dir, args.sr_from)
        else:
            path = ship_dalle2(args.cache, out, defaults, args.recipe, args.from_dir, args.sr_from)
    except (ValueError, FileNotFoundError) as err:  # e.g. no refiner checkpoint, a refiner_start it cannot run
        p.error(str(err))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"{path}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
