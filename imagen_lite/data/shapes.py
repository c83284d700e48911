"""The ``shapes`` domain: procedural captioned images that can be scored exactly.

Implements the shapes-domain spec (v1; see ``docs/shapes.md``): a scene sampler, a caption grammar
and its parser, an anti-aliased numpy renderer, a held-out set of compositions, a
deterministic ``IterableDataset`` and a Hugging Face ``imagefolder`` writer.

Coordinates of a :class:`ShapeObject` are fractions of the canvas side ``S``, so one scene
renders identically (up to resolution) at 64 and 256 pixels. Sample ``i`` of a seeded stream
is a function of ``(seed, i)`` alone (``numpy.random.default_rng([seed, i])``), which makes
training resumable at a data position and lets workers and ranks split indices.

The matching detector and scorer live in :mod:`imagen_lite.evaluation.shapes`.
"""

from __future__ import annotations


import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "COLORS",
    "SHAPES",
    "KINDS",
    "SIZES",
    "POSITIONS",
    "RELATIONS",
    "NUMBERS",
    "HELDOUT_PAIRS",
    "HELDOUT_RELATIONS",
    "GRAMMAR",
    "ShapeObject",
    "Scene",
    "CaptionObject",
    "ParsedCaption",
    "sample_scene",
    "scene_for_caption",
    "render",
    "render_pair",
    "area_downsample",
    "parse_caption",
    "is_heldout",
    "prompt_set",
    "ShapesDataset",
    "write_imagefolder",
]

# --------------------------------------------------------------------------------------
# Vocabulary (spec: "Objects", "Positions", "Caption grammar")
# --------------------------------------------------------------------------------------

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 210, 0),
    "purple": (150, 40, 190),
    "orange": (255, 140, 0),
}
SHAPES = ("circle", "square", "triangle")
KINDS = ("single", "position", "two_objects", "relation", "counting")

# size word -> nominal d / S ("" is the unnamed default size)
SIZES: dict[str, float] = {"small": 0.16, "": 0.24, "large": 0.36}
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
RELATIONS = ("to the left of", "to the right of", "above", "below")
NUMBERS: dict[str, int] = {"two": 2, "three": 3, "four": 4}

GAP = 0.04  # min gap between bounding boxes and from the canvas edge (fraction of S)
SIZE_JITTER = 0.10  # sizes jitter by at most +-10% of d
POSITION_MARGIN = 0.03  # centres keep this far inside a named third (detector rounding)
RELATION_MIN_OFFSET = 0.2  # spec: the named axis offset is at least 0.2 S when rendering
SUPERSAMPLE = 4  # spec: at least 4x supersampling, then a box-filter downsample

# Scoring constants (spec "Scoring"), shared with imagen_lite.evaluation.shapes
FOREGROUND_THRESHOLD = 60  # foreground: max channel distance from white > 60 (0-255)
MIN_AREA_FRACTION = 0.005  # objects cover at least 0.5% of the canvas
SQUARE_MIN_FILL = 0.93  # fill = area / bbox area: square >= 0.93
CIRCLE_MIN_FILL = 0.68  # circle 0.68 <= fill < 0.93, triangle < 0.68
SMALL_MAX_D = 0.20  # "small": detected d / S < 0.20
LARGE_MIN_D = 0.30  # "large": detected d / S > 0.30

# Legibility margins. At 64 px a ~10 px disc can threshold to a fill anywhere in 0.60-0.90
# depending on its sub-pixel offset, so the sampler redraws a centre whose 64 px renders
# (render(scene, 64) and the 64 of render_pair) would not read, with these margins, as the
# intended object. The margins leave room for an independent scorer's rounding choices.
LEGIBLE_FILL = {"circle": (0.70, 0.91), "square": (0.95, 1.0), "triangle": (0.0, 0.66)}
LEGIBLE_SMALL_MAX_D = 0.19
LEGIBLE_LARGE_MIN_D = 0.31
LEGIBLE_MAX_CENTRE_ERROR = 0.02  # < POSITION_MARGIN
LEGIBILITY_SIZE = 64  # the base resolution, where the margins are thinnest

GRAMMAR = (
    "single:      'a [small |large ]COLOR SHAPE[ POSITION]'\n"
    "two objects: 'a COLOR SHAPE and a COLOR SHAPE'\n"
    "relation:    'a COLOR SHAPE RELATION a COLOR SHAPE'\n"
    "counting:    'N COLOR SHAPEs'\n"
    f"  COLOR in {list(COLORS)}, SHAPE in {list(SHAPES)}, N in {list(NUMBERS)},\n"
    f"  POSITION in {list(POSITIONS)}, RELATION in {list(RELATIONS)};\n"
    "  lower case, single spaces, no trailing period; the article is 'an' before 'orange'"
)

