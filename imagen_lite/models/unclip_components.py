"""Component builders for the DALL-E 2-style (unCLIP) family: word-level CLIP tokenizer, CLIP
text and vision towers, prior, decoder and super-resolution UNets, schedulers -- all from config
objects in code, no downloads. ``TINY_UNCLIP`` serves the tests (seconds on CPU);
``SMALL_UNCLIP`` is sized for an embedded default trained on the 2-core CPU.

Every builder returns a plain diffusers/transformers object (or
:class:`~imagen_lite.models.text_proj.UnCLIPTextProjection`), in the shapes Karlo
(``kakaobrain/karlo-v1-alpha``) uses, so what they make saves with ``save_pretrained`` and
loads in diffusers' own ``UnCLIPPipeline``:

- the CLIP text tower's token states, its pooled embedding and the image embedding all have one
  width ``D`` (``embedding_dim``): the prior reads the token states through a ``D -> inner``
  linear, and ``text_proj`` projects all three;
- the prior's ``num_embeddings`` is the tokenizer's ``model_max_length`` (one position per token);
- the decoder is a ``UNet2DConditionModel`` with ``class_embed_type="identity"``: ``text_proj``'s
  additive CLIP time embedding arrives as ``class_labels``, and its context tokens (K image
  tokens + the text tokens, already projected to ``cross_attention_dim`` and layer-normed) as
  ``encoder_hidden_states``. So, unlike the Imagen family's UNets, it has no
  ``encoder_hid_dim``: the projection lives in ``text_proj``, as in Karlo;
- the super-resolution UNets are unconditional ``UNet2DModel``s on ``[noise, upsampled image]``
  (6 channels), as Karlo's ``super_res_first``/``super_res_last``.

Decisions:
- The tokenizer is a ``CLIPTokenizer`` (the class Karlo ships) whose BPE merges are trained on
  the word list until every word is one token; the lower-case alphabet, digits and ASCII
  punctuation stay in the vocabulary so an unknown word splits into characters instead of
  becoming ``<|endoftext|>`` (CLIP's unknown token is its end token, and the pooled embedding is
  read at the first end token).
- ``SMALL_UNCLIP``'s decoder runs on 4x4 pixel patches (``unshuffle_factor=4``, 48x16x16 for
  64px, channels 48/96/192, as the Imagen family's embedded default base) and predicts x0 with
  a fixed variance, the setting that trained fastest on this AVX2 CPU in the Imagen family
  (issue #10; 2x2 patches with attention at 16x16 cost ~10x more per step).
"""

from __future__ import annotations

import json
import math
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from .text_proj import UnCLIPTextProjection

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Words of the shapes domain (``imagen_lite.data.shapes``' grammar), the default vocabulary.
SHAPES_WORDS = tuple(
    "a an and small large red green blue yellow purple orange circle square triangle circles squares "
    "triangles on the left right at top bottom in center to of above below two three four".split()
)
# CLIP's own pre-tokenizer split (transformers' CLIPTokenizer uses the same expression).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_word_tokenizer(words=SHAPES_WORDS, model_max_length: int = 16) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` with one token per word of ``words`` (ids 0-1: start, end/pad/unk)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    words = [w.lower() for w in words]
    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=EOS))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # large enough that merging only stops once every word is one token
        min_frequency=0,
        special_tokens=[BOS, EOS],
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(words, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        for piece in (ch, ch + "</w>"):
            vocab.setdefault(piece, len(vocab))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    # Through vocab.json + merges.txt (the files Karlo's tokenizer/ ships): CLIPTokenizer reads
    # them in transformers 4.x and 5.x alike.
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length)


@dataclass
class ClipSize:
    embedding_dim: int = 32  # D: token states, pooled text and image embeddings (Karlo: 768)
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 64
    max_length: int = 16  # tokens per prompt (Karlo: 77); shapes captions are <= 12 with specials
    image_size: int = 32  # vision tower input side (encode_images only)
    patch_size: int = 8


@dataclass
class PriorSize:
    num_layers: int = 1
    num_heads: int = 2
    head_dim: int = 16  # inner width = num_heads * head_dim


