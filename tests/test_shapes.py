"""Tests of the shapes domain: renderer, captions, datasets, detector, scorer, CLI."""

from __future__ import annotations

import argparse
import json
import re
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from imagen_lite.cli_shapes import register
from imagen_lite.data import shapes as S
from imagen_lite.data.shapes import (
    COLORS,
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    KINDS,
    SHAPES,
    Scene,
    ShapeObject,
    ShapesDataset,
    area_downsample,
    is_heldout,
    parse_caption,
    prompt_set,
    render,
    render_pair,
    sample_scene,
    scene_for_caption,
    write_imagefolder,
)
from imagen_lite.evaluation.shapes import (
    FAILURE_MODES,
    detect_objects,
    evaluate,
    failure_mode,
    format_failures,
    format_paired,
    format_table,
    label_components,
    paired,
    score_image,
)


def _scene(i: int, seed: int = 0, **kw) -> Scene:
    return sample_scene(np.random.default_rng([seed, i]), **kw)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [_scene(i, seed=123) for i in range(200)]


# ----------------------------------------------------------------------------- rendering


def _reference_render(scene: Scene, size: int, f: int = 4) -> np.ndarray:
    """Brute-force spec renderer: inside tests on the whole f x supersampled canvas."""
    n = size * f
    t = (np.arange(n) + 0.5) / n
    x, y = t[None, :], t[:, None]
    canvas = np.full((size, size, 3), 255.0)
    for o in scene.objects:
        r, dx, dy = o.d / 2, x - o.cx, y - o.cy
        if o.shape == "circle":
            inside = dx * dx + dy * dy <= r * r
        elif o.shape == "square":
            inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        else:  # apex (cx, cy - d/2), base corners (cx -/+ d/2, cy + d/2)
            inside = (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
        a = inside.reshape(size, f, size, f).mean(axis=(1, 3))[..., None]
        canvas = canvas * (1 - a) + a * np.array(COLORS[o.color])
    return np.rint(canvas).astype(np.uint8)


def test_render_matches_brute_force_supersampling(scenes):
    for scene in scenes[:6]:
        for size in (64, 256):
            img = render(scene, size)
            assert img.shape == (size, size, 3) and img.dtype == np.uint8
            np.testing.assert_array_equal(img, _reference_render(scene, size))


def test_render_is_white_and_antialiased():
    obj = ShapeObject("circle", "blue", 0.5, 0.5, 0.3)
    img = render(Scene("a blue circle", "single", [obj]), 64)
    assert (img[:4] == 255).all() and (img[:, :4] == 255).all()
    assert tuple(img[32, 32]) == COLORS["blue"]
    blue = np.array(COLORS["blue"])
    partial = ~((img == 255).all(-1) | (img == blue).all(-1))
    assert partial.sum() > 20  # anti-aliased edge pixels between background and colour


def test_render_pair_low_is_area_downsample_of_high(scenes):
    for scene in scenes[:5]:
        low, high = render_pair(scene)
        assert low.shape == (64, 64, 3) and high.shape == (256, 256, 3)
        np.testing.assert_array_equal(high, render(scene, 256))
        block_mean = high.reshape(64, 4, 64, 4, 3).astype(np.float64).mean(axis=(1, 3))
        np.testing.assert_array_equal(low, np.rint(block_mean).astype(np.uint8))
        np.testing.assert_array_equal(low, area_downsample(high, 4))
        pil_box = np.asarray(Image.fromarray(high).resize((64, 64), Image.BOX))
        assert np.abs(pil_box.astype(int) - low).max() <= 1


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match=r"size must be an int >= 16.*got 8"):
        render(Scene("", "single", []), 8)
    with pytest.raises(ValueError, match=r"unknown color 'pink'.*red"):
        render(Scene("", "single", [ShapeObject("circle", "pink", 0.5, 0.5, 0.2)]))
    with pytest.raises(ValueError, match=r"unknown shape 'hexagon'.*circle"):
        render(Scene("", "single", [ShapeObject("hexagon", "red", 0.5, 0.5, 0.2)]))


# ------------------------------------------------------------------------------ sampling


