"""The benchmark's plumbing (scripts/bench.py, imagen-lite bench) on tiny configs, one round, CPU
-- not its timings -- and the exact speed work it justified (constant-input reuse,
inference mode), which must leave every output bit for bit as it was."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from imagen_lite.cli_bench import build_parser, run
from imagen_lite.evaluation import bench as B

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--rounds", "1", "--warmup", "0", "--threads", "1"]


def _reference():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench_generate import unclip_reference
    finally:
        sys.path.pop(0)
    return unclip_reference()


def _imagen_pytorch_usable() -> bool:
    try:
        B.import_imagen_pytorch_unet()
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny ImagenPipeline directory with generation defaults (for the quality section)."""
    from imagen_lite.pipelines.imagen import ImagenPipeline

    d = tmp_path_factory.mktemp("bench") / "tiny"
    ImagenPipeline(**B.build_imagen_parts(B.IMAGEN_CASES["tiny"]), max_sequence_length=77).save_pretrained(d)
    (d / "imagen_lite_defaults.json").write_text(json.dumps({"num_inference_steps": [2, 2], "guidance_scale": [2.0, 1.0]}))
    return d


def test_bench_every_section_tiny_one_round(tmp_path, tiny_dir, capsys):
    out = tmp_path / "bench.json"
    args = build_parser().parse_args([
        "--sections", "sampling", "quality", "training", "gpu", "--cases", "tiny", "--steps", "2", "2",
        "--model-dir", str(tiny_dir), "--quality-schedulers", "ddim", "--quality-steps", "2",
        "--quality-prompts", "2", "--quality-batch", "2", "--train-batch", "1", "--gpu-unet", "tiny",
        "--json", str(out), *FAST,
    ])  # fmt: skip
    report = run(args, unclip_reference=_reference())
    printed = capsys.readouterr().out

    # the machine heads the table; the JSON holds the same report
    assert printed.startswith("Machine: ") and "cores" in printed and "load average" in printed
    saved = json.loads(out.read_text())
    assert set(saved["machine"]) >= {"cpu", "cores", "ram_gib", "gpu", "fast_bf16", "torch", "diffusers", "date", "load_average"}
    # an AVX2-only EPYC and an AVX-512 BF16 one share their model name: the header tells them apart
    bf16_note = {True: "(AVX-512 BF16 / AMX)", False: "(no AVX-512 BF16 / AMX)"}.get(saved["machine"]["fast_bf16"], "")
    assert bf16_note in printed.splitlines()[0]
    assert saved["sections"] == ["sampling", "quality", "training", "gpu"]

    # (a) sampling: per-stage rows and end to end for both families, same images as diffusers
    rows = saved["sampling"]
    assert [(r["family"], r["stage"]) for r in rows] == [
        ("imagen", "base"), ("imagen", "sr_32"), ("imagen", "end to end"),
        ("unclip", "prior"), ("unclip", "decoder"), ("unclip", "sr_32"), ("unclip", "end to end"),
    ]  # fmt: skip
    for r in rows:
        assert r["max_abs_diff"] < 1e-4, r
        assert r["lite_s"] > 0 and r["diffusers_s"] > 0 and r["ratio"] > 0 and r["ratio_cpu"] > 0
    assert "| family | case | stage |" in printed

    # (b) quality per second: the directory's default row first, a Pareto flag on every row
    q = saved["quality"]
    assert [(r["scheduler"], r["steps"], r["note"]) for r in q["rows"]] == [
        ("DDPMScheduler", 2, "model default"), ("ddim", 2, ""),
    ]
    assert all(isinstance(r["pareto"], bool) and 0 <= r["accuracy"] <= 100 and r["n_images"] == 2 for r in q["rows"])
    assert any(r["pareto"] for r in q["rows"])
    assert q["acceptance"] is None  # no DDPM-100 reference row ran

    # (c) training: our row always; imagen-pytorch's only when it is installed, else said why
    t = saved["training"]
    assert t["rows"][0]["impl"] == "imagen-lite" and t["rows"][0]["samples_per_s"] > 0
    if _imagen_pytorch_usable():
        assert [r["impl"] for r in t["rows"]] == ["imagen-lite", "imagen-pytorch"]
        assert abs(t["rows"][1]["params_m"] / t["rows"][0]["params_m"] - 1) <= 0.10
    else:
        assert len(t["rows"]) == 1
        assert "imagen-pytorch" in saved["skipped"]["training (imagen-pytorch)"]
        assert "Skipped training (imagen-pytorch): imagen-pytorch is not usable here" in printed

    # (d) GPU: measured on CUDA, else skipped with the reason printed
    if torch.cuda.is_available():
        assert saved["gpu"] and saved["gpu"][-1]["stage"] == "end to end"
    else:
        assert saved["gpu"] == [] and "no CUDA" in saved["skipped"]["gpu"]
        assert "Skipped gpu: no CUDA device here" in printed