@dataclass
class DecoderSize:
    sample_size: int = 16  # UNet grid side; the image side is sample_size * unshuffle_factor
    unshuffle_factor: int = 1  # decoder runs on r x r pixel patches (Karlo: 1)
    block_out_channels: tuple = (32, 64)  # time embedding width = 4 * block_out_channels[0]
    layers_per_block: int = 1
    attention_head_dim: int = 8
    cross_attention_dim: int = 32  # width of the context tokens text_proj makes
    attention_levels: tuple = (False, True)  # which levels have (self + cross) attention blocks
    extra_context_tokens: int = 4  # K image tokens (unCLIP: 4)
    learned_variance: bool = True  # Karlo: learned_range (out_channels doubled)
    prediction_type: str = "epsilon"


@dataclass
class SRSize:
    sample_size: int = 32  # output side
    block_out_channels: tuple = (16, 32)
    layers_per_block: int = 1
    # Karlo's SR predicts epsilon. The shapes default predicts x0 ("sample"): after 400 small-crop
    # steps an epsilon SR left a grey, noisy background that got worse with fewer steps, which
    # the <= 5 s budget for a 256 px image needs (x0 prediction gave the base clean flat shapes
    # within minutes, see training/default.py).
    prediction_type: str = "epsilon"


@dataclass
class UnCLIPSize:
    clip: ClipSize = field(default_factory=ClipSize)
    prior: PriorSize = field(default_factory=PriorSize)
    decoder: DecoderSize = field(default_factory=DecoderSize)
    sr: SRSize | None = field(default_factory=SRSize)  # None: a decoder-only (64px) cascade


TINY_UNCLIP = UnCLIPSize()
SMALL_UNCLIP = UnCLIPSize(
    clip=ClipSize(embedding_dim=64, num_layers=2, num_heads=4, intermediate_size=128, max_length=16, image_size=64),
    prior=PriorSize(num_layers=4, num_heads=4, head_dim=16),
    decoder=DecoderSize(
        sample_size=16,
        unshuffle_factor=4,
        block_out_channels=(48, 96, 192),
        layers_per_block=1,
        attention_head_dim=32,
        cross_attention_dim=64,
        attention_levels=(False, True, True),
        learned_variance=False,
        prediction_type="sample",
    ),
    sr=SRSize(sample_size=256, block_out_channels=(16, 32, 64), layers_per_block=1, prediction_type="sample"),
)


# ---------------------------------------------------------------------- CLIP towers
def clip_text_encoder(vocab_size: int, size: ClipSize = TINY_UNCLIP.clip, eos_token_id: int = 1) -> CLIPTextModelWithProjection:
    """CLIP text tower with projection: ``text_embeds`` (B, D) pooled at the first end token,
    ``last_hidden_state`` (B, L, D)."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=size.embedding_dim,
        projection_dim=size.embedding_dim,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        max_position_embeddings=size.max_length,
        bos_token_id=0,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    return CLIPTextModelWithProjection(config)


def clip_vision_encoder(size: ClipSize = TINY_UNCLIP.clip) -> CLIPVisionModelWithProjection:
    """CLIP vision tower with projection: ``image_embeds`` (B, D)."""
    config = CLIPVisionConfig(
        hidden_size=size.embedding_dim,
        projection_dim=size.embedding_dim,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
    )
    return CLIPVisionModelWithProjection(config)


def clip_image_processor(size: ClipSize = TINY_UNCLIP.clip) -> CLIPImageProcessor:
    """CLIP's preprocessing (resize shortest side, centre crop, CLIP mean/std) at ``image_size``."""
    side = size.image_size
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


# ---------------------------------------------------------------------- prior / decoder / SR
def prior_transformer(size: UnCLIPSize = TINY_UNCLIP) -> PriorTransformer:
    """unCLIP's decoder-only transformer prior over ``[text tokens, z_t, t, z_i^(t), query]``."""
    return PriorTransformer(
        num_attention_heads=size.prior.num_heads,
        attention_head_dim=size.prior.head_dim,
        num_layers=size.prior.num_layers,
        embedding_dim=size.clip.embedding_dim,
        num_embeddings=size.clip.max_length,
    )


