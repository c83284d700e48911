"""Benchmarks: imagen-lite against diffusers and imagen-pytorch on identical work.

Five sections, each a function returning rows (plain dicts, written as JSON and printed as a
markdown table by ``scripts/bench.py`` / ``imagen-lite bench``):

- :func:`bench_imagen` / :func:`bench_unclip` -- sampling: ``ImagenPipeline`` against diffusers'
  ``IFPipeline`` (+ ``IFSuperResolutionPipeline``) and ``UnCLIPLitePipeline`` against a reference
  ``UnCLIPPipeline``, built on the *same module objects* (identical weights), same seed, same
  steps. Seconds per denoising step (the interval between consecutive calls of a stage's
  network, so one full step: network, guidance, scheduler step, loop) and end to end, and the
  largest difference between the two outputs (the pipelines draw the same noise in the same
  order, so it should be ~1e-6).
- :func:`bench_quality` -- shapes accuracy against wall time for several schedulers and step
  counts on a trained ``ImagenPipeline`` directory, with the Pareto front marked.
- :func:`bench_training` -- samples/s of one training step (forward, backward, AdamW) of the
  embedded base UNet against imagen-pytorch's ``Unet`` of the same parameter count, both fed
  precomputed text embeddings (imagen-pytorch is the optional ``bench`` extra).
- :func:`bench_gpu` -- the sampling comparison at an IF-I-XL-sized UNet in float16 on CUDA.
- :func:`bench_latency` -- seconds per ``generate()`` image at 256 px of each family's embedded
  default (issue #10's <= 5 s target), no reference to compare against.

Timing on a shared machine: every comparison is *interleaved* -- each round runs every
candidate once, in rotated order, after warm-up rounds -- and reports medians over rounds; a
ratio is the median of the per-round ratios of candidates timed side by side. Absolute
seconds on a loaded machine mean little; the ratios are what to read.

The package never imports diffusers' deprecated unCLIP pipeline (``tests/test_unclip.py``
enforces it): :func:`bench_unclip` takes the reference pipeline's class from its caller --
``scripts/bench_generate.py`` supplies it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import runtime
from ..models import components as C

# ---------------------------------------------------------------------- machine and timing


def machine_info() -> dict:
    """What a benchmark table is headed with: CPU, cores, RAM, GPU, versions, date, load."""
    import diffusers
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), cpu)
    ram_gib = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        ram_gib = round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": ram_gib,
        "gpu": gpu,
        # the same "AMD EPYC" comes with and without AVX-512 BF16, and bf16 autocast is ~10x
        # slower without it: the header says which (None where /proc/cpuinfo has no flags)
        "fast_bf16": runtime.cpu_has_fast_bf16(cpuinfo),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_average": load_average(),
    }


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _bf16_note(fast_bf16: bool | None) -> str:
    return {True: " (AVX-512 BF16 / AMX)", False: " (no AVX-512 BF16 / AMX)"}.get(fast_bf16, "")


def machine_header(info: dict) -> str:
    """One markdown paragraph describing the machine."""
    return (
        f"Machine: {info['cpu']}{_bf16_note(info.get('fast_bf16'))}, {info['cores']} cores, {info['ram_gib']} GiB RAM, GPU: {info['gpu']}; "
        f"torch {info['torch']} ({info['torch_threads']} threads), diffusers {info['diffusers']}, "
        f"transformers {info['transformers']}, Python {info['python']}; {info['date']}; "
        f"load average {info['load_average']}."
    )


@contextmanager
def num_threads(n: int | None):
    """``torch.set_num_threads(n)`` for the block (nothing when ``n`` is None)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def interleaved(candidates: dict[str, Callable[[], dict]], rounds: int, warmup: int = 1) -> dict[str, list[dict]]:
    """Run every candidate once per round, in an order rotated each round, after ``warmup``
    untimed rounds. Each candidate returns a dict of measurements; returns them per candidate,
    one dict per timed round (round ``k`` of every candidate ran side by side)."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds={rounds!r} must be >= 1 and warmup={warmup!r} >= 0")
    names = list(candidates)
    out: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            m = candidates[name]()
            if r >= warmup:
                out[name].append(m)
    return out


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired_ratio(a: list[dict], b: list[dict], key: str) -> float | None:
    """Median over rounds of ``a[key] / b[key]`` (the two measured side by side)."""
    ratios = [x[key] / y[key] for x, y in zip(a, b) if x.get(key) and y.get(key)]
    return statistics.median(ratios) if ratios else None


class StepTimer:
    """Per-step seconds of a pipeline's stages, from forward pre-hooks on each stage's networks.

    ``stages`` maps a stage name to its network(s); a step is the interval between two
    consecutive calls of that stage's networks, so it holds one network call plus guidance,
    the scheduler step and the loop around them. The same hooks serve both libraries.

    Two clocks: wall (``perf_counter``) and this process's CPU time (``process_time``). On a
    machine shared with other work the CPU clock leaves out the time the process waited for a
    core, so its ratios are the steadier of the two (with one torch thread they measure the
    same work)."""

    def __init__(self, stages: dict[str, list[torch.nn.Module]]):
        self.stages = stages
        self.calls: dict[str, list[tuple[float, float]]] = {}
        self._handles = []

    def __enter__(self):
        self.calls = {name: [] for name in self.stages}
        for name, modules in self.stages.items():
            for m in modules:
                self._handles.append(m.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name):
        def hook(module, args):
            self.calls[name].append((time.perf_counter(), time.process_time()))

        return hook

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def per_step(self, clock: int = 0) -> dict[str, float | None]:
        """Seconds per step per stage (None for a stage called fewer than twice); ``clock`` 0 is
        wall time, 1 CPU time."""
        return {
            name: (ts[-1][clock] - ts[0][clock]) / (len(ts) - 1) if len(ts) >= 2 else None
            for name, ts in self.calls.items()
        }


def _timed_call(fn: Callable[[], object], timer: StepTimer) -> tuple[dict, object]:
    with timer:
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        total, cpu_total = time.perf_counter() - start, time.process_time() - cpu
    return {
        "total": total, "cpu/total": cpu_total,
        **{f"step/{k}": v for k, v in timer.per_step().items()},
        **{f"cpu/step/{k}": v for k, v in timer.per_step(clock=1).items()},
    }, result  # fmt: skip


def _max_abs_diff(a, b) -> float:
    a = torch.as_tensor(a).float()
    b = torch.as_tensor(b).float()
    if a.shape != b.shape:
        return float("nan")
    return float((a - b).abs().max())


def _quiet(*pipes):
    for p in pipes:
        p.set_progress_bar_config(disable=True)


def _compile_side(pipe, stage_nets: dict[str, list], names: dict[str, str], **compile_kwargs) -> dict[str, list]:
    """Give ``pipe`` ``torch.compile``d copies of its networks (``names``: pipeline attribute ->
    stage); the reference pipeline keeps the eager originals, so the weights stay identical and
    neither side's hooks reach the other's graphs. Returns ``pipe``'s stage networks for its
    own :class:`StepTimer` (the hooks sit on the compiled wrappers, outside the graphs).
    ``compile_kwargs`` go to ``torch.compile`` (the tests pass ``backend="eager"``)."""
    import copy

    from ..pipelines.speed import compile_models

    for attr in names:
        setattr(pipe, attr, copy.deepcopy(getattr(pipe, attr)))
    compile_models(pipe, list(names), **compile_kwargs)
    nets = {stage: [] for stage in stage_nets}
    for attr, stage in names.items():
        nets[stage].append(getattr(pipe, attr))
    return nets


def _candidates(fns: dict[str, Callable[[], object]], timers: dict[str, StepTimer], outputs: dict):
    """Timed runners for :func:`interleaved`: each side's call under its own :class:`StepTimer`."""

    def runner(name):
        def run():
            m, out = _timed_call(fns[name], timers[name])
            outputs[name] = out
            return m

        return run

    return {name: runner(name) for name in fns}


