"""``imagen-lite train``: train or fine-tune one stage of either family on captioned images.

Every :class:`~imagen_lite.training.config.TrainConfig` field is a flag (``--max-steps``,
``--lora-rank``...) whose help is the field's comment; ``--config FILE`` reads a JSON object of
fields first and flags override it. Also runs as ``accelerate launch -m imagen_lite.cli train
...`` or ``torchrun --nproc_per_node N -m imagen_lite.cli train ...`` for data-parallel training.
Importing this module does not import torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re

__all__ = ["register", "cmd_train"]

SHORT = {
    "family": "imagen | dalle2",
    "stage": "imagen: base | sr; dalle2: clip | prior | decoder | sr",
    "timestep_bias_strategy": "none | later | earlier | range (as diffusers' SDXL script's --timestep_bias_strategy)",
    "shapes_mixture": 'data shapes: JSON share per caption kind, e.g. \'{"position": 0.5, "relation": 0.5}\'',
}


def _field_comments(cls) -> dict[str, str]:
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+= .*?#\s*(.+)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _typed(annotation: str):
    def convert(text: str):
        if text.lower() == "none" and "None" in annotation:
            return None
        try:
            if "dict" in annotation:
                return json.loads(text)
            if "float" in annotation:
                return float(text)
            if "int" in annotation:
                return int(text)
            return text
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {annotation}") from None  # JSONDecodeError too

    return convert


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to an argparse subparsers object."""
    from .training.config import TrainConfig  # torch-free

    p = subparsers.add_parser(
        "train",
        help="train or fine-tune one stage (base/sr, clip/prior/decoder/sr) on captioned images",
        description="Train or fine-tune one stage of the Imagen or DALL-E 2 family on a folder of captioned "
        "images (imagefolder metadata.jsonl or .txt captions), a `datasets` dataset, or 'shapes'. The output "
        "directory is a complete pipeline that generate(model=OUT) loads; checkpoints go to OUT/checkpoints. "
        "See docs/training.md.",
    )
    p.add_argument("--config", default=None, help="JSON file of run-config fields; flags override it")
    comments = _field_comments(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = SHORT.get(f.name, comments.get(f.name, "")) + f" (default: {f.default!r})"
        annotation = str(f.type)
        if annotation in ("bool",):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif annotation == "bool | None":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif isinstance(f.default, tuple):  # one or more values: --sr-crop 16 32, --validation-prompts "a" "b"
            element = int if f.default and isinstance(f.default[0], int) else str
            p.add_argument(flag, dest=f.name, type=element, nargs="+", default=argparse.SUPPRESS,
                           metavar=f.name.split("_")[-1].upper().rstrip("S"), help=help_text)  # fmt: skip
        else:
            p.add_argument(flag, dest=f.name, type=_typed(annotation), default=argparse.SUPPRESS,
                           metavar=f.name.upper(), help=help_text)  # fmt: skip
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .training.config import TrainConfig
    from .training.loop import train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig.load(args.config) if args.config else TrainConfig()
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in fields}
    out = train(cfg.replace(**overrides))
    print(out)
    return 0