def test_sampled_scenes_follow_layout_rules():
    for i in range(300):
        scene = _scene(i, seed=7)
        parsed = parse_caption(scene.caption)
        assert parsed.kind == scene.kind and len(parsed.objects) == len(scene.objects)
        for want, o in zip(parsed.objects, scene.objects):
            assert (o.color, o.shape) == (want.color, want.shape)
            nominal = S.SIZES[want.size or ""]
            assert abs(o.d - nominal) <= 0.1 * nominal + 1e-12
            assert min(o.cx, o.cy) - o.d / 2 >= S.GAP - 1e-12
            assert max(o.cx, o.cy) + o.d / 2 <= 1 - S.GAP + 1e-12
            if want.position == "on the left":
                assert o.cx < 1 / 3
            elif want.position == "at the bottom":
                assert o.cy > 2 / 3
            elif want.position == "in the center":
                assert 1 / 3 < o.cx < 2 / 3 and 1 / 3 < o.cy < 2 / 3
        for a in range(len(scene.objects)):
            for b in range(a + 1, len(scene.objects)):
                assert S._separated(scene.objects[a], scene.objects[b])
        if parsed.relation:
            assert S._relation_holds_for_render(*scene.objects, parsed.relation)


def test_sample_scene_is_seeded():
    a, b = _scene(5, seed=1), _scene(5, seed=1)
    assert a == b
    np.testing.assert_array_equal(render(a), render(b))
    others = [_scene(5, seed=s) for s in range(2, 6)]
    assert any(o.caption != a.caption for o in others)
    assert all(not np.array_equal(render(o), render(a)) for o in others)


def test_mixture_restricts_kinds():
    kinds = {_scene(i, mixture={"counting": 1.0, "relation": 3}).kind for i in range(60)}
    assert kinds == {"counting", "relation"}
    assert {_scene(i, mixture={"position": 1, "single": 0}).kind for i in range(20)} == {"position"}
    with pytest.raises(ValueError, match=r"unknown kind\(s\) \['colour'\].*single"):
        _scene(0, mixture={"colour": 1.0})
    with pytest.raises(ValueError, match=r"at least one positive weight"):
        _scene(0, mixture={"single": 0})


def test_exclude_heldout_never_yields_heldout():
    flagged = [is_heldout(_scene(i, seed=3).caption) for i in range(300)]
    assert 0 < sum(flagged) < 300  # the held-out set is neither empty nor everything
    for i in range(300):
        assert not is_heldout(_scene(i, seed=3, exclude_heldout=True).caption)


def test_is_heldout_examples():
    color, shape = sorted(HELDOUT_PAIRS)[0]
    assert is_heldout(f"three {color} {shape}s")
    assert is_heldout(f"{S._noun_phrase(color, shape)} and a red square")
    shape_a, relation, shape_b = sorted(HELDOUT_RELATIONS)[0]
    assert is_heldout(f"a red {shape_a} {relation} a blue {shape_b}")
    assert not is_heldout("a red circle")
    for shape_a, relation, shape_b in HELDOUT_RELATIONS:  # listed with its mirror phrasing
        mirror = {"above": "below", "below": "above", "to the left of": "to the right of",
                  "to the right of": "to the left of"}[relation]
        assert (shape_b, mirror, shape_a) in HELDOUT_RELATIONS


def test_prompt_set_is_fixed_and_balanced():
    prompts = prompt_set(50, seed=0)
    assert prompts == prompt_set(50, seed=0) and prompts != prompt_set(50, seed=1)
    assert len(prompts) == 50 and len({c for c, _ in prompts}) == 50
    counts = {k: sum(kind == k for _, kind in prompts) for k in KINDS}
    assert set(counts.values()) == {10}
    assert all(parse_caption(c).kind == k for c, k in prompts)
    assert {k for _, k in prompt_set(9, mixture={"relation": 1, "counting": 5})} == {"relation", "counting"}


# ------------------------------------------------------------------------------ captions