def _compare_rows(family, case, runs, stages: dict[str, int], steps: dict[str, int], diff: float, names=("imagen-lite", "diffusers")):
    """Rows (one per stage, then end to end) from :func:`interleaved` results of two pipelines."""
    lite, ref = runs[names[0]], runs[names[1]]
    rows = []
    for stage, px in stages.items():
        key = f"step/{stage}"
        rows.append({
            "family": family, "case": case, "stage": stage, "px": px, "steps": steps[stage],
            "lite_s": median(m.get(key) for m in lite), "diffusers_s": median(m.get(key) for m in ref),
            "ratio": paired_ratio(lite, ref, key), "ratio_cpu": paired_ratio(lite, ref, f"cpu/{key}"),
            "max_abs_diff": diff, "rounds": len(lite),
        })  # fmt: skip
    rows.append({
        "family": family, "case": case, "stage": "end to end", "px": max(stages.values()),
        "steps": "+".join(str(steps[s]) for s in stages),
        "lite_s": median(m["total"] for m in lite), "diffusers_s": median(m["total"] for m in ref),
        "ratio": paired_ratio(lite, ref, "total"), "ratio_cpu": paired_ratio(lite, ref, "cpu/total"),
        "max_abs_diff": diff, "rounds": len(lite),
    })  # fmt: skip
    return rows


SAMPLING_COLUMNS = [
    ("family", "family"), ("case", "case"), ("stage", "stage"), ("px", "px"), ("steps", "steps"),
    ("lite_s", "imagen-lite s"), ("diffusers_s", "diffusers s"), ("ratio", "ratio lite/diffusers (wall)"),
    ("ratio_cpu", "ratio (CPU time)"), ("max_abs_diff", "max abs diff"), ("rounds", "rounds"),
]  # fmt: skip
"""(row key, column title) of the sampling table; a stage row is seconds per denoising step
(wall), the ``end to end`` row seconds per pipeline call; the ratios are medians of per-round
ratios on the wall clock and on the process's CPU clock (see :class:`StepTimer`)."""


# ---------------------------------------------------------------------- the Imagen family


@dataclass
class ImagenCase:
    """An IF-layout cascade built in code for the comparison (random weights, one seed)."""

    name: str
    base_side: int  # base UNet grid side (the image side is base_side * unshuffle_factor)
    sr_side: int | None  # SR output side; None: base only
    base: C.UNetSize = field(default_factory=C.UNetSize)
    sr: C.UNetSize = field(default_factory=lambda: C.TINY_SR)
    t5: C.T5Size = field(default_factory=C.T5Size)
    unshuffle_factor: int = 1  # >1: the embedded default's patch grid; IFPipeline runs the same grid
    learned_variance: bool = True  # IF's UNets predict a variance (learned_range)
    prediction_type: str = "epsilon"


