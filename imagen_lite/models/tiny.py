"""Randomly initialised tiny pipelines: tests, and the stand-in ``generate()`` uses (with a
warning) when no trained embedded default is installed for a family."""

from __future__ import annotations

import torch

from . import components as C

TINY_WORDS = "a an red green blue yellow purple orange small large circle square triangle circles squares triangles".split()


def build_tiny_imagen(seed: int = 0, with_sr: bool = True, unshuffle_factor: int = 1, with_refiner: bool = False):
    """A tiny random ImagenPipeline (16px base -> 32px SR), built without touching the global RNG.
    ``with_refiner``: a low-noise refiner trained (notionally) on t < 300; the base and SR then
    have a fixed variance (a refiner predicts none)."""
    from ..pipelines.imagen import ImagenPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = C.word_tokenizer(TINY_WORDS)
        r = unshuffle_factor
        learned = r == 1 and not with_refiner
        parts = dict(
            tokenizer=tok,
            text_encoder=C.t5_encoder(len(tok)).eval(),
            unet=C.if_unet(sample_size=16 // r, in_channels=3 * r * r, out_channels=6 if learned else 3 * r * r,
                           text_dim=32, size=C.TINY_BASE),
            scheduler=C.ddpm_scheduler(variance_type="learned_range" if learned else "fixed_small"),
        )  # fmt: skip
        if with_refiner:
            parts.update(refiner=C.refiner_unet(16).eval(), refiner_scheduler=C.refiner_scheduler())
        if with_sr:
            parts.update(
                sr_unet=C.if_unet(sample_size=32, in_channels=6, out_channels=3 if with_refiner else 6, text_dim=32,
                                  size=C.TINY_SR, super_resolution=True),
                sr_scheduler=C.ddpm_scheduler(variance_type="fixed_small" if with_refiner else "learned_range"),
                image_noising_scheduler=C.noising_scheduler(),
            )  # fmt: skip
        return ImagenPipeline(**parts, unshuffle_factor=r, max_sequence_length=16,
                              refiner_max_timestep=300 if with_refiner else 0)