def test_caption_grammar_examples():
    p = parse_caption("a large blue square")
    assert (p.kind, p.objects[0].size, p.objects[0].color, p.objects[0].shape) == ("single", "large", "blue", "square")
    p = parse_caption("a green triangle on the left")
    assert (p.kind, p.objects[0].position) == ("position", "on the left")
    p = parse_caption("an orange square to the right of a red circle")
    assert p.kind == "relation" and p.relation == "to the right of"
    assert [(o.color, o.shape) for o in p.objects] == [("orange", "square"), ("red", "circle")]
    p = parse_caption("three yellow triangles")
    assert p.kind == "counting" and len(p.objects) == 3
    assert parse_caption("a small orange circle").objects[0].size == "small"
    assert parse_caption("a red circle and an orange square").kind == "two_objects"
    for i in range(100):  # sampled captions use "an" exactly before "orange"
        caption = _scene(i, seed=9).caption
        assert re.search(r"\ban (?!orange)|\ba orange", caption) is None


@pytest.mark.parametrize(
    "caption",
    [
        "a orange circle",
        "an red square",
        "an large orange square",
        "a red circle.",
        "A red circle",
        "a red  circle",
        "a red hexagon",
        "a pink circle",
        "two red circle",
        "five red circles",
        "one red circle",
        "a small red circle and a blue square",
        "a red circle on the left of a blue square",
        "a red circle in the middle",
        "",
    ],
)
def test_parse_caption_rejects_malformed(caption):
    with pytest.raises(ValueError, match=re.escape(repr(caption))) as info:
        parse_caption(caption)
    assert "COLOR SHAPE" in str(info.value)  # the message teaches the grammar


def test_parse_caption_rejects_non_string():
    with pytest.raises(TypeError, match="caption must be a str"):
        parse_caption(None)


# ------------------------------------------------------------------------------ datasets


def _same_items(a, b):
    assert a.keys() == b.keys()
    assert a["text"] == b["text"]
    for key in a:
        if key != "text":
            assert torch.equal(a[key], b[key])


def test_dataset_items_and_resume():
    ds = ShapesDataset(64, seed=4)
    it = iter(ds)
    first = [next(it) for _ in range(6)]
    x = first[0]["pixel_values"]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() == 1  # white background is exactly +1
    assert isinstance(first[0]["text"], str)
    resumed = iter(ShapesDataset(64, seed=4, start_index=3))
    for item in first[3:]:
        _same_items(item, next(resumed))
    again = iter(ShapesDataset(64, seed=4))
    _same_items(first[0], next(again))
    other = next(iter(ShapesDataset(64, seed=5)))
    assert not torch.equal(other["pixel_values"], x)


def test_dataset_pairs_and_finite_length():
    items = list(ShapesDataset((64, 256), seed=2, start_index=1, num_samples=4))
    assert len(items) == 3
    for i, item in enumerate(items, start=1):
        low, high = render_pair(S._scene_at(2, i, None, False))
        assert item["pixel_values"].shape == (3, 256, 256)
        assert item["pixel_values_low"].shape == (3, 64, 64)
        to_uint8 = lambda t: np.rint((t.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)  # noqa: E731
        np.testing.assert_array_equal(to_uint8(item["pixel_values"]), high)
        np.testing.assert_array_equal(to_uint8(item["pixel_values_low"]), area_downsample(high, 4))
        np.testing.assert_array_equal(to_uint8(item["pixel_values_low"]), low)


def test_dataset_splits_indices_across_workers(monkeypatch):
    ds = ShapesDataset(64, seed=0, start_index=2, num_samples=12)
    expected = [ds.example(i)["text"] for i in range(2, 12)]
    seen = []
    for wid in range(3):
        info = types.SimpleNamespace(id=wid, num_workers=3)
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
        seen.append([item["text"] for item in ds])
    assert sorted(sum(seen, [])) == sorted(expected)
    assert seen[1] == expected[1::3]


def test_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"size must be an int or a \(low, high\) pair, got \(64, 128, 256\)"):
        ShapesDataset((64, 128, 256))
    with pytest.raises(ValueError, match=r"high a multiple of low, got \(64, 100\)"):
        ShapesDataset((64, 100))
    with pytest.raises(ValueError, match=r"start_index must be an int >= 0, got -1"):
        ShapesDataset(start_index=-1)


def test_write_imagefolder(tmp_path):
    out = write_imagefolder(tmp_path / "folder", n=5, seed=3, size=64, exclude_heldout=True)
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and all(set(line) == {"file_name", "text"} for line in lines)
    for i, line in enumerate(lines):
        img = np.asarray(Image.open(out / line["file_name"]))
        assert img.shape == (64, 64, 3)
        assert score_image(img, line["text"])
        assert line["text"] == S._scene_at(3, i, None, True).caption
    with pytest.raises(ValueError, match="is not empty"):
        write_imagefolder(out, n=1, seed=0)


