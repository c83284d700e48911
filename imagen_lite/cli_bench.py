"""``imagen-lite bench`` (and ``scripts/bench.py``): imagen-lite measured against the alternatives.

Sections (``--sections``, default all), each a function of
:mod:`imagen_lite.evaluation.bench`; the report is markdown on stdout, headed with the machine,
and ``--json`` writes every number:

- ``sampling``: seconds per denoising step and end to end against diffusers' ``IFPipeline`` (+
  ``IFSuperResolutionPipeline``) and ``UnCLIPPipeline`` on identical weights (cases ``tiny``,
  ``64-256``; ``default``, the embedded default's base UNet, has no diffusers reference --
  ``IFPipeline`` needs a learned-variance UNet -- and is reported as skipped).
- ``quality``: shapes accuracy against wall time per scheduler and step count on a trained
  pipeline directory (``--model-dir``), Pareto front marked. Skipped, saying why, without one.
- ``training``: samples/s of a training step against imagen-pytorch's ``Unet`` of equal
  parameter count. imagen-pytorch is the optional ``bench`` extra
  (``pip install 'imagen-lite[bench]'``), never a runtime dependency: without it only
  imagen-lite's row is measured and the report says so.
- ``gpu``: an IF-I-XL-sized base UNet in float16 on CUDA; skipped, saying so, without CUDA.
- ``latency``: wall seconds of one ``generate()`` image per family at ``--latency-size`` (256)
  px with the embedded defaults' own settings (or ``--latency-model FAMILY=DIR``), against the
  <= 5 s target on the 2-core CPU. Run it on an otherwise idle machine with ``--threads 2``.

diffusers' ``UnCLIPPipeline`` lives in its deprecated package, which ``imagen_lite`` never
imports: ``scripts/bench.py`` passes it in (from ``scripts/bench_generate.py``), and
``imagen-lite bench`` loads that script from the source checkout when there is one; otherwise
the unCLIP rows are skipped with a note.

Timing on a shared machine: interleaved rounds, medians, paired ratios, wall and CPU clocks
(see the module docstring of :mod:`imagen_lite.evaluation.bench`). Use ``--threads 1`` beside
other work.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

__all__ = ["register", "build_parser", "run", "main", "SECTIONS"]

SECTIONS = ("sampling", "quality", "training", "gpu", "latency")
CASES = ("tiny", "64-256", "default")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="what to run (default: all)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch intra-op threads (default: torch's); use 1 beside other work")  # fmt: skip
    p.add_argument("--rounds", type=_positive_int, default=5, help="timed interleaved rounds, median reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--json", default=None, help="also write every row, the machine and the command as JSON here")
    g = p.add_argument_group("sampling")
    g.add_argument("--cases", nargs="+", default=["tiny", "64-256"], choices=CASES,
                   help="tiny: 16->32 px test sizes; 64-256: small widths at 64->256 px; default: the embedded default's base")  # fmt: skip
    g.add_argument("--families", nargs="+", default=["imagen", "unclip"], choices=("imagen", "unclip"))
    g.add_argument("--compile", action="store_true",
                   help="time imagen-lite with its opt-in torch.compile (load_pipeline(compile=True)) against eager "
                        "diffusers; the warm-up rounds pay the compilation")
    g.add_argument("--steps", type=_positive_int, nargs=2, default=None, metavar=("BASE", "SR"),
                   help="steps of the base/decoder (and prior) stage and of the SR stage (default 10 5)")  # fmt: skip
    g = p.add_argument_group("quality per second")
    g.add_argument("--model-dir", default=None, help="a trained ImagenPipeline directory (e.g. the embedded default's export)")
    g.add_argument("--quality-schedulers", nargs="+", default=["ddpm", "ddim", "dpm++", "unipc"])
    g.add_argument("--quality-steps", type=_positive_int, nargs="+", default=[100, 50, 25, 10],
                   help="step counts per scheduler (only DDPM runs more than 50)")  # fmt: skip
    g.add_argument("--quality-prompts", type=_positive_int, default=40, help="shapes prompts per row (default 40)")
    g.add_argument("--quality-batch", type=_positive_int, default=20, help="prompts per pipeline call")
    g.add_argument("--quality-guidance", type=float, default=None, help="guidance of every row (default: the directory's)")
    g.add_argument("--quality-default", default=None, metavar="SCHEDULER:STEPS",
                   help="the settings marked 'model default' when the directory has no imagen_lite_defaults.json "
                        "(the shipped embedded default: ddim:25)")  # fmt: skip
    g = p.add_argument_group("training")
    g.add_argument("--train-batch", type=_positive_int, default=8, help="training batch (default 8)")
    g = p.add_argument_group("latency")
    g.add_argument("--latency-size", type=_positive_int, default=256, help="output px (default 256)")
    g.add_argument("--latency-model", action="append", default=[], metavar="FAMILY=DIR",
                   help="time this pipeline directory instead of the family's embedded default")  # fmt: skip
    g.add_argument("--latency-sr-strength", type=float, nargs="+", default=[], metavar="S",
                   help="add Imagen rows at these SR strengths, timed side by side with the defaults")
    g.add_argument("--latency-decoder-candidates", type=_positive_int, nargs="+", default=[], metavar="K",
                   help="add DALL-E 2 rows at these decoder_candidates (re-ranked samples), timed side by side")
    g.add_argument("--latency-families", nargs="+", default=["imagen", "dalle2"], choices=("imagen", "dalle2"))
    g = p.add_argument_group("gpu")
    g.add_argument("--gpu-steps", type=_positive_int, default=10)
    g.add_argument("--gpu-unet", choices=("if-i-xl", "tiny"), default="if-i-xl",
                   help="the UNet timed on CUDA (tiny: the plumbing check)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the main CLI's subparsers object."""
    p = subparsers.add_parser("bench", help="benchmarks: vs diffusers, vs imagen-pytorch, quality per second, GPU",
                              description=__doc__.splitlines()[0])  # fmt: skip
    add_arguments(p)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    run(args)
    return 0


