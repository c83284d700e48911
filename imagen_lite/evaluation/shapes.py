"""Exact scoring of images against shapes-domain captions (spec section "Scoring").

``detect_objects`` finds the objects of an image (foreground threshold, 8-connected
components, palette colour, shape from fill ratio), ``score_image`` checks them against a
caption, and ``evaluate`` runs a generator over the fixed prompt set of
:func:`imagen_lite.data.shapes.prompt_set` and reports accuracy per category, GenEval style.

Pure numpy: connected components are labelled with a run-length union-find, no scipy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from ..data.shapes import (
    CIRCLE_MIN_FILL,
    COLORS,
    FOREGROUND_THRESHOLD,
    KINDS,
    LARGE_MIN_D,
    MIN_AREA_FRACTION,
    SMALL_MAX_D,
    SQUARE_MIN_FILL,
    ParsedCaption,
    is_heldout,
    parse_caption,
    prompt_set,
)

__all__ = [
    "DetectedObject",
    "detect_objects",
    "label_components",
    "match_caption",
    "score_image",
    "FAILURE_MODES",
    "failure_mode",
    "evaluate",
    "format_table",
    "format_failures",
    "paired",
    "format_paired",
]

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float64)  # (6, 3)


@dataclass
class DetectedObject:
    """A detected object. ``cx``, ``cy`` (bounding-box centre) and ``d`` (larger box side)
    are fractions of the canvas side; ``area`` is in pixels."""

    color: str
    shape: str
    cx: float
    cy: float
    d: float
    area: int


# --------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------


def _as_rgb_array(image) -> np.ndarray:
    """PIL image or uint8 (H, W, 3|4) / (H, W) array -> uint8 (S, S, 3); square only."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8 (0-255), got dtype {image.dtype}")
        if image.ndim == 2:
            arr = np.repeat(image[..., None], 3, axis=2)
        elif image.ndim == 3 and image.shape[2] in (3, 4):
            arr = image[..., :3]
        else:
            raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {image.shape}")
    else:
        raise TypeError(f"image must be a PIL.Image or a uint8 numpy array, got {type(image).__name__}")
    if arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"image must be square and non-empty, got {arr.shape[1]}x{arr.shape[0]} (WxH)")
    return arr


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean (H, W) mask.

    Returns ``(labels, n)``: int32 labels (0 = background, components 1..n numbered in
    order of their first pixel in row-major order) and the number of components.
    Runs of each row are joined with the overlapping (or diagonally touching) runs of the
    row above through a union-find, so the cost grows with the number of runs, not pixels.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    if not mask.any():
        return labels, 0
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)  # +1 at run starts, -1 one past run ends
    run_rows, run_starts = np.nonzero(edges == 1)
    _, run_ends = np.nonzero(edges == -1)  # exclusive; same row-major order as the starts
    n_runs = len(run_rows)
    parent = list(range(n_runs))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(run_rows, np.arange(h + 1))  # runs of row r: [first[r], first[r+1])
    starts, ends = run_starts.tolist(), run_ends.tolist()
    for r in range(1, h):
        a0, a1 = int(row_first[r - 1]), int(row_first[r])  # runs of the row above
        b1 = int(row_first[r + 1])
        i = a0
        for j in range(a1, b1):
            s, e = starts[j], ends[j]
            # skip runs above that end before this run's diagonal reach
            while i < a1 and ends[i] < s:
                i += 1
            k = i
            while k < a1 and starts[k] <= e:  # overlaps or touches diagonally
                ra, rb = find(k), find(j)
                if ra != rb:
                    if ra < rb:
                        parent[rb] = ra
                    else:
                        parent[ra] = rb
                k += 1
    roots = np.array([find(i) for i in range(n_runs)])
    uniq, run_label = np.unique(roots, return_inverse=True)  # roots are first runs: row-major order
    lengths = run_ends - run_starts
    labels[mask] = np.repeat(run_label.astype(np.int32) + 1, lengths)
    return labels, len(uniq)


def _classify_shape(fill: float) -> str:
    if fill >= SQUARE_MIN_FILL:
        return "square"
    if fill >= CIRCLE_MIN_FILL:
        return "circle"
    return "triangle"


