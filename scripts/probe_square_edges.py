#!/usr/bin/env python
"""Can an Imagen base give back a true render? Its x0 prediction of a noised true image, scored.

    python scripts/probe_square_edges.py                                  # the embedded default
    python scripts/probe_square_edges.py --model DIR --timesteps 0,20,60,150,300
    python scripts/probe_square_edges.py --model DIR --refiner      # the model's low-noise refiner instead

For each caption, 16 true renders (``shapes.render`` of ``shapes.scene_for_caption``, seeded) are
noised to timestep t with the base's own scheduler. The base (conditional branch) predicts x0
once, and the shapes scorer checks that prediction against the caption. A true render always
scores (the spec's rule), so every miss is the network's.

Nineteenth session: the shipped base v4 (4x4 patches, 48x16x16) returned 51 of 64 square
renders right at t = 0 (the input is the clean image), 47-53 at t = 20-300. Its misses are
squares whose edge rows come back ragged: the box grows a pixel and the fill reads as a circle's.
"Shape wrong" is its largest failure in generation too, and neither a sampler, a timestep mix nor
an early stop fixed it. This probe compares base architectures on that limit early in a run,
long before the generated images can be compared (model card, "Nineteenth session").
``--refiner`` asks the pipeline's refiner (twentieth session) for the x0 prediction instead of
the base, through the same conversion the pipeline uses (``ImagenPipeline._refine``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

CAPTIONS = ("a yellow square", "a small yellow square", "a blue square", "four purple squares")


def true_renders(caption: str, n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 64, 64) true renders of ``caption`` in [-1, 1]."""
    from imagen_lite.data import shapes

    rng = np.random.default_rng(seed)
    ims = [shapes.render(shapes.scene_for_caption(caption, rng), 64) for _ in range(n)]
    return torch.stack([torch.from_numpy(im.astype(np.float32) / 127.5 - 1).permute(2, 0, 1) for im in ims])


@torch.no_grad()
def returned_right(pipe, caption: str, t: int, n: int = 16, seed: int = 0, refiner: bool = False) -> tuple[int, int]:
    """(true renders scored right, x0 predictions of them scored right) for ``caption`` at ``t``;
    ``refiner``: the pipeline's refiner predicts instead of the base."""
    from imagen_lite import sampling
    from imagen_lite.evaluation.shapes import score_image
    from imagen_lite.pipelines.common import postprocess

    if pipe.scheduler.config.prediction_type != "sample" and not refiner:
        raise ValueError(f"the probe reads x0 predictions; this base predicts {pipe.scheduler.config.prediction_type!r}")
    x = true_renders(caption, n, seed)
    r = pipe.config.unshuffle_factor
    xu = sampling.pixel_unshuffle(x, r)
    tt = torch.full((n,), int(t), dtype=torch.long)
    xt = pipe.scheduler.add_noise(xu, torch.randn(xu.shape, generator=torch.Generator().manual_seed(seed + 1)), tt)
    xt = sampling.append_coordinates(xt, getattr(pipe.config, "coord_channels", 0))  # as the pipeline's base
    if refiner:
        image = xt[:, : xu.shape[1]]
        out = pipe._refine(image, tt[0])
        a = pipe.scheduler.alphas_cumprod[int(t)].item()
        x0 = sampling.pixel_shuffle(sampling.x0_from_prediction(out, image, a, pipe.scheduler.config.prediction_type), r)
    else:
        emb = pipe.encode_prompt([caption] * n, "cpu")
        x0 = sampling.pixel_shuffle(pipe.unet(xt, tt, encoder_hidden_states=emb, return_dict=False)[0], r)
    true = sum(score_image(im, caption) for im in postprocess(x, "pil"))  # the pipeline's own PIL rounding
    return true, sum(score_image(im, caption) for im in postprocess(x0, "pil"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--model", default=None, help="an Imagen pipeline directory (default: the embedded default)")
    p.add_argument("--timesteps", default="0,20,60,150,300")
    p.add_argument("--n", type=int, default=16, help="true renders per caption")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--refiner", action="store_true", help="the model's refiner predicts x0 instead of its base")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        timesteps = [int(v) for v in args.timesteps.split(",")]
    except ValueError:
        p.error(f"--timesteps {args.timesteps!r}: give comma-separated integers such as 0,20,60")
    from imagen_lite.api import load_pipeline

    pipe = load_pipeline("imagen", model=args.model, device="cpu", dtype="float32")
    top = pipe.config.get("refiner_max_timestep", 0) if args.refiner else pipe.scheduler.config.num_train_timesteps
    if args.refiner and pipe.refiner is None:
        p.error(f"--refiner: the model {args.model or 'embedded default'!s} has no refiner")
    bad = [t for t in timesteps if not 0 <= t < top]
    if bad:
        p.error(f"--timesteps {bad}: each must be in [0, {top})" + (" (the refiner's trained timesteps)" if args.refiner else ""))
    rows = {}
    print("| t | true renders right | x0 predictions right |\n|---:|---:|---:|")
    for t in timesteps:
        true = got = 0
        for caption in CAPTIONS:
            a, b = returned_right(pipe, caption, t, args.n, refiner=args.refiner)
            true, got = true + a, got + b
        rows[t] = (got, true)
        print(f"| {t} | {true} / {args.n * len(CAPTIONS)} | {got} / {args.n * len(CAPTIONS)} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