IMAGEN_CASES = {
    # the test-sized cascade of tests/conftest.py::build_tiny_if (16 -> 32 px)
    "tiny": ImagenCase("tiny", 16, 32),
    # small widths at the real resolutions, 64px base -> 256px SR; levels as IF's (attention
    # only on the coarse grids -- the mid block always attends, so the 256px UNet needs 5 levels)
    "64-256": ImagenCase(
        "64-256", 64, 256,
        base=C.UNetSize(block_out_channels=(32, 64, 64, 128), attention_levels=(False, False, True, True)),
        sr=C.UNetSize(block_out_channels=(16, 16, 32, 64, 64), attention_levels=(False,) * 5),
    ),  # fmt: skip
}


def embedded_default_case() -> ImagenCase:
    """The embedded default's base (``build_base(BaseRunConfig())``: patch grid, x0 prediction).

    Kept for :func:`unet_call_rows` and for a future reference: :func:`bench_imagen` refuses it,
    because ``IFPipeline`` splits every UNet output into prediction and variance halves and this
    UNet predicts no variance (it would otherwise run the same patch grid, and its output would
    be pixel-shuffled before comparing)."""
    from ..training.default import BaseRunConfig

    cfg = BaseRunConfig()
    r = cfg.unshuffle_factor
    return ImagenCase(
        f"default (r={r})", 64 // r, None, base=C.UNetSize(**cfg.unet), t5=C.T5Size(**cfg.t5), unshuffle_factor=r,
        learned_variance=False, prediction_type="sample",
    )  # fmt: skip


def build_imagen_parts(case: ImagenCase, seed: int = 0) -> dict:
    """Components of ``case`` (tokenizer, T5, UNets, schedulers), without touching the global RNG."""
    from ..models.tiny import TINY_WORDS

    r = case.unshuffle_factor
    pixels = 3 * r * r
    variance = "learned_range" if case.learned_variance else "fixed_small"
    out_mult = 2 if case.learned_variance else 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = C.word_tokenizer(TINY_WORDS)
        parts = dict(
            tokenizer=tok,
            text_encoder=C.t5_encoder(len(tok), case.t5).eval(),
            unet=C.if_unet(sample_size=case.base_side, in_channels=pixels, out_channels=out_mult * pixels,
                           text_dim=case.t5.d_model, size=case.base).eval(),
            scheduler=C.ddpm_scheduler(prediction_type=case.prediction_type, variance_type=variance),
        )  # fmt: skip
        if case.sr_side is not None:
            parts.update(
                sr_unet=C.if_unet(sample_size=case.sr_side, in_channels=6, out_channels=3 * out_mult,
                                  text_dim=case.t5.d_model, size=case.sr, super_resolution=True).eval(),
                sr_scheduler=C.ddpm_scheduler(variance_type=variance),
                image_noising_scheduler=C.noising_scheduler(),
            )  # fmt: skip
    return parts


