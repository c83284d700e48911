#!/usr/bin/env python
"""Does an Imagen base use position words? Its x0 prediction from (almost) pure noise, by prompt.

    python scripts/probe_layout.py imagen_lite/weights/imagen
    python scripts/probe_layout.py EXPORTED_DIR --checkpoint ~/.cache/imagen-lite/train_default/imagen-base/step_011200

For each timestep (999, 900: where a sample's layout is decided) and prompt, the base predicts
x0 from ``q_sample(white canvas, t)`` for 32 noise draws; the table prints the share of the
predicted "ink" (distance from white) in the left/middle/right and top/middle/bottom thirds, and
the mean RGB. A model that learned positions puts the ink of "on the left" in the left third;
the embedded default through step 9,200 printed the same thirds for every position word
(docs/model_card.md, "Why positions stay at chance"). ``--checkpoint`` swaps in the raw
(non-EMA) weights of a training checkpoint: the EMA lags ~1,000 steps behind them.

After the table, one line per timestep sums it up: dx = (left-third minus right-third share of
"on the left") minus (the same of "on the right"), dy likewise for "at the top"/"at the bottom".
A model that ignores position words prints ~0 (the cache's base at 12,800: +0.000 / +0.001 at
t = 999); one that places objects where told, ~1 (a from-scratch run: +0.53 / +1.08 after 400
position-only steps; docs/model_card.md, "The layout phase").
"""

from __future__ import annotations

import argparse

import torch

from imagen_lite import runtime, sampling
from imagen_lite.pipelines.imagen import ImagenPipeline

PROMPTS = ("a red circle on the left", "a red circle on the right", "a red circle at the top",
           "a red circle at the bottom", "a blue square", "")  # fmt: skip


def position_gaps(shares: dict) -> tuple[float, float]:
    """(dx, dy) from ``{prompt: (x thirds, y thirds)}``: how far the position words move the ink."""

    def gap(prompt, axis):
        thirds_ = shares[prompt][axis]
        return thirds_[0] - thirds_[2]

    dx = gap("a red circle on the left", 0) - gap("a red circle on the right", 0)
    dy = gap("a red circle at the top", 1) - gap("a red circle at the bottom", 1)
    return dx, dy


def thirds(v: torch.Tensor) -> list[float]:
    side = v.shape[0]
    cuts = (0, side // 3, side - side // 3, side)
    return [round(float(v[a:b].sum() / v.sum()), 4) for a, b in zip(cuts, cuts[1:])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an Imagen pipeline directory (the base is probed)")
    p.add_argument("--checkpoint", default=None, help="a train_default base checkpoint: use its raw weights")
    p.add_argument("--timesteps", default="999,900")
    p.add_argument("--draws", type=int, default=32)
    args = p.parse_args(argv)

    pipe = ImagenPipeline.from_pretrained(args.model, **runtime.dtype_kwargs(torch.float32))
    if args.checkpoint:
        from imagen_lite.training.checkpoint import raw_weights

        pipe.unet.load_state_dict(raw_weights(args.checkpoint, "unet."))
        pipe.text_encoder.load_state_dict(raw_weights(args.checkpoint, "text_encoder."), strict=False)
    r, coords, n = pipe.config.unshuffle_factor, pipe.config.get("coord_channels", 0), args.draws
    side = pipe.unet.config.sample_size
    white = sampling.pixel_unshuffle(torch.ones(n, 3, side * r, side * r), r)
    noise = torch.randn(white.shape, generator=torch.Generator().manual_seed(0))
    print("| t | prompt | x thirds (L/M/R) | y thirds (T/M/B) | mean RGB |\n|---|---|---|---|---|")
    gaps = {}
    for t in (int(v) for v in args.timesteps.split(",")):
        shares = {}
        steps = torch.full((n,), t)
        x_t = pipe.scheduler.add_noise(white, noise, steps)
        if coords:
            x_t = torch.cat([x_t, sampling.coordinate_grid(n, side)], dim=1)
        for prompt in PROMPTS:
            with torch.no_grad():
                states = pipe.encode_prompt([prompt] * n)
                x0 = pipe.unet(x_t, steps, encoder_hidden_states=states).sample
            image = sampling.pixel_shuffle(x0, r)
            ink = (1 - image.min(dim=1).values).clamp(min=0)  # (n, H, W)
            rgb = [round(float(c), 2) for c in image.mean(dim=(0, 2, 3))]
            shares[prompt] = (thirds(ink.mean(dim=(0, 1))), thirds(ink.mean(dim=(0, 2))))
            print(f"| {t} | {prompt!r} | {[round(v, 2) for v in shares[prompt][0]]} | {[round(v, 2) for v in shares[prompt][1]]} | {rgb} |")
        gaps[t] = position_gaps(shares)
    for t, (dx, dy) in gaps.items():
        print(f"t={t}: dx {dx:+.3f} dy {dy:+.3f}")


if __name__ == "__main__":
    main()