def checkout_unclip_reference():
    """diffusers' ``UnCLIPPipeline`` / ``UnCLIPTextProjModel`` through ``scripts/bench_generate.py``
    of the source checkout beside this package; None when there is none (installed wheel) or
    this diffusers has dropped them."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_generate.py"
    if not script.is_file():
        return None
    spec = importlib.util.spec_from_file_location("_imagen_lite_bench_generate", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.unclip_reference()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sampling_section(args, unclip_reference) -> tuple[list, list]:
    from .evaluation import bench as B

    rows, notes = [], []
    for case in args.cases:
        if "imagen" in args.families:
            spec = B.embedded_default_case() if case == "default" else B.IMAGEN_CASES[case]
            _log(f"[sampling] imagen {spec.name} ...")
            kw = {} if args.steps is None else {"steps": (args.steps[0], args.steps[1])}
            try:
                rows += B.bench_imagen(spec, rounds=args.rounds, warmup=args.warmup, compile=args.compile, **kw)
            except ValueError as err:  # no diffusers pipeline can run this case
                notes.append(f"imagen/{case}: {err}; skipped")
        if "unclip" in args.families:
            if case == "default":
                notes.append("unclip/default: not compared -- the embedded DALL-E 2 default's decoder runs on a 4x4 patch grid, "
                             "which UnCLIPPipeline cannot shuffle back before its SR stage; skipped")  # fmt: skip
                continue
            if unclip_reference is None:
                notes.append(f"unclip/{case}: diffusers' UnCLIPPipeline is not available here (it is imported only by "
                             "scripts/bench_generate.py of a source checkout, or this diffusers dropped it); skipped")  # fmt: skip
                continue
            _log(f"[sampling] unclip {case} ...")
            kw = {} if args.steps is None else {"steps": (args.steps[0], args.steps[0], max(2, args.steps[1]))}
            rows += B.bench_unclip(case, *unclip_reference, rounds=args.rounds, warmup=args.warmup, compile=args.compile,
                                   **kw)
    return rows, notes


def quality_section(args) -> tuple[dict | None, str | None]:
    from .evaluation import bench as B

    default = None
    if args.quality_default:
        name, _, k = args.quality_default.partition(":")
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"--quality-default {args.quality_default!r} is not SCHEDULER:STEPS (e.g. ddim:25)")
        default = (name, int(k))
    if args.model_dir is None:
        return None, "no --model-dir given (a trained ImagenPipeline directory, e.g. the embedded default's export)"
    model_dir = Path(args.model_dir).expanduser()
    if not (model_dir / "model_index.json").is_file():
        return None, f"--model-dir {str(model_dir)!r} is not a pipeline directory (no model_index.json)"
    _log(f"[quality] {model_dir} ...")
    result = B.bench_quality(str(model_dir), schedulers=tuple(args.quality_schedulers), steps=tuple(args.quality_steps),
                             n_prompts=args.quality_prompts, batch_size=args.quality_batch,
                             guidance=args.quality_guidance, default=default)  # fmt: skip
    result["model_dir"] = str(model_dir)
    return result, None


def training_section(args) -> dict:
    from .evaluation import bench as B

    _log("[training] ...")
    return B.bench_training(batch_size=args.train_batch, rounds=args.rounds, warmup=args.warmup)


def gpu_section(args) -> tuple[list, str | None]:
    import torch

    from .evaluation import bench as B

    if not torch.cuda.is_available():
        return [], "no CUDA device here; the GPU section needs one"
    config = None
    if args.gpu_unet == "tiny":
        from .models import components as C

        unet = C.if_unet(sample_size=16, in_channels=3, out_channels=6, text_dim=32, size=C.TINY_BASE)
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    _log("[gpu] ...")
    return B.bench_gpu(unet_config=config, steps=args.gpu_steps, rounds=args.rounds, warmup=args.warmup), None


def latency_section(args) -> list[dict]:
    from .evaluation import bench as B

    models = {family: None for family in args.latency_families}
    for item in args.latency_model:
        family, sep, directory = item.partition("=")
        if not sep or family not in ("imagen", "dalle2"):
            raise ValueError(f"--latency-model {item!r} is not FAMILY=DIR with FAMILY imagen or dalle2")
        models[family] = directory
    _log(f"[latency] {args.latency_size} px: {models} ...")
    return B.bench_latency(models, size=args.latency_size, rounds=args.rounds, warmup=args.warmup,
                           imagen_sr_strengths=args.latency_sr_strength,
                           dalle2_candidates=args.latency_decoder_candidates)


def run(args, unclip_reference: Callable | tuple | None | str = "checkout", out=None) -> dict:
    """Run the sections ``args`` asks for; print the markdown report to ``out`` (stdout) and
    return everything as one dict (also written to ``args.json`` when given).

    ``unclip_reference``: ``(UnCLIPPipeline, UnCLIPTextProjModel)``, None (skip the unCLIP
    comparison) or ``"checkout"`` (load them through the source checkout's script)."""
    from .evaluation import bench as B

    out = out or sys.stdout
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if unclip_reference == "checkout":
        unclip_reference = checkout_unclip_reference() if "unclip" in args.families and "sampling" in args.sections else None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report: dict = {"command": " ".join(sys.argv), "sections": list(args.sections), "skipped": {}, "notes": []}
    with B.num_threads(args.threads):
        if "sampling" in args.sections:
            report["sampling"], report["notes"] = sampling_section(args, unclip_reference)
        if "quality" in args.sections:
            report["quality"], reason = quality_section(args)
            if reason:
                report["skipped"]["quality"] = reason
        if "training" in args.sections:
            report["training"] = training_section(args)
            if report["training"]["skipped"]:
                report["skipped"]["training (imagen-pytorch)"] = report["training"]["skipped"]
        if "gpu" in args.sections:
            report["gpu"], reason = gpu_section(args)
            if reason:
                report["skipped"]["gpu"] = reason
        if "latency" in args.sections:
            report["latency"] = latency_section(args)
        report["machine"] = B.machine_info()
    print(markdown(report), file=out)
    if args.json:
        B.write_json(args.json, report)
    return report


def markdown(report: dict) -> str:
    """The report as markdown: the machine, then one table per section that ran."""
    from .evaluation import bench as B

    parts = [B.machine_header(report["machine"]), ""]
    parts.append("Interleaved rounds after warm-up; medians over rounds; a ratio is the median of per-round ratios "
                 "of the two timed side by side (wall clock, and this process's CPU clock, which leaves out time "
                 "spent waiting for a core on a shared machine).")  # fmt: skip
    if report.get("sampling"):
        parts += ["", "## Sampling: imagen-lite vs diffusers, identical weights",
                  "A stage row is seconds per denoising step, `end to end` seconds per call; ratio < 1: imagen-lite is faster.", "",
                  B.markdown_table(report["sampling"], B.SAMPLING_COLUMNS)]  # fmt: skip
    q = report.get("quality")
    if q:
        parts += ["", f"## Quality per second: shapes accuracy vs wall time ({q['model_dir']})", "",
                  B.markdown_table(q["rows"], B.QUALITY_COLUMNS)]  # fmt: skip
        a = q.get("acceptance")
        if a:
            verdict = ("not judged: " + a["why_not_judged"]) if a["met"] is None else ("met" if a["met"] else "not met")
            parts += ["", f"Model default vs {a['reference']}: accuracy gap {a['accuracy_gap_points']:.1f} points, "
                          f"{a['time_fraction']:.2f}x its CPU time; target (within 1 point in <= 1/4 of the time) "
                          f"{verdict}. The Pareto front is over CPU seconds."]  # fmt: skip
    t = report.get("training")
    if t:
        parts += ["", "## Training step (forward, backward, AdamW), precomputed text embeddings", "",
                  B.markdown_table(t["rows"], B.TRAINING_COLUMNS)]  # fmt: skip
    if report.get("gpu"):
        parts += ["", "## GPU", "", B.markdown_table(report["gpu"], B.SAMPLING_COLUMNS)]
    if report.get("latency"):
        parts += ["", "## Latency: one generate() image, float32, CPU, each model's own defaults", "",
                  B.markdown_table(report["latency"], B.LATENCY_COLUMNS)]  # fmt: skip
    for name, reason in report.get("skipped", {}).items():
        parts += ["", f"Skipped {name}: {reason}."]
    for note in report.get("notes", []):
        parts += ["", f"Note: {note}"]
    return "\n".join(parts)


def main(argv=None, unclip_reference="checkout") -> int:
    args = build_parser().parse_args(argv)
    run(args, unclip_reference)
    return 0