def test_bench_skips_quality_without_a_pipeline_directory(tmp_path, capsys):
    args = build_parser().parse_args(["--sections", "quality", *FAST])
    report = run(args, unclip_reference=None)
    assert "no --model-dir given" in report["skipped"]["quality"]
    args = build_parser().parse_args(["--sections", "quality", "--model-dir", str(tmp_path / "missing"), *FAST])
    report = run(args, unclip_reference=None)
    assert "is not a pipeline directory" in report["skipped"]["quality"]
    assert "Skipped quality:" in capsys.readouterr().out


def test_bench_without_the_unclip_reference_says_so(capsys):
    args = build_parser().parse_args(["--sections", "sampling", "--cases", "default", "--families", "unclip", *FAST])
    report = run(args, unclip_reference=None)
    assert report["sampling"] == []
    assert any("unclip/default" in n for n in report["notes"])


def test_cli_bench_is_registered(capsys):
    from imagen_lite.cli import main

    assert main(["bench", "--sections", "quality", *FAST]) == 0
    assert "Skipped quality: no --model-dir given" in capsys.readouterr().out
    assert main(["bench", "--sections", "quality", "--quality-default", "ddim", "--model-dir", str(ROOT), *FAST]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "--sections", "nonsense"])


def test_scripts_bench_runs_as_a_script(tmp_path, monkeypatch, capsys):
    import runpy

    out = tmp_path / "b.json"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--sections", "gpu", "--json", str(out), *FAST])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts scripts/ on it
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "scripts" / "bench.py"), run_name="__main__")
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("Machine: ")
    assert json.loads(out.read_text())["sections"] == ["gpu"]