def bench_imagen(
    case: ImagenCase,
    steps: tuple[int, int] = (10, 5),
    guidance: tuple[float, float] = (7.0, 4.0),
    prompts=("a red circle",),
    noise_level: int = 100,
    rounds: int = 5,
    warmup: int = 1,
    seed: int = 0,
    compile: bool = False,
    compile_kwargs: dict | None = None,
) -> list[dict]:
    """``ImagenPipeline`` against ``IFPipeline`` (+ ``IFSuperResolutionPipeline`` when the case
    has an SR stage) on the same module objects. Returns table rows (see SAMPLING_COLUMNS).

    ``compile=True`` times imagen-lite's opt-in ``torch.compile`` (``load_pipeline(compile=True)``)
    against eager diffusers: imagen-lite runs compiled copies of the same weights; the warm-up
    rounds pay the compilation (minutes on a small CPU) and are not timed."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    from ..pipelines.imagen import ImagenPipeline
    from ..sampling import pixel_shuffle

    if not case.learned_variance:
        raise ValueError(
            f"case {case.name!r}: its UNet predicts without a variance, and IFPipeline splits every UNet output "
            "into prediction + variance halves, so it cannot run this UNet; no diffusers reference for it"
        )
    parts = build_imagen_parts(case)
    r = case.unshuffle_factor
    # IF tokenises to 77 tokens; ours is told the same so both cross-attend to the same context
    lite = ImagenPipeline(**parts, unshuffle_factor=r, max_sequence_length=77)
    none = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    s1 = IFPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], unet=parts["unet"],
                    scheduler=parts["scheduler"], **none)  # fmt: skip
    s2 = None
    if case.sr_side is not None:
        s2 = IFSuperResolutionPipeline(
            tokenizer=parts["tokenizer"], text_encoder=None, unet=parts["sr_unet"], scheduler=parts["sr_scheduler"],
            image_noising_scheduler=parts["image_noising_scheduler"], **none,
        )  # fmt: skip
        _quiet(s2)
    _quiet(lite, s1)
    prompts = list(prompts)
    n_stages = 1 if s2 is None else 2
    stage_px = {"base": case.base_side * r}
    stage_nets = {"base": [parts["unet"]]}
    if s2 is not None:
        stage_px[f"sr_{case.sr_side}"] = case.sr_side
        stage_nets[f"sr_{case.sr_side}"] = [parts["sr_unet"]]
    stage_steps = dict(zip(stage_px, steps))

    def run_lite():
        return lite(
            prompts, num_inference_steps=steps[:n_stages], guidance_scale=guidance[:n_stages], noise_level=noise_level,
            generator=torch.Generator().manual_seed(seed), output_type="pt",
        ).images  # fmt: skip

    def run_diffusers():
        g = torch.Generator().manual_seed(seed)
        pe, ne = s1.encode_prompt(prompts, do_classifier_free_guidance=guidance[0] > 1.0, clean_caption=False)
        image = s1(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps[0], guidance_scale=guidance[0],
                   generator=g, output_type="pt").images  # fmt: skip
        image = pixel_shuffle(image, r)  # the same grid as ours, back to pixels
        if s2 is not None:
            image = s2(image=image, prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps[1],
                       guidance_scale=guidance[1], noise_level=noise_level, generator=g, output_type="pt").images  # fmt: skip
        return image

    lite_nets = stage_nets
    if compile:
        attrs = {"unet": "base", **({"sr_unet": f"sr_{case.sr_side}"} if s2 is not None else {})}
        lite_nets = _compile_side(lite, stage_nets, attrs, **(compile_kwargs or {}))
    timers = {"imagen-lite": StepTimer(lite_nets), "diffusers": StepTimer(stage_nets)}
    outputs = {}
    with warnings.catch_warnings():  # each pipeline brings its own no_grad / inference_mode
        warnings.simplefilter("ignore")
        runs = interleaved(_candidates({"imagen-lite": run_lite, "diffusers": run_diffusers}, timers, outputs),
                           rounds, warmup)  # fmt: skip
    diff = _max_abs_diff(outputs["imagen-lite"], outputs["diffusers"])
    return _compare_rows("imagen", case.name + (" +compile" if compile else ""), runs, stage_px, stage_steps, diff)


def unet_call_rows(case: ImagenCase, rounds: int = 5, warmup: int = 1, batch: int = 2) -> list[dict]:
    """Seconds per call of ``case``'s base UNet alone (CFG batch ``batch``): the floor under
    any pipeline's per-step time -- the rest is guidance, scheduler and loop."""
    parts = build_imagen_parts(case)
    unet = parts["unet"]
    x = torch.randn(batch, unet.config.in_channels, case.base_side, case.base_side)
    context = torch.randn(batch, 77, case.t5.d_model)
    t = torch.tensor(500)

    def call():
        start = time.perf_counter()
        unet(x, t, encoder_hidden_states=context, return_dict=False)
        return {"total": time.perf_counter() - start}

    with torch.inference_mode():
        runs = interleaved({"unet": call}, rounds, warmup)
    return [{"case": case.name, "px": case.base_side * case.unshuffle_factor, "batch": batch,
             "unet_call_s": median(m["total"] for m in runs["unet"]),
             "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2)}]  # fmt: skip


# ---------------------------------------------------------------------- the unCLIP family


def unclip_sizes(name: str):
    """The unCLIP cascades compared: ``tiny`` (16 -> 32 px, the tests') and ``64-256`` (tiny
    widths at Karlo's resolutions; UnCLIPPipeline cannot unshuffle, so r = 1)."""
    from ..models import unclip_components as U

    if name == "tiny":
        return U.TINY_UNCLIP
    if name == "64-256":  # the same level layout as the Imagen family's 64-256 case
        return U.UnCLIPSize(
            decoder=U.DecoderSize(sample_size=64, block_out_channels=(32, 64, 64, 128),
                                  attention_levels=(False, False, True, True)),
            sr=U.SRSize(sample_size=256, block_out_channels=(16, 16, 32, 64, 64)),
        )  # fmt: skip
    raise ValueError(f"unCLIP case {name!r} is not known; use 'tiny' or '64-256'")


def build_unclip_parts(name: str, seed: int = 0) -> dict:
    """Components of an unCLIP cascade (Karlo's names), without touching the global RNG."""
    from ..models import unclip_components as U

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = U.build_components(unclip_sizes(name))
        with torch.no_grad():  # non-trivial values where init leaves zeros/ones
            parts["prior"].clip_mean.normal_()
            parts["prior"].clip_std.uniform_(0.5, 1.5)
            parts["text_proj"].learned_classifier_free_guidance_embeddings.normal_()
    return parts


def bench_unclip(
    name: str,
    reference_class,
    text_proj_class,
    steps: tuple[int, int, int] = (10, 10, 5),
    guidance: tuple[float, float] = (4.0, 8.0),
    prompts=("a red circle",),
    rounds: int = 5,
    warmup: int = 1,
    seed: int = 0,
    compile: bool = False,
    compile_kwargs: dict | None = None,
) -> list[dict]:
    """``UnCLIPLitePipeline`` against a reference ``UnCLIPPipeline`` on the same module objects
    (``compile=True``: imagen-lite's networks compiled, as in :func:`bench_imagen`).

    ``reference_class`` / ``text_proj_class`` are diffusers' ``UnCLIPPipeline`` and
    ``UnCLIPTextProjModel``, passed in by the caller (the package never imports diffusers'
    deprecated pipelines); the reference gets its own ``UnCLIPTextProjModel`` holding the same
    weights as ours. Returns table rows (see SAMPLING_COLUMNS)."""
    from ..pipelines.unclip import UnCLIPLitePipeline

    parts = build_unclip_parts(name)
    r = parts.pop("unshuffle_factor")
    lite = UnCLIPLitePipeline(**parts, unshuffle_factor=r)
    text_proj = text_proj_class(**dict(parts["text_proj"].config))
    text_proj.load_state_dict(parts["text_proj"].state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference_class(**{**parts, "text_proj": text_proj.eval()})
    _quiet(lite, ref)
    prompts = list(prompts)
    side = parts["decoder"].config.sample_size * r
    sr_side = parts["super_res_first"].config.sample_size
    stage_px = {"prior": 0, "decoder": side, f"sr_{sr_side}": sr_side}
    stage_nets = {
        "prior": [parts["prior"]], "decoder": [parts["decoder"]],
        f"sr_{sr_side}": [parts["super_res_first"], parts["super_res_last"]],
    }  # fmt: skip
    stage_steps = dict(zip(stage_px, steps))

    def run_lite():
        return lite(prompts, num_inference_steps=steps, guidance_scale=(*guidance, 1.0),
                    generator=torch.Generator().manual_seed(seed), output_type="np").images  # fmt: skip

    def run_ref():
        return ref(
            prompts, prior_num_inference_steps=steps[0], decoder_num_inference_steps=steps[1],
            super_res_num_inference_steps=steps[2], prior_guidance_scale=guidance[0],
            decoder_guidance_scale=guidance[1], generator=torch.Generator().manual_seed(seed), output_type="np",
        ).images  # fmt: skip

    lite_nets = stage_nets
    if compile:
        sr = f"sr_{sr_side}"
        lite_nets = _compile_side(lite, stage_nets, {"prior": "prior", "decoder": "decoder", "super_res_first": sr,
                                                     "super_res_last": sr}, **(compile_kwargs or {}))  # fmt: skip
    timers = {"imagen-lite": StepTimer(lite_nets), "diffusers": StepTimer(stage_nets)}
    outputs = {}
    with warnings.catch_warnings():  # each pipeline brings its own no_grad / inference_mode
        warnings.simplefilter("ignore")
        runs = interleaved(_candidates({"imagen-lite": run_lite, "diffusers": run_ref}, timers, outputs), rounds, warmup)
    diff = _max_abs_diff(outputs["imagen-lite"], outputs["diffusers"])
    rows = _compare_rows("unclip", name + (" +compile" if compile else ""), runs, stage_px, stage_steps, diff)
    for row in rows:
        if row["stage"] == "prior":
            row["px"] = "-"  # the prior makes a CLIP embedding, not an image
    return rows


# ---------------------------------------------------------------------- quality per second

QUALITY_SCHEDULERS = ("ddpm", "ddim", "dpm++", "unipc")
QUALITY_COLUMNS = [
    ("scheduler", "scheduler"), ("steps", "steps"), ("guidance", "guidance"), ("seconds", "wall s"),
    ("cpu_seconds", "CPU s"), ("s_per_image", "CPU s/image"), ("accuracy", "accuracy %"), ("pareto", "Pareto"),
    ("note", "note"),
]  # fmt: skip


def pareto_front(rows: list[dict], cost: str = "seconds", value: str = "accuracy") -> None:
    """Mark ``row["pareto"] = True`` on rows no other row beats: none has cost <= and value >=
    with one of them strict."""
    for a in rows:
        a["pareto"] = not any(
            b is not a and b[cost] <= a[cost] and b[value] >= a[value] and (b[cost] < a[cost] or b[value] > a[value])
            for b in rows
        )


def bench_quality(
    model: str,
    schedulers=QUALITY_SCHEDULERS,
    steps=(100, 50, 25, 10),
    n_prompts: int = 40,
    seeds=(0,),
    batch_size: int = 20,
    guidance: float | None = None,
    reference=("ddpm", 100),
    default: tuple[str, int] | None = None,
    min_reference_accuracy: float = 10.0,
) -> dict:
    """Shapes accuracy vs wall time of an ``ImagenPipeline`` directory's 64px base stage.

    One row per (scheduler, steps), plus the directory's own default settings (its scheduler
    and steps, from ``imagen_lite_defaults.json``; ``default=(scheduler, steps)`` names them
    for a directory that has none, e.g. a training export before it is shipped);
    ``guidance`` defaults to the directory's; its ``guidance_interval`` applies either way.
    Returns ``{"rows", "acceptance"}``: ``acceptance`` compares the default row with
    ``reference`` (accuracy within 1 point in at most 1/4 of its CPU time) when both ran;
    it is not judged (``met`` None) while the reference scores below ``min_reference_accuracy``.
    Times are CPU seconds of this process (the rows run one after another on a shared
    machine); wall seconds are kept beside them."""
    from ..api import load_pipeline
    from .shapes import evaluate

    def run(name: str | None, k: int | None, note: str = "") -> dict:
        pipe = load_pipeline("imagen", model=model, device="cpu", dtype="float32", scheduler=name)
        pipe.set_progress_bar_config(disable=True)
        preset = pipe.imagen_lite_preset
        g = float(preset.guidance_scale[0] if guidance is None else guidance)
        k = int(preset.num_inference_steps[0] if k is None else k)

        def gen(prompts, seed):
            generator = torch.Generator().manual_seed(seed)
            return pipe(prompts, num_inference_steps=k, guidance_scale=g, guidance_interval=preset.guidance_interval,
                        num_stages=1, generator=generator).images  # fmt: skip

        start, cpu = time.perf_counter(), time.process_time()
        result = evaluate(gen, n_prompts=n_prompts, seeds=tuple(seeds), batch_size=batch_size)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        sched = type(pipe.scheduler).__name__ if name is None else name
        return {
            "scheduler": sched, "steps": k, "guidance": g, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "s_per_image": cpu_seconds / result["n_images"], "accuracy": 100.0 * result["overall"],
            "n_images": result["n_images"], "note": note,
        }  # fmt: skip

    rows = [run(None, None, "model default") if default is None else run(default[0], int(default[1]), "model default")]
    for name in schedulers:
        for k in steps:
            if name != "ddpm" and k > 50:
                continue  # the fast solvers gain nothing from 100 steps; DDPM needs them
            rows.append(run(name, k))
    pareto_front(rows, cost="cpu_seconds")  # CPU time: rows run one after another on a shared machine
    acceptance = None
    ref = next((r for r in rows[1:] if (r["scheduler"], r["steps"]) == tuple(reference)), None)
    if ref is not None:
        d = rows[0]
        gap, fraction = ref["accuracy"] - d["accuracy"], d["cpu_seconds"] / ref["cpu_seconds"]
        acceptance = {
            "reference": f"{reference[0]} {reference[1]} steps", "accuracy_gap_points": gap, "time_fraction": fraction,
            "met": gap <= 1.0 and fraction <= 0.25, "judged": ref["accuracy"] >= min_reference_accuracy,
        }  # fmt: skip
        if not acceptance["judged"]:
            acceptance["met"] = None  # an untrained model matches its reference at ~0%: that proves nothing
            acceptance["why_not_judged"] = (
                f"the reference reaches only {ref['accuracy']:.1f}% (< {min_reference_accuracy:g}%): the model is "
                "not trained enough for the comparison to mean anything"
            )
    return {"rows": rows, "acceptance": acceptance}


# ---------------------------------------------------------------------- training throughput

LATENCY_COLUMNS = [
    ("family", "family"), ("model", "model"), ("px", "px"), ("steps", "steps per stage"), ("guidance", "guidance"),
    ("sr_strength", "SR strength"), ("candidates", "64 px samples / image"), ("wall_s", "wall s (median)"), ("wall_min", "min"), ("wall_max", "max"), ("cpu_s", "CPU s"), ("rounds", "rounds"),
    ("target", "<= 5 s"),
]  # fmt: skip


def bench_latency(models: dict[str, str | None], size: int = 256, rounds: int = 5, warmup: int = 1,
                  prompt: str = "a red circle above a blue square", target_s: float = 5.0,
                  imagen_sr_strengths=(), dalle2_candidates=()) -> list[dict]:
    """Wall seconds of one ``generate()`` (one image, float32, CPU) per family at ``size`` px with
    each model's own generation defaults -- issue #10's "a 256 px image in <= 5 s" figure.

    ``models`` maps a family ("imagen"/"dalle2") to a pipeline directory, or None for the
    embedded default. ``imagen_sr_strengths`` adds one Imagen row per SR strength given (the
    same model, ``generate(..., sr_strength=s)``), timed in the same interleaved rounds, so
    their ratios are side by side; ``dalle2_candidates`` likewise adds DALL-E 2 rows at those
    ``decoder_candidates`` (64 px samples per image, re-ranked). The rows run interleaved, each call with a new seed;
    loading (and the warm-up call) are outside the timing."""
    from ..api import generate, load_pipeline

    strengths = [float(s) for s in imagen_sr_strengths]
    if strengths and "imagen" not in models:
        raise ValueError(f"imagen_sr_strengths={tuple(imagen_sr_strengths)!r} needs the imagen family in models")
    ks = list(dalle2_candidates)
    if ks and "dalle2" not in models:
        raise ValueError(f"dalle2_candidates={tuple(dalle2_candidates)!r} needs the dalle2 family in models")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"dalle2_candidates={tuple(dalle2_candidates)!r} must be positive integers")
    variants = [(family, family, {}) for family in models]
    variants += [(f"imagen sr_strength={s:g}", "imagen", {"sr_strength": s}) for s in strengths]
    variants += [(f"dalle2 decoder_candidates={k}", "dalle2", {"decoder_candidates": k}) for k in ks]
    pipes, calls = {}, {}
    for key, family, kwargs in variants:
        model = models[family]
        pipes[family] = load_pipeline(family, model=model, device="cpu", dtype=torch.float32)
        seed = iter(range(10**6))

        def call(family=family, model=model, seed=seed, kwargs=kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            generate(prompt, pipeline=family, model=model, size=size, seed=next(seed), device="cpu", dtype=torch.float32,
                     **kwargs)  # fmt: skip
            return {"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu}

        calls[key] = call
    runs = interleaved(calls, rounds=rounds, warmup=warmup)
    rows = []
    for key, family, kwargs in variants:
        measured = runs[key]
        preset = pipes[family].imagen_lite_preset
        walls = [m["wall"] for m in measured]
        wall = median(walls)
        own_sr = family == "imagen" or preset.extra.get("saves_sr")  # a dalle2 model with an Imagen-style SR saves one
        sr = kwargs.get("sr_strength", preset.sr_strength) if own_sr else None
        rows.append({
            "family": family, "model": models[family] or "embedded default", "px": size,
            "steps": ",".join(str(k) for k in preset.num_inference_steps), "guidance": format_guidance(preset),
            "sr_strength": "--" if sr is None else f"{sr:g}" + ("" if "sr_strength" in kwargs else " (model's)"),
            "candidates": kwargs.get("decoder_candidates", preset.extra.get("decoder_candidates") or 1) if family == "dalle2" else "--",
            "wall_s": wall, "wall_min": min(walls), "wall_max": max(walls), "cpu_s": median(m["cpu"] for m in measured),
            "rounds": len(measured), "target": "yes" if wall <= target_s else "no",
        })  # fmt: skip
    return rows


def format_guidance(preset) -> str:
    """A preset's guidance per stage, with its guidance interval when it is not every step:
    ``"3,1 (steps [0, 0.4))"``."""
    text = ",".join(f"{g:g}" for g in preset.guidance_scale)
    from ..pipelines.common import is_one_interval

    interval = (preset.guidance_interval,) if is_one_interval(preset.guidance_interval) else preset.guidance_interval
    limited = sorted({tuple(v) for v in interval} - {(0.0, 1.0)})
    return text + "".join(f" (steps [{a:g}, {b:g}))" for a, b in limited)


TRAINING_COLUMNS = [
    ("impl", "implementation"), ("params_m", "params (M)"), ("grid", "UNet input"), ("batch", "batch"),
    ("step_s", "s/step"), ("samples_per_s", "samples/s"), ("ratio", "ratio vs imagen-pytorch"),
]  # fmt: skip


def _adamw_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], optimizer) -> Callable[[], dict]:
    def step():
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"total": time.perf_counter() - start}

    return step


def import_imagen_pytorch_unet():
    """imagen-pytorch's ``Unet`` class, imported without the network.

    Importing ``imagen_pytorch`` calls ``T5Config.from_pretrained("google/t5-v1_1-base")`` (a
    class default, ``text_embed_dim=get_encoded_dim(DEFAULT_T5_NAME)``), which fails offline;
    for that one name the published value (``d_model=768``) is supplied instead. Raises
    ImportError saying why when imagen-pytorch cannot be imported."""
    import transformers

    T5Config = transformers.T5Config
    had_own = "from_pretrained" in T5Config.__dict__
    original = T5Config.from_pretrained

    def offline(name, *args, **kwargs):
        if str(name) == "google/t5-v1_1-base":
            return T5Config(d_model=768)
        return original(name, *args, **kwargs)

    T5Config.from_pretrained = staticmethod(offline)
    try:
        from imagen_pytorch import Unet
    except ImportError:
        raise
    except Exception as err:  # noqa: BLE001 -- any failure at import means "not usable here"
        raise ImportError(f"imagen-pytorch is installed but failed to import: {type(err).__name__}: {err}") from err
    finally:
        if had_own:
            T5Config.from_pretrained = original
        else:
            del T5Config.from_pretrained
    return Unet


def imagen_pytorch_unet(target_params: int, text_dim: int, unet_cfg: dict, tolerance: float = 0.10):
    """imagen-pytorch's ``Unet`` laid out as ours -- the same base width ``dim`` and channel
    multipliers, one resnet block per level, attention where ours has it -- with its
    conditioning width (``cond_dim``, a multiple of ``dim``) and attention heads chosen so that
    its parameter count is closest to ``target_params``. When no such choice is within
    ``tolerance``, the base width (a multiple of 8, its group norms need it) is searched too.
    Returns ``(unet, params)``; raises ValueError when nothing is within ``tolerance``."""
    Unet = import_imagen_pytorch_unet()

    widths = list(unet_cfg["block_out_channels"])
    mults = tuple(max(1, w // widths[0]) for w in widths)
    attn = tuple(bool(a) for a in unet_cfg["attention_levels"])
    heads_dim = int(unet_cfg.get("attention_head_dim", 32))

    def make(dim, heads, cond):
        return Unet(
            dim=dim, dim_mults=mults, num_resnet_blocks=int(unet_cfg.get("layers_per_block", 1)),
            layer_attns=attn, layer_cross_attns=attn, attn_heads=heads, attn_dim_head=heads_dim,
            text_embed_dim=text_dim, cond_dim=cond * dim, channels=3,
        )  # fmt: skip

    def count(*choice):
        with torch.device("meta"):
            return sum(p.numel() for p in make(*choice).parameters())

    def closest(dims):
        best = None
        for dim in dims:
            for heads in (2, 3, 4, 6, 8):
                for cond in (1, 2, 3, 4):
                    n = count(dim, heads, cond)
                    if best is None or abs(n - target_params) < abs(best[1] - target_params):
                        best = ((dim, heads, cond), n)
        return best

    base = max(8, round(widths[0] / 8) * 8)
    choice, n = closest([base])
    if abs(n - target_params) > tolerance * target_params:
        choice, n = closest(range(max(8, base // 2), 2 * base + 1, 8))
    if abs(n - target_params) > tolerance * target_params:
        raise ValueError(f"no imagen-pytorch Unet within {tolerance:.0%} of {target_params} parameters "
                         f"(closest: dim, heads, cond_dim/dim = {choice}, {n})")  # fmt: skip
    return make(*choice), n


def bench_training(batch_size: int = 8, rounds: int = 5, warmup: int = 1, seq_len: int | None = None) -> dict:
    """Samples/s of a training step (forward, backward, AdamW) on 64px images fed precomputed
    text embeddings: the embedded base UNet (``build_base(BaseRunConfig())``, on its
    pixel-unshuffled grid) against imagen-pytorch's ``Unet`` of the same parameter count
    (+-10%) on 64x64x3. Returns ``{"rows", "skipped"}``; imagen-pytorch missing -> only our
    row, with ``skipped`` saying so."""
    import torch.nn.functional as F

    from ..sampling import pixel_unshuffle
    from ..training.default import BaseRunConfig, build_base

    cfg = BaseRunConfig()
    _, _, unet, scheduler = build_base(cfg)
    unet.train()
    r = cfg.unshuffle_factor
    d = cfg.t5["d_model"]
    L = seq_len or cfg.max_length
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, 64, 64, generator=gen) * 2 - 1
    states = torch.randn(batch_size, L, d, generator=gen)  # precomputed text embeddings
    ours_params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def ours_loss():
        x0 = pixel_unshuffle(images, r)  # (B, 3r^2, 64/r, 64/r)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=states, return_dict=False)[0]
        return F.mse_loss(pred, x0)

    candidates = {"imagen-lite": _adamw_step(unet, ours_loss, opt)}
    rows_meta = {"imagen-lite": (ours_params, f"{3 * r * r}x{64 // r}x{64 // r}")}
    skipped = None
    try:
        import_imagen_pytorch_unet()
    except ImportError as err:
        skipped = (f"imagen-pytorch is not usable here ({err}; it is the optional extra: pip install "
                   "'imagen-lite[bench]'); only imagen-lite's row is measured")
    if skipped is None:
        theirs, theirs_params = imagen_pytorch_unet(ours_params, d, cfg.unet)
        theirs.train()
        opt2 = torch.optim.AdamW(theirs.parameters(), lr=1e-4)
        mask = torch.ones(batch_size, L, dtype=torch.bool)

        def theirs_loss():
            times = torch.rand(batch_size, generator=gen)  # continuous times (its default)
            noise = torch.randn(images.shape, generator=gen)
            pred = theirs(images + noise, times, text_embeds=states, text_mask=mask)
            return F.mse_loss(pred, noise)

        candidates["imagen-pytorch"] = _adamw_step(theirs, theirs_loss, opt2)
        rows_meta["imagen-pytorch"] = (theirs_params, "3x64x64")
    runs = interleaved(candidates, rounds, warmup)
    rows = []
    for name, ms in runs.items():
        s = median(m["total"] for m in ms)
        params, grid = rows_meta[name]
        rows.append({"impl": name, "params_m": round(params / 1e6, 2), "grid": grid, "batch": batch_size,
                     "step_s": s, "samples_per_s": batch_size / s, "ratio": None})  # fmt: skip
    if "imagen-pytorch" in runs:
        ratio = paired_ratio(runs["imagen-pytorch"], runs["imagen-lite"], "total")  # their time / ours = our speed-up
        rows[0]["ratio"] = ratio
        rows[1]["ratio"] = 1.0
    return {"rows": rows, "skipped": skipped}


# ---------------------------------------------------------------------- GPU (untested here)

IF_I_XL_UNET = dict(
    # DeepFloyd IF-I-XL's stage I UNet layout (4.3B parameters) as published in its unet/config.json;
    # UNTESTED in this repository (no GPU where it was written) -- check against the hub config.
    sample_size=64, in_channels=3, out_channels=6, layers_per_block=3,
    block_out_channels=(640, 1280, 1920, 2560),
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=2560, encoder_hid_dim=4096,
    attention_head_dim=64, addition_embed_type="text", addition_embed_type_num_heads=64,
    cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu",
)  # fmt: skip


def bench_gpu(unet_config: dict | None = None, steps: int = 10, guidance: float = 7.0, rounds: int = 3, warmup: int = 1,
              device: str = "cuda", dtype=torch.float16, text_len: int = 77) -> list[dict]:
    """Per-step and end-to-end time of ``ImagenPipeline`` vs ``IFPipeline`` on one random-weight
    UNet (default: IF-I-XL's layout) in ``dtype`` on ``device``, fed random prompt embeddings
    (no T5). UNTESTED on CUDA here; the tests run the same code on the CPU with a tiny config."""
    from diffusers import IFPipeline, UNet2DConditionModel

    from ..pipelines.imagen import ImagenPipeline

    config = dict(IF_I_XL_UNET if unet_config is None else unet_config)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**config).to(dtype).eval()
    scheduler = C.ddpm_scheduler(variance_type="learned_range" if config["out_channels"] == 2 * config["in_channels"] else "fixed_small")
    lite = ImagenPipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=scheduler)
    ref = IFPipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=scheduler, safety_checker=None,
                     feature_extractor=None, watermarker=None, requires_safety_checker=False)  # fmt: skip
    _quiet(lite, ref)
    g = torch.Generator(device).manual_seed(0)
    width = config["encoder_hid_dim"]
    pe = torch.randn(1, text_len, width, generator=g, device=device, dtype=dtype)
    ne = torch.randn(1, text_len, width, generator=g, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps, guidance_scale=guidance, output_type="pt")

    def wrap(pipe):
        def fn():
            out = pipe(generator=torch.Generator(device).manual_seed(0), **kw).images
            sync()
            return out

        return fn

    timer = StepTimer({"base": [unet]})

    def candidate(fn):
        return lambda: _timed_call(fn, timer)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = interleaved({"imagen-lite": candidate(wrap(lite)), "diffusers": candidate(wrap(ref))}, rounds, warmup)
        diff = _max_abs_diff(wrap(lite)().cpu(), wrap(ref)().cpu())
    px = config["sample_size"]
    rows = _compare_rows("imagen", f"{sum(p.numel() for p in unet.parameters()) / 1e9:.2f}B {str(dtype).split('.')[-1]}",
                         runs, {"base": px}, {"base": steps}, diff)  # fmt: skip
    del lite, ref, unet
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------- output


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if value != value:  # nan
            return "nan"
        if value == 0:
            return "0"
        if abs(value) < 1e-3:
            return f"{value:.1e}"
        if abs(value) < 10:
            return f"{value:.3f}"
        return f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict], columns) -> str:
    """A markdown table of ``rows`` with ``columns`` as (key, title) pairs."""
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def write_json(path, payload: dict) -> None:
    """Write ``payload`` as JSON (NaN written as null), creating the parent directory."""
    from pathlib import Path

    def clean(x):
        if isinstance(x, float) and x != x:
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(payload), indent=2) + "\n")


__all__ = [
    "IMAGEN_CASES", "ImagenCase", "StepTimer", "bench_gpu", "bench_imagen", "bench_quality", "bench_training",
    "bench_unclip", "embedded_default_case", "interleaved", "machine_header", "machine_info", "markdown_table",
    "pareto_front", "unet_call_rows", "write_json",
]  # fmt: skip