# ----------------------------------------------------------------------------- detection


def test_label_components_is_8_connected():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one component
    mask[0, 3:6] = True
    mask[4:6, 0:2] = True
    mask[3, 5] = mask[4, 4] = True  # diagonal chain, separate from row 0 (gap at row 1-2)
    labels, n = label_components(mask)
    assert n == 4
    assert labels[0, 0] == labels[1, 1] and labels[3, 5] == labels[4, 4]
    assert label_components(np.zeros((3, 3), dtype=bool))[1] == 0


def test_label_components_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = rng.random(tuple(rng.integers(1, 30, size=2))) < rng.uniform(0.2, 0.7)
        ours, n = label_components(mask)
        ref, n_ref = ndimage.label(mask, structure=np.ones((3, 3)))
        assert n == n_ref
        np.testing.assert_array_equal(ours, ref)


def test_detect_objects_reads_a_scene():
    scene = Scene(
        "",
        "two_objects",
        [ShapeObject("triangle", "purple", 0.25, 0.3, 0.24), ShapeObject("circle", "yellow", 0.7, 0.7, 0.3)],
    )
    for size in (64, 128, 256):
        img = render(scene, size)
        for image in (img, Image.fromarray(img), Image.fromarray(img).convert("RGBA")):
            found = detect_objects(image)
            assert [(o.color, o.shape) for o in found] == [("purple", "triangle"), ("yellow", "circle")]
            assert found[1].cx == pytest.approx(0.7, abs=0.01) and found[1].d == pytest.approx(0.3, abs=0.02)
    assert detect_objects(np.full((64, 64, 3), 255, dtype=np.uint8)) == []
    with pytest.raises(ValueError, match="image must be square.*64x32"):
        detect_objects(np.zeros((32, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8.*float32"):
        detect_objects(np.zeros((8, 8, 3), dtype=np.float32))


def test_detect_ignores_specks():
    img = np.full((64, 64, 3), 255, dtype=np.uint8)
    img[10:14, 10:14] = COLORS["red"]  # 16 px < 0.5% of 4096
    assert detect_objects(img) == []


# ------------------------------------------------------------------------------- scoring


def test_ground_truth_renders_score_true(scenes):
    assert {s.kind for s in scenes} == set(KINDS)
    for scene in scenes:
        low, high = render_pair(scene)
        assert score_image(render(scene, 64), scene.caption), scene
        assert score_image(low, scene.caption), scene
        assert score_image(high, scene.caption), scene


def _gt(caption: str, objects: list[tuple]) -> Scene:
    scene = Scene(caption, parse_caption(caption).kind, [ShapeObject(*o) for o in objects])
    for size in (64, 256):
        assert score_image(render(scene, size), caption)
    return scene


def _scores(objects: list[tuple], caption: str) -> bool:
    scene = Scene(caption, "", [ShapeObject(*o) for o in objects])
    return score_image(render(scene, 64), caption) or score_image(render(scene, 256), caption)


def test_wrong_renders_score_false():
    red_circle = ("circle", "red", 0.5, 0.5, 0.24)
    _gt("a red circle", [red_circle])
    assert not _scores([("circle", "blue", 0.5, 0.5, 0.24)], "a red circle")  # wrong colour
    assert not _scores([("square", "red", 0.5, 0.5, 0.24)], "a red circle")  # wrong shape
    assert not _scores([("triangle", "red", 0.5, 0.5, 0.24)], "a red circle")
    extra = ("square", "green", 0.15, 0.15, 0.2)
    assert not _scores([red_circle, extra], "a red circle")  # an extra object

    _gt("a small red circle", [("circle", "red", 0.5, 0.5, 0.16)])
    assert not _scores([red_circle], "a small red circle")  # wrong size
    _gt("a large red circle", [("circle", "red", 0.5, 0.5, 0.36)])
    assert not _scores([red_circle], "a large red circle")

    left = ("triangle", "green", 0.2, 0.5, 0.24)
    _gt("a green triangle on the left", [left])
    assert not _scores([("triangle", "green", 0.8, 0.5, 0.24)], "a green triangle on the left")  # wrong position
    assert not _scores([("triangle", "green", 0.5, 0.5, 0.24)], "a green triangle on the left")
    assert not _scores([("triangle", "green", 0.5, 0.2, 0.24)], "a green triangle in the center")

    three = [("square", "yellow", x, 0.5, 0.2) for x in (0.2, 0.5, 0.8)]
    _gt("three yellow squares", three)
    assert not _scores(three[:2], "three yellow squares")  # wrong count
    assert not _scores(three + [("square", "yellow", 0.5, 0.15, 0.2)], "three yellow squares")
    assert not _scores(three[:2] + [("square", "blue", 0.8, 0.5, 0.2)], "three yellow squares")

    a, b = ("square", "blue", 0.25, 0.5, 0.24), ("circle", "orange", 0.75, 0.55, 0.24)
    _gt("a blue square to the left of an orange circle", [a, b])
    _gt("an orange circle to the right of a blue square", [a, b])
    swapped = [("square", "blue", 0.75, 0.5, 0.24), ("circle", "orange", 0.25, 0.55, 0.24)]
    assert not _scores(swapped, "a blue square to the left of an orange circle")  # swapped relation
    assert not _scores([a, b], "a blue square above an orange circle")  # wrong axis
    diagonal = [("square", "blue", 0.3, 0.3, 0.2), ("circle", "orange", 0.6, 0.7, 0.2)]
    assert not _scores(diagonal, "a blue square to the left of an orange circle")  # |dy| > |dx|
    _gt("a blue square above an orange circle", diagonal)

    _gt("a blue square and an orange circle", [a, b])
    rebound = [("square", "orange", 0.25, 0.5, 0.24), ("circle", "blue", 0.75, 0.55, 0.24)]
    assert not _scores(rebound, "a blue square and an orange circle")  # colours bound wrongly
    assert not _scores([a, b, extra], "a blue square and an orange circle")


def test_score_image_rejects_malformed_caption():
    img = np.full((64, 64, 3), 255, dtype=np.uint8)
    with pytest.raises(ValueError, match=re.escape("'a red circles'")):
        score_image(img, "a red circles")


def test_scene_for_caption_scores_for_any_grammatical_caption():
    rng = np.random.default_rng(0)
    for caption in ("a red square below a red circle", "four orange circles", "a large purple triangle at the top"):
        scene = scene_for_caption(caption, rng)
        assert score_image(render(scene, 64), caption) and score_image(render(scene, 256), caption)


# ---------------------------------------------------------------------------- evaluation


def _ground_truth_fn(size: int = 64):
    def generate_fn(prompts, seed):
        rng = np.random.default_rng(seed)
        return [Image.fromarray(render(scene_for_caption(p, rng), size)) for p in prompts]

    return generate_fn


def test_evaluate_ground_truth_is_perfect_and_blank_is_zero():
    result = evaluate(_ground_truth_fn(), n_prompts=25, seeds=(0, 1), batch_size=8)
    assert result["overall"] == 1.0 and result["n_images"] == 50
    assert result["per_category"] == {k: 1.0 for k in KINDS}
    assert len(result["records"]) == 50
    assert set(result["records"][0]) == {"caption", "kind", "seed", "ok", "heldout", "failure"}
    assert all(r["failure"] is None for r in result["records"])
    held = [r for r in result["records"] if r["heldout"]]
    assert (result["heldout"] is None) == (not held)
    table = format_table(result)
    assert "| relation | 100.0% | 10 |" in table and "overall" in table

    blank = lambda prompts, seed: [Image.new("RGB", (64, 64), "white") for _ in prompts]  # noqa: E731
    result = evaluate(blank, n_prompts=10, seeds=(0,))
    assert result["overall"] == 0.0 and all(v == 0.0 for v in result["per_category"].values())


def test_evaluate_checks_generator_output():
    with pytest.raises(ValueError, match="returned 0 images for 5 prompts"):
        evaluate(lambda prompts, seed: [], n_prompts=5, seeds=(0,))


# ----------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    register(sub)
    return p


def test_cli_data_shapes_writes_imagefolder(tmp_path, capsys):
    out = tmp_path / "shapes"
    args = _parser().parse_args(["data", "shapes", "--out", str(out), "--n", "3", "--seed", "1", "--size", "64"])
    assert args.func(args) == 0
    assert str(out) in capsys.readouterr().out
    lines = (out / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert Image.open(out / json.loads(lines[0])["file_name"]).size == (64, 64)


def test_cli_eval_shapes_uses_api_generate(tmp_path, monkeypatch, capsys):
    calls = []
    ground_truth = _ground_truth_fn(256)

    def generate(prompt, pipeline="imagen", model=None, size=None, num_inference_steps=None,
                 guidance_scale=None, seed=None, device="auto", dtype="auto", scheduler=None):
        calls.append((pipeline, size, num_inference_steps, guidance_scale, seed, device))
        return ground_truth(prompt, seed)

    monkeypatch.setitem(sys.modules, "imagen_lite.api", types.SimpleNamespace(generate=generate))
    out = tmp_path / "eval.json"
    args = _parser().parse_args(
        ["eval", "shapes", "--pipeline", "unclip", "--size", "256", "--seeds", "2", "--n-prompts", "5",
         "--steps", "3", "--guidance", "4.5", "--device", "cpu", "--out", str(out)]
    )
    assert args.func(args) == 0
    assert "| **overall** | **100.0%** | 10 |" in capsys.readouterr().out
    assert {c[4] for c in calls} == {0, 1} and calls[0][:4] == ("unclip", 256, 3, 4.5)
    saved = json.loads(out.read_text())
    assert saved["overall"] == 1.0 and saved["config"]["seeds"] == [0, 1]
    # --seed-start: the same prompts on new seeds
    calls.clear()
    args = _parser().parse_args(["eval", "shapes", "--pipeline", "imagen", "--seeds", "2", "--seed-start", "5",
                                 "--n-prompts", "5", "--out", str(out)])  # fmt: skip
    assert args.func(args) == 0
    assert {c[4] for c in calls} == {5, 6} and json.loads(out.read_text())["config"]["seeds"] == [5, 6]
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval", "shapes", "--pipeline", "imagen", "--seed-start", "-1"])


def test_register_reuses_existing_commands():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    data = sub.add_parser("data").add_subparsers()
    data.add_parser("captions")
    register(sub)
    assert p.parse_args(["data", "shapes", "--out", "x", "--n", "1"]).func.__name__ == "data_shapes"
    with pytest.raises(SystemExit):
        p.parse_args(["data", "shapes", "--out", "x", "--n", "0"])


def test_evaluate_rejects_bad_arguments():
    blank = lambda prompts, seed: [Image.new("RGB", (64, 64), "white") for _ in prompts]  # noqa: E731
    with pytest.raises(ValueError, match=r"seeds must be a non-empty sequence of ints.*got 2"):
        evaluate(blank, n_prompts=5, seeds=2)
    with pytest.raises(ValueError, match=r"n_prompts must be a positive int, got 0"):
        evaluate(blank, n_prompts=0)
    assert evaluate(blank, n_prompts=5, seeds=range(1))["n_images"] == 5


# (shape, colour, cx, cy, d) of each drawn object, the caption it is scored against, and why it fails
RED_CIRCLE_L, BLUE_SQUARE_R = ("circle", "red", 0.25, 0.5, 0.24), ("square", "blue", 0.75, 0.5, 0.24)
FAILURE_CASES = [
    ([RED_CIRCLE_L, BLUE_SQUARE_R], "a red circle and a blue square", None),
    ([("circle", "blue", 0.25, 0.5, 0.24), ("square", "red", 0.75, 0.5, 0.24)], "a red circle and a blue square", "binding swapped"),
    ([RED_CIRCLE_L, ("square", "green", 0.75, 0.5, 0.24)], "a red circle and a blue square", "colour wrong"),
    ([RED_CIRCLE_L, ("circle", "blue", 0.75, 0.5, 0.24)], "a red circle and a blue square", "shape wrong"),
    ([RED_CIRCLE_L, ("triangle", "green", 0.75, 0.5, 0.24)], "a red circle and a blue square", "colour and shape wrong"),
    ([RED_CIRCLE_L], "a red circle and a blue square", "too few objects"),
    ([RED_CIRCLE_L, BLUE_SQUARE_R, ("square", "blue", 0.5, 0.15, 0.16)], "a red circle and a blue square", "too many objects"),
    ([RED_CIRCLE_L, BLUE_SQUARE_R], "a red circle to the right of a blue square", "relation wrong"),
    ([RED_CIRCLE_L, BLUE_SQUARE_R], "a red circle to the left of a blue square", None),
    ([("circle", "red", 0.8, 0.5, 0.24)], "a red circle on the left", "position wrong"),
    ([("circle", "red", 0.5, 0.5, 0.16)], "a large red circle", "size wrong"),
    ([("circle", "red", 0.2, 0.5, 0.16)], "a large red circle on the left", "size wrong"),
    # size and position both wrong: the position is named (sizes are ignored only when that fixes it)
    ([("circle", "red", 0.8, 0.5, 0.16)], "a large red circle on the left", "position wrong"),
]


@pytest.mark.parametrize("objects,caption,expected", FAILURE_CASES)
def test_failure_mode_names_why_an_image_fails(objects, caption, expected):
    parsed = parse_caption(caption)
    image = render(Scene(caption, parsed.kind, [ShapeObject(*o) for o in objects]), 64)
    detected = detect_objects(image)
    assert len(detected) == len(objects)  # the scene drew what the case says
    assert failure_mode(detected, parsed) == expected
    assert score_image(image, caption) == (expected is None)


def test_evaluate_records_and_tables_failures():
    drawn = {caption: render(Scene(caption, parse_caption(caption).kind, [ShapeObject(*o) for o in objs]), 64)
             for objs, caption, _ in FAILURE_CASES[:3]}  # fmt: skip

    def one_image(prompts, seed):
        return [Image.fromarray(drawn["a red circle and a blue square"]) if "and" in p else Image.new("RGB", (64, 64), "white")
                for p in prompts]  # fmt: skip

    result = evaluate(one_image, n_prompts=25, seeds=(0,), mixture={"two_objects": 1.0})
    failures = {r["failure"] for r in result["records"]}
    assert failures <= set(FAILURE_MODES)
    table = format_failures(result)
    n = len(result["records"])
    right = sum(r["ok"] for r in result["records"])
    assert f"| two_objects | {n} | {right} |" in table
    # every prompt drew the same red-circle-and-blue-square image: right for that caption, a
    # mode for the others, and the table's counts add up
    row = [line for line in table.splitlines() if line.startswith("| two_objects")][0]
    cells = [int(c) for c in row.strip("|").split("|")[1:]]
    assert cells[0] == cells[1] + sum(cells[2:])


def test_contrast_groups_share_objects_and_differ_only_in_position_or_relation():
    from imagen_lite.data.shapes import contrast_variants

    assert contrast_variants("a small red circle at the top") == [
        "a small red circle at the top", "a small red circle on the left", "a small red circle on the right",
        "a small red circle at the bottom", "a small red circle in the center"]  # fmt: skip
    assert sorted(contrast_variants("an orange square below a red circle")[1:]) == sorted(
        f"an orange square {r} a red circle" for r in ("to the left of", "to the right of", "above"))
    assert contrast_variants("three red circles") == ["three red circles"]
    plain = S.ShapesDataset(seed=5, exclude_heldout=True)
    grouped = S.ShapesDataset(seed=5, exclude_heldout=True, contrast_group=4)
    kinds = set()
    for first in range(0, 200, 4):
        assert grouped.scene(first) == plain.scene(first)  # a group opens with the plain stream's scene
        group = [grouped.scene(first + k) for k in range(4)]
        assert not any(S.is_heldout(s.caption) for s in group)
        kinds.add(group[0].kind)
        if group[0].kind in ("position", "relation"):
            assert all(s.kind == group[0].kind and s.caption in contrast_variants(group[0].caption) for s in group)
            assert len({s.caption for s in group}) >= 3
            for s in group:  # each variant is laid out to satisfy its own caption
                assert score_image(render(s, 64), s.caption)
        else:
            assert group[1] == plain.scene(first + 1)  # other kinds: independent scenes
    assert {"position", "relation", "single"} <= kinds
    with pytest.raises(ValueError, match="contrast_group must be an int >= 1"):
        S.ShapesDataset(contrast_group=0)


# ----------------------------------------------------------------------- paired comparison


def test_paired_counts_the_images_right_in_one_evaluation_only():
    truth = _ground_truth_fn()

    def blank_singles_at_seed_1(prompts, seed):  # wrong exactly on the single-object images of seed 1
        images = truth(prompts, seed)
        kinds = [S.parse_caption(p).kind for p in prompts]
        return [Image.new("RGB", (64, 64), "white") if seed == 1 and k == "single" else im
                for im, k in zip(images, kinds)]

    a = evaluate(truth, n_prompts=25, seeds=(0, 1))
    b = evaluate(blank_singles_at_seed_1, n_prompts=25, seeds=(0, 1))
    n_single = sum(1 for r in b["records"] if r["kind"] == "single" and r["seed"] == 1)
    assert n_single > 0 and b["overall"] < 1.0
    result = paired(a, b)
    assert (result["n_images"], result["only_a"], result["only_b"]) == (50, n_single, 0)
    assert result["both"] == 50 - n_single and result["neither"] == 0
    assert result["z"] == pytest.approx(n_single**0.5)
    assert result["per_category"]["single"]["only_a"] == n_single
    assert sum(c["only_a"] for c in result["per_category"].values()) == n_single
    reverse = paired(b, a)
    assert (reverse["only_a"], reverse["only_b"], reverse["z"]) == (0, n_single, -result["z"])
    assert f"| **all** | **50** | **{n_single}** | **0** |" in format_paired(result)


def test_paired_matches_repeated_captions_copy_by_copy_and_needs_shared_images():
    def rec(caption, seed, ok):
        return {"caption": caption, "kind": "single", "seed": seed, "ok": ok}

    # "a red circle" twice at seed 0: the first copy is right in a only, the second in b only
    a = {"records": [rec("a red circle", 0, True), rec("a red circle", 0, False), rec("a blue square", 0, True)]}
    b = {"records": [rec("a red circle", 0, False), rec("a red circle", 0, True), rec("a blue square", 0, True)]}
    result = paired(a, b)
    assert (result["n_images"], result["only_a"], result["only_b"], result["both"]) == (3, 1, 1, 1)
    c = {"records": [rec("a red circle", 0, True), rec("a green triangle", 0, True)]}
    result = paired(a, c)
    assert (result["n_images"], result["only_in_a"], result["only_in_b"]) == (1, 2, 1)  # a's second copy has no match
    assert "not compared: 2 images only in a, 1 only in b" in format_paired(result)
    with pytest.raises(ValueError, match="share no image"):
        paired(a, {"records": [rec("a red circle", 5, True)]})
    with pytest.raises(ValueError, match="no 'records' list"):
        paired(a, {"overall": 0.5})


def test_cli_eval_paired(tmp_path, capsys):
    a = evaluate(_ground_truth_fn(), n_prompts=10, seeds=(0,))
    b = evaluate(lambda prompts, seed: [Image.new("RGB", (64, 64), "white")] * len(prompts), n_prompts=10, seeds=(0,))
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    args = _parser().parse_args(["eval", "paired", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| **all** | **10** | **10** | **0** |" in out and "z +3.2" in out
    import gzip

    (tmp_path / "b.json.gz").write_bytes(gzip.compress((tmp_path / "b.json").read_bytes()))  # docs/evals keeps them gzipped
    args = _parser().parse_args(["eval", "paired", str(tmp_path / "a.json"), str(tmp_path / "b.json.gz")])
    assert args.func(args) == 0 and capsys.readouterr().out == out.replace("b.json", "b.json.gz")
    from imagen_lite.cli import main  # user errors: one line on stderr, exit status 2

    (tmp_path / "bad.json.gz").write_text("not gzip")
    assert main(["eval", "paired", str(tmp_path / "a.json"), str(tmp_path / "bad.json.gz")]) == 2
    assert "is not JSON" in capsys.readouterr().err

    assert main(["eval", "paired", str(tmp_path / "a.json"), str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "missing.json" in err and "Traceback" not in err
    (tmp_path / "c.json").write_text(json.dumps({"records": []}))
    assert main(["eval", "paired", str(tmp_path / "a.json"), str(tmp_path / "c.json")]) == 2
    assert "share no image" in capsys.readouterr().err