def test_imagen_pytorch_is_not_a_runtime_dependency():
    text = (ROOT / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "imagen-pytorch" not in deps
    assert 'bench = ["imagen-pytorch' in text
    for path in (ROOT / "imagen_lite").rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not line.startswith(("import imagen_pytorch", "from imagen_pytorch")), f"{path}: top-level import"


@pytest.mark.skipif(importlib.util.find_spec("imagen_pytorch") is None, reason="imagen-pytorch (the bench extra) is not installed")
def test_imagen_pytorch_unet_matches_parameter_count():
    from imagen_lite.training.default import BaseRunConfig

    cfg = BaseRunConfig()
    unet, n = B.imagen_pytorch_unet(7_600_000, cfg.t5["d_model"], cfg.unet)
    assert abs(n - 7_600_000) <= 760_000 and n == sum(p.numel() for p in unet.parameters())


def test_pareto_front_marks_the_undominated():
    rows = [{"cpu_seconds": 1, "accuracy": 50}, {"cpu_seconds": 2, "accuracy": 40}, {"cpu_seconds": 3, "accuracy": 60}]
    B.pareto_front(rows, cost="cpu_seconds")
    assert [r["pareto"] for r in rows] == [True, False, True]


# ---------------------------------------------------------------------- the speed work


def _tiny_pipelines():
    from imagen_lite.pipelines.imagen import ImagenPipeline
    from imagen_lite.pipelines.unclip import UnCLIPLitePipeline

    imagen = ImagenPipeline(**B.build_imagen_parts(B.IMAGEN_CASES["tiny"]), max_sequence_length=77)
    parts = B.build_unclip_parts("tiny")
    unclip = UnCLIPLitePipeline(**parts)
    for p in (imagen, unclip):
        p.set_progress_bar_config(disable=True)
    return imagen, unclip


def test_constant_input_reuse_is_bit_exact_and_hits(monkeypatch):
    from imagen_lite.pipelines import speed

    imagen, unclip = _tiny_pipelines()
    calls = {
        "imagen": lambda: imagen(["a red circle"], num_inference_steps=(3, 2), guidance_scale=(5.0, 3.0),
                                 generator=torch.Generator().manual_seed(0), output_type="pt", return_stage_outputs=True),
        "unclip": lambda: unclip(["a red circle"], num_inference_steps=(3, 3, 2), guidance_scale=(4.0, 6.0, 1.0),
                                 generator=torch.Generator().manual_seed(0), output_type="pt", return_stage_outputs=True),
    }  # fmt: skip
    hits = []
    restore = speed._Memo.restore
    monkeypatch.setattr(speed._Memo, "restore", lambda self: (hits.append(self.hits), restore(self)))
    fast = {k: f() for k, f in calls.items()}
    assert hits and sum(hits) > 0 and all(h in (0, 1, 2) for h in hits)  # 3-step stages: computed once, reused
    monkeypatch.setattr(speed, "constant_input_modules", lambda model: [])
    slow = {k: f() for k, f in calls.items()}
    for k in calls:
        assert torch.equal(fast[k].images, slow[k].images), k
        for stage in fast[k].stage_images:
            assert torch.equal(fast[k].stage_images[stage], slow[k].stage_images[stage]), (k, stage)
    # the modules are left as they were: no memo remains on any submodule
    for model in (imagen.unet, imagen.sr_unet, unclip.prior, unclip.decoder):
        assert not any("forward" in m.__dict__ for m in model.modules())


def test_outputs_are_ordinary_tensors_after_inference_mode():
    imagen, _ = _tiny_pipelines()
    out = imagen(["a red circle"], num_inference_steps=2, num_stages=1, generator=torch.Generator().manual_seed(0),
                 output_type="pt", return_stage_outputs=True)  # fmt: skip
    assert not out.images.is_inference() and not out.stage_images["base"].is_inference()
    out.images.mul_(2)  # in place works outside inference mode
    assert out["images"] is out.images


def test_load_pipeline_compile_is_opt_in(tiny_dir):
    from imagen_lite.api import load_pipeline
    from imagen_lite.pipelines.speed import constant_input_modules

    plain = load_pipeline("imagen", model=tiny_dir, device="cpu", dtype="float32")
    compiled = load_pipeline("imagen", model=tiny_dir, device="cpu", dtype="float32", compile=True)
    assert type(plain.unet).__name__ == "UNet2DConditionModel"
    assert type(compiled.unet).__name__ == "OptimizedModule" and compiled.unet._orig_mod is plain.unet
    assert compiled.unet.config.sample_size == plain.unet.config.sample_size
    assert constant_input_modules(compiled.unet) == []  # compiled graphs are not memoised
    with pytest.raises(ValueError, match="compile=True and offload=True"):
        load_pipeline("imagen", model=tiny_dir, device="cpu", dtype="float32", compile=True, offload=True)


def test_bench_latency_times_generate_with_the_models_defaults(tiny_dir, capsys):
    args = build_parser().parse_args(["--sections", "latency", "--latency-families", "imagen", "--latency-model",
                                      f"imagen={tiny_dir}", "--latency-size", "32", *FAST])  # fmt: skip
    report = run(args, unclip_reference=None)
    (row,) = report["latency"]
    assert row["family"] == "imagen" and row["model"] == str(tiny_dir) and row["px"] == 32
    assert row["steps"].startswith("2") and row["guidance"].startswith("2")  # from imagen_lite_defaults.json
    assert row["wall_min"] <= row["wall_s"] <= row["wall_max"] and row["rounds"] == 1
    assert row["sr_strength"] == "1 (model's)"
    assert "## Latency" in capsys.readouterr().out
    args = build_parser().parse_args(["--sections", "latency", "--latency-families", "imagen", "--latency-model",
                                      f"imagen={tiny_dir}", "--latency-size", "32", "--latency-sr-strength", "0.5",
                                      *FAST])  # fmt: skip
    rows = run(args, unclip_reference=None)["latency"]
    assert [r["sr_strength"] for r in rows] == ["1 (model's)", "0.5"] and all(r["wall_s"] > 0 for r in rows)
    with pytest.raises(ValueError, match="FAMILY=DIR"):
        run(build_parser().parse_args(["--sections", "latency", "--latency-model", "sd=x", *FAST]), unclip_reference=None)



def test_bench_latency_times_dalle2_decoder_candidates_side_by_side(tmp_path, capsys):
    """--latency-decoder-candidates adds DALL-E 2 rows at those k, each timed in the same rounds;
    the model's own row says its saved k."""
    from imagen_lite.pipelines.unclip import build_tiny_unclip

    d = tmp_path / "d2"
    build_tiny_unclip().save_pretrained(d, safe_serialization=True)
    (d / "imagen_lite_defaults.json").write_text(json.dumps({"num_inference_steps": [2, 2, 2],
                                                              "guidance_scale": [2.0, 2.0, 1.0], "decoder_candidates": 2}))
    args = build_parser().parse_args(["--sections", "latency", "--latency-families", "dalle2", "--latency-model",
                                      f"dalle2={d}", "--latency-size", "16", "--latency-decoder-candidates", "1", "3",
                                      *FAST])  # fmt: skip
    rows = run(args, unclip_reference=None)["latency"]
    assert [r["candidates"] for r in rows] == [2, 1, 3] and all(r["wall_s"] > 0 for r in rows)
    assert "64 px samples / image" in capsys.readouterr().out
    with pytest.raises(ValueError, match="needs the dalle2 family"):
        B.bench_latency({"imagen": None}, dalle2_candidates=(2,))

def test_sampling_compare_times_compiled_imagen_lite_against_eager_diffusers():
    """--compile: imagen-lite runs compiled copies (the eager backend here: the plumbing, not
    inductor's minutes of codegen) of the very weights diffusers runs eagerly; both sides' steps
    are timed and the images still agree."""
    kw = dict(rounds=1, warmup=0, compile=True, compile_kwargs={"backend": "eager"})
    rows = B.bench_imagen(B.IMAGEN_CASES["tiny"], steps=(2, 2), **kw)
    rows += B.bench_unclip("tiny", *_reference(), steps=(2, 2, 2), **kw)
    assert {r["case"] for r in rows} == {"tiny +compile"}
    assert {(r["family"], r["stage"]) for r in rows} == {
        ("imagen", "base"), ("imagen", "sr_32"), ("imagen", "end to end"),
        ("unclip", "prior"), ("unclip", "decoder"), ("unclip", "sr_32"), ("unclip", "end to end"),
    }  # fmt: skip
    for r in rows:
        assert r["lite_s"] > 0 and r["diffusers_s"] > 0, r
        assert r["max_abs_diff"] < 1e-4, r


def test_budget_speed_script_times_issue_10s_configurations(capsys):
    spec = importlib.util.spec_from_file_location("budget_speed", ROOT / "scripts" / "budget_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--batch", "2", "--rounds", "1", "--threads", "1"])
    rows = result["rows"]
    assert [r["reference"] for r in rows] == [0.55, 0.42, 1.04, None, None]
    assert 3.0 < rows[0]["params_m"] < 4.0 and 7.0 < rows[2]["params_m"] < 8.0  # the issue's 3.5M / 7.6M
    assert rows[0]["params_m"] == rows[1]["params_m"] and rows[3]["params_m"] == rows[4]["params_m"]
    assert all(r["seconds"] > 0 for r in rows)
    assert result["factor"] == min(rows[0]["slowdown"], rows[1]["slowdown"], rows[2]["slowdown"])
    out = capsys.readouterr().out
    assert "Machine:" in out and "not comparable" in out
    with pytest.raises(SystemExit):
        module.main(["--batch", "0"])


def test_latency_rows_name_a_limited_guidance_interval():
    import dataclasses

    from imagen_lite import presets
    from imagen_lite.evaluation.bench import format_guidance

    full = dataclasses.replace(presets.DEFAULT_IMAGEN, guidance_scale=(3.0, 1.0))
    assert format_guidance(full) == "3,1"
    assert format_guidance(dataclasses.replace(full, guidance_interval=(0.0, 0.4))) == "3,1 (steps [0, 0.4))"
    per_stage = dataclasses.replace(full, guidance_interval=((0.0, 0.4), (0.0, 1.0)))
    assert format_guidance(per_stage) == "3,1 (steps [0, 0.4))"