# --------------------------------------------------------------------------------------
# Held-out compositions (excluded from training when exclude_heldout=True)
# --------------------------------------------------------------------------------------

#: (colour, shape) pairs never shown in training: one per shape, three distinct colours.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("green", "square")}
)
#: (shape_a, relation, shape_b) combinations, any colours. Each is listed together with its
#: mirror phrasing ("a circle above a triangle" == "a triangle below a circle"), so the
#: spatial arrangement itself is never captioned in training.
HELDOUT_RELATIONS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("circle", "above", "triangle"),
        ("triangle", "below", "circle"),
        ("square", "to the left of", "circle"),
        ("circle", "to the right of", "square"),
    }
)

# --------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------


@dataclass
class ShapeObject:
    """One object of a scene; ``cx``, ``cy``, ``d`` are fractions of the canvas side.

    ``(cx, cy)`` is the centre of the axis-aligned bounding box and ``d`` its side.
    """

    shape: str
    color: str
    cx: float
    cy: float
    d: float


@dataclass
class Scene:
    """A caption, its kind (one of :data:`KINDS`) and the objects that render it."""

    caption: str
    kind: str
    objects: list[ShapeObject] = field(default_factory=list)


@dataclass(frozen=True)
class CaptionObject:
    """One object named by a caption. ``size`` is ``"small"``/``"large"``/``None``."""

    color: str
    shape: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class ParsedCaption:
    """A parsed caption. For ``relation`` captions, ``relation`` holds between
    ``objects[0]`` (A) and ``objects[1]`` (B): "A RELATION B"."""

    caption: str
    kind: str
    objects: tuple[CaptionObject, ...]
    relation: str | None = None


# --------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order (word-level tokenizers of models
    trained on shapes: the same ids whatever mixture of caption kinds a run draws)."""
    words = ["a", "an", "and", "small", "large", *COLORS, *SHAPES, *(s + "s" for s in SHAPES)]
    for phrase in (*POSITIONS, *RELATIONS, *NUMBERS):
        words += phrase.split()
    return list(dict.fromkeys(words))


def _article(word: str) -> str:
    return "an" if word == "orange" else "a"


def _noun_phrase(color: str, shape: str, size: str = "") -> str:
    first = size or color
    words = [_article(first)] + ([size] if size else []) + [color, shape]
    return " ".join(words)


def _caption_for(kind: str, objs: list[CaptionObject], relation: str | None = None) -> str:
    if kind in ("single", "position"):
        o = objs[0]
        text = _noun_phrase(o.color, o.shape, o.size or "")
        return f"{text} {o.position}" if o.position else text
    if kind == "two_objects":
        a, b = objs
        return f"{_noun_phrase(a.color, a.shape)} and {_noun_phrase(b.color, b.shape)}"
    if kind == "relation":
        a, b = objs
        return f"{_noun_phrase(a.color, a.shape)} {relation} {_noun_phrase(b.color, b.shape)}"
    if kind == "counting":
        word = {v: k for k, v in NUMBERS.items()}[len(objs)]
        return f"{word} {objs[0].color} {objs[0].shape}s"
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


_C = "(" + "|".join(COLORS) + ")"
_S = "(" + "|".join(SHAPES) + ")"
_NP = rf"(a|an) {_C} {_S}"
_RE_SINGLE = re.compile(
    rf"^(a|an) (?:(small|large) )?{_C} {_S}(?: ({'|'.join(POSITIONS)}))?$"
)
_RE_TWO = re.compile(rf"^{_NP} and {_NP}$")
_RE_RELATION = re.compile(rf"^{_NP} ({'|'.join(RELATIONS)}) {_NP}$")
_RE_COUNTING = re.compile(rf"^({'|'.join(NUMBERS)}) {_C} {_S}s$")


def _malformed(caption: str, why: str) -> ValueError:
    return ValueError(f"malformed shapes caption {caption!r} ({why}); the grammar is:\n{GRAMMAR}")


def parse_caption(caption: str) -> ParsedCaption:
    """Parse a caption of the shapes grammar (:data:`GRAMMAR`).

    Raises:
        TypeError: ``caption`` is not a string.
        ValueError: the caption does not follow the grammar; the message quotes the caption
            and the grammar.
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}: {caption!r}")

    def check_article(article: str, next_word: str) -> None:
        if article != _article(next_word):
            raise _malformed(
                caption, f"article {article!r} before {next_word!r} should be {_article(next_word)!r}"
            )

    m = _RE_SINGLE.match(caption)
    if m:
        article, size, color, shape, position = m.groups()
        check_article(article, size or color)
        obj = CaptionObject(color, shape, size, position)
        return ParsedCaption(caption, "position" if position else "single", (obj,))
    m = _RE_TWO.match(caption)
    if m:
        art_a, col_a, shp_a, art_b, col_b, shp_b = m.groups()
        check_article(art_a, col_a)
        check_article(art_b, col_b)
        objs = (CaptionObject(col_a, shp_a), CaptionObject(col_b, shp_b))
        return ParsedCaption(caption, "two_objects", objs)
    m = _RE_RELATION.match(caption)
    if m:
        art_a, col_a, shp_a, relation, art_b, col_b, shp_b = m.groups()
        check_article(art_a, col_a)
        check_article(art_b, col_b)
        objs = (CaptionObject(col_a, shp_a), CaptionObject(col_b, shp_b))
        return ParsedCaption(caption, "relation", objs, relation)
    m = _RE_COUNTING.match(caption)
    if m:
        number, color, shape = m.groups()
        objs = tuple(CaptionObject(color, shape) for _ in range(NUMBERS[number]))
        return ParsedCaption(caption, "counting", objs)
    raise _malformed(caption, "no rule matches")


