"""Ground-truth check of the shapes domain: every sampled caption's render must score True.

Samples N captions (all kinds, held-out compositions included) and scores
``render(scene, 64)``, the 64 px image of ``render_pair(scene)`` and ``render(scene, 256)``
against their captions with :func:`imagen_lite.evaluation.shapes.score_image`. Also checks
that each caption parses back to its kind. Prints a per-kind summary; exits 1 on any failure.

    python scripts/check_shapes.py            # 2,000 captions, seed 0
    python scripts/check_shapes.py --n 5000 --seed 3
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import numpy as np

from imagen_lite.data.shapes import KINDS, is_heldout, parse_caption, render, render_pair, sample_scene
from imagen_lite.evaluation.shapes import score_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="number of captions (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="stream seed: sample i uses default_rng([seed, i])")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")

    start = time.perf_counter()
    renders = ("64", "pair-64", "256")
    total = collections.Counter()
    passed = collections.Counter()
    failures = []
    n_heldout = 0
    for i in range(args.n):
        scene = sample_scene(np.random.default_rng([args.seed, i]))
        n_heldout += is_heldout(scene.caption)
        parsed = parse_caption(scene.caption)
        if parsed.kind != scene.kind or len(parsed.objects) != len(scene.objects):
            failures.append((i, "parse", scene.caption))
        low, high = render_pair(scene)
        for name, image in zip(renders, (render(scene, 64), low, high)):
            total[scene.kind, name] += 1
            if score_image(image, scene.caption):
                passed[scene.kind, name] += 1
            else:
                failures.append((i, name, scene.caption))
    elapsed = time.perf_counter() - start

    print(f"shapes ground-truth check: {args.n} captions (seed {args.seed}, {n_heldout} held-out), {elapsed:.1f} s")
    print("| kind | " + " | ".join(renders) + " |")
    print("|---|" + "---:|" * len(renders))
    for kind in KINDS:
        cells = [f"{passed[kind, r]}/{total[kind, r]}" for r in renders]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    if failures:
        print(f"FAILED: {len(failures)} render(s) did not score True, e.g.:")
        for i, name, caption in failures[:20]:
            print(f"  sample {i} [{name}]: {caption!r}")
        return 1
    print("OK: every ground-truth render scores True at 64 (direct and pair) and 256.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
