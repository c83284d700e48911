#!/usr/bin/env python
"""Train the embedded default on the shapes domain, resumably, on the CPU.

    nohup python scripts/train_default.py --stage imagen-base --minutes 120 > train.out 2>&1 &

The full resume state (weights, EMA, optimizer, step, RNG) lives in --cache (default
~/.cache/imagen-lite/train_default/<stage>), outside the repository; every run continues
from the newest checkpoint there. On a new machine (empty cache) a run starts from the shipped
weights in imagen_lite/weights/<family> (--warm-start shipped, the default): the step and
hour counters continue from their training_state.json, AdamW starts afresh. --warm-start
none trains from scratch. A run keeps the recipe of what it resumes (the checkpoint's config,
or the shipped training_state.json's); --set FIELD=JSON changes a field from there (e.g.
--set lr=3e-5 to lower the learning rate; a recipe's phases re-apply at their steps and win over a
--set of the same field, so a later lr drop goes in as a phase: --set 'phases={..., "25000": {"lr": 2e-5}}').
--recipe picks the lineage; without it, the one the package ships (its training_state.json).
--export writes the EMA weights as an fp16 pipeline directory (imagen_lite/weights/imagen ships
it). The log and the shapes-accuracy curve (curve.jsonl) sit beside the checkpoints. A recipe
under bf16 autocast on a CPU without AVX-512 BF16 / AMX (10x slower there) gets a warning that
names --set bf16=false (twenty-seventh session).
"""

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path

from imagen_lite import presets, runtime
from imagen_lite.training.default import (
    BASE_RECIPES, DALLE2_PLANS, DEFAULT_CACHE, TRAINING_STATE_FILE, WIP_DIR, BaseRunConfig, RefinerRunConfig, SRRunConfig, export_base_checkpoint,
    export_refiner_checkpoint, export_sr_checkpoint, lineage_name, resumed_config, shipped_recipe, train_base_plan, train_dalle2,
    train_refiner, train_sr,
)  # fmt: skip
from imagen_lite.training.checkpoint import resolve_resume