def text_projection(size: UnCLIPSize = TINY_UNCLIP) -> UnCLIPTextProjection:
    return UnCLIPTextProjection(
        clip_extra_context_tokens=size.decoder.extra_context_tokens,
        clip_embeddings_dim=size.clip.embedding_dim,
        time_embed_dim=4 * size.decoder.block_out_channels[0],
        cross_attention_dim=size.decoder.cross_attention_dim,
    )


def decoder_unet(size: DecoderSize = TINY_UNCLIP.decoder) -> UNet2DConditionModel:
    """Karlo-style decoder: GLIDE's UNet with the additive CLIP time embedding as identity
    ``class_labels`` and cross-attention on ``text_proj``'s context tokens."""
    levels = tuple(size.attention_levels)
    if len(levels) != len(size.block_out_channels):
        raise ValueError(
            f"attention_levels={levels} must have one entry per block_out_channels={size.block_out_channels}"
        )
    pixels = 3 * size.unshuffle_factor**2
    return UNet2DConditionModel(
        sample_size=size.sample_size,
        in_channels=pixels,
        out_channels=2 * pixels if size.learned_variance else pixels,
        down_block_types=tuple("SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in levels),
        up_block_types=tuple("SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(levels)),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=tuple(size.block_out_channels),
        layers_per_block=size.layers_per_block,
        cross_attention_dim=size.cross_attention_dim,
        attention_head_dim=size.attention_head_dim,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
        norm_num_groups=math.gcd(32, min(size.block_out_channels)),  # 32 as Karlo where it divides
    )


def sr_unet(size: SRSize = TINY_UNCLIP.sr) -> UNet2DModel:
    """Karlo-style super-resolution UNet on ``[x_t, bicubic-upsampled decoder image]``."""
    n = len(size.block_out_channels)
    return UNet2DModel(
        sample_size=size.sample_size,
        in_channels=6,
        out_channels=3,
        down_block_types=("ResnetDownsampleBlock2D",) * n,
        up_block_types=("ResnetUpsampleBlock2D",) * n,
        block_out_channels=tuple(size.block_out_channels),
        layers_per_block=size.layers_per_block,
        resnet_time_scale_shift="scale_shift",
        norm_num_groups=math.gcd(32, min(size.block_out_channels)),  # 32 as Karlo where it divides
    )


# ---------------------------------------------------------------------- schedulers (Karlo's)
def prior_scheduler() -> UnCLIPScheduler:
    """The prior predicts ``z_i`` itself (x0), clipped to +-5 (Karlo's setting)."""
    return UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0)


def decoder_scheduler(size: DecoderSize = TINY_UNCLIP.decoder) -> UnCLIPScheduler:
    variance = "learned_range" if size.learned_variance else "fixed_small_log"
    return UnCLIPScheduler(variance_type=variance, prediction_type=size.prediction_type)


def super_res_scheduler(size: SRSize = TINY_UNCLIP.sr) -> UnCLIPScheduler:
    return UnCLIPScheduler(variance_type="fixed_small_log", prediction_type=size.prediction_type)


def build_components(size: UnCLIPSize = TINY_UNCLIP, words=SHAPES_WORDS) -> dict:
    """All components of an unCLIP cascade, keyed by Karlo's names (random weights: seed torch
    first), plus ``unshuffle_factor``."""
    tokenizer = clip_word_tokenizer(words, model_max_length=size.clip.max_length)
    parts = dict(
        tokenizer=tokenizer,
        text_encoder=clip_text_encoder(len(tokenizer), size.clip, eos_token_id=tokenizer.eos_token_id).eval(),
        prior=prior_transformer(size),
        text_proj=text_projection(size),
        decoder=decoder_unet(size.decoder),
        prior_scheduler=prior_scheduler(),
        decoder_scheduler=decoder_scheduler(size.decoder),
        unshuffle_factor=size.decoder.unshuffle_factor,
    )
    if size.sr is not None:
        parts.update(
            super_res_first=sr_unet(size.sr), super_res_last=sr_unet(size.sr), super_res_scheduler=super_res_scheduler(size.sr)
        )
    return parts