def is_heldout(caption: str) -> bool:
    """Whether a caption names a held-out composition.

    True when any object is a (colour, shape) pair in :data:`HELDOUT_PAIRS`, or the caption is
    a relation whose (shape_a, relation, shape_b) is in :data:`HELDOUT_RELATIONS`.
    Raises ``ValueError`` for a caption outside the grammar.
    """
    parsed = parse_caption(caption)
    if any((o.color, o.shape) in HELDOUT_PAIRS for o in parsed.objects):
        return True
    if parsed.relation is not None:
        a, b = parsed.objects
        return (a.shape, parsed.relation, b.shape) in HELDOUT_RELATIONS
    return False


# --------------------------------------------------------------------------------------
# Scene sampling
# --------------------------------------------------------------------------------------

_MAX_TRIES = 200  # per object before a layout restarts
_MAX_RESTARTS = 200


def _check_mixture(mixture: dict[str, float] | None) -> tuple[list[str], np.ndarray]:
    """Validate a kind mixture; returns the kinds with positive weight and their probabilities."""
    if mixture is None:
        return list(KINDS), np.full(len(KINDS), 1.0 / len(KINDS))
    if not isinstance(mixture, dict) or not mixture:
        raise ValueError(f"mixture must be a non-empty dict {{kind: weight}} over {KINDS}, got {mixture!r}")
    unknown = [k for k in mixture if k not in KINDS]
    if unknown:
        raise ValueError(f"mixture has unknown kind(s) {unknown}; allowed kinds are {KINDS}")
    for k, w in mixture.items():
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"mixture weight for {k!r} must be a finite number >= 0, got {w!r}")
    kinds = [k for k in KINDS if mixture.get(k, 0) > 0]
    if not kinds:
        raise ValueError(f"mixture needs at least one positive weight, got {mixture!r}")
    w = np.array([float(mixture[k]) for k in kinds])
    return kinds, w / w.sum()


def _jittered_size(rng: np.random.Generator, size_word: str) -> float:
    return SIZES[size_word] * (1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))


def _centre_range(d: float, position: str | None) -> tuple[tuple[float, float], tuple[float, float]]:
    """Legal (cx, cy) ranges for an object of size ``d`` with an optional absolute position."""
    lo, hi = GAP + d / 2, 1.0 - GAP - d / 2
    x, y = (lo, hi), (lo, hi)
    third, m = 1.0 / 3.0, POSITION_MARGIN
    if position == "on the left":
        x = (lo, min(hi, third - m))
    elif position == "on the right":
        x = (max(lo, 2 * third + m), hi)
    elif position == "at the top":
        y = (lo, min(hi, third - m))
    elif position == "at the bottom":
        y = (max(lo, 2 * third + m), hi)
    elif position == "in the center":
        x = y = (max(lo, third + m), min(hi, 2 * third - m))
    return x, y


