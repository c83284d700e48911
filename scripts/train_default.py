#!/usr/bin/env python
"""Train the embedded default on the shapes domain, resumably, on the CPU.

    nohup python scripts/train_default.py --stage imagen-base --minutes 120 > train.out 2>&1 &

The full resume state (weights, EMA, optimizer, step, RNG) lives in --cache (default
~/.cache/imagen-lite/train_default/<stage>), outside the repository; every run continues
from the newest checkpoint there. --export writes the EMA weights as an fp16 pipeline
directory (imagen_lite/weights/imagen ships it). The log and the shapes-accuracy curve
(curve.jsonl) sit beside the checkpoints.
"""

import argparse
import json
from dataclasses import fields
from pathlib import Path

from imagen_lite.training.default import (
    DEFAULT_CACHE, BaseRunConfig, SRRunConfig, export_base_checkpoint, export_sr_checkpoint, train_base, train_dalle2, train_sr,
)  # fmt: skip

# Run configs of the Imagen stages; "dalle2" chains clip -> prior -> sr -> decoder with the
# generic `imagen-lite train` loop, its recipe in DALLE2_PLAN (no --set there).
STAGES = {"imagen-base": BaseRunConfig, "imagen-sr": SRRunConfig}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=[*sorted(STAGES), "dalle2"], default="imagen-base")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of this run")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--cache", type=Path, default=None, help="checkpoint folder (default: %s/<stage>)" % DEFAULT_CACHE)
    p.add_argument("--resume", default="latest", help="'latest', a step_* dir, or 'none' to start afresh")
    p.add_argument("--export", type=Path, default=None, help="write the EMA pipeline here at the end")
    p.add_argument("--base-dir", type=Path, default=None, help="imagen-sr: the trained base pipeline dir (frozen T5)")
    p.add_argument("--export-only", action="store_true", help="export the latest checkpoint's EMA to --export (imagen-sr: on top of --base-dir), no training")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 when sharing the CPU with other jobs)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="override a config field")
    args = p.parse_args(argv)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cache = args.cache or DEFAULT_CACHE / args.stage
    if args.stage == "dalle2":
        if args.set or args.export_only:
            p.error("--stage dalle2 takes its recipe from DALLE2_PLAN (imagen_lite/training/default.py): no --set or --export-only")
        print(json.dumps(train_dalle2(cache, args.minutes), indent=2))
        return
    cfg = STAGES[args.stage]()
    names = {f.name for f in fields(cfg)}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in names:
            p.error(f"--set {item!r}: unknown field {key!r}; known: {sorted(names)}")
        setattr(cfg, key, json.loads(value))
    resume = None if args.resume == "none" else args.resume
    if args.export_only:
        if args.export is None:
            p.error("--export-only needs --export DIR")
        if args.stage == "imagen-base":
            print(export_base_checkpoint(cache, args.export, args.resume))
        elif args.base_dir is None:
            p.error("--stage imagen-sr --export-only needs --base-dir (the base pipeline to put under the SR stage)")
        else:
            print(export_sr_checkpoint(cache, args.base_dir, args.export, args.resume))
        return
    if args.stage == "imagen-base":
        result = train_base(cfg, cache, args.minutes, resume, args.export, args.max_steps)
    else:
        if args.base_dir is None:
            p.error("--stage imagen-sr needs --base-dir (an exported base pipeline directory)")
        result = train_sr(cfg, args.base_dir, cache, args.minutes, resume, args.export, args.max_steps)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
