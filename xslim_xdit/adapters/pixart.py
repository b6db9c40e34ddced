"""PixArt-Alpha/Sigma (``PixArtTransformer2DModel``): adaLN-single blocks, self-attention over image
tokens plus cross-attention to the text condition (the text is a condition, not a stream)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .attention import SelfAttnTokenProcessor, TokenContext
from .base import BlockCall, BlockStack, ModelAdapter, register_adapter


@register_adapter
class PixArtAdapter(ModelAdapter):
    name = "pixart"
    model_class_names = ("PixArtTransformer2DModel",)
    tiny_config = MappingProxyType(
        dict(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=4,
            sample_size=8,
            patch_size=2,
            cross_attention_dim=16,
            caption_channels=24,
            norm_type="ada_norm_single",
            use_additional_conditions=False,
        )
    )

    def tiny_inputs(self, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, dict[str, Any]]:
        """8x8 latents (16 patch tokens) and 6 caption tokens per sample."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 4, 8, 8, generator=g)
        return x, {
            "encoder_hidden_states": torch.randn(batch, 6, 24, generator=g),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }

    def stacks(self, model: nn.Module) -> list[BlockStack]:
        return [BlockStack("blocks", model.transformer_blocks)]

    def modulated_input(self, block: nn.Module, call: BlockCall) -> torch.Tensor:
        h = call.img
        t = call.bound.arguments["timestep"]
        shift_msa, scale_msa = (block.scale_shift_table[None] + t.reshape(h.shape[0], 6, -1)).chunk(6, dim=1)[
            :2
        ]
        return block.norm1(h) * (1 + scale_msa) + shift_msa

    def self_attention(self, block: nn.Module) -> nn.Module:
        return block.attn1

    def token_processor(self, attn: nn.Module, stack: BlockStack, ctx: TokenContext) -> Any:
        return SelfAttnTokenProcessor(attn.processor, ctx, "none")
