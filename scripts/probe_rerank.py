"""Does a family's own denoiser tell its right shapes images from its wrong ones? (twenty-ninth session)

Generates the shipped default's 64 px images for a prompt set and several seeds, scores each
exactly (``imagen_lite.evaluation.shapes``), then noises each image at timesteps ``--ts`` with
``--draws`` noise draws shared by every image of a prompt (common random numbers) and records
the denoiser's x0 error given the caption (``cond``) and given the empty caption (``uncond``):

- ``--family dalle2``: the decoder with the learned unconditional image embedding (its
  caption-alone branch, learned through ``image_embed_dropout``); the score that ships as
  ``decoder_candidates`` is the ``cond`` error at t >= 500 over 2 draws
  (``UnCLIPLitePipeline.caption_error``);
- ``--family imagen``: the base UNet on the T5 states.

It prints, per score, how often the score picks the right image of a pair of seeds of one
prompt where exactly one is right ("discordant pairs"), and the simulated best of 2 over seed
pairs (0, 1), (2, 3)... against the first of each pair. The arrays go to ``--out``.npz /
.json, so other scores can be computed without regenerating. Results: docs/model_card.md,
"Twenty-ninth session".

    python scripts/probe_rerank.py --family dalle2 --prompt-seed 2 --n-prompts 150 --seeds 0 1 2 3 --draws 3 --out /tmp/d2_p2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from imagen_lite import sampling
from imagen_lite.api import generate, load_pipeline
from imagen_lite.data.shapes import is_heldout, prompt_set
from imagen_lite.evaluation.shapes import detect_objects, failure_mode, parse_caption


def conditioner(pipe, family: str, prompts: list[str]):
    """(cond, uncond) keyword sets for the denoiser's forward, one row per prompt."""
    n = len(prompts)
    if family == "imagen":
        cond, null = pipe.encode_prompt(prompts, "cpu"), pipe.encode_prompt([""], "cpu").expand(n, -1, -1)
        return [dict(encoder_hidden_states=c) for c in (cond, null)]
    learned = pipe.text_proj.learned_classifier_free_guidance_embeddings.unsqueeze(0).expand(n, -1)
    out = []
    for text in (pipe.encode_prompt(prompts, "cpu"), pipe.encode_prompt([""] * n, "cpu")):
        context, temb, mask = pipe.decoder_context(learned, text)
        out.append(dict(encoder_hidden_states=context, class_labels=temb, attention_mask=mask))
    return out


@torch.no_grad()
def errors(pipe, family: str, images: np.ndarray, conds, ts, draws: int) -> np.ndarray:
    """(N, len(ts), 2, draws) x0 squared errors, [cond, uncond], noise seeded per (draw, t)."""
    unet = pipe.unet if family == "imagen" else pipe.decoder
    sched = pipe.scheduler if family == "imagen" else pipe.decoder_scheduler
    r, coords = pipe.config.unshuffle_factor, pipe.config.get("coord_channels", 0)
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    n = x0.shape[0]
    out = np.zeros((n, len(ts), 2, draws))
    for d in range(draws):
        g = torch.Generator().manual_seed(1234 + d)
        for j, t in enumerate(ts):
            a = sched.alphas_cumprod[t]
            xt = sampling.pixel_unshuffle(a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g), r)
            xin = torch.cat([xt, sampling.coordinate_grid(n, xt.shape[-1], None, xt.dtype)], 1) if coords else xt
            for k, kw in enumerate(conds):
                pred = unet(xin, torch.full((n,), t), return_dict=False, **kw)[0][:, : xt.shape[1]]
                x0h = sampling.x0_from_prediction(pred, xt, a, sched.config.prediction_type)
                out[:, j, k, d] = (x0h - sampling.pixel_unshuffle(x0, r)).pow(2).mean(dim=(1, 2, 3)).numpy()
    return out


