"""Component builders for the Imagen-style family: word-level T5 tokenizer, T5 encoder,
IF-style base and super-resolution UNets, schedulers -- all from config objects in code, no
downloads. ``tiny`` sizes serve the tests (seconds on CPU); ``small`` sizes are the embedded
default (trained on the 2-core CPU, see ``docs/model_card.md``).

Every builder returns a plain diffusers/transformers object, so what they make saves with
``save_pretrained`` and loads with the library's own classes.

Decisions:
- The tokenizer is a ``T5Tokenizer`` whose vocabulary is whole words (a Unigram model with one
  piece per word, SentencePiece's ``▁`` word prefix): the shapes grammar has ~35 words, and a
  sub-word tokenizer trained on so few words splits them into letters (59 tokens, captions
  then overflow a 16-token limit). It is still the class DeepFloyd IF ships, so IF's loaders
  read it. Unknown words map to ``<unk>``.
- The embedded default predicts x0 (``prediction_type="sample"``) with a cosine schedule:
  on flat-colour shapes epsilon prediction gave colour blobs after 45 CPU-minutes where x0
  gave clean shapes in 15 (issue #10's measurements).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from transformers import T5Config, T5EncoderModel, T5Tokenizer

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def word_tokenizer(words) -> T5Tokenizer:
    """A T5Tokenizer with one token per word of ``words`` (ids 0-2: pad, eos, unk)."""
    vocab = [(t, 0.0) for t in SPECIAL_TOKENS]
    seen = set()
    for w in words:
        if w not in seen and w not in SPECIAL_TOKENS:
            seen.add(w)
            vocab.append(("\u2581" + w, -1.0))
    return T5Tokenizer(vocab=vocab, extra_ids=0)


@dataclass
class T5Size:
    d_model: int = 32  # token state width = the UNets' encoder_hid_dim
    num_layers: int = 2
    num_heads: int = 2
    d_ff: int = 64
    d_kv: int = 16


@dataclass
class UNetSize:
    block_out_channels: tuple = (32, 64)  # one per resolution level
    layers_per_block: int = 1
    attention_head_dim: int = 8
    cross_attention_dim: int = 32  # width of the projected text tokens inside the UNet
    attention_levels: tuple = (False, True)  # which levels have cross-attention blocks


TINY_T5 = T5Size()
TINY_BASE = UNetSize()
TINY_SR = UNetSize(block_out_channels=(16, 32), attention_levels=(False, False))


def t5_encoder(vocab_size: int, size: T5Size = TINY_T5) -> T5EncoderModel:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=size.d_model,
        d_kv=size.d_kv,
        d_ff=size.d_ff,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def _blocks(levels, attn_down: str, plain_down: str):
    return [attn_down if a else plain_down for a in levels]


def if_unet(
    *,
    sample_size: int,
    in_channels: int,
    out_channels: int,
    text_dim: int,
    size: UNetSize,
    super_resolution: bool = False,
) -> UNet2DConditionModel:
    """An IF-style ``UNet2DConditionModel``: T5 tokens projected by ``encoder_hid_dim`` for
    cross-attention, pooled text added to the time embedding (``addition_embed_type="text"``);
    super-resolution UNets also embed the augmentation noise level as ``class_labels``."""
    levels = tuple(size.attention_levels)
    if len(levels) != len(size.block_out_channels):
        raise ValueError(
            f"attention_levels={levels} must have one entry per block_out_channels={size.block_out_channels}"
        )
    down = _blocks(levels, "SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D")
    up = _blocks(reversed(levels), "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D")
    kwargs = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        layers_per_block=size.layers_per_block,
        block_out_channels=tuple(size.block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=size.cross_attention_dim,
        encoder_hid_dim=text_dim,
        attention_head_dim=size.attention_head_dim,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
        norm_num_groups=min(8, min(size.block_out_channels)),
    )
    if super_resolution:
        kwargs.update(class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu")
    return UNet2DConditionModel(**kwargs)


def grow_input_channels(state: dict, in_channels: int) -> dict:
    """A UNet state dict whose ``conv_in`` takes ``in_channels`` inputs, from one that takes
    fewer: the added inputs (coordinate channels) get zero weights, so the grown UNet computes
    exactly what the saved one did until training teaches it to use them."""
    weight = state["conv_in.weight"]
    extra = in_channels - weight.shape[1]
    if extra <= 0:
        raise ValueError(f"conv_in takes {weight.shape[1]} input channels; cannot grow it to {in_channels}")
    grown = torch.cat([weight, weight.new_zeros(weight.shape[0], extra, *weight.shape[2:])], dim=1)
    return {**state, "conv_in.weight": grown}


def with_input_channels(unet: UNet2DConditionModel, in_channels: int) -> UNet2DConditionModel:
    """A copy of ``unet`` taking ``in_channels`` inputs (see :func:`grow_input_channels`)."""
    grown = UNet2DConditionModel.from_config({**unet.config, "in_channels": in_channels}).to(unet.dtype)
    grown.load_state_dict(grow_input_channels(unet.state_dict(), in_channels))
    return grown.to(unet.device)


def ddpm_scheduler(prediction_type: str = "epsilon", variance_type: str = "fixed_small", **overrides) -> DDPMScheduler:
    """A 1000-step cosine DDPM scheduler with IF's dynamic thresholding settings."""
    config = dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        variance_type=variance_type,
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.5,
        clip_sample=True,
        clip_sample_range=1.0,
    )
    config.update(overrides)
    return DDPMScheduler(**config)


@dataclass
class RefinerSize:
    block_out_channels: tuple = (16, 32)
    layers_per_block: int = 1
    norm_num_groups: int = 8


TINY_REFINER = RefinerSize()
SMALL_REFINER = RefinerSize(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16)


def refiner_unet(sample_size: int = 64, size: RefinerSize = TINY_REFINER) -> UNet2DModel:
    """The Imagen base's low-noise refiner: an unconditional, full-resolution ``UNet2DModel``
    (no attention, no text) that predicts v on the base's last steps (twentieth session,
    ``ImagenPipeline``'s ``refiner``). Fully convolutional, so it runs at any side."""
    n = len(size.block_out_channels)
    return UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=3,
        block_out_channels=tuple(size.block_out_channels), layers_per_block=size.layers_per_block,
        down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
        norm_num_groups=size.norm_num_groups,
    )  # fmt: skip


def refiner_scheduler() -> DDPMScheduler:
    """The refiner's scheduler: the base's cosine schedule (:func:`ddpm_scheduler`), predicting v.
    The timesteps it was trained on are the pipeline's ``refiner_max_timestep``."""
    return ddpm_scheduler(prediction_type="v_prediction")


def noising_scheduler() -> DDPMScheduler:
    """The scheduler for noise-conditioning augmentation (IF: linear betas 1e-4..0.02)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
