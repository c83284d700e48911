"""Captioned images for training: folders, ``datasets`` datasets and the shapes stream.

Sources (:func:`open_source` picks one from ``--data``):

- an image folder in the Hugging Face ``imagefolder`` convention: ``metadata.jsonl`` lines
  ``{"file_name": "a/b.png", "text": "a caption"}`` (the caption key is ``--caption-column``);
- a folder of images with a same-named ``.txt`` caption beside each (``cat.png`` + ``cat.txt``);
- a ``datasets`` dataset, by hub name or ``save_to_disk`` directory, with ``--image-column`` and
  ``--caption-column`` (only when ``datasets`` is installed; it is not a dependency);
- ``shapes``: the procedural shapes stream (:class:`imagen_lite.data.shapes.ShapesDataset`).

Every check on user data happens when the source is opened, before any training step: a
missing or empty directory, a folder without captions, a ``metadata.jsonl`` line that is not
JSON or whose ``file_name`` leaves the folder are errors naming the value. Unreadable images and
empty captions are skipped and counted in one warning; an image that turns out unreadable only
when decoded mid-run is replaced by the next readable one (counted, warned), never a crash.

Data order is a pure function of ``(data_seed, position)`` (:func:`indices_for`): each epoch is
a seeded permutation, and a run resumed at micro-step ``m`` reads exactly what it would have
read, whatever the number of processes had been... as long as it is the same.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger("imagen_lite.train")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# ---------------------------------------------------------------------- images
def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited on white (shapes-style backgrounds)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def fit(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` and centre-crop: float32 (3, size, size) in [-1, 1]."""
    image = ImageOps.fit(to_rgb(image), (size, size), method=Image.Resampling.BICUBIC)
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(x))


# ---------------------------------------------------------------------- sources
class Source:
    """Index-addressable captioned images. ``len()`` is None for an endless stream."""

    description = ""

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def size(self) -> int | None:
        return len(self)

    def caption(self, index: int) -> str:
        raise NotImplementedError

    def image(self, index: int) -> Image.Image:
        """The PIL image of ``index``; raises (OSError, ValueError...) when it cannot be read."""
        raise NotImplementedError

    def image_for(self, index: int, size: int) -> Image.Image:
        """The image of ``index`` for a batch whose largest side is ``size``: the stored image
        (``fit`` resizes it). A procedural source may draw it at ``size`` directly."""
        return self.image(index)

    def captions(self, limit: int | None = None) -> list[str]:
        n = self.size if self.size is not None else (limit or 1000)
        n = min(n, limit) if limit else n
        return [self.caption(i) for i in range(n)]


class FolderSource(Source):
    """``(path, caption)`` pairs found in a folder (imagefolder ``metadata.jsonl`` or ``.txt``)."""

    def __init__(self, items: list[tuple[Path, str]], description: str):
        self.items = items
        self.description = description

    def __len__(self) -> int:
        return len(self.items)

    def caption(self, index: int) -> str:
        return self.items[index][1]

    def image(self, index: int) -> Image.Image:
        with Image.open(self.items[index][0]) as im:
            im.load()
            return im.copy()

    def name(self, index: int) -> str:
        return str(self.items[index][0])


class DatasetsSource(Source):
    """A ``datasets.Dataset`` with an image column (PIL images or paths) and a caption column."""

    def __init__(self, dataset, image_column: str, caption_column: str, keep: list[int], description: str):
        self.dataset, self.image_column, self.keep = dataset, image_column, keep
        self.texts = [str(dataset[caption_column][i]).strip() for i in keep]
        self.description = description

    def __len__(self) -> int:
        return len(self.keep)

    def caption(self, index: int) -> str:
        return self.texts[index]

    def image(self, index: int) -> Image.Image:
        value = self.dataset[self.keep[index]][self.image_column]
        if isinstance(value, Image.Image):
            value.load()
            return value
        if isinstance(value, dict) and value.get("bytes"):
            import io

            with Image.open(io.BytesIO(value["bytes"])) as im:
                im.load()
                return im.copy()
        if isinstance(value, dict) and value.get("path"):
            value = value["path"]
        with Image.open(value) as im:
            im.load()
            return im.copy()


class ShapesSource(Source):
    """The shapes stream: sample ``i`` is a function of ``(seed, i)``; endless."""

    def __init__(self, seed: int = 0, exclude_heldout: bool = True, mixture: dict | None = None, contrast_group: int = 1):
        from ..data.shapes import ShapesDataset

        self.dataset = ShapesDataset(size=64, seed=seed, mixture=mixture, exclude_heldout=exclude_heldout,
                                     contrast_group=contrast_group)  # fmt: skip
        extra = (f", mixture {mixture}" if mixture else "") + (f", contrast groups of {contrast_group}" if contrast_group > 1 else "")
        self.description = f"shapes stream (seed {seed}{extra})"

    def __len__(self) -> int:
        raise TypeError("the shapes stream is endless")

    @property
    def size(self) -> None:
        return None

    def caption(self, index: int) -> str:
        return self.dataset.scene(index).caption

    def image(self, index: int) -> Image.Image:
        return self.image_for(index, 256)

    def image_for(self, index: int, size: int) -> Image.Image:
        """The scene drawn at ``size``, the largest side a batch asks for (the spec's renderer,
        anti-aliased by supersampling), so a 64 px stage gets ``render(scene, 64)`` exactly and
        does not pay for a 256 px render and a bicubic downsample (2.3 against 0.33 ms an
        image, about 13% of a DALL-E 2 decoder step here; twelfth session). A 64 + 256 px batch
        (the SR stage) is drawn at 256 and its 64 px side is ``fit``'s bicubic downsample, as
        before. Until then every stage drew 256 px."""
        from ..data.shapes import render

        return Image.fromarray(render(self.dataset.scene(index), size))


