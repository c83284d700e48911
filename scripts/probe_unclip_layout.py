#!/usr/bin/env python
"""Where does a DALL-E 2 (unCLIP) pipeline lose position words? Three measurements.

    python scripts/probe_unclip_layout.py imagen_lite/weights/dalle2
    python scripts/probe_unclip_layout.py EXPORTED_DIR --checkpoint ~/.cache/imagen-lite/train_default/dalle2/decoder/checkpoints/step_002200

1. *CLIP image tower*: mean cosine between the CLIP image embeddings of true renderings of the
   same object at different positions ("on the left" vs "on the right", "at the top" vs "at the
   bottom"), beside the cosine between two renderings of the same caption. Equal numbers: the
   image embedding carries no position, so neither can the prior's output. And retrieval: for
   each object, how often the CLIP text embedding of "... on the left" (etc.) is nearest to the
   mean image embedding of its own position among the four (chance: 1 in 4).
2. *CLIP text tower*: cosine of the token states of the position word ("left" vs "right", "top"
   vs "bottom") at the last hidden layer -- what the decoder's cross-attention reads.
3. *Decoder*: dx = mean ink-centroid x of images drawn for "... on the right" minus "... on the
   left" (in image widths), dy likewise bottom minus top, 64 px, once through the prior (the
   default path) and once conditioned on the CLIP image embeddings of true renderings (an
   oracle prior). A decoder that places objects where told prints about +0.4 (the centre of a
   third); one that ignores the words, ~0.

The tenth session's shipped decoder (14,200) printed cosines 0.98 across positions as within
one caption, token cosine 0.984 for left/right, and dx / dy ~0 on both paths: the tiny CLIP
never learned positions and the decoder does not read the words (docs/model_card.md, "Tenth
session"). ``--clip-only`` stops after 1 and 2 (a CLIP stage's output, eleventh session: contrast
groups of 4 made retrieval 16 / 16 where the shipped CLIP gets chance). ``--checkpoint`` swaps in the raw (non-EMA) decoder and text_proj weights of a
training checkpoint (``model.safetensors``; the EMA lags ~1,000 steps behind them).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

OBJECTS = (("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle"))
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom")


def ink_centroid(image) -> tuple[float, float]:
    """(x, y) of the centre of the non-white pixels, in image widths/heights (0.5: centred)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    ink = (255.0 - a).sum(-1)
    ink[ink < 60] = 0.0  # the light grey of a background is not ink
    if ink.sum() == 0:
        return 0.5, 0.5
    ys, xs = np.mgrid[0 : a.shape[0], 0 : a.shape[1]]
    return float((xs * ink).sum() / ink.sum() / a.shape[1]), float((ys * ink).sum() / ink.sum() / a.shape[0])


