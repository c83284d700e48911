"""Shared fixtures: tiny components built in code (no downloads), saved in the on-disk layouts
of the real checkpoints they stand in for."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread: tiny models gain nothing from more, and a second thread oversubscribes the
# 2-core machine when a training job runs beside the tests (measured 35x slower).
torch.set_num_threads(int(os.environ.get("IMAGEN_LITE_TEST_THREADS", "1")))

WORDS = "a an red green blue yellow purple orange small large circle square triangle circles squares triangles".split()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def build_tiny_if(tmp_path, with_sr: bool = True, seed: int = 0, learned_variance: bool = True):
    """Tiny DeepFloyd-IF-layout repos built with diffusers' own IF pipeline classes.

    Returns (stage_1_dir, stage_2_dir or None)."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    from imagen_lite.models import components as C

    torch.manual_seed(seed)
    tok = C.word_tokenizer(WORDS)
    t5 = C.t5_encoder(len(tok)).eval()
    out_ch = 6 if learned_variance else 3
    variance = "learned_range" if learned_variance else "fixed_small"
    base = C.if_unet(sample_size=16, in_channels=3, out_channels=out_ch, text_dim=32, size=C.TINY_BASE)
    s1 = IFPipeline(
        tokenizer=tok, text_encoder=t5, unet=base, scheduler=C.ddpm_scheduler(variance_type=variance),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False,
    )
    d1 = tmp_path / "IF-I-tiny"
    s1.save_pretrained(d1, safe_serialization=True)
    if not with_sr:
        return d1, None
    sr = C.if_unet(sample_size=32, in_channels=6, out_channels=out_ch, text_dim=32, size=C.TINY_SR, super_resolution=True)
    s2 = IFSuperResolutionPipeline(
        tokenizer=tok, text_encoder=None, unet=sr, scheduler=C.ddpm_scheduler(variance_type=variance),
        image_noising_scheduler=C.noising_scheduler(),
        safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False,
    )
    d2 = tmp_path / "IF-II-tiny"
    s2.save_pretrained(d2, safe_serialization=True)
    return d1, d2


@pytest.fixture(scope="session")
def tiny_if_dirs(tmp_path_factory):
    return build_tiny_if(tmp_path_factory.mktemp("tiny_if"))
