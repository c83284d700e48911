#!/usr/bin/env python
"""Where the DALL-E 2 default loses colour-shape binding (sixteenth session).

    python scripts/probe_dalle2_binding.py                    # both checks on the shipped default
    python scripts/probe_dalle2_binding.py --model DIR --pairs 60 --seeds 0 1

1. ``clip``: does the CLIP image tower tell a render of "a C1 S1 and a C2 S2" from one of its
   colour-swapped caption "a C2 S1 and a C1 S2"? For ``--pairs`` random pairs, 4 renders of each
   caption (different layouts); a render's nearest other render by embedding should have its
   own binding (chance 3/7). Shipped default: 0.60.
2. ``oracle``: the decoder conditioned on the CLIP image embedding of a true render of each
   caption (the prior bypassed: ``image_embeds``) against the full chain, on the two-object and
   relation prompts of the standard prompt set (``prompt_set(300, 0)``; ``--kinds``, ``--prompt-seed``
   for others), 64 px, the model's call defaults (the refiner included since the twenty-eighth
   session); failures counted by ``failure_mode``. Shipped default, seeds 0-1: "binding
   swapped" 26 images both ways, two objects 56 -> 70 of 120 right, relations 61 -> 63 (sixteenth
   session, no refiner). Twenty-eighth session, every kind of the selection prompts (``--kinds
   single position two_objects relation counting --prompt-seed 1 --n-prompts 100``), seeds 0-1:
   the prior's embeddings 165 of 200 right, true renders' 173 (with the refiner; 135 / 146 without),
   so a perfect prior would be worth about 4 points.
"""

from __future__ import annotations

import argparse
import collections
import itertools
from pathlib import Path

import numpy as np
import torch


def clip_towers(model: Path):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    return (CLIPVisionModelWithProjection.from_pretrained(model / "image_encoder").eval(),
            CLIPImageProcessor.from_pretrained(model / "feature_extractor"))  # fmt: skip


@torch.no_grad()
def clip_binding(model: Path, pairs: int = 60, seed: int = 0) -> float:
    """Share of renders whose nearest other render (by CLIP image embedding) has their binding."""
    from imagen_lite.data import shapes
    from imagen_lite.pipelines.unclip import encode_images

    vision, processor = clip_towers(model)
    art = lambda c: "an" if c == "orange" else "a"  # noqa: E731
    every = [(c1, s1, c2, s2) for c1, c2 in itertools.permutations(shapes.COLORS, 2)
             for s1, s2 in itertools.permutations(shapes.SHAPES, 2)]  # fmt: skip
    rng = np.random.default_rng(seed)
    hits = total = 0
    for k in rng.choice(len(every), pairs, replace=False):
        c1, s1, c2, s2 = every[k]
        own, swapped = f"{art(c1)} {c1} {s1} and {art(c2)} {c2} {s2}", f"{art(c2)} {c2} {s1} and {art(c1)} {c1} {s2}"
        renders = [shapes.render(shapes.scene_for_caption(c, np.random.default_rng([int(k), j])), 64)
                   for c in (own, swapped) for j in range(4)]  # fmt: skip
        z = torch.nn.functional.normalize(encode_images(renders, vision, processor), dim=-1)
        sim = z @ z.T
        sim.fill_diagonal_(-2.0)
        hits += sum(int(sim[i].argmax().item() // 4 == i // 4) for i in range(8))
        total += 8
    return hits / total


@torch.no_grad()
def oracle(model: Path, seeds=(0, 1), n_prompts: int = 300, batch: int = 20, prompt_seed: int = 0,
           kinds=("two_objects", "relation")) -> dict:
    """{(conditioning, kind): Counter of failure modes ("ok" for right)} for the prior's
    embeddings ("prior") and true renders' ("oracle"), on the prompts of ``kinds`` in
    ``prompt_set(n_prompts, prompt_seed)``."""
    from imagen_lite import load_pipeline
    from imagen_lite.api import family_call_defaults
    from imagen_lite.data import shapes
    from imagen_lite.evaluation.shapes import detect_objects, failure_mode
    from imagen_lite.pipelines.unclip import encode_images

    pipe = load_pipeline("dalle2", model=str(model), device="cpu", dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    preset = pipe.imagen_lite_preset
    # the call defaults generate() fills in (since the twenty-second session the Imagen refiner's
    # refiner_start): without them the probe measured the decoder alone, not the default
    call = family_call_defaults("dalle2", preset)
    vision, processor = clip_towers(model)
    prompts = [c for c, k in shapes.prompt_set(n_prompts, prompt_seed) if k in kinds]
    found = collections.defaultdict(collections.Counter)
    for seed in seeds:
        for i in range(0, len(prompts), batch):
            part = prompts[i:i + batch]
            renders = [shapes.render(shapes.scene_for_caption(c, np.random.default_rng([seed, i, j])), 64)
                       for j, c in enumerate(part)]  # fmt: skip
            z = encode_images(renders, vision, processor)
            for mode, extra in (("prior", {}), ("oracle", {"image_embeds": z})):
                images = pipe(part, num_inference_steps=preset.num_inference_steps, guidance_scale=preset.guidance_scale,
                              num_stages=2, generator=torch.Generator().manual_seed(seed), output_type="np", **call, **extra).images  # fmt: skip
                for caption, image in zip(part, images):
                    parsed = shapes.parse_caption(caption)
                    mode_of = failure_mode(detect_objects((image * 255).round().astype(np.uint8)), parsed)
                    found[(mode, parsed.kind)][mode_of or "ok"] += 1
    return dict(found)


def main(argv=None) -> dict:
    from imagen_lite import presets

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=presets.WEIGHTS_DIR / "dalle2", help="a DALL-E 2 pipeline dir with image_encoder/")
    p.add_argument("--checks", nargs="+", choices=("clip", "oracle"), default=["clip", "oracle"])
    p.add_argument("--pairs", type=int, default=60, help="clip: colour-swapped caption pairs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="oracle: seeds")
    p.add_argument("--n-prompts", type=int, default=300, help="oracle: the standard prompt set's size")
    p.add_argument("--prompt-seed", type=int, default=0, help="oracle: the prompt set's seed (0: the standard set)")
    p.add_argument("--kinds", nargs="+", default=["two_objects", "relation"],
                   choices=("single", "position", "two_objects", "relation", "counting"), help="oracle: prompt kinds")
    args = p.parse_args(argv)
    out = {}
    if "clip" in args.checks:
        out["clip"] = clip_binding(args.model, args.pairs)
        print(f"clip: nearest render has the same binding {out['clip']:.2f} (chance 0.43; {args.pairs} pairs x 8 renders)")
    if "oracle" in args.checks:
        out["oracle"] = oracle(args.model, tuple(args.seeds), args.n_prompts, prompt_seed=args.prompt_seed,
                               kinds=tuple(args.kinds))
        for key in sorted(out["oracle"]):
            print(f"oracle: {key[0]:6s} {key[1]:11s} {dict(out['oracle'][key])}")
        for mode in ("prior", "oracle"):
            right = sum(c["ok"] for (m, _), c in out["oracle"].items() if m == mode)
            total = sum(sum(c.values()) for (m, _), c in out["oracle"].items() if m == mode)
            print(f"oracle: {mode:6s} right {right} of {total} ({100 * right / max(total, 1):.1f}%)")
    return out


if __name__ == "__main__":
    main()