def detect_objects(image) -> list[DetectedObject]:
    """Detect the objects of a square image per the spec's scoring rules 1-4.

    Args:
        image: ``PIL.Image`` or uint8 ``(S, S, 3)`` array, any square size.

    Returns:
        Objects in row-major order of their first pixel.
    """
    arr = _as_rgb_array(image)
    size = arr.shape[0]
    distance = 255 - arr.min(axis=2).astype(np.int16)  # max channel distance from white
    mask = distance > FOREGROUND_THRESHOLD
    labels, n = label_components(mask)
    if n == 0:
        return []
    flat = labels.ravel()
    areas = np.bincount(flat, minlength=n + 1)
    min_area = MIN_AREA_FRACTION * size * size
    objects = []
    pixels = arr.reshape(-1, 3)
    for k in np.nonzero(areas >= min_area)[0]:
        if k == 0:
            continue
        idx = np.flatnonzero(flat == k)
        ys, xs = np.divmod(idx, size)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        area = int(areas[k])
        fill = area / float((y1 - y0) * (x1 - x0))
        median = np.median(pixels[idx].astype(np.float64), axis=0)
        color = _PALETTE_NAMES[int(np.argmin(((_PALETTE - median) ** 2).sum(axis=1)))]
        objects.append(
            DetectedObject(
                color=color,
                shape=_classify_shape(fill),
                cx=(x0 + x1) / 2 / size,
                cy=(y0 + y1) / 2 / size,
                d=max(y1 - y0, x1 - x0) / size,
                area=area,
            )
        )
    return objects


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------

_THIRD = 1.0 / 3.0


def _position_holds(obj: DetectedObject, position: str) -> bool:
    if position == "on the left":
        return obj.cx < _THIRD
    if position == "on the right":
        return obj.cx > 2 * _THIRD
    if position == "at the top":
        return obj.cy < _THIRD
    if position == "at the bottom":
        return obj.cy > 2 * _THIRD
    if position == "in the center":
        return _THIRD <= obj.cx <= 2 * _THIRD and _THIRD <= obj.cy <= 2 * _THIRD
    raise ValueError(f"unknown position {position!r}")


