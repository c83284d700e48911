"""The output type both families return."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers.utils import BaseOutput


@dataclass
class ImageLiteOutput(BaseOutput):
    """Result of a pipeline call.

    Attributes:
        images: list of PIL images, an (N, H, W, 3) float array in [0, 1] (``output_type="np"``),
            or the last stage's raw (N, 3, H, W) tensor in [-1, 1] (``output_type="pt"``,
            IF's convention, so the tensor can feed another stage).
        stage_images: per stage name (``"base"``, ``"sr_256"``... or ``"prior"``...), the raw
            (N, C, ...) output of that stage; filled when ``return_stage_outputs=True``.
        stage_seconds: wall seconds spent in each stage of this call.
    """

    images: object
    stage_images: dict = field(default_factory=dict)
    stage_seconds: dict = field(default_factory=dict)