# Run configs of the Imagen stages; "dalle2" chains clip -> prior -> sr -> decoder with the
# generic `imagen-lite train` loop, its recipe in DALLE2_PLAN (v2: DALLE2_V2_PLAN; no --set there).
# "imagen-refiner" (twentieth session) is the base's low-noise refiner; it trains without a base
# (unconditional) and is exported onto --base-dir, by default the shipped cascade.
STAGES = {"imagen-base": BaseRunConfig, "imagen-sr": SRRunConfig, "imagen-refiner": RefinerRunConfig}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=[*sorted(STAGES), "dalle2"], default="imagen-base")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of this run")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--cache", type=Path, default=None, help="checkpoint folder (default: %s/<stage>)" % DEFAULT_CACHE)
    p.add_argument("--resume", default="latest", help="'latest', a step_* dir, or 'none' to start afresh")
    p.add_argument("--export", type=Path, default=None, help="write the EMA pipeline here at the end")
    p.add_argument("--base-dir", type=Path, default=None, help="imagen-sr: the trained base pipeline dir (frozen T5); imagen-refiner: the pipeline "
                                                                    "to export the refiner with (default: the shipped one)")
    p.add_argument("--export-only", action="store_true", help="export the latest checkpoint's EMA to --export (imagen-sr: on top of --base-dir), no training")
    p.add_argument("--warm-start", default="shipped",
                   help="with no checkpoint in the cache, start from these exported weights: 'shipped' (the package's "
                        "default, %(default)s), a pipeline dir, or 'none' for from scratch")
    p.add_argument("--recipe", choices=sorted({*BASE_RECIPES, *DALLE2_PLANS}), default=None,
                   help="the lineage (imagen-base, dalle2; BASE_RECIPES, DALLE2_PLANS in imagen_lite/training/default.py). "
                        "Default: the one the package ships (v2 since the twelfth session). A lineage trains in the "
                        "cache folder <stage> (v1) or <stage>-<recipe>; the shipped one warm-starts from the package, "
                        "any other only from wip/<its folder>")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 when sharing the CPU with other jobs)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="override a config field")
    args = p.parse_args(argv)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    recipes = {"imagen-base": BASE_RECIPES, "dalle2": DALLE2_PLANS}.get(args.stage, {"v1": None})
    family = "dalle2" if args.stage == "dalle2" else "imagen"
    # the lineage that ships (its stage record's "recipe", v1 when unrecorded) warm-starts from the
    # package; any other lineage from its own work-in-progress weights (wip/<lineage>), if any
    record = {"imagen-base": "imagen-base", "imagen-sr": "imagen-sr", "imagen-refiner": "imagen-refiner",
              "dalle2": "decoder"}[args.stage]  # fmt: skip
    in_package = shipped_recipe(presets.WEIGHTS_DIR / family, record)
    if args.recipe is None:
        args.recipe = in_package  # continue what ships, not a lineage the package has moved past
    if args.recipe not in recipes:
        p.error(f"--recipe {args.recipe}: --stage {args.stage} has the lineages {sorted(recipes)}")
    lineage = lineage_name(args.stage, args.recipe)
    cache = args.cache or DEFAULT_CACHE / lineage
    shipped_here = in_package == args.recipe
    shipped = presets.WEIGHTS_DIR / family if shipped_here else WIP_DIR / lineage
    warm_start = {"none": None, "shipped": shipped}.get(args.warm_start, Path(args.warm_start))
    if warm_start is not None and not (warm_start / TRAINING_STATE_FILE).is_file():
        if args.warm_start != "shipped":
            p.error(f"--warm-start {args.warm_start!r}: no {TRAINING_STATE_FILE} there (an exported default directory "
                    f"is needed), or pass 'none'")  # fmt: skip
        warm_start = None  # nothing shipped yet (a checkout before the first ship): from scratch
    if args.stage == "dalle2":
        if args.set or args.export_only:
            p.error("--stage dalle2 takes its recipe from DALLE2_PLANS (imagen_lite/training/default.py): no --set or --export-only")
        print(json.dumps(train_dalle2(cache, args.minutes, plan=DALLE2_PLANS[args.recipe], warm_start=warm_start), indent=2))
        return
    resume = None if args.resume == "none" else args.resume
    try:
        ckpt = resolve_resume(cache, resume)
    except FileNotFoundError as err:
        p.error(str(err))
    # a run continues the recipe it resumes (checkpoint, else shipped weights); --set changes it
    cfg = resumed_config(STAGES[args.stage], ckpt, warm_start if resume else None, args.stage)
    if args.stage == "imagen-base" and ckpt is None and (
        warm_start is None or not resume or shipped_recipe(warm_start, "imagen-base") != args.recipe
    ):
        # from scratch: the lineage's recipe; a branch (weights of another lineage, --recipe names
        # this one) too, its phases re-applied up to the warm start's step (e.g. v4d from v4)
        cfg = replace(cfg, **BASE_RECIPES[args.recipe])
    names = {f.name for f in fields(cfg)}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in names:
            p.error(f"--set {item!r}: unknown field {key!r}; known: {sorted(names)}")
        setattr(cfg, key, json.loads(value))
    if args.export_only:
        if args.export is None:
            p.error("--export-only needs --export DIR")
        if args.stage == "imagen-base":
            print(export_base_checkpoint(cache, args.export, args.resume))
        elif args.stage == "imagen-refiner":
            print(export_refiner_checkpoint(cache, args.base_dir or presets.WEIGHTS_DIR / family, args.export, args.resume))
        elif args.base_dir is None:
            p.error("--stage imagen-sr --export-only needs --base-dir (the base pipeline to put under the SR stage)")
        else:
            print(export_sr_checkpoint(cache, args.base_dir, args.export, args.resume))
        return
    if cfg.bf16 and runtime.cpu_has_fast_bf16() is False:
        # a recipe's bf16 autocast (v2+ bases, the refiner) is ~10x slower than float32 on a CPU
        # without AVX-512 BF16 / AMX; the run keeps its recipe, the user is told how to change it
        print(f"warning: --stage {args.stage} trains under bf16 autocast, and this CPU has none of "
              f"{', '.join(runtime.FAST_BF16_CPU_FLAGS)}: its steps run about 10x slower than in float32 "
              f"(python scripts/budget_speed.py times both); add --set bf16=false", file=sys.stderr)
    if args.stage == "imagen-base":
        result = train_base_plan(cfg, cache, args.minutes, resume, args.export, args.max_steps, warm_start=warm_start)
    elif args.stage == "imagen-refiner":
        try:
            result = train_refiner(cfg, cache, args.minutes, resume, args.export, args.max_steps, warm_start=warm_start,
                                   base_dir=args.base_dir or presets.WEIGHTS_DIR / family)  # fmt: skip
        except ValueError as err:  # a bad --set (max_timestep)
            p.error(str(err))
    else:
        base_dir = args.base_dir or warm_start  # the shipped cascade carries the base's T5
        if base_dir is None:
            p.error("--stage imagen-sr needs --base-dir (an exported base pipeline directory)")
        result = train_sr(cfg, base_dir, cache, args.minutes, resume, args.export, args.max_steps, warm_start=warm_start)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