def position_gaps(centroids: dict) -> tuple[float, float]:
    """dx, dy from ``{position: [(x, y), ...]}``: right minus left x, bottom minus top y."""
    mean = {k: np.mean(np.asarray(v, dtype=np.float64), axis=0) for k, v in centroids.items()}
    return float(mean["on the right"][0] - mean["on the left"][0]), float(mean["at the bottom"][1] - mean["at the top"][1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a DALL-E 2 pipeline directory with image_encoder/ and feature_extractor/")
    p.add_argument("--checkpoint", help="a decoder training checkpoint: use its raw weights")
    p.add_argument("--renders", type=int, default=8, help="true renderings per caption for the CLIP cosines")
    p.add_argument("--seeds", type=int, default=2, help="images per (object, position) and path")
    p.add_argument("--steps", default="25,25", help="prior and decoder steps")
    p.add_argument("--guidance", default="2,2", help="prior and decoder guidance")
    p.add_argument("--clip-only", action="store_true", help="measure the CLIP towers only (1 and 2)")
    args = p.parse_args(argv)

    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from imagen_lite import load_pipeline
    from imagen_lite.data.shapes import render, scene_for_caption
    from imagen_lite.pipelines.unclip import encode_images

    pipe = load_pipeline("dalle2", model=args.model, device="cpu", dtype="float32")
    if args.checkpoint:  # the raw decoder and text_proj of a training checkpoint
        from imagen_lite.training.checkpoint import raw_weights

        for part in ("decoder", "text_proj"):
            getattr(pipe, part).load_state_dict(raw_weights(args.checkpoint, f"parts.{part}."))
    vision = CLIPVisionModelWithProjection.from_pretrained(f"{args.model}/image_encoder").float().eval()
    processor = CLIPImageProcessor.from_pretrained(f"{args.model}/feature_extractor")
    rng = np.random.default_rng(0)

    def truth(caption: str, n: int):
        return [Image.fromarray(render(scene_for_caption(caption, rng), 64)) for _ in range(n)]

    # 1. the CLIP image tower
    captions = [f"a {c} {s} {pos}" for c, s in OBJECTS for pos in POSITIONS]
    emb = {c: torch.nn.functional.normalize(encode_images(truth(c, args.renders), vision, processor), dim=-1) for c in captions}
    same, across = [], []
    for c, s in OBJECTS:
        for a in POSITIONS:
            ea = emb[f"a {c} {s} {a}"]
            n = ea.shape[0]
            same.append(float(((ea @ ea.T).sum() - n) / (n * n - n)))
            for b in POSITIONS:
                if b != a:
                    across.append(float((ea @ emb[f"a {c} {s} {b}"].T).mean()))
    print(f"CLIP image embeddings: cosine within a caption {np.mean(same):.3f}, across positions {np.mean(across):.3f}")
    hits = 0
    for c, s in OBJECTS:
        caps = [f"a {c} {s} {pos}" for pos in POSITIONS]
        text = torch.nn.functional.normalize(pipe.encode_prompt(caps)[0].float(), dim=-1)
        image = torch.nn.functional.normalize(torch.stack([emb[cap].mean(0) for cap in caps]), dim=-1)
        hits += int((text @ image.T).argmax(1).eq(torch.arange(len(caps))).sum())
    n = len(OBJECTS) * len(POSITIONS)
    print(f"CLIP text -> image: the right position first for {hits} of {n} captions (chance {n // len(POSITIONS)})")

    # 2. the CLIP text tower's token states at the position word
    words = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
    _, states, mask = pipe.encode_prompt([f"a red circle {w}" for w in words.values()])
    last = [int(m.sum()) - 2 for m in mask]  # the position word sits before the end-of-text token
    word_state = {w: torch.nn.functional.normalize(states[i, last[i]], dim=-1) for i, w in enumerate(words)}
    lr, tb = float(word_state["left"] @ word_state["right"]), float(word_state["top"] @ word_state["bottom"])
    print(f"CLIP text token states: cosine left/right {lr:.3f}, top/bottom {tb:.3f}")
    if args.clip_only:
        return

    # 3. the decoder, through the prior and through an oracle prior
    steps = tuple(int(v) for v in args.steps.split(","))
    guidance = tuple(float(v) for v in args.guidance.split(","))
    print("| path | dx | dy |")
    print("|---|---|---|")
    for path in ("prior", "oracle"):
        centroids = {pos: [] for pos in POSITIONS}
        for c, s in OBJECTS:
            for pos in POSITIONS:
                caption = f"a {c} {s} {pos}"
                kw = {}
                if path == "oracle":
                    kw["image_embeds"] = encode_images(truth(caption, args.seeds), vision, processor)
                out = pipe([caption] * args.seeds, num_inference_steps=(*steps, 1), guidance_scale=(*guidance, 1.0),
                           num_stages=2, generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
                centroids[pos] += [ink_centroid(im) for im in out.images]
        dx, dy = position_gaps(centroids)
        print(f"| {path} | {dx:+.3f} | {dy:+.3f} |")


if __name__ == "__main__":
    main()
