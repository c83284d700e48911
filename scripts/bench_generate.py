"""imagen-lite vs diffusers on identical weights: seconds per denoising step and end to end.

(1) ``ImagenPipeline`` vs ``IFPipeline`` (base) and ``IFPipeline`` + ``IFSuperResolutionPipeline``
(cascade); (2) ``UnCLIPLitePipeline`` vs diffusers' ``UnCLIPPipeline`` assembled from the same
components. Both sides share the module objects, seed and steps; the table's ``max abs diff``
shows they computed the same images. Runs are interleaved (imagen-lite, diffusers, diffusers,
imagen-lite, ...) after a warm-up round; medians over rounds; a ratio is the median of the
per-round ratios -- on a loaded machine only those ratios mean something.

    python scripts/bench_generate.py                      # tiny + 64->256 px, both families
    python scripts/bench_generate.py --cases tiny --rounds 1 --json out.json
    python scripts/bench_generate.py --cases 64-256 default --threads 1

Case ``default`` is the embedded default's base (``build_base(BaseRunConfig())``); it has no
diffusers reference (IFPipeline needs a UNet that also predicts a variance) and is reported
as skipped. ``scripts/bench.py`` runs this comparison together with the other benchmarks.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imagen_lite.evaluation import bench as B  # noqa: E402

CASES = ("tiny", "64-256", "default")


def unclip_reference():
    """diffusers' (deprecated) ``UnCLIPPipeline`` and ``UnCLIPTextProjModel``: the reference,
    imported here because the package itself never imports them. None when this diffusers has
    dropped them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline, UnCLIPTextProjModel
    except ImportError:
        return None
    return UnCLIPPipeline, UnCLIPTextProjModel


def sampling_rows(cases, families=("imagen", "unclip"), rounds=5, warmup=1, steps=None, log=print) -> tuple[list, list]:
    """Rows of the sampling comparison for ``cases``; returns ``(rows, notes)``."""
    rows, notes = [], []
    for case in cases:
        if case not in CASES:
            raise ValueError(f"case {case!r} is not known; use some of {CASES}")
        if "imagen" in families:
            spec = B.embedded_default_case() if case == "default" else B.IMAGEN_CASES[case]
            log(f"[sampling] imagen {spec.name} ...")
            kw = {} if steps is None else {"steps": (steps[0], steps[1])}
            try:
                rows += B.bench_imagen(spec, rounds=rounds, warmup=warmup, **kw)
            except ValueError as err:  # IFPipeline cannot run a UNet without a learned variance
                notes.append(f"imagen/{case}: {err}; skipped")
        if "unclip" in families:
            if case == "default":
                notes.append("unclip/default: no embedded unCLIP default is trained yet; skipped")
                continue
            ref = unclip_reference()
            if ref is None:
                notes.append("unclip: this diffusers has no UnCLIPPipeline; skipped")
                continue
            log(f"[sampling] unclip {case} ...")
            kw = {} if steps is None else {"steps": (steps[0], steps[0], max(3, steps[1]))}
            rows += B.bench_unclip(case, *ref, rounds=rounds, warmup=warmup, **kw)
    return rows, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["tiny", "64-256"], choices=CASES)
    parser.add_argument("--families", nargs="+", default=["imagen", "unclip"], choices=("imagen", "unclip"))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--steps", type=int, nargs=2, default=None, metavar=("BASE", "SR"),
                        help="steps of the base/decoder stage and of the SR stage (default 10 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the rows and machine as JSON here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error(f"--rounds must be >= 1 and --warmup >= 0, got {args.rounds} and {args.warmup}")
    with B.num_threads(args.threads):
        rows, notes = sampling_rows(args.cases, args.families, args.rounds, args.warmup, args.steps,
                                    log=lambda m: print(m, file=sys.stderr))  # fmt: skip
        info = B.machine_info()
    print(B.machine_header(info))
    print()
    print("Interleaved runs on a shared machine: medians over rounds; a stage row is seconds per denoising step,")
    print("`end to end` seconds per call; ratio = median of per-round imagen-lite/diffusers ratios (< 1: imagen-lite faster).")
    print()
    print(B.markdown_table(rows, B.SAMPLING_COLUMNS))
    for note in notes:
        print(f"\nNote: {note}")
    if args.json:
        B.write_json(args.json, {"machine": info, "command": " ".join(sys.argv), "sampling": rows, "notes": notes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