def report(ok: dict, err: dict, ts, heldout: np.ndarray) -> None:
    seeds, ts = list(ok), np.asarray(ts)
    hi = ts >= 500
    scores = {  # higher is better
        "cond, t >= 500, draws 0-1 (decoder_candidates)": lambda e: -e[:, hi, 0, :2].mean(axis=(1, 2)),
        "cond, all t, all draws": lambda e: -e[:, :, 0, :].mean(axis=(1, 2)),
        "uncond - cond, all t": lambda e: (e[:, :, 1, :] - e[:, :, 0, :]).mean(axis=(1, 2)),
        "log uncond - log cond, all t": lambda e: (np.log(e[:, :, 1, :]) - np.log(e[:, :, 0, :])).mean(axis=(1, 2)),
    }
    pairs = [(seeds[i], seeds[i + 1]) for i in range(0, len(seeds) - 1, 2)]
    for name, fn in scores.items():
        if "draws 0-1" in name and next(iter(err.values())).shape[3] < 2:
            continue
        sc = {s: fn(err[s]) for s in seeds}
        right = total = 0
        for i, a in enumerate(seeds):
            for b in seeds[i + 1:]:
                dis = ok[a] != ok[b]
                good = np.where(sc[a] > sc[b], ok[a], ok[b])
                right += int((good & dis).sum())
                total += int(dis.sum())
        best = np.concatenate([np.where(sc[a] >= sc[b], ok[a], ok[b]) for a, b in pairs])
        first = np.concatenate([ok[a] for a, _ in pairs])
        held = np.tile(heldout, len(pairs))
        print(f"{name}: discordant pairs right {right} / {total}; best of 2 {best.mean():.1%} against {first.mean():.1%} "
              f"(held-out {best[held].mean():.1%} / {first[held].mean():.1%})")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=("imagen", "dalle2"), required=True)
    p.add_argument("--n-prompts", type=int, default=100)
    p.add_argument("--prompt-seed", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--ts", type=int, nargs="+", default=[100, 200, 300, 400, 500, 600, 700, 800, 900])
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--out", required=True, help="path prefix for the .npz / .json")
    a = p.parse_args(argv)
    if len(a.seeds) < 2 or a.draws < 1 or not all(0 <= t < 1000 for t in a.ts):
        p.error("give at least two seeds, one draw, timesteps in [0, 1000)")
    prompts = [c for c, _ in prompt_set(a.n_prompts, seed=a.prompt_seed)]
    pipe = load_pipeline(a.family, device="cpu", dtype="float32")
    conds = conditioner(pipe, a.family, prompts)
    images, ok, fails, err = {}, {}, {}, {}
    start = time.time()
    for s in a.seeds:
        rows = []
        for i in range(0, len(prompts), 16):
            batch = prompts[i : i + 16]
            rows += list(zip(batch, generate(batch, pipeline=a.family, size=64, seed=s, device="cpu", dtype="float32")))
        images[s] = np.stack([np.asarray(im.convert("RGB")) for _, im in rows])
        fails[s] = [failure_mode(detect_objects(im), parse_caption(c)) for c, im in rows]
        ok[s] = np.array([f is None for f in fails[s]])
        err[s] = errors(pipe, a.family, images[s], conds, a.ts, a.draws)
        print(f"seed {s}: {ok[s].mean():.1%} right ({time.time() - start:.0f} s)", flush=True)
    np.savez(a.out + ".npz", ts=np.array(a.ts), seeds=np.array(a.seeds), **{f"img{s}": images[s] for s in a.seeds},
             **{f"ok{s}": ok[s] for s in a.seeds}, **{f"err{s}": err[s] for s in a.seeds})  # fmt: skip
    with open(a.out + ".json", "w") as f:
        json.dump({"family": a.family, "prompts": prompts, "fails": {str(s): fails[s] for s in a.seeds}}, f)
    report(ok, err, a.ts, np.array([is_heldout(c) for c in prompts]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
