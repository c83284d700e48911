"""Time the shapes renderer: 1,000 samples at 64 px (sampling + rendering), on this CPU.

Prints a small markdown table with the CPU model, core count and date. Each row is the best
of ``--repeats`` runs (the least disturbed by other processes on the machine).

    python scripts/bench_shapes.py
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

from imagen_lite.data.shapes import ShapesDataset, render, render_pair, sample_scene


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="samples per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the best is reported")
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        parser.error(f"--n and --repeats must be >= 1, got {args.n} and {args.repeats}")
    n = args.n
    scenes = [sample_scene(np.random.default_rng([0, i])) for i in range(n)]

    def sample_and_render():
        for i in range(n):
            render(sample_scene(np.random.default_rng([0, i])), 64)

    def render_only():
        for scene in scenes:
            render(scene, 64)

    def dataset():
        it = iter(ShapesDataset(64, seed=0))
        for _ in range(n):
            next(it)

    pair_n = max(1, n // 10)

    def pairs():
        for scene in scenes[:pair_n]:
            render_pair(scene)

    rows = [
        (f"sample_scene + render, {n} x 64 px", _best(sample_and_render, args.repeats), n),
        (f"render only, {n} x 64 px", _best(render_only, args.repeats), n),
        (f"ShapesDataset(64) items, {n}", _best(dataset, args.repeats), n),
        (f"render_pair (64, 256), {pair_n}", _best(pairs, args.repeats), pair_n),
    ]
    today = datetime.date.today().isoformat()
    print(f"shapes renderer benchmark, {today}: {_cpu_model()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, numpy {np.__version__}; best of {args.repeats}")
    print()
    print("| what | total (s) | per sample (ms) |")
    print("|---|---:|---:|")
    for name, seconds, count in rows:
        print(f"| {name} | {seconds:.3f} | {1000 * seconds / count:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