def _skip_warning(counts: dict[str, list[str]], where: str, total: int) -> None:
    skipped = {k: v for k, v in counts.items() if v}
    if not skipped:
        return
    parts = [f"{len(v)} {k} (e.g. {v[0]!r})" for k, v in skipped.items()]
    n = sum(len(v) for v in skipped.values())
    warnings.warn(f"{where}: skipped {n} of {total} items: " + "; ".join(parts), UserWarning, stacklevel=3)


def _inside(root: Path, name: str, line_no: int, meta: Path) -> Path:
    """The path ``root/name``, refusing absolute names and names that leave ``root``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{meta}: line {line_no} has file_name={name!r}; expected a relative path inside {str(root)!r}")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ValueError(
            f"{meta}: line {line_no} has file_name={name!r}, an absolute path; file_name must be relative to {str(root)!r}"
        )
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(
            f"{meta}: line {line_no} has file_name={name!r}, which points outside the folder {str(root)!r}; "
            "file_name must stay inside it (no '..')"
        )
    return path


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001 - any decoder error means "unreadable"
        return False


def _folder_source(root: Path, caption_column: str) -> FolderSource:
    meta = root / "metadata.jsonl"
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    counts: dict[str, list[str]] = {"unreadable images": [], "empty captions": [], "missing files": []}
    pairs: list[tuple[Path, str]] = []
    if meta.is_file():
        with open(meta, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{meta}: line {line_no} is not JSON ({err.msg}): {line.strip()[:80]!r}") from None
                if not isinstance(row, dict) or "file_name" not in row:
                    raise ValueError(f"{meta}: line {line_no} has no 'file_name'; expected {{\"file_name\": ..., "
                                     f"\"{caption_column}\": ...}}, got {line.strip()[:80]!r}")  # fmt: skip
                path = _inside(root, row["file_name"], line_no, meta)
                if caption_column not in row:
                    raise ValueError(
                        f"{meta}: line {line_no} has no caption key {caption_column!r} (keys: {sorted(row)}); "
                        "pass --caption-column to name the key that holds the caption"
                    )
                text = row[caption_column]
                text = text.strip() if isinstance(text, str) else ""
                if not path.is_file():
                    counts["missing files"].append(row["file_name"])
                elif not text:
                    counts["empty captions"].append(row["file_name"])
                else:
                    pairs.append((path, text))
        how = f"imagefolder {str(root)!r} (metadata.jsonl)"
    else:
        if not images:
            raise ValueError(
                f"data directory {str(root)!r} has no images ({', '.join(IMAGE_EXTENSIONS)}) and no metadata.jsonl"
            )
        with_txt = [p for p in images if p.with_suffix(".txt").is_file()]
        if not with_txt:
            raise ValueError(
                f"data directory {str(root)!r} has {len(images)} images but no captions: expected a metadata.jsonl "
                "with {\"file_name\", \"text\"} lines, or a same-named .txt file beside each image (cat.png + cat.txt)"
            )
        for p in images:
            txt = p.with_suffix(".txt")
            text = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""
            if not text:
                counts["empty captions"].append(p.name)
            else:
                pairs.append((p, text))
        how = f"image folder {str(root)!r} (.txt captions)"
    total = len(pairs) + len(counts["empty captions"]) + len(counts["missing files"])
    good = []
    for path, text in pairs:
        if _readable(path):
            good.append((path, text))
        else:
            counts["unreadable images"].append(path.name)
    _skip_warning(counts, how, total)
    if not good:
        raise ValueError(f"{how} has no usable captioned image (of {total} entries; see the warning for why)")
    return FolderSource(good, f"{how}: {len(good)} captioned images")


def _datasets_source(data: str, image_column: str, caption_column: str) -> DatasetsSource:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"data={data!r} is not a directory; a Hugging Face dataset by name needs `pip install datasets`"
        ) from None
    path = Path(data)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(data)
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    for name, col in (("--image-column", image_column), ("--caption-column", caption_column)):
        if col not in ds.column_names:
            raise ValueError(f"dataset {data!r} has no column {col!r} ({name}); its columns are {ds.column_names}")
    texts = ds[caption_column]
    keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
    empty = [str(i) for i, t in enumerate(texts) if not (isinstance(t, str) and t.strip())]
    _skip_warning({"empty captions": empty}, f"dataset {data!r}", len(texts))
    if not keep:
        raise ValueError(f"dataset {data!r} has no non-empty caption in column {caption_column!r}")
    return DatasetsSource(ds, image_column, caption_column, keep, f"dataset {data!r}: {len(keep)} captioned images")


def _is_saved_dataset(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def open_source(data: str, image_column: str = "image", caption_column: str = "text", seed: int = 0,
                shapes_mixture: dict | None = None, shapes_contrast_group: int = 1) -> Source:  # fmt: skip
    """The :class:`Source` that ``--data`` names; every check on the data happens here.
    ``shapes_mixture`` (data "shapes" only): the share of each caption kind;
    ``shapes_contrast_group``: groups of hard negatives (``ShapesDataset``'s ``contrast_group``)."""
    if data == "shapes":
        return ShapesSource(seed=seed, mixture=shapes_mixture, contrast_group=shapes_contrast_group)
    path = Path(data)
    if path.is_dir():
        if not any(path.iterdir()):
            raise ValueError(f"data directory {data!r} is empty; put images with captions in it (see docs/training.md)")
        if _is_saved_dataset(path):
            return _datasets_source(data, image_column, caption_column)
        return _folder_source(path, caption_column)
    if path.exists():
        raise ValueError(f"data={data!r} is a file; pass a directory of captioned images, a dataset, or 'shapes'")
    hub_like = "/" in data and data.count("/") == 1 and all(data.split("/")) and not data.startswith((".", "~"))
    if hub_like or ("/" not in data and os.sep not in data):
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise FileNotFoundError(
                f"data directory {data!r} does not exist (a Hugging Face dataset by name needs `pip install datasets`)"
            ) from None
        return _datasets_source(data, image_column, caption_column)
    raise FileNotFoundError(f"data directory {data!r} does not exist")


# ---------------------------------------------------------------------- order
@lru_cache(maxsize=4)
def _permutation(n: int, data_seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(data_seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def indices_for(micro_step: int, rank: int, world: int, batch_size: int, n: int | None, data_seed: int) -> list[int]:
    """Sample indices of process ``rank``'s batch at ``micro_step``.

    The global batch of a micro-step is ``world * batch_size`` consecutive positions of an
    endless sequence of seeded epoch permutations (positions themselves for an endless
    stream); rank ``r`` takes its ``batch_size`` slice. A pure function of its arguments."""
    start = (micro_step * world + rank) * batch_size
    positions = range(start, start + batch_size)
    if n is None:
        return list(positions)
    return [_permutation(n, data_seed, p // n)[p % n] for p in positions]


class Batches:
    """Batches of ``{"pixel_values": (B, 3, S, S), <key>: ... for each extra size, "text": [...]}``.

    ``sizes`` maps output keys to image sides (e.g. ``{"pixel_values": 64, "clip_pixel_values":
    32}``). An image that fails to decode is replaced by the next index that decodes; the
    replacements are counted and warned about once per 100."""

    def __init__(self, source: Source, sizes: dict[str, int], batch_size: int, data_seed: int,
                 rank: int = 0, world: int = 1, num_workers: int = 0):  # fmt: skip
        self.source, self.sizes, self.batch_size = source, dict(sizes), batch_size
        self.data_seed, self.rank, self.world = data_seed, rank, world
        self.pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self.replaced: list[int] = []

    def _item(self, index: int) -> tuple[dict[str, torch.Tensor], str]:
        n = self.source.size
        for attempt in range(n or 1_000):
            i = index if n is None else (index + attempt) % n
            try:
                image = self.source.image_for(i, max(self.sizes.values()))
                return {k: fit(image, s) for k, s in self.sizes.items()}, self.source.caption(i)
            except Exception as err:  # noqa: BLE001 - a bad file mid-run is skipped, not fatal
                self.replaced.append(i)
                if len(self.replaced) % 100 == 1:
                    warnings.warn(
                        f"could not read image {i} of {self.source.description} ({type(err).__name__}: {err}); "
                        f"using the next one ({len(self.replaced)} replaced so far)",
                        UserWarning,
                        stacklevel=2,
                    )
                index += 1 if n is None else 0
        raise ValueError(f"no image of {self.source.description} could be read")

    def __call__(self, micro_step: int) -> dict:
        idx = indices_for(micro_step, self.rank, self.world, self.batch_size, self.source.size, self.data_seed)
        items = list(self.pool.map(self._item, idx)) if self.pool else [self._item(i) for i in idx]
        batch = {k: torch.stack([it[0][k] for it in items]) for k in self.sizes}
        batch["text"] = [it[1] for it in items]
        return batch

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def caption_words(source: Source, limit: int = 5000) -> list[str]:
    """The most frequent whitespace-separated words of the captions (lower case), for the word
    tokenizers of from-scratch models. The shapes stream gives its grammar's whole vocabulary
    instead: a resume with another ``shapes_mixture`` must see the same token ids."""
    from collections import Counter

    if isinstance(source, ShapesSource):
        from ..data.shapes import vocabulary

        return vocabulary()[:limit]

    counts = Counter(w for text in source.captions(limit=20_000) for w in text.lower().split())
    return [w for w, _ in counts.most_common(limit)]
