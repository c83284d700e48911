"""CLI subcommands of the shapes domain: ``data shapes``, ``eval shapes`` and ``eval paired``.

``register(subparsers)`` adds them to the main CLI's subparsers object. It creates the
``data`` and ``eval`` commands, or reuses them when the main CLI already has them, so other
``data ...``/``eval ...`` subcommands can live beside these. Importing this module does not
import torch; the handlers import what they need.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["register", "data_shapes", "eval_shapes", "eval_paired"]


def _subcommands(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """The subparsers action of command ``name``, creating the command if needed."""
    parser = subparsers.choices.get(name)
    if parser is None:
        parser = subparsers.add_parser(name, help=help, description=help)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest=f"{name}_command", metavar="DOMAIN", required=True)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data shapes`` and ``eval shapes`` to an argparse subparsers object."""
    data = _subcommands(subparsers, "data", "write training data sets")
    p = data.add_parser(
        "shapes",
        help="write a shapes imagefolder (PNG files + metadata.jsonl)",
        description="Write N procedurally rendered, captioned shapes images as a Hugging Face "
        "imagefolder: PNG files plus metadata.jsonl lines {file_name, text}.",
    )
    p.add_argument("--out", required=True, help="output directory (created; must be new or empty)")
    p.add_argument("--n", type=_positive_int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="data seed: image i is a function of (seed, i)")
    p.add_argument("--size", type=int, choices=(64, 256), default=256, help="image side in pixels")
    p.add_argument(
        "--exclude-heldout",
        action="store_true",
        help="leave out the held-out compositions (see docs/shapes.md)",
    )
    p.set_defaults(func=data_shapes)

    ev = _subcommands(subparsers, "eval", "evaluate a text-to-image pipeline")
    p = ev.add_parser(
        "shapes",
        help="score a pipeline on the shapes prompt set",
        description="Generate images for the fixed shapes prompt set and score them exactly "
        "(per-category accuracy: single, position, two_objects, relation, counting).",
    )
    p.add_argument("--pipeline", required=True, help="pipeline family, e.g. 'imagen' or 'unclip'")
    p.add_argument("--model", default=None, help="model name or path (default: the pipeline's default)")
    p.add_argument("--size", type=int, choices=(64, 256), default=None, help="output side (default: the model's)")
    p.add_argument("--seeds", type=_positive_int, default=2, help="K: generate each prompt with seeds S..S+K-1")
    p.add_argument("--seed-start", type=_non_negative_int, default=0,
                   help="S, the first seed (default 0); e.g. --seeds 2 --seed-start 2 checks a choice on new images")
    p.add_argument("--n-prompts", type=_positive_int, default=100, help="prompt-set size (balanced over kinds)")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt set")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="prompts per generate() call")
    from .cli import _floats_or_float, _ints_or_int, add_call_arguments

    p.add_argument("--steps", type=_ints_or_int, default=None, help="num_inference_steps, one or per stage: 25 or 25,10")
    p.add_argument("--guidance", type=_floats_or_float, default=None, help="guidance_scale, one or per stage")
    p.add_argument("--scheduler", default=None, help="swap the scheduler: ddpm, ddim, dpm++, unipc, ...")
    add_call_arguments(p)
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--dtype", default="auto", help="'auto', 'float32', 'float16', 'bfloat16'")
    p.add_argument("--out", default="shapes_eval.json", help="where to write the JSON result")
    p.set_defaults(func=eval_shapes)

    p = ev.add_parser(
        "paired",
        help="compare two 'eval shapes' results image by image",
        description="Count the images (same caption, same seed) right in one 'eval shapes' JSON "
        "and wrong in the other, per category, with the sign test's z (McNemar). Both must come "
        "from the same prompt set and seeds.",
    )
    p.add_argument("a", help="first eval shapes JSON")
    p.add_argument("b", help="second eval shapes JSON")
    p.set_defaults(func=eval_paired)


def data_shapes(args: argparse.Namespace) -> int:
    """Handler of ``data shapes``: write the imagefolder and say where."""
    from .data.shapes import write_imagefolder

    out = write_imagefolder(
        args.out, n=args.n, seed=args.seed, size=args.size, exclude_heldout=args.exclude_heldout
    )
    print(f"wrote {args.n} shapes images ({args.size}px, seed {args.seed}) to {out}")
    return 0


def eval_shapes(args: argparse.Namespace) -> int:
    """Handler of ``eval shapes``: generate, score, print the table, write JSON."""
    from .api import generate
    from .cli import call_kwargs
    from .evaluation.shapes import evaluate, format_failures, format_table

    def generate_fn(prompts: list[str], seed: int):
        return generate(
            prompts,
            pipeline=args.pipeline,
            model=args.model,
            size=args.size,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            seed=seed,
            device=args.device,
            dtype=args.dtype,
            scheduler=args.scheduler,
            **call_kwargs(args),
        )

    seeds = tuple(range(args.seed_start, args.seed_start + args.seeds))
    result = evaluate(
        generate_fn,
        n_prompts=args.n_prompts,
        seeds=seeds,
        prompt_seed=args.prompt_seed,
        batch_size=args.batch_size,
    )
    config = {
        "pipeline": args.pipeline,
        "model": args.model,
        "size": args.size,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "scheduler": args.scheduler,
        "sr_strength": args.sr_strength,
        "denoising_end": args.denoising_end,
        "refiner_start": args.refiner_start,
        "decoder_candidates": args.decoder_candidates,
        "guidance_interval": call_kwargs(args).get("guidance_interval"),
        "device": args.device,
        "dtype": args.dtype,
        "seeds": list(seeds),
        "n_prompts": args.n_prompts,
        "prompt_seed": args.prompt_seed,
    }
    print(format_table(result))
    print("\nWhy images failed (imagen_lite.evaluation.shapes.failure_mode):")
    print(format_failures(result))
    out = Path(args.out)
    if out.parent != Path("."):
        out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": config, **result}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


def _load_result(path: str) -> dict:
    """One ``eval shapes --out`` JSON, or that file gzipped (``.gz``: how ``docs/evals`` keeps the
    records later sessions pair against); a missing or malformed file is an error naming it (the
    main CLI prints it as one line and exits 2)."""
    import gzip

    try:
        if str(path).endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return json.loads(f.read())
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"eval paired: no such file {path!r} (pass two 'eval shapes --out' JSON files)") from None
    except (json.JSONDecodeError, OSError, EOFError) as err:  # OSError: a .gz that is not gzip
        raise ValueError(f"eval paired: {path!r} is not JSON ({err})") from None


def eval_paired(args: argparse.Namespace) -> int:
    """Handler of ``eval paired``: print the paired table of two ``eval shapes`` results."""
    from .evaluation.shapes import format_paired, paired

    a, b = _load_result(args.a), _load_result(args.b)
    result = paired(a, b)  # ValueError (no shared image, no records) names what is wrong
    for path, r in ((args.a, a), (args.b, b)):
        cats = ", ".join(f"{k} {100 * v:.1f}" for k, v in r.get("per_category", {}).items())
        print(f"{path}: {100 * r.get('overall', 0.0):.1f}% ({cats})")
    print(format_paired(result, "a", "b"))
    return 0
