"""compare(): a tiny two-pipeline comparison writes every file; the grid is rows x columns; the
JSON, CSV and HTML carry the same numbers; CLIP choice and its statement; bad input; the CLI;
and a real browser (headless Chromium) renders the page."""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import imagen_lite
from imagen_lite.cli import main
from imagen_lite.evaluation.compare import GRID, compare, grid_size, read_prompts_file

PROMPTS = ["a red circle", "a blue square above a green triangle"]
SEEDS = (0, 1)
STEPS = 2


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Tiny saved pipelines of both families; the dalle2 one ships its CLIP vision tower
    (image_encoder/ + feature_extractor/) as a trained default would."""
    from imagen_lite.models import unclip_components as U
    from imagen_lite.models.tiny import build_tiny_imagen
    from imagen_lite.pipelines.unclip import build_tiny_unclip

    root = tmp_path_factory.mktemp("compare")
    build_tiny_imagen().save_pretrained(root / "imagen", safe_serialization=True)
    build_tiny_unclip().save_pretrained(root / "dalle2", safe_serialization=True)
    shutil.copytree(root / "dalle2", root / "dalle2_no_vision")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        U.clip_vision_encoder().save_pretrained(root / "dalle2" / "image_encoder", safe_serialization=True)
    U.clip_image_processor().save_pretrained(root / "dalle2" / "feature_extractor")
    return {"imagen": str(root / "imagen"), "dalle2": str(root / "dalle2"), "dalle2_no_vision": str(root / "dalle2_no_vision")}


@pytest.fixture(scope="module")
def models(dirs):
    return {"imagen": dirs["imagen"], "dalle2": dirs["dalle2"]}


@pytest.fixture(scope="module")
def report(models):
    return compare(PROMPTS, models=models, seeds=SEEDS, size=None, num_inference_steps=STEPS, device="cpu",
                   stage_images=True, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def saved(report, tmp_path_factory):
    return report.save(tmp_path_factory.mktemp("report") / "out")


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{prefix}{k}", v


def _json_numbers(doc) -> dict:
    """(pipeline, prompt_index, seed, metric) -> value, read independently from metrics.json."""
    out = {}
    for p, summary in doc["pipelines"].items():
        for m, v in _flatten(summary):
            out[(p, "", "", m)] = v
    for rec in doc["images"]:
        rest = {k: v for k, v in rec.items() if k not in ("pipeline", "prompt_index", "prompt", "seed")}
        for m, v in _flatten(rest):
            out[(rec["pipeline"], str(rec["prompt_index"]), str(rec["seed"]), m)] = v
    return out


# ---------------------------------------------------------------------- files and numbers
def test_writes_every_file(saved):
    for name in ("grid.png", "index.html", "metrics.json", "metrics.csv"):
        assert (saved / name).is_file() and (saved / name).stat().st_size > 0, name
    assert len(list((saved / "images").glob("*_s?.png"))) == len(PROMPTS) * len(SEEDS) * 2
    assert list((saved / "images").glob("imagen_p0_s0_base.png"))  # the intermediate stage image


def test_grid_is_rows_by_columns(saved, report):
    grid = Image.open(saved / "grid.png")
    cell = GRID["cell_min"]  # tiny images (32 px) are shown at the minimum cell side
    assert grid.size == grid_size(len(PROMPTS), 2 * len(SEEDS), cell)
    pad, left, top = GRID["pad"], GRID["row_label_width"], GRID["header_height"]
    assert grid.size == (left + pad + 4 * (cell + pad), top + pad + 2 * (cell + pad))
    # the cell in row 1, column (dalle2, seed 1) is that image, scaled up
    x, y = left + pad + 3 * (cell + pad), top + pad + 1 * (cell + pad)
    crop = grid.convert("RGB").crop((x, y, x + cell, y + cell))
    expected = report.images[("dalle2", 1, 1)].convert("RGB").resize((cell, cell), Image.NEAREST)
    assert np.array_equal(np.asarray(crop), np.asarray(expected))


def test_json_csv_html_carry_the_same_numbers(saved):
    doc = json.loads((saved / "metrics.json").read_text())
    from_json = _json_numbers(doc)
    with open(saved / "metrics.csv", newline="") as f:
        from_csv = {(r["pipeline"], r["prompt_index"], r["seed"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)}
    page = (saved / "index.html").read_text()
    from_html = {tuple(html.unescape(k).split("|")): float(v) for k, v in re.findall(r'data-key="([^"]+)">([^<]+)</td>', page)}
    assert from_json and set(from_json) == set(from_csv) == set(from_html)
    for key, value in from_json.items():
        assert from_csv[key] == value == from_html[key], key
    # what the issue asks the table to hold, per pipeline
    for p in ("imagen", "dalle2"):
        for metric in ("median_seconds_per_image", "peak_memory_mb", "clip_score_mean", "shapes_accuracy.overall",
                       "shapes_accuracy.single", "shapes_accuracy.relation"):  # fmt: skip
            assert (p, "", "", metric) in from_json, (p, metric)
    assert from_json[("imagen", "", "", "steps.base")] == STEPS
    assert from_json[("dalle2", "", "", "steps.prior")] == STEPS
    assert ("dalle2", "", "", "median_stage_seconds.decoder") in from_json
    assert "every stage of every pipeline ran 2 denoising steps" in doc["config"]["step_policy"]


def test_cells_are_what_generate_makes(report, models):
    for p in ("imagen", "dalle2"):
        for i, prompt in enumerate(PROMPTS):
            got = imagen_lite.generate(prompt, pipeline=p, model=models[p], seed=1, num_inference_steps=STEPS, device="cpu")
            assert np.array_equal(np.asarray(got[0]), np.asarray(report.images[(p, i, 1)])), (p, prompt)


def test_page_is_self_contained(saved):
    page = (saved / "index.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    srcs = re.findall(r'src="([^"]+)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "favours" in page  # the CLIP bias statement


# ---------------------------------------------------------------------- CLIP and shapes
def test_clip_auto_is_the_dalle2_pipelines_own_and_says_it_favours_it(report, models):
    assert report.clip["source"] == models["dalle2"]
    assert report.clip["shared_with"] == ["dalle2"]
    assert "favours" in report.clip["statement"] and "dalle2" in report.clip["statement"]
    scores = [r["clip_score"] for r in report.records]
    assert len(scores) == 8 and all(0 <= s <= 100 for s in scores)


def test_clip_skipped_with_a_reason(dirs):
    kw = dict(seeds=(0,), size=16, num_inference_steps=STEPS, device="cpu", progress=False)
    r = compare("a red circle", pipelines=("dalle2",), models={"dalle2": dirs["dalle2_no_vision"]}, **kw)
    assert r.clip["used"] is None and "no CLIP vision tower" in r.clip["statement"]
    assert r.summary["dalle2"]["clip_score_mean"] is None and "clip_score" not in r.records[0]
    r = compare("a red circle", pipelines=("imagen",), models={"imagen": dirs["imagen"]}, clip=None, **kw)
    assert "skipped" in r.clip["statement"]


def _save_clip_model(path, text_encoder=None):
    """A tiny transformers CLIPModel directory; with ``text_encoder``, its text tower is that one."""
    from transformers import CLIPConfig, CLIPModel

    from imagen_lite.models import unclip_components as U

    tok = U.clip_word_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        text = text_encoder.config if text_encoder is not None else U.clip_text_encoder(len(tok), eos_token_id=tok.eos_token_id).config
        model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=U.clip_vision_encoder().config.to_dict(),
                                     projection_dim=32))  # fmt: skip
    if text_encoder is not None:
        model.text_model.load_state_dict(text_encoder.text_model.state_dict())
        model.text_projection.load_state_dict(text_encoder.text_projection.state_dict())
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    U.clip_image_processor().save_pretrained(path)
    return str(path)


def test_clip_from_a_transformers_clip_directory(dirs, models, tmp_path):
    from transformers import CLIPTextModelWithProjection

    kw = dict(models=models, seeds=(0,), size=16, num_inference_steps=STEPS, device="cpu", progress=False)
    r = compare("a red circle", clip=_save_clip_model(tmp_path / "other"), **kw)
    assert r.clip["used"].startswith("transformers CLIPModel") and r.clip["shared_with"] == []
    assert "would favour" in r.clip["statement"]
    assert all(isinstance(rec["clip_score"], float) for rec in r.records)
    # a CLIP whose text tower is the dalle2 pipeline's is recognised as shared, wherever it comes from
    own = CLIPTextModelWithProjection.from_pretrained(f"{models['dalle2']}/text_encoder")
    r = compare("a red circle", clip=_save_clip_model(tmp_path / "same", own), **kw)
    assert r.clip["shared_with"] == ["dalle2"] and "favours it" in r.clip["statement"]


def test_bad_clip_fails_before_generating(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        compare("a red circle", models=models, clip=str(tmp_path / "missing"), progress=False)
    with pytest.raises(ValueError, match="clip=3 is not valid"):
        compare("a red circle", models=models, clip=3, progress=False)
    (tmp_path / "notclip").mkdir()
    (tmp_path / "notclip" / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match="is not a CLIP"):
        compare("a red circle", models=models, clip=str(tmp_path / "notclip"), progress=False)


def test_shapes_only_for_shapes_captions(dirs):
    r = compare(["a photo of a cat", "two red circles"], pipelines=("imagen",), models=[dirs["imagen"]], seeds=(0,),
                size=16, num_inference_steps=STEPS, device="cpu", clip=None, progress=False)  # fmt: skip
    assert r.shapes["prompts_scored"] == 1 and "not shapes captions" in r.shapes["statement"]
    assert set(r.summary["imagen"]["shapes_accuracy"]) == {"overall", "counting"}
    assert r.records[0]["shapes_ok"] is None and r.records[1]["shapes_ok"] in (0, 1)
    # a wrong image says why (failure_mode), a right one has no failure; the summary counts them
    from imagen_lite.evaluation.shapes import FAILURE_MODES, detect_objects, failure_mode, parse_caption

    rec = r.records[1]
    expected = failure_mode(detect_objects(r.images[("imagen", 1, 0)]), parse_caption("two red circles"))
    assert rec["shapes_failure"] == (None if rec["shapes_ok"] else expected)
    assert (rec["shapes_failure"] in FAILURE_MODES) == (not rec["shapes_ok"])
    assert r.summary["imagen"]["shapes_failures"] == ({} if rec["shapes_ok"] else {expected: 1})
    assert "shapes failures" in r.markdown()


def test_per_pipeline_settings_and_policy(dirs, models):
    r = compare("a red circle", models=models, seeds=(0,), size=16, device="cpu", clip=None, progress=False,
                imagen={"num_inference_steps": 3}, dalle2={"num_inference_steps": (2, 3), "guidance_scale": 2.0})  # fmt: skip
    assert r.summary["imagen"]["steps"] == {"base": 3}
    assert r.summary["dalle2"]["steps"] == {"prior": 2, "decoder": 3}
    assert r.summary["dalle2"]["guidance"] == {"prior": 2.0, "decoder": 2.0}
    assert "set per pipeline" in r.config["step_policy"]
    assert "guided steps" not in r.markdown()  # every step guided: no row


def test_guidance_interval_is_passed_and_reported(models):
    r = compare("a red circle", models=models, seeds=(0,), size=16, device="cpu", clip=None, progress=False,
                imagen={"num_inference_steps": 4, "guidance_scale": 3.0, "guidance_interval": (0, 0.5)},
                dalle2={"num_inference_steps": 2})  # fmt: skip
    assert r.summary["imagen"]["guidance_interval"] == {"base": (0.0, 0.5)}
    assert "| guided steps (fraction) | [0, 0.5) | [0, 1) / [0, 1) |" in r.markdown()
    assert "samples per image" not in r.markdown()  # no model re-ranks: no row
    got = imagen_lite.generate("a red circle", model=models["imagen"], seed=0, size=16, num_inference_steps=4,
                               guidance_scale=3.0, guidance_interval=(0, 0.5), device="cpu")  # fmt: skip
    assert np.array_equal(np.asarray(got[0]), np.asarray(r.images[("imagen", 0, 0)]))


def test_a_saved_decoder_candidates_default_is_run_and_reported(dirs, tmp_path):
    """A dalle2 model whose defaults re-rank (decoder_candidates) is compared as generate() runs
    it, and the table says how many 64 px samples each image was picked from."""
    d2 = tmp_path / "dalle2_rerank"
    shutil.copytree(dirs["dalle2_no_vision"], d2)
    (d2 / "imagen_lite_defaults.json").write_text(json.dumps({"num_inference_steps": [2, 2, 2],
                                                               "guidance_scale": [2.0, 2.0, 1.0], "decoder_candidates": 2}))
    r = compare("a red circle", models={"imagen": dirs["imagen"], "dalle2": str(d2)}, seeds=(0,), size=16,
                device="cpu", clip=None, progress=False, imagen={"num_inference_steps": 2})  # fmt: skip
    assert r.summary["dalle2"]["candidates"] == 2 and r.summary["imagen"]["candidates"] == 1
    assert "| 64 px samples per image (best kept) | 1 | 2 |" in r.markdown()
    got = imagen_lite.generate("a red circle", pipeline="dalle2", model=str(d2), seed=0, size=16, device="cpu")
    assert np.array_equal(np.asarray(got[0]), np.asarray(r.images[("dalle2", 0, 0)]))


def test_imagen_sr_strength_is_passed_and_reported(models):
    r = compare("a red circle", models=models, seeds=(0,), size=None, device="cpu", clip=None, progress=False,
                imagen={"num_inference_steps": 2, "sr_strength": 0.5}, dalle2={"num_inference_steps": 2})  # fmt: skip
    assert r.summary["imagen"]["sr_strength"] == 0.5 and r.summary["dalle2"]["sr_strength"] is None
    assert "| SR strength (img2img start) | 0.5 | - |" in r.markdown()
    got = imagen_lite.generate("a red circle", model=models["imagen"], seed=0, num_inference_steps=2, sr_strength=0.5,
                               device="cpu")  # fmt: skip
    assert np.array_equal(np.asarray(got[0]), np.asarray(r.images[("imagen", 0, 0)]))
    # given for every pipeline, the Imagen SR's settings reach imagen only; for dalle2 they are named
    both = compare("a red circle", models=models, seeds=(0,), size=None, device="cpu", clip=None, progress=False,
                   num_inference_steps=2, sr_strength=0.5, noise_level=50)  # fmt: skip
    assert both.summary["imagen"]["sr_strength"] == 0.5 and both.summary["dalle2"]["sr_strength"] is None
    with pytest.raises(ValueError, match="sr_strength=0.5 applies to pipeline='imagen' only"):
        compare("a red circle", models=models, device="cpu", clip=None, progress=False, dalle2={"sr_strength": 0.5})


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (([],), {}, "at least one prompt"),
        (("",), {}, "non-empty"),
        (("a red circle",), {"pipelines": ("imagen", "dalle3")}, "'dalle3' is not known"),
        (("a red circle",), {"pipelines": ()}, "one or more of"),
        (("a red circle",), {"pipelines": ("imagen", "imagen")}, "twice"),
        (("a red circle",), {"seeds": (0, "one")}, "seeds must be integers, got 'one'"),
        (("a red circle",), {"seeds": (0, 1.5)}, "seeds must be integers, got 1.5"),
        (("a red circle",), {"seeds": ()}, "one or more integer seeds"),
        (("a red circle",), {"seeds": (1, 1)}, "repeats"),
        (("a red circle",), {"seeds": (0, 2**64)}, r"a seed=18446744073709551616 is out of range"),
        (("a red circle",), {"models": {"sdxl": "x"}}, "not among pipelines"),
        (("a red circle",), {"steps": 3}, "unknown keyword 'steps'"),
        (("a red circle",), {"dalle2": {"steps": 3}}, "unknown settings"),
        (("a red circle",), {"size": "big"}, "size='big'"),
    ],
)
def test_bad_input_is_named(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compare(*args, progress=False, **kwargs)


def test_prompts_file(tmp_path):
    (tmp_path / "p.txt").write_text("# shapes\n\na red circle\n  two blue squares  \n")
    assert read_prompts_file(tmp_path / "p.txt") == ["a red circle", "two blue squares"]
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="has no prompts"):
        read_prompts_file(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts_file(tmp_path / "missing.txt")


# ---------------------------------------------------------------------- CLI
def test_cli_compare_writes_a_report(models, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a blue square\n")
    out = tmp_path / "report"
    code = main(["compare", "a red circle", "--prompts-file", str(tmp_path / "prompts.txt"), "--models",
                 f"imagen={models['imagen']}", f"dalle2={models['dalle2']}", "--seeds", "0", "3", "--size", "32",
                 "--steps", "imagen=2", "dalle2=2,2,2", "--guidance-interval", "imagen=0,0.5", "--device", "cpu",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["pipelines"]["imagen"]["guidance_interval"]["base"] == [0.0, 0.5]
    assert doc["config"]["prompts"] == ["a red circle", "a blue square"] and doc["config"]["seeds"] == [0, 3]
    assert doc["pipelines"]["dalle2"]["steps"] == {"prior": 2, "decoder": 2, "sr_32": 2}
    assert Image.open(out / "grid.png").size == grid_size(2, 4, GRID["cell_min"])
    assert "index.html" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["compare", "--out", "X"], "no prompts"),
        (["compare", "a red circle", "--pipelines", "imagen", "dalle3", "--out", "X"], "'dalle3' is not known"),
        (["compare", "a red circle", "--models", "imagen", "--out", "X"], "is not PIPELINE=MODEL"),
        (["compare", "a red circle", "--steps", "sd=3", "--out", "X"], "'sd' is not a pipeline"),
        (["compare", "a red circle", "--guidance-interval", "imagen=0.6,0.2", "--out", "X"],
         r"--guidance-interval 'imagen=0.6,0.2'.*it must be a pair \(start, stop\)"),
    ],
)
def test_cli_errors_exit_2_without_traceback(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err


def test_cli_empty_prompts_file_and_bad_seed(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n")
    assert main(["compare", "--prompts-file", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "has no prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["compare", "a red circle", "--seeds", "0", "x", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "seed 'x' is not an integer" in capsys.readouterr().err


# ---------------------------------------------------------------------- a real browser
def test_chromium_renders_grid_and_table(saved, tmp_path):
    """Headless Chromium (Debian's package; .ci/run installs it) opens index.html from disk;
    the screenshot must show the grid (the images' many colours) and the table (its header
    cells' background colour), not a blank page."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed here (.ci/run installs Debian's package in CI)")
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1400",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", (saved / "index.html").resolve().as_uri()]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)  # (H, W, 3)
    assert rgb.std() > 20, "the screenshot is (nearly) one colour: a blank page"
    # the grid: its cells are noisy images with hundreds of distinct colours
    colours = np.unique(rgb.reshape(-1, 3), axis=0)
    assert len(colours) > 500, f"only {len(colours)} distinct colours: the grid did not render"
    # the per-pipeline table: header cells have background #dde6f5 from the page's stylesheet
    header = (np.abs(rgb - np.array([0xDD, 0xE6, 0xF5])).max(axis=-1) <= 3).sum()
    assert header > 2000, f"only {header} table-header pixels: the table did not render"
    # both lie in the first screenful, the grid above the table
    rows_with_colour = np.where((rgb.max(-1) - rgb.min(-1) > 60).sum(axis=1) > 50)[0]
    header_rows = np.where((np.abs(rgb - np.array([0xDD, 0xE6, 0xF5])).max(axis=-1) <= 3).sum(axis=1) > 100)[0]
    assert rows_with_colour.size and header_rows.size and rows_with_colour.min() < header_rows.min()