def _relation_holds(a: DetectedObject, b: DetectedObject, relation: str) -> bool:
    """"A RELATION B": the named axis dominates the offset and its sign is right."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # offset from A to B
    if relation == "to the left of":
        return abs(dx) > abs(dy) and dx > 0
    if relation == "to the right of":
        return abs(dx) > abs(dy) and dx < 0
    if relation == "above":
        return abs(dy) > abs(dx) and dy > 0
    if relation == "below":
        return abs(dy) > abs(dx) and dy < 0
    raise ValueError(f"unknown relation {relation!r}")


def match_caption(objects: list[DetectedObject], parsed: ParsedCaption) -> bool:
    """Spec rule 5: the detected objects match the caption exactly.

    Same number of objects, and some one-to-one assignment of detected to named objects in
    which every named colour, shape, size, position and relation holds.
    """
    named = parsed.objects
    if len(objects) != len(named):
        return False
    for perm in itertools.permutations(objects):
        ok = True
        for det, want in zip(perm, named):
            if det.color != want.color or det.shape != want.shape:
                ok = False
            elif want.size == "small" and not det.d < SMALL_MAX_D:
                ok = False
            elif want.size == "large" and not det.d > LARGE_MIN_D:
                ok = False
            elif want.position is not None and not _position_holds(det, want.position):
                ok = False
            if not ok:
                break
        if ok and parsed.relation is not None:
            ok = _relation_holds(perm[0], perm[1], parsed.relation)
        if ok:
            return True
    return False


# Why an image fails its caption, first match wins (see :func:`failure_mode`).
FAILURE_MODES = (
    "too few objects",
    "too many objects",
    "binding swapped",
    "colour wrong",
    "shape wrong",
    "colour and shape wrong",
    "size wrong",
    "position wrong",
    "relation wrong",
)


def failure_mode(objects: list[DetectedObject], parsed: ParsedCaption) -> str | None:
    """Why ``objects`` do not match ``parsed`` (None when they do), one of :data:`FAILURE_MODES`.

    In order: the object count; then, with the right count, whether the detected
    (colour, shape) pairs are the named ones -- if not, "binding swapped" when the colours and
    the shapes are each right but paired wrongly ("a red circle and a blue square" drawn as a
    blue circle and a red square), else which of colour / shape is off; with the right pairs,
    "size wrong" when the caption holds once sizes are ignored, else "relation wrong" for a
    relation caption and "position wrong" for the rest. A diagnostic for training curves and
    model cards; accuracy stays :func:`match_caption`'s.
    """
    if match_caption(objects, parsed):
        return None
    named = parsed.objects
    if len(objects) != len(named):
        return "too few objects" if len(objects) < len(named) else "too many objects"
    got = sorted((o.color, o.shape) for o in objects)
    want = sorted((o.color, o.shape) for o in named)
    if got != want:
        colours = sorted(o.color for o in objects) == sorted(o.color for o in named)
        shapes = sorted(o.shape for o in objects) == sorted(o.shape for o in named)
        if colours and shapes:
            return "binding swapped"
        if shapes:
            return "colour wrong"
        if colours:
            return "shape wrong"
        return "colour and shape wrong"
    unsized = replace(parsed, objects=tuple(replace(o, size=None) for o in named))
    if match_caption(objects, unsized):
        return "size wrong"
    return "relation wrong" if parsed.relation is not None else "position wrong"


def score_image(image, caption: str) -> bool:
    """Whether ``image`` satisfies ``caption`` under the spec's scoring rules.

    Raises ``ValueError`` for a caption outside the grammar or an unusable image.
    """
    parsed = parse_caption(caption)
    return match_caption(detect_objects(image), parsed)


# --------------------------------------------------------------------------------------
# Evaluation loop
# --------------------------------------------------------------------------------------


def _summary(records: list[dict]) -> dict:
    per_category = {}
    for kind in KINDS:
        oks = [r["ok"] for r in records if r["kind"] == kind]
        if oks:
            per_category[kind] = sum(oks) / len(oks)
    return {
        "overall": (sum(r["ok"] for r in records) / len(records)) if records else 0.0,
        "per_category": per_category,
        "n_images": len(records),
    }


def evaluate(
    generate_fn,
    n_prompts: int = 100,
    seeds=(0, 1),
    prompt_seed: int = 0,
    batch_size: int = 16,
    mixture: dict[str, float] | None = None,
) -> dict:
    """Generate images for the fixed prompt set and score them.

    Args:
        generate_fn: ``generate_fn(prompts: list[str], seed: int) -> list[PIL.Image]``,
            one image per prompt.
        n_prompts: size of :func:`~imagen_lite.data.shapes.prompt_set` (balanced over kinds).
        seeds: generation seeds; every prompt is generated once per seed.
        prompt_seed: seed of the prompt set.
        batch_size: prompts per ``generate_fn`` call.
        mixture: restricts the prompt set to kinds with positive weight.

    Returns:
        ``{"overall", "per_category": {kind: accuracy}, "heldout", "seen", "n_images",
        "records": [{"caption", "kind", "seed", "ok", "heldout", "failure"}]}`` (``failure``:
        :func:`failure_mode`, None for a right image); ``"heldout"`` and
        ``"seen"`` are the same summary (``overall``, ``per_category``, ``n_images``) over
        held-out / other prompts, ``None`` when there are none.
    """
    if not callable(generate_fn):
        raise TypeError(f"generate_fn must be callable, got {type(generate_fn).__name__}")
    if not isinstance(n_prompts, int) or n_prompts < 1:
        raise ValueError(f"n_prompts must be a positive int, got {n_prompts!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    seeds_list = [] if isinstance(seeds, (int, str)) else list(seeds)
    if not seeds_list or not all(isinstance(s, (int, np.integer)) for s in seeds_list):
        raise ValueError(f"seeds must be a non-empty sequence of ints such as (0, 1), got {seeds!r}")
    seeds = [int(s) for s in seeds_list]
    prompts = prompt_set(n_prompts, seed=prompt_seed, mixture=mixture)
    heldout = {caption: is_heldout(caption) for caption, _ in prompts}
    records = []
    for seed in seeds:
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            captions = [c for c, _ in batch]
            images = list(generate_fn(captions, seed))
            if len(images) != len(captions):
                raise ValueError(
                    f"generate_fn returned {len(images)} images for {len(captions)} prompts (seed {seed})"
                )
            for (caption, kind), image in zip(batch, images):
                failure = failure_mode(detect_objects(image), parse_caption(caption))
                records.append(
                    {
                        "caption": caption,
                        "kind": kind,
                        "seed": seed,
                        "ok": failure is None,
                        "heldout": heldout[caption],
                        "failure": failure,
                    }
                )
    held = [r for r in records if r["heldout"]]
    seen = [r for r in records if not r["heldout"]]
    result = _summary(records)
    result["heldout"] = _summary(held) if held else None
    result["seen"] = _summary(seen) if seen else None
    result["records"] = records
    return result


def format_table(result: dict) -> str:
    """Markdown table of per-category accuracy (with image counts) from :func:`evaluate`."""
    records = result.get("records", [])
    lines = ["| category | accuracy | images |", "|---|---:|---:|"]
    for kind, acc in result["per_category"].items():
        n = sum(1 for r in records if r["kind"] == kind)
        lines.append(f"| {kind} | {100 * acc:.1f}% | {n} |")
    lines.append(f"| **overall** | **{100 * result['overall']:.1f}%** | {result['n_images']} |")
    for name in ("seen", "heldout"):
        part = result.get(name)
        if part:
            label = "held-out compositions" if name == "heldout" else "seen compositions"
            lines.append(f"| {label} | {100 * part['overall']:.1f}% | {part['n_images']} |")
    return "\n".join(lines)


def format_failures(result: dict) -> str:
    """Markdown table of why images failed, per category (counts of :data:`FAILURE_MODES`,
    only the modes that occur), from :func:`evaluate`'s records."""
    records = result.get("records", [])
    modes = [m for m in FAILURE_MODES if any(r.get("failure") == m for r in records)]
    lines = ["| category | images | right | " + " | ".join(modes) + " |", "|---|" + "---:|" * (len(modes) + 2)]
    for kind in result["per_category"]:
        rows = [r for r in records if r["kind"] == kind]
        counts = [sum(1 for r in rows if r.get("failure") == m) for m in modes]
        right = sum(1 for r in rows if r["ok"])
        lines.append(f"| {kind} | {len(rows)} | {right} | " + " | ".join(str(c) for c in counts) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Paired comparison
# --------------------------------------------------------------------------------------


def _records_by_image(result: dict, name: str) -> dict:
    records = result.get("records") if isinstance(result, dict) else None
    if not isinstance(records, list):
        raise ValueError(f"{name} has no 'records' list: pass evaluate()'s result (or eval shapes' JSON)")
    # A prompt set may hold a caption more than once (prompt_set draws with replacement within
    # a kind); each copy is its own image, so the key is (caption, seed, n-th copy), in order.
    by_image, seen = {}, {}
    for r in records:
        base = (r["caption"], r["seed"])
        seen[base] = seen.get(base, -1) + 1
        by_image[base + (seen[base],)] = r
    return by_image


def paired(a: dict, b: dict) -> dict:
    """Compare two :func:`evaluate` results image by image (same caption, same seed; a
    caption that the prompt set holds twice is matched copy by copy, in order).

    Two evaluations of the same prompts and seeds differ in which images each gets right; the
    overall scores hide that most images are right (or wrong) in both. This counts the
    discordant images, as McNemar's test does: ``only_a`` right in ``a`` and wrong in ``b``,
    ``only_b`` the reverse, and ``z = (only_a - only_b) / sqrt(only_a + only_b)`` (the sign
    test's normal approximation; |z| >= 2 is about p < 0.05 two-sided). The embedded default's
    ship rules read it (docs/model_card.md: a new lineage ships when not behind, ``only_a >=
    only_b``; more steps of the shipped lineage only when clearly ahead, ``z >= 2``).

    Only images scored in both count; ``only_in_a`` / ``only_in_b`` say how many were not.

    Returns:
        ``{"n_images", "only_a", "only_b", "both", "neither", "z", "only_in_a", "only_in_b",
        "per_category": {kind: {"n_images", "only_a", "only_b"}}}``.
    """
    ra, rb = _records_by_image(a, "a"), _records_by_image(b, "b")
    common = [k for k in ra if k in rb]
    if not common:
        raise ValueError(
            f"a and b share no image (a has {len(ra)}, b has {len(rb)}): a paired count needs "
            "the same prompt set and seeds (--n-prompts, --prompt-seed, --seeds, --seed-start)"
        )
    counts = {"only_a": 0, "only_b": 0, "both": 0, "neither": 0}
    per_category: dict[str, dict] = {}
    for k in common:
        ok_a, ok_b = bool(ra[k]["ok"]), bool(rb[k]["ok"])
        which = "both" if ok_a and ok_b else "only_a" if ok_a else "only_b" if ok_b else "neither"
        counts[which] += 1
        cat = per_category.setdefault(ra[k]["kind"], {"n_images": 0, "only_a": 0, "only_b": 0})
        cat["n_images"] += 1
        if which in ("only_a", "only_b"):
            cat[which] += 1
    discordant = counts["only_a"] + counts["only_b"]
    z = (counts["only_a"] - counts["only_b"]) / discordant**0.5 if discordant else 0.0
    ordered = {kind: per_category[kind] for kind in KINDS if kind in per_category}
    return {
        "n_images": len(common),
        **counts,
        "z": z,
        "only_in_a": len(ra) - len(common),
        "only_in_b": len(rb) - len(common),
        "per_category": ordered,
    }


def format_paired(result: dict, name_a: str = "a", name_b: str = "b") -> str:
    """Markdown table of :func:`paired`'s counts, per category and overall."""
    lines = [
        f"| category | images | right only in {name_a} | right only in {name_b} |",
        "|---|---:|---:|---:|",
    ]
    for kind, c in result["per_category"].items():
        lines.append(f"| {kind} | {c['n_images']} | {c['only_a']} | {c['only_b']} |")
    lines.append(
        f"| **all** | **{result['n_images']}** | **{result['only_a']}** | **{result['only_b']}** |"
    )
    lines.append(
        f"\nright in both {result['both']}, in neither {result['neither']}; z {result['z']:+.1f}"
        " (sign test on the discordant images)"
    )
    skipped = result["only_in_a"] + result["only_in_b"]
    if skipped:
        lines.append(
            f"not compared: {result['only_in_a']} images only in {name_a}, {result['only_in_b']} only in {name_b}"
        )
    return "\n".join(lines)
