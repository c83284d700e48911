"""unCLIP's text/image projection for the decoder (Ramesh et al. 2022, "Hierarchical
Text-Conditional Image Generation with CLIP Latents", sec. 2.1).

The decoder is GLIDE's UNet conditioned on a CLIP image embedding ``z_i`` in two ways: ``z_i``
(and the pooled CLIP text embedding ``z_t``) is projected and *added to the timestep
embedding*, and ``z_i`` is projected into ``clip_extra_context_tokens`` extra tokens
*concatenated to the text tokens* the UNet cross-attends to. For classifier-free guidance the
unconditional image embedding is a learned vector.

:class:`UnCLIPTextProjection` has the config fields, parameter names and forward semantics of
diffusers' (deprecated) ``UnCLIPTextProjModel``, so Karlo's ``text_proj/`` weights load into it
with ``from_pretrained``; it is written here so that imagen-lite does not depend on diffusers'
deprecated pipelines package.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class UnCLIPTextProjection(ModelMixin, ConfigMixin):
    """Project CLIP embeddings into the decoder's time embedding and context tokens.

    Config (names as in Karlo's ``text_proj/config.json``):
        clip_extra_context_tokens: how many context tokens ``z_i`` becomes (unCLIP: 4).
        clip_embeddings_dim: CLIP embedding width (image and pooled text; Karlo: 768). The text
            encoder's token states have the same width.
        time_embed_dim: the decoder's time embedding width (``4 * block_out_channels[0]``).
        cross_attention_dim: the decoder's cross-attention width.
    """

    @register_to_config
    def __init__(
        self,
        *,
        clip_extra_context_tokens: int = 4,
        clip_embeddings_dim: int = 768,
        time_embed_dim: int,
        cross_attention_dim: int,
    ):
        super().__init__()
        # the unconditional z_i for classifier-free guidance
        self.learned_classifier_free_guidance_embeddings = nn.Parameter(torch.zeros(clip_embeddings_dim))

        # z_t and z_i -> additive time embedding
        self.embedding_proj = nn.Linear(clip_embeddings_dim, time_embed_dim)
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(clip_embeddings_dim, time_embed_dim)

        # z_i -> extra context tokens; text token states -> cross-attention width
        self.clip_extra_context_tokens = clip_extra_context_tokens
        self.clip_extra_context_tokens_proj = nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)
        self.encoder_hidden_states_proj = nn.Linear(clip_embeddings_dim, cross_attention_dim)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(cross_attention_dim)

    def forward(
        self,
        *,
        image_embeddings: torch.Tensor,
        prompt_embeds: torch.Tensor,
        text_encoder_hidden_states: torch.Tensor,
        do_classifier_free_guidance: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Build the decoder's conditioning.

        Args:
            image_embeddings: (B, D) CLIP image embeddings ``z_i``.
            prompt_embeds: (B', D) pooled CLIP text embeddings ``z_t``; with guidance B' = 2B,
                the unconditional half first.
            text_encoder_hidden_states: (B', L, D) CLIP text token states.
            do_classifier_free_guidance: prepend the learned unconditional ``z_i`` (B of them).

        Returns:
            ``(context, time_embeddings)``: (B', K + L, cross_attention_dim) tokens -- the K extra
            image tokens first -- and (B', time_embed_dim), passed to the decoder as
            ``encoder_hidden_states`` and ``class_labels`` (``class_embed_type="identity"``).
        """
        if do_classifier_free_guidance:
            uncond = self.learned_classifier_free_guidance_embeddings.unsqueeze(0).expand(image_embeddings.shape[0], -1)
            image_embeddings = torch.cat([uncond, image_embeddings], dim=0)
        if image_embeddings.shape[0] != prompt_embeds.shape[0]:
            raise ValueError(
                f"image_embeddings has batch {image_embeddings.shape[0]} (after guidance) but prompt_embeds has "
                f"{prompt_embeds.shape[0]}; they must match"
            )
        batch = prompt_embeds.shape[0]

        # "projecting and adding CLIP embeddings to the existing timestep embedding"
        time_embeddings = self.embedding_proj(prompt_embeds) + self.clip_image_embeddings_project_to_time_embeddings(
            image_embeddings
        )  # (B', T)

        # "projecting CLIP embeddings into four extra tokens of context"
        extra = self.clip_extra_context_tokens_proj(image_embeddings)  # (B', K * C)
        extra = extra.reshape(batch, -1, self.clip_extra_context_tokens).permute(0, 2, 1)  # (B', K, C)

        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_encoder_hidden_states))
        return torch.cat([extra, text], dim=1), time_embeddings
