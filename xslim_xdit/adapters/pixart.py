"""PixArt-Alpha/Sigma (``PixArtTransformer2DModel``): adaLN-single blocks, self-attention over image
tokens plus cross-attention to the text condition (the text is a condition, not a stream)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .attention import SelfAttnTokenProcessor, TokenContext
from .base import BlockCall, BlockStack, ModelAdapter, register_adapter


@register_adapter
class PixArtAdapter(ModelAdapter):
    name = "pixart"
    model_class_names = ("PixArtTransformer2DModel",)

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
