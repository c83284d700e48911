"""``imagen-lite``: generate | data | eval | train | compare | bench (and more as they land).

Errors in user input (ValueError, FileNotFoundError) print as one line on stderr, without a
traceback, and exit with status 2. Progress bars go to stderr; files go where asked.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _ints_or_int(text: str):
    parts = [p for p in text.split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is empty")
    return values[0] if len(values) == 1 else tuple(values)


def _floats_or_float(text: str):
    parts = [p for p in text.split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a comma-separated list of numbers") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is empty")
    return values[0] if len(values) == 1 else tuple(values)


def _interval(text: str) -> tuple[float, float]:
    from .sampling import check_guidance_interval

    try:
        return check_guidance_interval(tuple(float(p) for p in text.split(",")), "--guidance-interval")
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def _timesteps(text: str):
    """``--refiner-start``: one timestep (every stage) or comma-separated, one per stage."""
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a timestep such as 80, or one per stage such as 80,120") from None
    return values[0] if len(values) == 1 else values


def add_call_arguments(parser) -> None:
    """``--guidance-interval``, ``--sr-strength``, ``--denoising-end``, ``--refiner-start``, ``--text-guidance`` and
    ``--decoder-candidates`` for
    the commands that call ``generate()`` (generate, eval shapes)."""
    parser.add_argument("--guidance-interval", type=_interval, nargs="+", default=None, metavar="START,STOP",
                        help="the fraction of each guided stage's steps that use guidance, 0 = the noisiest: "
                             "one pair for every stage (0,0.4) or one per stage (0,0.4 0,1); default: the model's")  # fmt: skip
    parser.add_argument("--sr-strength", type=float, default=None,
                        help="imagen: where the SR stages start, in (0, 1]; 1 = from pure noise (default: the model's)")
    parser.add_argument("--denoising-end", type=float, default=None,
                        help="imagen: the fraction of the base's steps to run, in (0, 1]; below 1 the base "
                             "returns its x0 prediction there (default: the model's)")  # fmt: skip
    parser.add_argument("--refiner-start", type=_timesteps, default=None, metavar="T[,T...]",
                        help="imagen: each stage's steps below this timestep (one, or one per stage) run on the "
                             "model's low-noise refiner; 0: none (default: the model's)")  # fmt: skip
    parser.add_argument("--text-guidance", type=float, default=None, dest="text_guidance_scale",
                        help="dalle2: the decoder's caption-alone guidance s_t (three-branch guidance, "
                             "UnCLIPLitePipeline's text_guidance_scale; default: the model's)")  # fmt: skip
    parser.add_argument("--decoder-candidates", type=int, default=None, dest="decoder_candidates", metavar="K",
                        help="dalle2: 64 px samples drawn per image, the one the decoder's caption-alone branch "
                             "explains best kept; 1: no re-ranking (default: the model's)")  # fmt: skip


def call_kwargs(args) -> dict:
    """The pipeline-call keywords given on the command line (``guidance_interval``,
    ``sr_strength``, ``denoising_end``, ``refiner_start``, ``text_guidance_scale``, ``decoder_candidates``); one not given is left to the
    model's default."""
    interval = args.guidance_interval
    if interval is not None:  # one pair: every stage; several: one per stage
        interval = interval[0] if len(interval) == 1 else tuple(interval)
    given = {"guidance_interval": interval, "sr_strength": args.sr_strength, "denoising_end": args.denoising_end,
             "refiner_start": getattr(args, "refiner_start", None),
             "text_guidance_scale": getattr(args, "text_guidance_scale", None),
             "decoder_candidates": getattr(args, "decoder_candidates", None)}
    return {k: v for k, v in given.items() if v is not None}


def image_paths(out: str, n: int) -> list[Path]:
    """Where ``generate`` writes ``n`` images for ``--out out``: ``out`` itself for one image,
    ``<stem>_<i><suffix>`` for several; no extension means ``.png``. Checked before anything
    is generated, so a bad path costs no sampling: a directory, or an extension Pillow cannot
    write, is a ValueError naming it."""
    from PIL import Image

    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out!r} is a directory; give a file name such as {str(path / 'out.png')!r}")
    suffix = path.suffix or ".png"
    Image.init()
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if suffix.lower() not in writable:
        raise ValueError(f"--out {out!r}: {suffix!r} is not an image format Pillow can write; "
                         "use .png (or .jpg, .webp, .bmp, .tiff)")  # fmt: skip
    if n == 1:
        return [path.with_suffix(suffix)]
    return [path.with_name(f"{path.stem}_{i}{suffix}") for i in range(n)]


def cmd_generate(args) -> int:
    from .api import generate

    paths = image_paths(args.out, args.n)  # before sampling; generate() checks --n itself
    images = generate(
        args.prompt,
        pipeline=args.pipeline,
        model=args.model,
        size=args.size,
        num_images_per_prompt=args.n,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        scheduler=args.scheduler,
        **call_kwargs(args),
    )
    for path, image in zip(paths, images):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .presets import PIPELINES, PRESETS
    from .sampling import SCHEDULERS

    parser = argparse.ArgumentParser(
        prog="imagen-lite",
        description="Text-to-image diffusion: Imagen-style cascades and DALL-E 2-style unCLIP, one interface.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log decisions (device, dtype, model) to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate images from a prompt and write PNGs",
                       description="Generate images from a text prompt and write them as PNG files.")
    g.add_argument("prompt", help="the text prompt")
    g.add_argument("--pipeline", default="imagen", choices=PIPELINES, help="model family (default: imagen)")
    g.add_argument("--model", default=None,
                   help=f"preset {sorted(PRESETS)}, or a pipeline directory; default: the embedded default")
    g.add_argument("--size", type=int, default=None, help="output side; picks how many stages run (default: all)")
    g.add_argument("--steps", type=_ints_or_int, default=None, help="steps, one or one per stage: 25 or 25,10")
    g.add_argument("--guidance", type=_floats_or_float, default=None, help="guidance scale, one or one per stage")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS), help="swap the denoising scheduler")
    g.add_argument("--seed", type=int, default=None)
    add_call_arguments(g)
    g.add_argument("--n", type=int, default=1, help="images per prompt")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    g.add_argument("--out", default="out.png", help="output image, .png unless another extension is given (several images: out_0.png, out_1.png...)")
    g.set_defaults(func=cmd_generate)

    from .cli_shapes import register as register_shapes

    register_shapes(sub)
    from .cli_train import register as register_train; register_train(sub)  # noqa: E702
    from .cli_compare import register as register_compare; register_compare(sub)  # noqa: E702
    from .cli_bench import register as register_bench; register_bench(sub)  # noqa: E702
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"imagen-lite {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