def _separated(a: ShapeObject, b: ShapeObject) -> bool:
    """True when the bounding boxes of ``a`` and ``b`` are at least ``GAP`` apart."""
    half = (a.d + b.d) / 2
    return abs(a.cx - b.cx) - half >= GAP or abs(a.cy - b.cy) - half >= GAP


def _relation_holds_for_render(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """Spec rendering constraint: the named offset is >= 0.2 S and dominates 2:1."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # offset from A to B
    main, other = {
        "to the left of": (dx, dy),
        "to the right of": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[relation]
    return main >= RELATION_MIN_OFFSET and abs(other) <= main / 2


# relation -> (axis of B's offset from A: 0 = x, 1 = y; its sign)
_RELATION_AXIS = {"to the left of": (0, 1), "to the right of": (0, -1), "above": (1, 1), "below": (1, -1)}


def _propose_related(
    rng: np.random.Generator, a: ShapeObject, d: float, relation: str
) -> tuple[float, float] | None:
    """A centre for B such that "A RELATION B" holds when rendered (see
    :func:`_relation_holds_for_render`): the offset along the named axis is drawn in
    [max(0.2, gap-keeping distance), room], the cross offset within half of it.
    ``None`` when A leaves no room."""
    axis, sign = _RELATION_AXIS[relation]
    (x0, x1), (y0, y1) = _centre_range(d, None)
    a_main, a_cross = (a.cx, a.cy) if axis == 0 else (a.cy, a.cx)
    lo, hi = (x0, x1) if axis == 0 else (y0, y1)  # the legal box is square: same cross range
    room = hi - a_main if sign > 0 else a_main - lo
    # at least 0.2 S, and far enough that the boxes keep their gap along the named axis
    least = max(RELATION_MIN_OFFSET, (a.d + d) / 2 + GAP)
    if room < least:
        return None
    main = rng.uniform(least, room)
    c_lo, c_hi = max(-main / 2, lo - a_cross), min(main / 2, hi - a_cross)
    if c_hi < c_lo:
        return None
    b_main, b_cross = a_main + sign * main, a_cross + rng.uniform(c_lo, c_hi)
    return (b_main, b_cross) if axis == 0 else (b_cross, b_main)


def _place_one(
    rng: np.random.Generator,
    cobj: CaptionObject,
    d: float,
    placed: list[ShapeObject],
    relation: str | None,
) -> ShapeObject | None:
    """Draw centres for one object until one is legal; ``None`` after ``_MAX_TRIES``."""
    (x0, x1), (y0, y1) = _centre_range(d, cobj.position)
    for _ in range(_MAX_TRIES):
        if relation is not None and placed:
            centre = _propose_related(rng, placed[0], d, relation)
            if centre is None:
                return None
        else:
            centre = (rng.uniform(x0, x1), rng.uniform(y0, y1))
        obj = ShapeObject(cobj.shape, cobj.color, float(centre[0]), float(centre[1]), d)
        if all(_separated(obj, p) for p in placed) and _legible(obj, cobj.size):
            return obj
    return None


def _layout(
    rng: np.random.Generator,
    specs: list[tuple[CaptionObject, float]],
    relation: str | None = None,
) -> list[ShapeObject]:
    """Place objects (caption object, size d) uniformly among legal centres: inside the
    canvas margin and any named third, at least ``GAP`` from each other, legible at 64 px
    (:func:`_legible`) and, for a relation, B placed relative to A. A centre that fails is
    redrawn; the layout restarts when an object finds no spot."""
    for _ in range(_MAX_RESTARTS):
        placed: list[ShapeObject] = []
        for cobj, d in specs:
            obj = _place_one(rng, cobj, d, placed, relation)
            if obj is None:
                break
            placed.append(obj)
        if len(placed) == len(specs):
            return placed
    raise RuntimeError(f"could not lay out {specs!r} (relation={relation!r}); this is a bug")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _sample_kind(rng: np.random.Generator, kind: str) -> Scene:
    colors, shapes = list(COLORS), list(SHAPES)
    relation = None
    if kind in ("single", "position"):
        size = _pick(rng, ["", "small", "large"])
        position = _pick(rng, POSITIONS) if kind == "position" else None
        cobjs = [CaptionObject(_pick(rng, colors), _pick(rng, shapes), size or None, position)]
        sizes = [_jittered_size(rng, size)]
    elif kind == "two_objects":
        # colour binding: two different colours on two different shapes
        ca, cb = rng.choice(len(colors), size=2, replace=False)
        sa, sb = rng.choice(len(shapes), size=2, replace=False)
        cobjs = [CaptionObject(colors[ca], shapes[sa]), CaptionObject(colors[cb], shapes[sb])]
        sizes = [_jittered_size(rng, "") for _ in cobjs]
    elif kind == "relation":
        # two distinguishable objects: they differ in colour, shape or both
        while True:
            a = CaptionObject(_pick(rng, colors), _pick(rng, shapes))
            b = CaptionObject(_pick(rng, colors), _pick(rng, shapes))
            if a != b:
                break
        relation = _pick(rng, RELATIONS)
        cobjs = [a, b]
        sizes = [_jittered_size(rng, "") for _ in cobjs]
    elif kind == "counting":
        n = int(rng.integers(2, 5))
        cobj = CaptionObject(_pick(rng, colors), _pick(rng, shapes))
        cobjs = [cobj] * n
        sizes = [_jittered_size(rng, "") for _ in cobjs]
    else:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    objects = _layout(rng, list(zip(cobjs, sizes)), relation)
    return Scene(_caption_for(kind, cobjs, relation), kind, objects)


def sample_scene(
    rng: np.random.Generator,
    mixture: dict[str, float] | None = None,
    exclude_heldout: bool = False,
) -> Scene:
    """Sample a captioned scene.

    Args:
        rng: the only source of randomness (``numpy.random.default_rng(...)``).
        mixture: ``{kind: weight}`` over :data:`KINDS`; kinds left out get weight 0.
            ``None`` means uniform over all kinds.
        exclude_heldout: resample (within the drawn kind) until the caption is not held out
            (see :func:`is_heldout`), so the kind mixture is unchanged.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    kinds, probs = _check_mixture(mixture)
    kind = kinds[int(rng.choice(len(kinds), p=probs))]
    while True:
        scene = _sample_kind(rng, kind)
        if not exclude_heldout or not is_heldout(scene.caption):
            return scene


def scene_for_caption(caption: str, rng: np.random.Generator) -> Scene:
    """A ground-truth scene for any caption of the grammar, laid out like :func:`sample_scene`
    does (jittered sizes, legal centres). Raises ``ValueError`` for a malformed caption."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    parsed = parse_caption(caption)
    sizes = [_jittered_size(rng, o.size or "") for o in parsed.objects]
    objects = _layout(rng, list(zip(parsed.objects, sizes)), parsed.relation)
    return Scene(caption, parsed.kind, objects)


def prompt_set(n: int, seed: int = 0, mixture: dict[str, float] | None = None) -> list[tuple[str, str]]:
    """A fixed, seeded evaluation prompt set of ``(caption, kind)`` pairs.

    Kinds (those with positive weight in ``mixture``; all by default) take turns, so the set is
    balanced over kinds whatever the weights. Captions are distinct while the kind has unused
    captions left (a few dozen tries); held-out captions are included, flagged by
    :func:`is_heldout`.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    kinds, _ = _check_mixture(mixture)
    rng = np.random.default_rng([seed, 0x5EED])
    seen: set[str] = set()
    prompts = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        for _ in range(50):
            caption = _sample_kind(rng, kind).caption
            if caption not in seen:
                break
        seen.add(caption)
        prompts.append((caption, kind))
    return prompts


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _check_size(size, name: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"{name} must be an int >= 16 (the spec uses 64 and 256), got {size!r}")
    return int(size)


def _coverage(obj: ShapeObject, size: int, align: int = 1) -> tuple[int, int, np.ndarray]:
    """Anti-aliased coverage of one object: (row0, col0, (h, w) float32 array in [0, 1]).

    Coverage = the fraction of a pixel's ``SUPERSAMPLE x SUPERSAMPLE`` sample points (at
    ``(k + 0.5) / (SUPERSAMPLE * size)``) inside the shape, i.e. supersampling followed by a
    box filter, computed only over the object's bounding box (widened to multiples of
    ``align`` pixels).
    """
    f = SUPERSAMPLE
    n = size * f
    r = obj.d / 2
    c0 = max(0, math.floor((obj.cx - r) * size) // align * align)
    c1 = min(size, -(-math.ceil((obj.cx + r) * size) // align) * align)
    r0 = max(0, math.floor((obj.cy - r) * size) // align * align)
    r1 = min(size, -(-math.ceil((obj.cy + r) * size) // align) * align)
    if c1 <= c0 or r1 <= r0:
        return r0, c0, np.zeros((0, 0), dtype=np.float32)
    # Each shape is convex with a horizontal extent per row: count, for every sample row and
    # output pixel, the sample points (k + 0.5) / n whose |x - cx| <= half_width(y). This is
    # the supersampled inside test, done per row interval instead of per sample point.
    y = (np.arange(r0 * f, r1 * f) + 0.5) / n - obj.cy  # sample rows, relative to the centre
    inside_rows = np.abs(y) <= r
    if obj.shape == "circle":
        half = np.sqrt(np.maximum(r * r - y * y, 0.0))
    elif obj.shape == "square":
        half = np.full_like(y, r)
    elif obj.shape == "triangle":
        # apex (0, -r), base corners (-/+r, +r): half-width grows from 0 to r down the box
        half = (y + r) / 2
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    k_min = np.ceil((obj.cx - half) * n - 0.5)  # first sample column inside, per row
    k_max = np.where(inside_rows, np.floor((obj.cx + half) * n - 0.5), k_min - 1)
    k0 = np.arange(c0, c1) * f  # first sample column of each output pixel
    counts = np.minimum(k_max[:, None], k0 + (f - 1)) - np.maximum(k_min[:, None], k0) + 1
    counts = np.clip(counts, 0, f).astype(np.float32).reshape(r1 - r0, f, c1 - c0)
    cov = counts[:, 0]
    for i in range(1, f):
        cov = cov + counts[:, i]
    return r0, c0, cov / np.float32(f * f)


def _paint(region: np.ndarray, cov: np.ndarray, color: str) -> None:
    """Composite ``color`` with coverage ``cov`` over a float32 (h, w, 3) region, in place."""
    a = cov[..., None]
    region *= 1.0 - a
    region += a * np.asarray(COLORS[color], dtype=np.float32)


def _check_object(obj: ShapeObject) -> None:
    if obj.shape not in SHAPES:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    if obj.color not in COLORS:
        raise ValueError(f"unknown color {obj.color!r}; expected one of {list(COLORS)}")
    if not (obj.d > 0):
        raise ValueError(f"object size d must be > 0 (a fraction of the canvas side), got {obj.d!r}")


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Render a scene: ``(size, size, 3)`` uint8, white background, anti-aliased.

    Each object is drawn with ``SUPERSAMPLE``x supersampling and a box filter; objects are
    composited over white in order (valid scenes never overlap, so the order does not matter).
    """
    size = _check_size(size)
    canvas = np.full((size, size, 3), 255.0, dtype=np.float32)
    for obj in scene.objects:
        _check_object(obj)
        r0, c0, cov = _coverage(obj, size)
        if cov.size:
            h, w = cov.shape
            _paint(canvas[r0 : r0 + h, c0 : c0 + w], cov, obj.color)
    return np.rint(canvas).astype(np.uint8)


def _object_patches(obj: ShapeObject, size: int) -> list[tuple[int, int, np.ndarray]]:
    """The object alone as it appears in ``render(scene, size)`` and in the ``size`` image of
    ``render_pair(scene, size, 4 * size)``: [(row0, col0, uint8 patch), ...]."""
    patches = []
    r0, c0, cov = _coverage(obj, size)
    patch = np.full(cov.shape + (3,), 255.0, dtype=np.float32)
    _paint(patch, cov, obj.color)
    patches.append((r0, c0, np.rint(patch).astype(np.uint8)))
    r0, c0, cov = _coverage(obj, 4 * size, align=4)
    patch = np.full(cov.shape + (3,), 255.0, dtype=np.float32)
    _paint(patch, cov, obj.color)
    patches.append((r0 // 4, c0 // 4, area_downsample(np.rint(patch).astype(np.uint8), 4)))
    return patches


def _legible(obj: ShapeObject, size_word: str | None) -> bool:
    """Whether the object, rendered alone at ``LEGIBILITY_SIZE``, is detected as itself with
    the ``LEGIBLE_*`` margins: shape from fill, named size, centre (mirrors the detector).

    Squares, and triangles of the default size, are not checked: their fill (>= 0.96 and
    <= 0.61 at 64 px), size and centre hold with wide margins for every offset.
    """
    if obj.shape == "square" or (obj.shape == "triangle" and not size_word):
        return True
    size = LEGIBILITY_SIZE
    lo, hi = LEGIBLE_FILL[obj.shape]
    for r0, c0, patch in _object_patches(obj, size):
        mask = (255 - patch.min(axis=2).astype(np.int16)) > FOREGROUND_THRESHOLD
        ys, xs = np.nonzero(mask)
        if len(ys) < MIN_AREA_FRACTION * size * size:
            return False
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        fill = len(ys) / float(h * w)
        d = max(h, w) / size
        cx = (c0 + xs.min() + w / 2) / size
        cy = (r0 + ys.min() + h / 2) / size
        if not lo <= fill <= hi:
            return False
        if size_word == "small" and not d < LEGIBLE_SMALL_MAX_D:
            return False
        if size_word == "large" and not d > LEGIBLE_LARGE_MIN_D:
            return False
        if max(abs(cx - obj.cx), abs(cy - obj.cy)) > LEGIBLE_MAX_CENTRE_ERROR:
            return False
    return True


def area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter downsample of a uint8 ``(H, W, C)`` image by an integer factor.

    Each output pixel is the mean of its ``factor x factor`` block, rounded half to even.
    """
    h, w = image.shape[:2]
    if not isinstance(factor, int) or factor < 1 or h % factor or w % factor:
        raise ValueError(f"factor must be a positive int dividing the image size {h}x{w}, got {factor!r}")
    f = factor
    x = image.reshape(h // f, f, w, -1).astype(np.uint32)
    rows = x[:, 0].copy()
    for i in range(1, f):
        rows += x[:, i]  # (h/f, w, C): sums over each block's rows
    rows = rows.reshape(h // f, w // f, f, -1)
    total = rows[:, :, 0].copy()
    for i in range(1, f):
        total += rows[:, :, i]
    return np.rint(total / np.float64(f * f)).astype(np.uint8)


def render_pair(scene: Scene, low: int = 64, high: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A super-resolution training pair ``(low_px, high_px)``: the ``high`` render and its
    area-downsample to ``low`` (by default 64 and 256)."""
    low, high = _check_size(low, "low"), _check_size(high, "high")
    if high % low:
        raise ValueError(f"high ({high}) must be a multiple of low ({low})")
    hi = render(scene, high)
    return area_downsample(hi, high // low), hi


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    x = image.transpose(2, 0, 1).astype(np.float32)  # (3, H, W), contiguous copy
    x /= np.float32(127.5)
    x -= np.float32(1.0)
    return torch.from_numpy(x)


def _scene_at(seed: int, index: int, mixture, exclude_heldout: bool) -> Scene:
    return sample_scene(np.random.default_rng([seed, index]), mixture, exclude_heldout)


def contrast_variants(caption: str) -> list[str]:
    """``caption`` first, then every caption that differs from it only in its position word
    (``position`` kind) or its relation (``relation`` kind); ``[caption]`` for the other kinds.

    They are the hard negatives of contrastive (CLIP) training: in a batch where an object
    appears at several places, InfoNCE can only match captions to images by their positions."""
    parsed = parse_caption(caption)
    if parsed.kind == "position":
        obj = parsed.objects[0]
        others = [replace(obj, position=p) for p in POSITIONS if p != obj.position]
        return [caption] + [_caption_for("position", [o]) for o in others]
    if parsed.kind == "relation":
        objs = list(parsed.objects)
        return [caption] + [_caption_for("relation", objs, r) for r in RELATIONS if r != parsed.relation]
    return [caption]


class ShapesDataset(torch.utils.data.IterableDataset):
    """A deterministic stream of rendered, captioned shapes scenes.

    Sample ``i`` is a function of ``(seed, i)`` only (``numpy.random.default_rng([seed, i])``),
    so ``start_index=k`` resumes a run exactly at data position ``k``. Indices are split
    round-robin across ``torch.distributed`` ranks (when initialised) and DataLoader
    workers: shard ``s`` of ``N`` yields ``start_index + s, start_index + s + N, ...``.

    Yields dicts ``{"pixel_values": float32 (3, S, S) in [-1, 1], "text": caption}``; with
    ``size=(64, 256)`` also ``"pixel_values_low"`` (3, 64, 64), the area-downsample of the
    256 image (see :func:`render_pair`).

    Args:
        size: output side, or ``(low, high)`` for super-resolution pairs.
        seed: stream seed.
        mixture: ``{kind: weight}`` (see :func:`sample_scene`).
        exclude_heldout: never yield held-out compositions (see :func:`is_heldout`).
        start_index: first sample index (resume position).
        num_samples: stop before index ``num_samples``; ``None`` streams forever.
        contrast_group: 1, or ``g`` > 1 for contrastive training with hard negatives: indices
            ``g*j ... g*j + g - 1`` form a group. Its first scene is the one index ``g*j`` has
            anyway; when that is a position or relation caption, the others are its
            :func:`contrast_variants` in turn (the same objects, another position or relation,
            each laid out afresh from ``(seed, index)``), else they are independent scenes.
            Batches of consecutive indices that are a multiple of ``g`` keep groups whole.
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 64,
        seed: int = 0,
        mixture: dict[str, float] | None = None,
        exclude_heldout: bool = False,
        start_index: int = 0,
        num_samples: int | None = None,
        contrast_group: int = 1,
    ):
        super().__init__()
        if isinstance(contrast_group, bool) or not isinstance(contrast_group, int) or contrast_group < 1:
            raise ValueError(f"contrast_group must be an int >= 1 (1: independent scenes), got {contrast_group!r}")
        self.contrast_group = contrast_group
        if isinstance(size, (tuple, list)):
            if len(size) != 2:
                raise ValueError(f"size must be an int or a (low, high) pair, got {size!r}")
            low, high = _check_size(size[0], "size[0]"), _check_size(size[1], "size[1]")
            if high % low:
                raise ValueError(f"size (low, high) needs high a multiple of low, got {size!r}")
            self.size: int | tuple[int, int] = (low, high)
        else:
            self.size = _check_size(size)
        if not isinstance(start_index, int) or start_index < 0:
            raise ValueError(f"start_index must be an int >= 0, got {start_index!r}")
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 0):
            raise ValueError(f"num_samples must be None or an int >= 0, got {num_samples!r}")
        _check_mixture(mixture)
        self.seed = int(seed)
        self.mixture = mixture
        self.exclude_heldout = bool(exclude_heldout)
        self.start_index = start_index
        self.num_samples = num_samples

    def scene(self, index: int) -> Scene:
        """The scene of sample ``index``."""
        g = self.contrast_group
        first = index - index % g
        if index == first:
            return _scene_at(self.seed, index, self.mixture, self.exclude_heldout)
        variants = contrast_variants(_scene_at(self.seed, first, self.mixture, self.exclude_heldout).caption)
        if self.exclude_heldout:
            variants = [v for v in variants if not is_heldout(v)]
        if len(variants) == 1:  # not a position/relation caption: an independent scene
            return _scene_at(self.seed, index, self.mixture, self.exclude_heldout)
        caption = variants[(index - first) % len(variants)]
        return scene_for_caption(caption, np.random.default_rng([self.seed, index]))

    def example(self, index: int) -> dict:
        """The item of sample ``index`` (what iteration yields at that position)."""
        scene = self.scene(index)
        if isinstance(self.size, tuple):
            low_img, high_img = render_pair(scene, *self.size)
            return {
                "pixel_values_low": _to_tensor(low_img),
                "pixel_values": _to_tensor(high_img),
                "text": scene.caption,
            }
        return {"pixel_values": _to_tensor(render(scene, self.size)), "text": scene.caption}

    @staticmethod
    def _shard() -> tuple[int, int]:
        """(shard id, number of shards) over distributed ranks x DataLoader workers."""
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def __iter__(self):
        shard, num_shards = self._shard()
        index = self.start_index + shard
        while self.num_samples is None or index < self.num_samples:
            yield self.example(index)
            index += num_shards


def write_imagefolder(
    out_dir,
    n: int,
    seed: int,
    size: int = 256,
    mixture: dict[str, float] | None = None,
    exclude_heldout: bool = False,
) -> Path:
    """Write ``n`` samples as a Hugging Face ``imagefolder``: PNGs + ``metadata.jsonl``.

    Each ``metadata.jsonl`` line is ``{"file_name": "000000.png", "text": caption}``. Sample
    ``i`` is sample ``i`` of ``ShapesDataset(size, seed, mixture, exclude_heldout)``.
    ``out_dir`` is created; it must not already hold files. Returns its path.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    size = _check_size(size)
    _check_mixture(mixture)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"out_dir {str(out)!r} is not empty; pass a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(n - 1)))
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i in range(n):
            scene = _scene_at(seed, i, mixture, exclude_heldout)
            name = f"{i:0{width}d}.png"
            Image.fromarray(render(scene, size)).save(out / name)
            meta.write(json.dumps({"file_name": name, "text": scene.caption}) + "\n")
    return out
